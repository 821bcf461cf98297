"""The test oracle: a pruned model must equal the original with the removed units masked out.

`masked_original` builds that reference without the tool's dependency groups or rewriting (this
module imports neither): it multiplies a 0/1 mask into activations of the original model, at
places it finds from the matched blocks' named projections, and it reads nothing of the plan but
its kept indices —

- FFN hidden neurons: the down projection's input (after the activation, and the gate's product);
- V neurons and whole heads: the output projection's input, whose column h·d + j is V neuron j
  of query head h; query head h belongs to key/value head h // (heads / key/value heads);
- Q/K dims: the query projection's output (before any rotary embedding: a rotary pair whose
  two dims are both zero stays zero), column h·d + j. A zero query dim makes the scores ignore
  the key's, so the keys need no mask. Where an op computes or finishes the query itself, the
  mask goes on that op's inputs, by the op's specification: com.microsoft.Attention's packed
  weight and bias (query columns first), com.microsoft.MultiHeadAttention's packed [q | k | v]
  bias (it is added after the query tensor, so a zero there alone would not stay zero).

A wrong group in the rewrite (a weight left out, an index map shifted, the wrong copies of a
grouped-query unit) then gives a model that differs from this one: tests/test_oracle.py shows a
corrupted group that the older construction (zeroing the weights the groups name) lets through
and this one catches. Every form the tests prune (float, fp16, weight-only int8, int4 read as
float, the optimizers' fused forms) is covered by the masks; none uses the older construction."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import feed_for
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.score.importance import Ratios
from onnxsnp.match import AttentionBlock, find_blocks
from onnxsnp.pipeline import make_plan


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
    masks: dict[str | tuple[str, int], np.ndarray] = {}  # a tensor, or one input of one node
    for keep in plan.attention:
        block, d = keep.block, keep.block.head_dim
        kept_v = {group: keep.v[row] for row, group in enumerate(keep.heads)}
        _add_mask(masks, block.out.input, block.heads * d, _query_head_columns(block, kept_v), _dtype(g, block.out))
        # a removed head keeps its query dims here: its V mask already silences it
        kept_q = {group: np.arange(d) for group in range(block.groups)}
        kept_q.update({group: keep.qk[row] for row, group in enumerate(keep.heads)})
        query = _query_head_columns(block, kept_q)
        among = np.arange(block.heads * d)  # the query columns: first in every packed layout below
        for target, width in _query_places(g, block):
            _add_mask(masks, target, width, query, _dtype(g, block.q), among)
    for keep in plan.ffn:
        _add_mask(masks, keep.block.fc2.input, keep.block.hidden, keep.hidden, _dtype(g, keep.block.fc2))
    return _multiply(_copy(g.model), masks)


def _query_places(g: ModelGraph, block: AttentionBlock) -> list[tuple[str | tuple[str, int], int]]:
    """Where the query columns are masked, with the width of what holds them there: the query
    projection's output (q | k | v side by side when one product computes all three); inside
    com.microsoft.Attention, the op's packed weight and bias inputs, whose first columns are the
    query's (the op's specification); and com.microsoft.MultiHeadAttention's packed [q | k | v]
    bias, which the op adds after the query tensor."""
    if block.q.output is None:
        node = g.node(block.q.node)
        assert node.op_type == "Attention", f"no query tensor to mask in {node.op_type} {node.name}"
        width = g.constant(node.input[1]).shape[-1]
        return [((node.name, index), width) for index in (1, 2) if len(node.input) > index and node.input[index]]
    places = [(block.q.output, _fused_width(block))]
    if block.packed_bias is not None:
        places.append(((block.attention_op, 3), g.constant(block.packed_bias).shape[-1]))
    return places


def _query_head_columns(block: AttentionBlock, kept: dict[int, np.ndarray]) -> np.ndarray:
    """Columns h·d + j of every query head h whose key/value head h // r is a key of `kept`, with
    j among that key/value head's kept dims."""
    r, d = block.heads // block.groups, block.head_dim
    columns = [h * d + dims for group, dims in kept.items() for h in range(group * r, (group + 1) * r)]
    return np.concatenate(columns).astype(np.int64) if columns else np.zeros(0, np.int64)


def _fused_width(block: AttentionBlock) -> int:
    """The query projection's output width; one product computing q, k and v side by side (q
    first) ends with v's key/value heads."""
    if block.q.output != block.v.output:
        return block.heads * block.head_dim
    assert block.column_offsets[0] == 0, "q is first in a fused product"
    return block.column_offsets[2] + block.groups * block.head_dim


def _dtype(g: ModelGraph, linear) -> np.dtype:
    """The activations' type, as the projection's weight has it (a float16 export masks in float16)."""
    weight = g.constant(linear.weight)
    return weight.dtype if weight is not None and weight.dtype.kind == "f" else np.dtype(np.float32)


def _add_mask(masks: dict, target: str | tuple[str, int], width: int, kept: np.ndarray, dtype: np.dtype,
              among: np.ndarray | None = None) -> None:
    """Zero the columns of `target` `among` these (all of them by default: a fused product's k and v
    columns are not the query's to mask) that are not `kept`; masks on one target multiply."""
    mask = masks.setdefault(target, np.ones(width, dtype))
    removed = np.zeros(width, bool)
    removed[slice(None) if among is None else among] = True
    removed[np.asarray(kept, np.int64)] = False
    mask[removed] = 0.0


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


def _multiply(model: onnx.ModelProto, masks: dict) -> onnx.ModelProto:
    """Each masked tensor's readers read it times its mask (along the last axis), and each masked
    node input the input times its mask; a Mul sits right after the tensor's producer, or right
    before the node, so the nodes stay in topological order."""
    nodes = list(model.graph.node)
    for number, (target, mask) in enumerate(masks.items()):
        if mask.all():
            continue
        name = f"oracle_mask_{number}"
        model.graph.initializer.append(numpy_helper.from_array(mask, name))
        if isinstance(target, tuple):
            position = next(i for i, n in enumerate(nodes) if n.name == target[0])
            node = nodes[position]
            masked = f"{node.name}_{target[1]}__oracle_masked"
            mul = helper.make_node("Mul", [node.input[target[1]], name], [masked], name=f"oracle_mask_mul_{number}")
            node.input[target[1]] = masked
            nodes.insert(position, mul)
            continue
        masked = f"{target}__oracle_masked"
        for node in nodes:
            for index, read in enumerate(node.input):
                if read == target:
                    node.input[index] = masked
        producer = next((i for i, n in enumerate(nodes) if target in n.output), -1)
        nodes.insert(producer + 1, helper.make_node("Mul", [target, name], [masked], name=f"oracle_mask_mul_{number}"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
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


def through_the_cache(pruned: onnx.ModelProto, zeroed: onnx.ModelProto, vocab: int = 100) -> dict:
    """A decoder pruned and its masked original on one prefill of 6 tokens and one cached step:
    the same logits (float32 tolerances); the pruned prefill's outputs."""
    from decoders import prefill_and_step  # tools/: decoders with a KV cache

    ids, next_ids = (np.random.default_rng(seed).integers(0, vocab, (2, length)) for seed, length in ((0, 6), (1, 1)))
    (want, want_step), (got, got_step) = prefill_and_step(zeroed, ids, next_ids), prefill_and_step(pruned, ids, next_ids)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(got_step["logits"], want_step["logits"], atol=2e-5, rtol=1e-3)
    return got
