"""The test oracle: a pruned model must equal the original with the removed units masked out.

`masked_original` builds that reference without the tool's dependency groups or rewriting: it
multiplies a 0/1 mask into activations of the original model, at tensors it finds from the
matched blocks' named projections, and it reads nothing of the plan but its kept indices —

- FFN hidden neurons: the down projection's input (after the activation, and the gate's product);
- V neurons and whole heads: the output projection's input, whose column h·d + j is V neuron j
  of query head h; query head h belongs to key/value head h // (heads / key/value heads);
- Q/K dims: the query projection's output (before any rotary embedding: a rotary pair whose
  two dims are both zero stays zero), column h·d + j. A zero query dim makes the scores ignore
  the key's, so the keys need no mask.

A wrong group in the rewrite (a weight left out, an index map shifted, the wrong copies of a
grouped-query unit) then gives a model that differs from this one: tests/test_oracle.py shows it.

One place keeps the older construction, which zeroes the weights that the tool's own Q/K group
names: Q/K dims computed inside a fused attention op — com.microsoft.Attention (its projection
is part of the op, so no query tensor exists) and com.microsoft.MultiHeadAttention with a packed
[q | k | v] bias (the op adds the bias after the query tensor, so a zero there does not stay
zero). V neurons and heads of those blocks are still masked independently, at the output
projection's input. `zeroed_weights` is that older construction, kept also for the test that
shows what it cannot see."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import feed_for
from onnxsnp.graph import ModelGraph
from onnxsnp.importance import Ratios
from onnxsnp.matching import AttentionBlock, find_blocks
from onnxsnp.pipeline import make_plan
from onnxsnp.rewriting import plan_cuts


def plan_for(path, ratios: Ratios, criterion: str = "random"):
    g = ModelGraph(onnx.load(str(path)))
    return g, make_plan(g, find_blocks(g), ratios, criterion, feed_for(path, batch=2), batch=2, seed=3)


def masked_original(g: ModelGraph, plan) -> onnx.ModelProto:
    """The original model with a 0/1 mask multiplied into the activations of the removed units
    (see the module's docstring for where). Plans that refit weights, correct norms or cut the
    residual stream change more than units, so this reference does not describe them; nor does it
    model mapped columns (AttentionKeep.q_map …: rescaled or compensated heads), which the plans
    of the oracle's users (criterion "random", no compensation) do not have."""
    assert not (plan.refits or plan.norm_corrections or plan.stream is not None), "the oracle covers unit removal only"
    masks: dict[str, np.ndarray] = {}
    inside_op = []  # Q/K dims the masks cannot reach (the module's docstring)
    for keep in plan.attention:
        block, d = keep.block, keep.block.head_dim
        kept_v = {group: keep.v[row] for row, group in enumerate(keep.heads)}
        _add_mask(masks, block.out.input, block.heads * d, _query_head_columns(block, kept_v), _dtype(g, block.out))
        if block.q.output is None or block.packed_bias is not None:
            inside_op.append(keep)
            continue
        # a removed head keeps its query dims here: its V mask already silences it
        kept_q = {group: np.arange(d) for group in range(block.groups)}
        kept_q.update({group: keep.qk[row] for row, group in enumerate(keep.heads)})
        offset, width = _query_columns(block)
        _add_mask(masks, block.q.output, width, offset + _query_head_columns(block, kept_q), _dtype(g, block.q),
                  among=offset + np.arange(block.heads * d))
    for keep in plan.ffn:
        _add_mask(masks, keep.block.fc2.input, keep.block.hidden, keep.hidden, _dtype(g, keep.block.fc2))
    model = zeroed_weights(g, plan, only_qk_of=inside_op) if inside_op else _copy(g.model)
    return _multiply(model, masks)


def _query_head_columns(block: AttentionBlock, kept: dict[int, np.ndarray]) -> np.ndarray:
    """Columns h·d + j of every query head h whose key/value head h // r is a key of `kept`, with
    j among that key/value head's kept dims."""
    r, d = block.heads // block.groups, block.head_dim
    columns = [h * d + dims for group, dims in kept.items() for h in range(group * r, (group + 1) * r)]
    return np.concatenate(columns).astype(np.int64) if columns else np.zeros(0, np.int64)


def _query_columns(block: AttentionBlock) -> tuple[int, int]:
    """Where the query columns start in the query projection's output, and that output's width:
    one product computing q, k and v side by side ends with v's key/value heads."""
    if block.q.output != block.v.output:
        return 0, block.heads * block.head_dim
    return block.column_offsets[0], block.column_offsets[2] + block.groups * block.head_dim


def _dtype(g: ModelGraph, linear) -> np.dtype:
    """The activations' type, as the projection's weight has it (a float16 export masks in float16)."""
    weight = g.constant(linear.weight)
    return weight.dtype if weight is not None and weight.dtype.kind == "f" else np.dtype(np.float32)


def _add_mask(masks: dict[str, np.ndarray], tensor: str, width: int, kept: np.ndarray, dtype: np.dtype,
              among: np.ndarray | None = None) -> None:
    """Zero the columns of `tensor` `among` these (all of them by default: a fused product's k and v
    columns are not the query's to mask) that are not `kept`; masks on one tensor multiply."""
    mask = masks.setdefault(tensor, np.ones(width, dtype))
    removed = np.zeros(width, bool)
    removed[slice(None) if among is None else among] = True
    removed[np.asarray(kept, np.int64)] = False
    mask[removed] = 0.0


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


def _multiply(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Each masked tensor's readers read it times its mask (along the last axis); the Mul sits right
    after the tensor's producer, so the nodes stay in topological order."""
    nodes = list(model.graph.node)
    for number, (tensor, mask) in enumerate(masks.items()):
        if mask.all():
            continue
        name, masked = f"oracle_mask_{number}", f"{tensor}__oracle_masked"
        model.graph.initializer.append(numpy_helper.from_array(mask, name))
        for node in nodes:
            for index, read in enumerate(node.input):
                if read == tensor:
                    node.input[index] = masked
        producer = next((i for i, n in enumerate(nodes) if tensor in n.output), -1)
        nodes.insert(producer + 1, helper.make_node("Mul", [tensor, name], [masked], name=f"oracle_mask_mul_{number}"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def zeroed_weights(g: ModelGraph, plan, only_qk_of: list | None = None) -> onnx.ModelProto:
    """The older construction: the original model with the weights set to zero that the plan's
    dependency groups (the groups the rewrite cuts) say write a removed unit. It shares the groups
    with the rewrite, so a wrong group passes it; `masked_original` uses it only for the Q/K cuts
    of the attention blocks `only_qk_of` (see the module's docstring). A weight computed from
    constants (a quantized one) is replaced by its float value, zeroed."""
    model = _copy(g.model)
    edits: dict[str, np.ndarray] = {}
    wanted = None if only_qk_of is None else {f"{keep.block.name}/qk" for keep in only_qk_of}
    for cut in plan_cuts(g, plan):
        if wanted is not None and cut.group.name not in wanted:
            continue
        removed = cut.removed()
        for weight in cut.group.weights:
            if weight.reads:
                continue
            tensor = g.node(weight.node).input[weight.index]
            name = g.initializer_behind(tensor) or tensor
            value = edits.get(name, g.constant(tensor).copy())
            index = [slice(None)] * value.ndim
            index[weight.axis] = weight.indices(removed).reshape(-1)
            value[tuple(index)] = 0
            edits[name] = value
    for init in model.graph.initializer:
        if init.name in edits:
            init.CopyFrom(numpy_helper.from_array(edits.pop(init.name), init.name))
    for name, value in edits.items():  # computed weights: their producer gives way to the zeroed value
        producer = next(n for n in model.graph.node if name in n.output)
        model.graph.node.remove(producer)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model
def unshare(path, tmp_path):
    """Copy of the model where every float initializer has one reader: Identity-routed ones become
    their own tensors, and one that several nodes read (optimizers de-duplicate equal tensors) is
    copied per reader, so that zeroing one reader's weights does not zero another's. (onnxruntime's
    extended optimizer refuses some such copies of its own output — "Attempt to replace the existing
    tensor" — so the session-optimized forms run the oracle unoptimized.)"""
    model = onnx.load(str(path))
    g = ModelGraph(model)
    for node in list(model.graph.node):
        if node.op_type == "Identity" and g.initializer_behind(node.input[0]):
            model.graph.initializer.append(numpy_helper.from_array(g.constant(node.input[0]), node.output[0]))
            model.graph.node.remove(node)
    initializers = {t.name: t for t in model.graph.initializer}
    read = set()
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            tensor = initializers.get(name)
            if name in read and tensor is not None and tensor.data_type in (1, 10) and np.prod(tensor.dims) > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = f"{name}__{node.name}_{index}"
                model.graph.initializer.append(copy)
                node.input[index] = copy.name
            read.add(name)
    out = tmp_path / "unshared.onnx"
    onnx.save(model, str(out))
    return out


def zeroed_blocks(g: ModelGraph, layers) -> onnx.ModelProto:
    """The original model with what the given pre-norm blocks add to the stream set to zero — the
    output projection's and fc2's weights and biases, and a bias their join adds (onnxruntime's
    SkipLayerNormalization with the bias moved in): then each block passes its input on."""
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    slots = set()
    for layer in layers:
        for linear in (layer.attention.out, layer.ffn.fc2):
            slots |= {(linear.node, linear.weight_index)} | ({(linear.bias_node, linear.bias_index)} if linear.bias else set())
        for branch in (layer.attention.out.output, layer.ffn.fc2.output):
            for join in g.consumers_of(branch):
                if join.op_type.startswith("Skip") and len(join.input) > 4 and join.input[4]:
                    slots.add((join.name, 4))
    nodes = {n.name: n for n in model.graph.node}
    for number, (node, index) in enumerate(sorted(slots)):
        value = np.zeros_like(g.constant(nodes[node].input[index]))
        name = f"zeroed_block_{number}"
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        nodes[node].input[index] = name
    return model
