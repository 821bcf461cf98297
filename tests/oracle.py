"""The test oracle: a pruned model must equal the original with the removed neurons zeroed."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import feed_for
from onnxsnp.graph import ModelGraph
from onnxsnp.importance import Ratios
from onnxsnp.matching import find_blocks
from onnxsnp.pipeline import make_plan
from onnxsnp.rewriting import plan_cuts


def plan_for(path, ratios: Ratios, criterion: str = "random"):
    g = ModelGraph(onnx.load(str(path)))
    return g, make_plan(g, find_blocks(g), ratios, criterion, feed_for(path, batch=2), batch=2, seed=3)


def zeroed_original(g: ModelGraph, plan) -> onnx.ModelProto:
    """The original model with the removed units' weights set to zero: every weight the plan's
    dependency groups say writes a removed unit (the groups the rewrite cuts). A weight computed
    from constants (a quantized one) is replaced by its float value, zeroed."""
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    edits: dict[str, np.ndarray] = {}
    for cut in plan_cuts(g, plan):
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
