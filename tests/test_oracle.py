"""The oracle can fail: a dependency group corrupted in a way that keeps every shape valid (each
of its weight axes maps unit u to the index of unit u + 1) makes the rewrite keep the wrong
neurons. The older construction, which zeroes what the same groups name, agrees with that wrong
model; the masked original, built from the plan's kept indices alone, does not."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
import onnxsnp.rewrite.rewriting
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.groups import Group, WeightAxis
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import plan_cuts, rewrite
from oracle import masked_original

HIDDEN = 24


@dataclasses.dataclass(frozen=True)
class ShiftedAxis(WeightAxis):
    """A weight axis whose map from unit to index is off by one within each run of `period` units
    (a head's dims, or all FFN neurons), so a head's units stay in that head."""

    period: int = 1

    def indices(self, units: np.ndarray) -> np.ndarray:
        units = np.asarray(units, dtype=np.int64)
        return super().indices(units - units % self.period + (units + 1) % self.period)


def shifted(group: Group, period: int) -> Group:
    axes = tuple(ShiftedAxis(**dataclasses.asdict(axis), period=period) for axis in group.weights)
    return dataclasses.replace(group, weights=axes)


def ffn_model():
    b = graphs.Builder(0, opset=13)
    hidden = b.op("Relu", [b.linear("x", graphs.WIDTH, HIDDEN)])
    return b.model(b.linear(hidden, HIDDEN, graphs.WIDTH))


def zeroed_weights(g: ModelGraph, plan) -> onnx.ModelProto:
    """The oracle as it was: the original model with the weights set to zero that the plan's
    dependency groups (the groups the rewrite cuts) say write a removed unit. It shares the groups
    with the rewrite, so a wrong group passes it."""
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


def corrupt_ffn(attention: tuple[Group, Group], ffn: Group) -> tuple:
    return attention, shifted(ffn, HIDDEN)


def corrupt_qk(attention: tuple[Group, Group], ffn: Group) -> tuple:
    return (shifted(attention[0], graphs.HEAD_DIM), attention[1]), ffn


def corrupt_v(attention: tuple[Group, Group], ffn: Group) -> tuple:
    return (attention[0], shifted(attention[1], graphs.HEAD_DIM)), ffn


CASES = {  # the model, the ratios that cut the group, and the corruption
    "ffn-hidden": (ffn_model, Ratios(0.0, 0.0, 0.5), corrupt_ffn),
    "attention-qk": (graphs.softmax_attention, Ratios(0.5, 0.0, 0.0), corrupt_qk),
    "attention-v": (graphs.softmax_attention, Ratios(0.0, 0.5, 0.0), corrupt_v),
}


@pytest.mark.parametrize("case", CASES)
def test_a_shifted_group_fails_the_masked_oracle_and_passes_the_zeroed_one(case, monkeypatch):
    build, ratios, corrupt = CASES[case]
    g = ModelGraph(build())
    x = np.random.default_rng(0).standard_normal((4, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)
    plan = make_plan(g, find_blocks(g), ratios, "random", {"x": x}, batch=4, seed=3)
    sample = x[:1]
    right = graphs.run(rewrite(g, plan), sample)
    np.testing.assert_allclose(right, graphs.run(masked_original(g, plan), sample), atol=1e-5)

    attention_groups, ffn_group = onnxsnp.rewrite.rewriting.attention_groups, onnxsnp.rewrite.rewriting.ffn_group
    monkeypatch.setattr(onnxsnp.rewrite.rewriting, "attention_groups",
                        lambda graph, block: corrupt(attention_groups(graph, block), None)[0])
    monkeypatch.setattr(onnxsnp.rewrite.rewriting, "ffn_group", lambda block: corrupt(None, ffn_group(block))[1])
    wrong = graphs.run(rewrite(g, plan), sample)
    np.testing.assert_allclose(wrong, graphs.run(zeroed_weights(g, plan), sample), atol=1e-5)  # blind to it
    assert np.abs(wrong - graphs.run(masked_original(g, plan), sample)).max() > 1e-2  # caught
