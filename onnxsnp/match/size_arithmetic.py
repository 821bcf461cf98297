"""Sizes an exporter computes at run time from a tensor's width (torch's `chunk` under the legacy
exporter: Slice bounds of Shape(x)[-1] + 1, / 2, · k): such a bound follows a cut by itself, and
whether it takes the part it took before is checked by evaluating the arithmetic at other widths."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ..ir.graph import ModelGraph, attribute

# ops of size arithmetic: reading a shape, picking from it, integer arithmetic
_ARITHMETIC = {"Shape", "Gather", "Add", "Sub", "Mul", "Div", "Unsqueeze", "Squeeze", "Cast", "Concat", "Slice",
               "Identity", "Reshape"}


def width_function(g: ModelGraph, tensor: str, source: str) -> tuple[Callable[[int], np.ndarray], set[str]] | None:
    """`tensor` as a function of the last dim of `source` (the other dims set to 1), with the nodes
    that compute it: where it is computed only from Shape(source) and constants; else None."""
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()

    def visit(t: str) -> bool:
        if not t or t in seen or g.constant(t) is not None:
            return True
        seen.add(t)
        node = g.producer_of(t)
        if node is None or node.op_type not in _ARITHMETIC:
            return False
        if node.op_type == "Shape":
            if node.input[0] != source:
                return False
        elif not all(visit(i) for i in node.input):
            return False
        nodes.append(node)
        return True

    rank = len(g.shapes.get(source) or ())
    if not visit(tensor) or not rank or not any(n.op_type == "Shape" for n in nodes):
        return None
    constants = {i for n in nodes if n.op_type != "Shape" for i in n.input if i and g.constant(i) is not None}

    def at(width: int) -> np.ndarray:
        made = []
        for node in nodes:
            if node.op_type == "Shape":  # the shape of a (1, …, 1, width) tensor, as the node reads it
                dims = np.array([1] * (rank - 1) + [width], dtype=np.int64)
                start, end = attribute(node, "start", 0), attribute(node, "end", None)
                made.append(helper.make_node("Constant", [], list(node.output), value=numpy_helper.from_array(dims[start:end])))
            else:
                made.append(node)
        inits = [numpy_helper.from_array(np.asarray(g.constant(c)), c) for c in sorted(constants)]
        graph = helper.make_graph(made, "size", [], [helper.make_tensor_value_info(tensor, onnx.TensorProto.UNDEFINED, None)],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset())])
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])

    return at, {n.name for n in nodes}
