"""Small hand-built decoder attentions for fast unit tests of the decoder rules: grouped-query
attention (key/value heads repeated by Unsqueeze → Expand → Reshape), rotary embeddings written
out (rotate_half or interleaved), KV caches (past keys/values in, present ones out).

x (B, N, D) → attention → output projection → y; cos and sin (1, 1, N, d) are graph inputs, so
that a decode step can give the angles of its own positions."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphs import Builder

HEADS, HEAD_DIM = 4, 4
WIDTH = HEADS * HEAD_DIM


# rotate_half with one Split: its sizes input ("uneven": not two halves, which no rule matches)
sizes_of_halves = {"half-split": (HEAD_DIM // 2, HEAD_DIM // 2), "half-split-uneven": (1, HEAD_DIM - 1)}


def _rotate(b: Builder, x: str, style: str, heads: int | None = None, recast: bool = False) -> str:
    """x·cos + rotate(x)·sin; `heads`: the interleaved pairs flattened back with a literal head
    count and head dim in the target shape (Cohere's export), else with (0, 0, 0, −1); `recast`:
    x cast to float for x·cos and cast again for rotate(x) (ModernBERT's legacy export);
    "ort-op…" styles: com.microsoft.RotaryEmbedding (the transformers optimizer's fusion)."""
    if style.startswith("ort-op"):
        half = HEAD_DIM // 2
        angle = np.arange(64)[:, None] * 10000.0 ** (-np.arange(half) * 2 / HEAD_DIM)
        caches = [b.const(np.cos(angle).astype(np.float32)), b.const(np.sin(angle).astype(np.float32))]
        partial = {"rotary_embedding_dim": half} if style == "ort-op-partial" else {}
        return b.op("RotaryEmbedding", [x, "position_ids", *caches], domain="com.microsoft", **partial)
    plain = b.op("Cast", [x], to=TensorProto.FLOAT) if recast else x
    turned = _turned(b, b.op("Cast", [plain], to=TensorProto.FLOAT) if recast else x, style, heads)
    return b.op("Add", [b.op("Mul", [plain, "cos"]), b.op("Mul", [turned, "sin"])])


def _turned(b: Builder, x: str, style: str, heads: int | None) -> str:
    """rotate_half(x) (its halves taken by two Slices, or by one Split as onnxruntime's session
    optimizer saves it), or its interleaved form."""
    i64 = lambda *v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    half = HEAD_DIM // 2
    if style == "half":
        low = b.op("Slice", [x, i64(0), i64(half), i64(-1)])
        high = b.op("Slice", [x, i64(half), i64(2 ** 62), i64(-1)])
        return b.op("Concat", [b.op("Neg", [high]), low], axis=-1)
    if style.startswith("half-split"):
        sizes = [] if style == "half-split-equal" else [i64(*sizes_of_halves[style])]
        low, high = b.op("Split", [x, *sizes], outputs=2, axis=-1,
                         **({"num_outputs": 2} if style == "half-split-equal" else {}))
        return b.op("Concat", [b.op("Neg", [high]), low], axis=-1)
    even = b.op("Slice", [x, i64(0), i64(2 ** 62), i64(-1), i64(2)])
    odd = b.op("Slice", [x, i64(1), i64(2 ** 62), i64(-1), i64(2)])
    pair = b.op("Concat", [b.op("Unsqueeze", [b.op("Neg", [odd]), i64(-1)]), b.op("Unsqueeze", [even, i64(-1)])],
                axis=-1)
    return b.op("Reshape", [pair, i64(0, heads, 0, HEAD_DIM) if heads else i64(0, 0, 0, -1)])


def _rms_norm(b: Builder, x: str, width: int) -> str:
    """An RMSNorm over the last axis, written out as transformers' exports do, with a weight γ."""
    f32 = lambda v: b.const(np.array(v, dtype=np.float32))  # noqa: E731
    mean = b.op("ReduceMean", [b.op("Pow", [x, f32(2.0)]), b.const(np.array([-1], dtype=np.int64))], keepdims=1)
    scaled = b.op("Mul", [x, b.op("Div", [f32(1.0), b.op("Sqrt", [b.op("Add", [mean, f32(1e-6)])])])])
    return b.op("Mul", [scaled, f32(b.rng.uniform(0.5, 1.5, width))])


def _heads(b: Builder, t: str, heads: int) -> str:
    shaped = b.op("Reshape", [t, b.const(np.array([0, 0, heads, HEAD_DIM], dtype=np.int64))])
    return b.op("Transpose", [shaped], perm=[0, 2, 1, 3])


def _repeat(b: Builder, t: str, kv_heads: int) -> str:
    """(B, Hkv, T, d) → (B, H, T, d), as transformers' repeat_kv exports."""
    if kv_heads == HEADS:
        return t
    shape = b.op("Shape", [t])
    i64 = lambda *v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    front, back = b.op("Slice", [shape, i64(0), i64(2)]), b.op("Slice", [shape, i64(2), i64(4)])
    target = b.op("Concat", [front, i64(HEADS // kv_heads), back], axis=0)
    expanded = b.op("Expand", [b.op("Unsqueeze", [t, i64(2)]), target])
    return b.op("Reshape", [expanded, i64(0, HEADS, -1, HEAD_DIM)])


def decoder_io(width: int, kv_heads: int, head_dim: int, table: list) -> tuple[list, list]:
    """The graph inputs (x, cos and sin of shape `table`, the past keys and values) and outputs
    (y, the present keys and values) of a hand-built decoder attention."""
    cache = [1, kv_heads, None, head_dim]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, width]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, table),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, table),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "present_key", "present_value")]
    return inputs, outputs


def decoder_attention(kv_heads: int = 2, rotary: str | None = "half", seed: int = 0,
                      qk_norm: str | None = None, fused: bool = False, window: int = 0,
                      window_axis: int = 2, literal_heads: bool = False, recast: bool = False,
                      softcap: tuple[float, float] | None = None) -> onnx.ModelProto:
    """Separate q, k, v projections; rotary on q and k; k and v joined with the KV cache, then
    repeated for the query heads (unless kv_heads == 1: the score MatMul broadcasts). `qk_norm`:
    an RMSNorm on q and k over each head ("head": Qwen3, Gemma 3) or over all heads ("all": OLMo 2).
    `fused`: one q | k | v projection taken apart by three Slices along its features (Phi-3).
    `window`: a sliding-window cache, as torch's dynamo exporter writes transformers' (the past
    sliced to its last window − 1 positions before the join, the present after it), along
    `window_axis` (2, the sequence; another axis makes no cache). `literal_heads`: the interleaved
    rotary's flattening Reshape holds the head count and head dim as literals (Cohere). `recast`:
    q and k cast for x·cos and cast again for rotate(x) (ModernBERT's legacy export). `softcap`:
    the scores put through outer·tanh(s / inner) before the softmax (Gemma 2 where they agree)."""
    b = Builder(seed, opset=18)
    kv_width = kv_heads * HEAD_DIM
    if fused:
        qkv = b.linear("x", WIDTH, WIDTH + 2 * kv_width)
        bounds = [0, WIDTH, WIDTH + kv_width, 2 ** 63 - 1]
        q, k, v = (b.op("Slice", [qkv, b.const(np.array([start], dtype=np.int64)), b.const(np.array([end], dtype=np.int64)),
                                  b.const(np.array([-1], dtype=np.int64))]) for start, end in zip(bounds, bounds[1:]))
    else:
        q, k = b.linear("x", WIDTH, WIDTH), b.linear("x", WIDTH, kv_width)
    if qk_norm == "all":
        q, k = _rms_norm(b, q, WIDTH), _rms_norm(b, k, kv_width)
    q, k = _heads(b, q, HEADS), _heads(b, k, kv_heads)
    if qk_norm == "head":
        q, k = _rms_norm(b, q, HEAD_DIM), _rms_norm(b, k, HEAD_DIM)
    v = _heads(b, v if fused else b.linear("x", WIDTH, kv_width), kv_heads)
    if rotary is not None:
        q = _rotate(b, q, rotary, HEADS if literal_heads else None, recast)
        k = _rotate(b, k, rotary, kv_heads if literal_heads else None, recast)
    joined = ("present_key", "present_value") if not window else ("joined_key", "joined_value")
    past = ("past_key", "past_value")
    if window:
        last = [b.const(np.array(v, dtype=np.int64)) for v in ([1 - window], [2 ** 62], [window_axis])]
        past = tuple(b.op("Slice", [name, *last]) for name in past)
    b.nodes.append(helper.make_node("Concat", [past[0], k], [joined[0]], name="cache_key", axis=2))
    b.nodes.append(helper.make_node("Concat", [past[1], v], [joined[1]], name="cache_value", axis=2))
    if window:
        for name, present in zip(joined, ("present_key", "present_value")):
            b.nodes.append(helper.make_node("Slice", [name, *last], [present], name=f"keep_{present}"))
    if kv_heads > 1:
        k, v = _repeat(b, joined[0], kv_heads), _repeat(b, joined[1], kv_heads)
    else:
        k, v = joined
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scaled = b.op("Mul", [scores, b.const(np.array(HEAD_DIM ** -0.5, dtype=np.float32))])
    if softcap is not None:  # Gemma 2: (inner, outer) · tanh(s / inner), a soft cap where the two agree
        inner, outer = (b.const(np.array(v, dtype=np.float32)) for v in softcap)
        scaled = b.op("Mul", [b.op("Tanh", [b.op("Div", [scaled, inner])]), outer])
    probs = b.op("Softmax", [scaled], axis=-1)  # no causal mask: the rules do not care
    context = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]),
                               b.const(np.array([0, 0, WIDTH], dtype=np.int64))])
    b.nodes.append(helper.make_node("Identity", [b.linear(context, WIDTH, WIDTH)], ["y"], name="output"))
    inputs, outputs = decoder_io(WIDTH, kv_heads, HEAD_DIM, [1, 1, None, HEAD_DIM])
    opsets = [helper.make_opsetid("", 18)]
    if rotary and rotary.startswith("ort-op"):  # the op reads positions and holds its tables
        inputs = inputs[:1] + [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, None])] + inputs[3:]
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(b.nodes, "decoder", inputs if rotary else inputs[:1] + inputs[3:], outputs, b.inits)
    return helper.make_model(graph, opset_imports=opsets)


def angles(positions: np.ndarray, style: str | None) -> dict[str, np.ndarray]:
    """cos and sin (1, 1, N, d) of a rotary embedding at `positions` (base 10000)."""
    if style is None:
        return {}
    if style.startswith("ort-op"):  # RotaryEmbedding's own caches, read at these positions
        return {"position_ids": positions[None].astype(np.int64)}
    pairs = 10000.0 ** (-np.arange(HEAD_DIM // 2) * 2 / HEAD_DIM)
    freqs = positions[:, None] * pairs[None, :]
    per_dim = np.repeat(freqs, 2, axis=-1) if style == "interleaved" else np.concatenate([freqs, freqs], -1)
    return {"cos": np.cos(per_dim)[None, None].astype(np.float32), "sin": np.sin(per_dim)[None, None].astype(np.float32)}


def declared_and_past(model: onnx.ModelProto, past: dict[str, np.ndarray] | None
                      ) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """The model's declared input shapes, and `past` — or, where None, its caches empty (no
    positions yet), shaped as declared."""
    declared = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    if past is None:
        past = {name: np.zeros((1, dims[1], 0, dims[3]), np.float32) for name, dims in declared.items()
                if name.startswith("past")}
    return declared, past


def feed(model: onnx.ModelProto, tokens: int, past: dict[str, np.ndarray] | None = None, style: str | None = "half",
         seed: int = 1) -> dict[str, np.ndarray]:
    """x for `tokens` new positions after the cached ones (empty caches, shaped as the model declares)."""
    rng = np.random.default_rng(seed)
    _, past = declared_and_past(model, past)
    start = next(iter(past.values())).shape[2]
    return {"x": rng.standard_normal((1, tokens, WIDTH)).astype(np.float32), **past,
            **angles(np.arange(start, start + tokens, dtype=np.float64), style)}


GQA_DIM = 32  # onnxruntime's GroupQueryAttention with rotary takes head sizes in multiples of 16


def group_query_attention(separate: bool = False, seed: int = 0, window: int = 0, ring: bool = False
                          ) -> onnx.ModelProto:
    """com.microsoft.GroupQueryAttention (4 query heads over 2 key/value heads of 32 dims) with its
    own rotary caches and KV cache, on a packed q|k|v projection (or three), as onnxruntime-genai's
    builder writes it; seqlens_k and total_sequence_length are graph inputs. `window`: a sliding
    window of that many positions, its cache a ring buffer of that capacity with `ring` (what the
    builder writes for Gemma 3's local layers)."""
    b = Builder(seed, opset=18)
    width, kv = HEADS * GQA_DIM, 2 * GQA_DIM
    if separate:
        qkv = [b.linear("x", width, width, bias=False), b.linear("x", width, kv, bias=False),
               b.linear("x", width, kv, bias=False)]
    else:
        qkv = [b.linear("x", width, width + 2 * kv, bias=False), "", ""]
    pairs = 10000.0 ** (-np.arange(GQA_DIM // 2) * 2 / GQA_DIM)
    angles = np.arange(64)[:, None] * pairs[None, :]
    cos, sin = b.const(np.cos(angles).astype(np.float32)), b.const(np.sin(angles).astype(np.float32))
    b.nodes.append(helper.make_node(
        "GroupQueryAttention", qkv + ["past_key", "past_value", "seqlens_k", "total_sequence_length", cos, sin],
        ["context", "present_key", "present_value"], name="gqa", domain="com.microsoft", num_heads=HEADS,
        kv_num_heads=2, do_rotary=1, **({"local_window_size": window} if window else {}),
        **({"sliding_window_cache": 1} if ring else {})))
    b.nodes.append(helper.make_node("Identity", [b.linear("context", width, width)], ["y"], name="output"))
    cache = [1, 2, None, GQA_DIM]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, width]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "present_key", "present_value")]
    graph = helper.make_graph(b.nodes, "gqa", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def gqa_feed(model: onnx.ModelProto, tokens: int, past: dict[str, np.ndarray] | None = None, seed: int = 1
             ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    declared, past = declared_and_past(model, past)
    total = next(iter(past.values())).shape[2] + tokens
    return {"x": rng.standard_normal((1, tokens, declared["x"][2])).astype(np.float32), **past,
            "seqlens_k": np.array([total - 1], np.int32), "total_sequence_length": np.array(total, np.int32)}


def rotary_op_attention(kv_heads: int = 2, interleaved: bool = False, position_ids: bool = False, seed: int = 0
                        ) -> onnx.ModelProto:
    """What torch's dynamo exporter writes at opset 23: ONNX's RotaryEmbedding on the head-split q
    and k (cos and sin (1, N, d/2) graph inputs, one column per pair for every head), k and v
    joined with the KV cache and repeated for the query heads, ONNX's Attention on 4-D inputs
    with its scale. `position_ids`: the op indexes (positions, d/2) caches itself instead."""
    b = Builder(seed, opset=23)
    q, k = b.linear("x", WIDTH, WIDTH), b.linear("x", WIDTH, kv_heads * HEAD_DIM)
    q, k = _heads(b, q, HEADS), _heads(b, k, kv_heads)
    v = _heads(b, b.linear("x", WIDTH, kv_heads * HEAD_DIM), kv_heads)
    tables = ["cos", "sin"] + (["position_ids"] if position_ids else [])
    q, k = (b.op("RotaryEmbedding", [t, *tables], interleaved=int(interleaved), num_heads=heads)
            for t, heads in ((q, HEADS), (k, kv_heads)))
    b.nodes.append(helper.make_node("Concat", ["past_key", k], ["present_key"], name="cache_key", axis=2))
    b.nodes.append(helper.make_node("Concat", ["past_value", v], ["present_value"], name="cache_value", axis=2))
    k, v = _repeat(b, "present_key", kv_heads), _repeat(b, "present_value", kv_heads)
    context = b.op("Attention", [q, k, v], scale=HEAD_DIM ** -0.5)
    merged = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]),
                              b.const(np.array([0, 0, WIDTH], dtype=np.int64))])
    b.nodes.append(helper.make_node("Identity", [b.linear(merged, WIDTH, WIDTH)], ["y"], name="output"))
    inputs, _ = decoder_io(WIDTH, kv_heads, HEAD_DIM, [None, HEAD_DIM // 2] if position_ids else [1, None, HEAD_DIM // 2])
    if position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, None]))
    cache = [1, kv_heads, None, HEAD_DIM]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
               (("y", [1, None, WIDTH]), ("present_key", cache), ("present_value", cache))]
    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def rotary_op_feed(model: onnx.ModelProto, tokens: int, past: dict[str, np.ndarray] | None = None,
                   seed: int = 1) -> dict[str, np.ndarray]:
    """`feed` with the op's caches: cos and sin (1, N, d/2) at the new positions, one column per pair."""
    fed = feed(model, tokens, past, None, seed)
    start = fed["past_key"].shape[2]
    pairs = 10000.0 ** (-np.arange(HEAD_DIM // 2) * 2 / HEAD_DIM)
    freqs = np.arange(start, start + tokens)[:, None] * pairs[None, :]
    return {**fed, "cos": np.cos(freqs)[None].astype(np.float32), "sin": np.sin(freqs)[None].astype(np.float32)}
