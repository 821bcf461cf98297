"""A decoder's KV cache as calibration and timing feed it: which inputs are caches, what an empty
one is (a ring buffer's is its capacity of zero slots), which outputs are caches, and the empty
caches reshaped to what a pruned model's session declares."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from ..ir.graph import ModelGraph, attribute

if TYPE_CHECKING:
    from .calibration import InputSpec


def op_cache_shapes(g: ModelGraph) -> dict[str, tuple[tuple[int | None, ...], int]]:
    """(batch, kv heads, past, head size) of the past inputs of GroupQueryAttention ops, whose
    declared head size onnxruntime-genai leaves symbolic, and each one's ring-buffer capacity: a
    sliding-window layer written with `sliding_window_cache` (onnxruntime-genai's Gemma 3) keeps
    `local_window_size` slots and refuses a smaller past, even an empty one."""
    shapes = {}
    for node in g.nodes_of_type("GroupQueryAttention"):
        if len(node.input) < 5:
            continue
        heads, kv_heads = attribute(node, "num_heads", 0), attribute(node, "kv_num_heads", 0)
        packed = g.dim(node.input[0], -1)  # unknown where a MatMulNBits makes it
        separate = len(node.input) > 2 and node.input[1]
        size = (packed // heads if separate else packed // (heads + 2 * kv_heads)) if heads and kv_heads and packed \
            else None
        window = attribute(node, "local_window_size", -1) if attribute(node, "sliding_window_cache", 0) else 0
        for past in node.input[3:5]:
            if past:
                shapes[past] = ((None, kv_heads or None, None, size), max(window, 0))
    return shapes


def is_past_cache(spec: InputSpec) -> bool:
    """A decoder's KV cache input (past_key_values.*, past_key.*, …): float, 4-D or more, with a
    dynamic past-length axis. Calibration is prefill: it gets past length 0."""
    lowered = spec.name.lower()
    return "past" in lowered and spec.dtype.kind == "f" and len(spec.shape) >= 4 and \
        any(not (isinstance(d, int) and d > 0) for d in spec.shape[1:])


def empty_cache(spec: InputSpec, samples: int) -> np.ndarray:
    """An empty KV cache for `samples` prefill samples: every dynamic axis after the batch is 0 (a
    ring buffer's past axis: its capacity of zero slots, which the attention mask leaves unread)."""
    shape = [samples] + [d if isinstance(d, int) and d > 0 else 0 for d in spec.shape[1:]]
    if spec.capacity and len(shape) == 4:  # (batch, kv heads, past, head size)
        shape[2] = spec.capacity
    return np.zeros(shape, dtype=spec.dtype)


def cache_outputs(model: onnx.ModelProto) -> set[str]:
    """The graph outputs that are a decoder's KV cache: a Concat of a graph input (the past) with
    this step's keys or values, or the present outputs of an attention op."""
    graph_inputs = {i.name for i in model.graph.input}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)

    # how a static int8 model rounds a cache, an fp16 one with float32 inputs and outputs casts it,
    # or a sliding-window one keeps its last positions
    rounding = ("QuantizeLinear", "DequantizeLinear", "Cast", "Slice")

    def source(tensor: str) -> str:
        """What `tensor` rounds, through up to two rounding ops."""
        for _ in range(2):
            node = producers.get(tensor)
            if node is None or node.op_type not in rounding:
                break
            tensor = node.input[0]
        return tensor

    def rounded(tensor: str) -> set[str]:
        """`tensor` and what it is rounded into, through up to two rounding ops."""
        found = {tensor}
        for _ in range(2):
            found |= {o for t in found for n in readers.get(t, []) if n.op_type in rounding for o in n.output}
        return found

    found = set()
    for node in model.graph.node:
        if node.op_type in ("Concat", "QLinearConcat") and any(source(t) in graph_inputs for t in node.input):
            found |= rounded(node.output[0])
        elif node.op_type in ("GroupQueryAttention", "MultiHeadAttention", "Attention"):
            found.update(node.output[1:])
    return found & {o.name for o in model.graph.output}


def fitted(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` with every empty input (a KV cache at past length 0, or a ring buffer's zero slots)
    in the shape this session declares: a pruned decoder's caches are narrower than the original's."""
    declared = {i.name: i.shape for i in sess.get_inputs()}
    result = dict(feed)
    for name, value in feed.items():
        shape = declared.get(name)
        empty = value.size == 0 or (value.ndim >= 4 and not value.any())
        if empty and shape is not None and len(shape) == value.ndim:
            result[name] = np.zeros([d if isinstance(d, int) else n for d, n in zip(shape, value.shape)], value.dtype)
    return result
