"""Small hand-built graphs for fast tests of partial rotary embeddings (StableLM, Phi-2, GPT-NeoX:
only the first r of each head's d dims rotated, q = Concat(rotary(q[..., :r]), q[..., r:])) and of
a parallel transformer block (Phi-2: x + attn(LN(x)) + mlp(LN(x))).

The attention is decoder_graphs.decoder_attention's (grouped-query, KV cache) with head dim
`head_dim` and cos and sin (1, 1, N, r) as graph inputs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from decoder_graphs import declared_and_past, decoder_io
from graphs import Builder

HEADS, TOKENS = 4, 5
_END = 2 ** 62


def _i64(b: Builder, *values: int) -> str:
    return b.const(np.array(values, dtype=np.int64))


def _partial_rotate(b: Builder, x: str, rotated: int, literal: bool, runtime_half: bool) -> str:
    """Concat(x[..., :r]·cos + rotate_half(x[..., :r])·sin, x[..., r:]); `literal` False: the split
    point r read from the cos table's shape at run time; `runtime_half`: rotate_half's split read
    from x[..., :r]'s shape at run time (as the legacy exporter writes it)."""
    split = _i64(b, rotated) if literal else b.op("Slice", [b.op("Shape", ["cos"]), _i64(b, -1), _i64(b, _END)])
    first, rest = b.op("Slice", [x, _i64(b, 0), split, _i64(b, -1)]), b.op("Slice", [x, split, _i64(b, _END), _i64(b, -1)])
    half = b.op("Div", [b.op("Slice", [b.op("Shape", [first]), _i64(b, -1), _i64(b, _END)]), _i64(b, 2)]) \
        if runtime_half else _i64(b, rotated // 2)
    low = b.op("Slice", [first, _i64(b, 0), half, _i64(b, -1)])
    high = b.op("Slice", [first, half, _i64(b, _END), _i64(b, -1)])
    turned = b.op("Concat", [b.op("Neg", [high]), low], axis=-1)
    spun = b.op("Add", [b.op("Mul", [first, "cos"]), b.op("Mul", [turned, "sin"])])
    return b.op("Concat", [spun, rest], axis=-1)


def partial_rotary_attention(kv_heads: int = 2, head_dim: int = 8, rotated: int = 4, literal: bool = True,
                             runtime_half: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Separate q, k, v projections; a partial rotary embedding on q and k; k and v joined with the
    KV cache, then repeated for the query heads."""
    b = Builder(seed, opset=18)
    width = HEADS * head_dim

    def heads(t: str, count: int) -> str:
        return b.op("Transpose", [b.op("Reshape", [t, _i64(b, 0, 0, count, head_dim)])], perm=[0, 2, 1, 3])

    q, k = heads(b.linear("x", width, width), HEADS), heads(b.linear("x", width, kv_heads * head_dim), kv_heads)
    v = heads(b.linear("x", width, kv_heads * head_dim), kv_heads)
    q, k = (_partial_rotate(b, t, rotated, literal, runtime_half) for t in (q, k))
    b.nodes.append(helper.make_node("Concat", ["past_key", k], ["present_key"], name="cache_key", axis=2))
    b.nodes.append(helper.make_node("Concat", ["past_value", v], ["present_value"], name="cache_value", axis=2))
    k, v = "present_key", "present_value"
    if kv_heads != HEADS:  # repeat_kv as transformers exports it
        def repeat(t: str) -> str:
            shape = b.op("Shape", [t])
            target = b.op("Concat", [b.op("Slice", [shape, _i64(b, 0), _i64(b, 2)]), _i64(b, HEADS // kv_heads),
                                     b.op("Slice", [shape, _i64(b, 2), _i64(b, 4)])], axis=0)
            return b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, _i64(b, 2)]), target]),
                                    _i64(b, 0, HEADS, -1, head_dim)])

        k, v = repeat(k), repeat(v)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = b.op("Softmax", [b.op("Mul", [scores, b.const(np.array(head_dim ** -0.5, dtype=np.float32))])], axis=-1)
    context = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), _i64(b, 0, 0, width)])
    b.nodes.append(helper.make_node("Identity", [b.linear(context, width, width)], ["y"], name="output"))
    inputs, outputs = decoder_io(width, kv_heads, head_dim, [1, 1, None, rotated])
    graph = helper.make_graph(b.nodes, "partial_rotary", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def feed(model: onnx.ModelProto, tokens: int, past: dict[str, np.ndarray] | None = None, seed: int = 1
         ) -> dict[str, np.ndarray]:
    """x for `tokens` new positions after the cached ones, with their angles (base 10000)."""
    rng = np.random.default_rng(seed)
    declared, past = declared_and_past(model, past)
    start, rotated = next(iter(past.values())).shape[2], declared["cos"][3]
    freqs = np.arange(start, start + tokens)[:, None] * 10000.0 ** (-np.arange(rotated // 2) * 2 / rotated)[None, :]
    per_dim = np.concatenate([freqs, freqs], -1)[None, None]
    return {"x": rng.standard_normal((1, tokens, declared["x"][2])).astype(np.float32), **past,
            "cos": np.cos(per_dim).astype(np.float32), "sin": np.sin(per_dim).astype(np.float32)}


def parallel_block(width: int = 16, head_dim: int = 4, hidden: int = 32, seed: int = 0) -> onnx.ModelProto:
    """One Phi-2-style parallel block: y = x + attn(LN(x)) + mlp(LN(x)) (a ReLU MLP:
    Phi-2's GELU(tanh) makes no difference to the match)."""
    b = Builder(seed, opset=18)
    normed = b.op("LayerNormalization", ["x", b.const(np.ones(width, np.float32)), b.const(np.zeros(width, np.float32))],
                  axis=-1)
    heads = width // head_dim

    def split(t: str) -> str:
        return b.op("Transpose", [b.op("Reshape", [t, _i64(b, 0, 0, heads, head_dim)])], perm=[0, 2, 1, 3])

    q, k, v = (split(b.linear(normed, width, width)) for _ in range(3))
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = b.op("Softmax", [b.op("Mul", [scores, b.const(np.array(head_dim ** -0.5, dtype=np.float32))])], axis=-1)
    context = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), _i64(b, 0, 0, width)])
    attention = b.linear(context, width, width)
    mlp = b.linear(b.op("Relu", [b.linear(normed, width, hidden)]), hidden, width)
    y = b.op("Add", [b.op("Add", [attention, mlp]), "x"])
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    graph = helper.make_graph(b.nodes, "parallel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
