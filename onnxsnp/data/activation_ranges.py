"""A static QDQ model pruned on float activations, its activation pairs put back and their
ranges calibrated again.

quantize_static rounds activations through QuantizeLinear → DequantizeLinear pairs whose ranges
were calibrated on the float model. Pruning works on a view without them (`activation_view`),
as a weight-only int8 model, for two reasons measured on all-MiniLM-L6-v2 (--target-flops 0.7):
refits made through the old pairs learn their clipping, and once the pairs are calibrated
again for the pruned model that learning is wrong (cosine to fp32 0.834 against 0.866 pruned
on the view); and the user's other route, quantizing the pruned float model, calibrates on
float activations too. After the rewrite the pairs go back on the same tensors (`restore`).

After pruning, each pair is rescaled by how the range of its input moved (`recalibrated`): both
models run on the calibration samples with float activations (as the quantizer calibrated
them; measured through the pairs, a range that grew would be clipped by the pair before it),
and each end of the pair's range is scaled by the ratio of the pruned model's observed end to
the original's. Pruning moves ranges — projected Q/K carry what the cut dimensions carried
(up to 2× on MiniLM), refits move sublayer outputs — and an old range clips or wastes levels.
For a MinMax calibration on the same samples the rescaled range is what recalibrating gives;
for a clipping one (percentile, entropy) the clip keeps its place relative to the range. A
symmetric pair (signed, zero point 0) stays symmetric; an asymmetric one keeps its zero point
(the quantizer's, where exact zero is a level) and takes the one scale that covers both rescaled
ends (on all-MiniLM-L6-v2 at --target-flops 0.7 a gap to quantize(prune(fp32)) of −0.0094
against −0.0101 with both ends fitted anew in QOperator form, −0.0091 against −0.0093 static
QDQ per tensor: docs/QUANTIZED.md); a range that moved less than MOVED keeps its parameters bit
for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..heap import release_heap
from .calibration import Runner, weight_file, without_initializers

# a range whose ends moved less than this (relative to its width) keeps its parameters: a
# calibration on other samples of the same data moves it about that much, and a rounding step
# changed for nothing changes outputs that pruning did not touch
MOVED = 0.02


# One sample a run, as the ranges were first measured with every paired activation fetched (4 GB
# at 8 windows of 128 tokens, SmolLM2-135M). Each tensor is now reduced in the graph, so a larger
# batch would cost little memory, but a range is a min and a max over the samples' activations,
# and a batch of another size may round those activations differently: one sample a run keeps
# the ranges (and the written scales) those runs gave.
RANGE_BATCH = 1
# The scalars each measured tensor adds to the ranges model (`_measuring`): its min, its max, and
# whether every element is a number (numpy's min of a tensor holding a NaN is NaN, which the
# running min and max pass over; onnxruntime's ReduceMin gives some element instead)
_REDUCED = ("::onnxsnp_min", "::onnxsnp_max", "::onnxsnp_numbers")


def _activation_pairs(model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """QuantizeLinear name → (activation, scale, zero point) for per-tensor pairs on activations."""
    constant = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                           for o in n.output}
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    pairs = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[0] in constant:
            continue
        if sizes.get(node.input[1]) == 1 and sizes.get(node.input[2]) == 1:
            pairs[node.name] = (node.input[0], node.input[1], node.input[2])
    return pairs


def _unrounded(model: onnx.ModelProto, pairs: dict[str, tuple[str, str, str]]) -> onnx.ModelProto:
    """`model` with its activation pairs bypassed: what the quantizer calibrated, a float model.
    Measured through the pairs, a range that grew would be clipped by the pair before it."""
    producers = {o: (i, n) for i, n in enumerate(model.graph.node) for o in n.output}
    bypass, dropped = {}, set()  # dropped: positions in the node list (nodes are unhashable messages)
    for index, node in enumerate(model.graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        at, quantize = producers.get(node.input[0], (None, None))
        if quantize is not None and quantize.name in pairs:
            bypass[node.output[0]] = quantize.input[0]
            dropped |= {index, at}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = [n for i, n in enumerate(copy.graph.node) if i not in dropped]
    for node in nodes:
        for index, tensor in enumerate(node.input):
            node.input[index] = bypass.get(tensor, tensor)
    for output in copy.graph.output:
        output.name = bypass.get(output.name, output.name)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _ranges(model: onnx.ModelProto, tensors: list[str], feed: dict[str, np.ndarray], batch: int,
            role: str) -> dict[str, tuple[float, float]]:
    """(min, max) of each tensor over `feed` with float activations, zero included (a
    quantizer's range always holds it). At most RANGE_BATCH samples a run (`batch` below that).

    The session hands back three scalars a tensor (`_measuring`), not the tensors: fetched, all
    513 paired activations of SmolLM2-135M were held at once for every run. The min and max of a
    float tensor are exact whichever code takes them: the same ranges to the bit. The weights go
    to the session through a file written one tensor at a time (WeightFile), not a proto copy."""
    low = {t: 0.0 for t in tensors}
    high = {t: 0.0 for t in tensors}
    pairs = _activation_pairs(model)  # read on the whole model: the light copy has no initializers
    file = weight_file(model)  # None for a small model: its weights travel with the graph
    try:
        measuring = _measuring(_unrounded(model if file is None else without_initializers(model), pairs), tensors)
        outputs = [t + suffix for t in tensors for suffix in _REDUCED]
        runner = Runner(measuring, outputs, role=role, weight_file=file, configure=_measuring_options)
    finally:
        if file is not None:
            file.close()  # onnxruntime has read the weights
    del measuring
    for _, values in runner.batches(feed, outputs, min(batch, RANGE_BATCH)):
        for tensor in tensors:
            smallest, largest, numbers = (values[tensor + suffix] for suffix in _REDUCED)
            # an empty tensor reduces to ±inf, which leaves the range as it was (as skipping it did)
            if numbers:
                low[tensor] = min(low[tensor], float(smallest))
                high[tensor] = max(high[tensor], float(largest))
    del runner
    release_heap()  # what the session's runs left in the heap, before the next session is built
    return {t: (low[t], high[t]) for t in tensors}


def _measuring_options(options: ort.SessionOptions) -> None:
    """The ranges session's options. Its default node order (a reverse depth-first walk from the
    outputs) ran the added reductions after the whole forward pass, every measured tensor alive
    to the end of the run; priority-based, each is reduced as it is made. Without the memory
    arena a run's buffers go back to the heap instead of being kept for the next. Measured on
    SmolLM2-135M's pruned QDQ model, one window a run, over the session's own +290 MB: +490 MB
    default, +170 MB priority-based, +100 MB with the arena off too. Neither changes a value:
    the nodes and their kernels are the same, run one at a time."""
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False


def _measuring(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """`model` (edited in place) with each tensor's min, max and whether it holds no NaN added
    as the outputs `_REDUCED` names: the tensors themselves are freed as the run goes."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = []
    for tensor in tensors:
        smallest, largest, numbers = (tensor + suffix for suffix in _REDUCED)
        # Equal reads every type a QuantizeLinear does from opset 11 (int32 and float16 too); IsNaN,
        # before that, only floats (opset 10's int32 inputs would fail the session, not pass)
        same = [helper.make_node("Equal", [tensor, tensor], [numbers + "::each"])] if opset >= 11 else \
            [helper.make_node("IsNaN", [tensor], [numbers + "::nan"]),
             helper.make_node("Not", [numbers + "::nan"], [numbers + "::each"])]
        nodes += [helper.make_node("ReduceMin", [tensor], [smallest], keepdims=0),
                  helper.make_node("ReduceMax", [tensor], [largest], keepdims=0), *same,
                  helper.make_node("Cast", [numbers + "::each"], [numbers + "::levels"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("ReduceMin", [numbers + "::levels"], [numbers], keepdims=0)]
    model.graph.node.extend(nodes)
    return model


def recalibrated(original: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict[str, np.ndarray],
                 batch: int, stands_for: dict[str, str] | None = None) -> onnx.ModelProto:
    """`pruned` with the activation pairs it shares (by QuantizeLinear name) with `original`
    rescaled to the ranges its activations have on `feed` (see the module docstring);
    `stands_for`: activation → the tensor whose range is measured for it (a KV cache's past
    input: its present)."""
    before, after = _activation_pairs(original), _activation_pairs(pruned)
    shared = sorted(set(before) & set(after))
    if not shared or not feed:
        return pruned
    if stands_for:
        before = {n: (stands_for.get(t, t), *rest) for n, (t, *rest) in before.items()}
        after = {n: (stands_for.get(t, t), *rest) for n, (t, *rest) in after.items()}
    old = _ranges(original, sorted({before[n][0] for n in shared}), feed, batch, "input model")
    new = _ranges(pruned, sorted({after[n][0] for n in shared}), feed, batch, "pruned model")
    initializers = {t.name: t for t in pruned.graph.initializer}
    readers: dict[str, int] = {}
    for node in pruned.graph.node:
        for t in set(node.input):
            readers[t] = readers.get(t, 0) + 1
    # onnxruntime gives a Reshape's or Transpose's output the parameters of its input: pairs that
    # share them are one range, the union of theirs
    groups: dict[tuple[str, str], list[str]] = {}
    for name in shared:
        groups.setdefault(after[name][1:], []).append(name)
    for (scale_name, zero_name), names in groups.items():
        scale_tensor, zero_tensor = initializers.get(scale_name), initializers.get(zero_name)
        # the group's own Qs and DQs read these; a parameter shared further is left alone
        if scale_tensor is None or zero_tensor is None or \
                max(readers.get(scale_name, 0), readers.get(zero_name, 0)) > 2 * len(names):
            continue
        a0, b0 = min(old[before[n][0]][0] for n in names), max(old[before[n][0]][1] for n in names)
        a1, b1 = min(new[after[n][0]][0] for n in names), max(new[after[n][0]][1] for n in names)
        if abs(a1 - a0) <= MOVED * (b0 - a0) and abs(b1 - b0) <= MOVED * (b0 - a0):
            continue
        scale = float(numpy_helper.to_array(scale_tensor))
        zero_array = numpy_helper.to_array(zero_tensor)
        info = np.iinfo(zero_array.dtype)
        zero = int(zero_array)
        if zero == 0 and info.min < 0:  # symmetric
            reach0, reach1 = max(-a0, b0), max(-a1, b1)
            if reach0 <= 0 or reach1 <= 0:
                continue
            new_scale, new_zero = scale * reach1 / reach0, 0
        else:
            low, high = (info.min - zero) * scale, (info.max - zero) * scale
            low = low * a1 / a0 if a0 < 0 else min(low, a1)
            high = high * b1 / b0 if b0 > 0 else max(high, b1)
            if high <= low:
                continue
            if info.min < zero < info.max:  # the input's zero point kept: one scale covers both ends
                new_scale, new_zero = max(low / (info.min - zero), high / (info.max - zero)), zero
                if new_scale <= 0:
                    continue
            else:
                new_scale = (high - low) / (info.max - info.min)
                new_zero = int(np.clip(np.round(info.min - low / new_scale), info.min, info.max))
        scale_tensor.CopyFrom(numpy_helper.from_array(
            np.asarray(new_scale, numpy_helper.to_array(scale_tensor).dtype).reshape(scale_tensor.dims), scale_name))
        zero_tensor.CopyFrom(numpy_helper.from_array(np.asarray(new_zero, zero_array.dtype).reshape(zero_tensor.dims),
                                                     zero_name))
    return pruned


@dataclass
class ActivationView:
    """The model pruning works on, and what puts the activation pairs back."""

    model: onnx.ModelProto  # pairs bypassed
    pairs: list[tuple[onnx.NodeProto, onnx.NodeProto, tuple[str, ...]]]  # Q, DQ, readers of the float tensor
    # a pair before a graph output (a decoder's present key or value): the view's tensor takes the
    # output's name, so the view's outputs stay the model's; graph output → the float tensor's name
    renamed: dict[str, str] = field(default_factory=dict)
    # a past key or value input's pair → the float present it continues: calibration feeds start
    # with empty caches, and in decoding the past is the last step's present, so its range is that one's
    past: dict[str, str] = field(default_factory=dict)

    def view_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Run-time shapes of the view's unrounded tensors from the model's rounded ones."""
        outputs = set(self.renamed)
        return {d.output[0] if d.output[0] in outputs else q.input[0]: shapes[d.output[0]]
                for q, d, _ in self.pairs if d.output[0] in shapes}

    def restore(self, original: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict[str, np.ndarray],
                batch: int, in_place: bool = False) -> onnx.ModelProto:
        """`pruned` (a rewrite of the view) with each pair back after the tensor it rounded,
        read by what read the rounded tensor, its range calibrated again (`recalibrated`). A
        tensor pruning removed loses its pair. `in_place`: `pruned` itself is edited and
        returned, for a caller that reads it no more (a copy holds every weight twice: SmolLM2-135M,
        190 MB)."""
        model = pruned
        if not in_place:
            model = onnx.ModelProto()
            model.CopyFrom(pruned)
        graph = model.graph
        _rename(graph, self.renamed, outputs=False)  # the float tensor its own name again, the DQ's output the model's
        produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        after: dict[str, list[onnx.NodeProto]] = {}
        rounded = {}
        for quantize, dequantize, direct in self.pairs:
            tensor = quantize.input[0]
            if tensor not in produced:
                continue
            after.setdefault(tensor, []).extend([_copy_node(quantize), _copy_node(dequantize)])
            rounded[tensor] = (dequantize.output[0], set(direct))
        for node in graph.node:
            for index, tensor in enumerate(node.input):
                if tensor in rounded and node.name not in rounded[tensor][1]:
                    node.input[index] = rounded[tensor][0]
        ordered = [n for i in graph.input for n in after.get(i.name, [])]  # a rounded model input
        for node in list(graph.node):
            ordered.append(node)
            for output in node.output:
                ordered.extend(after.get(output, []))
        del graph.node[:]
        graph.node.extend(ordered)
        have = {t.name for t in graph.initializer}
        needed = {t for n in ordered for t in n.input}
        graph.initializer.extend([t for t in original.graph.initializer if t.name in needed and t.name not in have])
        return recalibrated(original, model, feed, batch, self.past)


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def activation_view(model: onnx.ModelProto) -> ActivationView | None:
    """The model with its per-tensor activation pairs bypassed; None without any."""
    pairs = _activation_pairs(model)
    if not pairs:
        return None
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node.name)
    outputs = {o.name for o in model.graph.output}
    found, renamed = [], {}
    for node in model.graph.node:
        quantize = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.name in pairs and readers.get(quantize.output[0]) == [node.name]:
            cache = node.output[0] in outputs and quantize.input[0] in producers and \
                producers[quantize.input[0]].op_type == "Concat"  # a decoder's present key or value
            if quantize.input[0] in outputs or node.output[0] in outputs and not cache:
                continue  # a model output: left in place, so the view's outputs are the model's
            if cache:  # bypassed all the same: the matcher sees the cache's Concat; the view renames (`renamed`)
                renamed[node.output[0]] = quantize.input[0]
            direct = tuple(r for r in readers.get(quantize.input[0], []) if r != quantize.name)
            found.append((quantize, node, direct))
    if not found:
        return None
    kept = {q.name: pairs[q.name] for q, _, _ in found}
    view = _unrounded(model, kept)
    _rename(view.graph, {tensor: output for output, tensor in renamed.items()}, outputs=True)
    inputs, presents = {i.name for i in model.graph.input}, set(renamed.values())
    past = {q.input[0]: concat.output[0] for q, d, _ in found if q.input[0] in inputs
            for concat in model.graph.node if concat.op_type == "Concat" and d.output[0] in concat.input
            and concat.output[0] in presents}
    return ActivationView(view, [(_copy_node(q), _copy_node(d), r) for q, d, r in found], renamed, past)


def _rename(graph: onnx.GraphProto, names: dict[str, str], outputs: bool) -> None:
    """Every node's inputs and outputs (and, with `outputs`, the graph's outputs) renamed by `names`."""
    if not names:
        return
    for node in graph.node:
        for index, tensor in enumerate(node.input):
            node.input[index] = names.get(tensor, tensor)
        for index, tensor in enumerate(node.output):
            node.output[index] = names.get(tensor, tensor)
    for info in graph.value_info:
        info.name = names.get(info.name, info.name)
    if outputs:
        for output in graph.output:
            output.name = names.get(output.name, output.name)
