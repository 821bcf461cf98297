"""Gated FFNs on small hand-built graphs (fast): act(x·W_gate) ∘ (x·W_up) → W_down, with the
activation as exporters write it — SiLU (Llama, Qwen), GELU with Erf, GELU(tanh) written out as
Gemma's exports do (x·x·x, no Pow), and the Gelu op with approximate="tanh" (opset 20). Each is
matched with its gate, and the pruned model equals the original with the removed units zeroed."""
from __future__ import annotations

import numpy as np
import pytest

from graphs import TOKENS, WIDTH, Builder, run
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original

HIDDEN = 24


def _activation(b: Builder, g: str, kind: str) -> str:
    f32 = lambda v: b.const(np.array(v, dtype=np.float32))  # noqa: E731
    if kind == "silu":
        return b.op("Mul", [g, b.op("Sigmoid", [g])])
    if kind == "gelu-erf":
        return b.op("Mul", [b.op("Mul", [g, f32(0.5)]), b.op("Add", [f32(1.0), b.op("Erf", [b.op("Div", [g, f32(2 ** 0.5)])])])])
    if kind == "gelu-tanh-written":
        cube = b.op("Mul", [g, b.op("Mul", [g, g])])
        inner = b.op("Mul", [f32((2 / np.pi) ** 0.5), b.op("Add", [g, b.op("Mul", [f32(0.044715), cube])])])
        return b.op("Mul", [f32(0.5), b.op("Mul", [g, b.op("Add", [f32(1.0), b.op("Tanh", [inner])])])])
    return b.op("Gelu", [g], approximate="tanh")


def gated_ffn(kind: str) -> tuple:
    b = Builder(0, opset=20)
    gate, up = b.linear("x", WIDTH, HIDDEN, bias=False), b.linear("x", WIDTH, HIDDEN, bias=False)
    hidden = b.op("Mul", [_activation(b, gate, kind), up])
    return b.model(b.linear(hidden, HIDDEN, WIDTH))


@pytest.mark.parametrize("kind", ["silu", "gelu-erf", "gelu-tanh-written", "gelu-op-tanh"])
def test_gated_ffn_is_matched_with_its_gate_and_pruned_exactly(kind):
    g = ModelGraph(gated_ffn(kind))
    (block,) = find_blocks(g).ffn
    assert block.gate is not None and block.hidden == HIDDEN
    assert g.node(block.gate.node).output[0] != g.node(block.fc1.node).output[0]
    x = np.random.default_rng(1).standard_normal((4, TOKENS, WIDTH)).astype(np.float32)
    plan = make_plan(g, find_blocks(g), Ratios(0.0, 0.0, 0.5), "random", {"x": x}, batch=4, seed=3)
    (keep,) = plan.ffn
    assert len(keep.hidden) == HIDDEN // 2
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    np.testing.assert_allclose(run(pruned, x[:1]), run(zeroed, x[:1]), atol=1e-5)


def fused_gated_ffn(splitter: str, bias: bool = False, gate_first: bool = True) -> tuple:
    """Phi-3's MLP: one gate | up projection taken apart along its features, then
    silu(gate) ∘ up → W_down. `splitter`: "split-sizes" (Split with a sizes input),
    "split-equal" (opset 18's num_outputs), "slices" (two Slices, the second to the end),
    "chunk-legacy" (two Slices whose bounds are computed from the projection's width at run time)."""
    b = Builder(0, opset=20 if splitter != "split-sizes" else 17)
    both = b.linear("x", WIDTH, 2 * HIDDEN, bias=bias)
    i64 = lambda v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    if splitter == "split-sizes":
        first, second = b.op("Split", [both, i64([HIDDEN, HIDDEN])], outputs=2, axis=-1)
    elif splitter == "split-equal":
        first, second = b.op("Split", [both], outputs=2, axis=2, num_outputs=2)
    elif splitter == "chunk-legacy":  # torch's legacy exporter: chunk(2, -1) bounds from the width at run time
        width = b.op("Gather", [b.op("Shape", [both]), i64([-1])], axis=0)
        half = b.op("Div", [b.op("Add", [width, i64([1])]), i64([2])])
        first = b.op("Slice", [both, i64([0]), b.op("Mul", [half, i64([1])]), i64([-1])])
        second = b.op("Slice", [both, b.op("Mul", [half, i64([1])]), b.op("Mul", [half, i64([2])]), i64([-1])])
    else:
        first = b.op("Slice", [both, i64([0]), i64([HIDDEN]), i64([-1]), i64([1])])
        second = b.op("Slice", [both, i64([HIDDEN]), i64([2 ** 63 - 1]), i64([-1])])
    gate, up = (first, second) if gate_first else (second, first)
    return b.model(b.linear(b.op("Mul", [up, _activation(b, gate, "silu")]), HIDDEN, WIDTH))


@pytest.mark.parametrize("splitter,bias,gate_first", [("split-sizes", False, True), ("split-equal", True, True),
                                                      ("slices", False, True), ("slices", True, False),
                                                      ("chunk-legacy", False, True)])
def test_a_fused_gate_up_projection_is_matched_as_its_two_halves_and_pruned_exactly(splitter, bias, gate_first):
    g = ModelGraph(fused_gated_ffn(splitter, bias, gate_first))
    (block,) = find_blocks(g).ffn
    assert block.gate is not None and block.gate.node == block.fc1.node and block.hidden == HIDDEN
    assert block.columns == ((HIDDEN, 0) if gate_first else (0, HIDDEN))  # (up, gate) column offsets
    x = np.random.default_rng(1).standard_normal((4, TOKENS, WIDTH)).astype(np.float32)
    plan = make_plan(g, find_blocks(g), Ratios(0.0, 0.0, 0.5), "random", {"x": x}, batch=4, seed=3)
    (keep,) = plan.ffn
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    np.testing.assert_allclose(run(pruned, x[:1]), run(zeroed, x[:1]), atol=1e-5)
    weights = {i.name: i for i in pruned.graph.initializer}
    fused = next(n for n in pruned.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    assert list(weights[fused.input[1]].dims) == [WIDTH, 2 * len(keep.hidden)]


def test_a_gate_up_projection_read_elsewhere_is_skipped_with_the_reason():
    b = Builder(0, opset=20)
    both = b.linear("x", WIDTH, 2 * HIDDEN, bias=False)
    gate, up = b.op("Split", [both], outputs=2, axis=-1, num_outputs=2)
    down = b.linear(b.op("Mul", [up, _activation(b, gate, "silu")]), HIDDEN, WIDTH)
    leak = b.op("ReduceMean", [both, b.const(np.array([-1], dtype=np.int64))], keepdims=1)
    found = find_blocks(ModelGraph(b.model(b.op("Add", [down, leak]))))
    assert found.ffn == ()
    assert any("read by" in s.reason and both in s.reason for s in found.skipped), found.skipped


def test_run_time_bounds_that_do_not_halve_at_other_widths_are_refused():
    """Slice bounds read off the width must take the same halves at any width: a bound of
    width − HIDDEN (true only at the exported width) is refused, naming the slices."""
    b = Builder(0, opset=17)
    both = b.linear("x", WIDTH, 2 * HIDDEN, bias=False)
    i64 = lambda v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    middle = b.op("Sub", [b.op("Gather", [b.op("Shape", [both]), i64([-1])], axis=0), i64([HIDDEN])])
    gate = b.op("Slice", [both, i64([0]), middle, i64([-1])])
    up = b.op("Slice", [both, middle, i64([2 ** 62]), i64([-1])])
    found = find_blocks(ModelGraph(b.model(b.linear(b.op("Mul", [up, _activation(b, gate, "silu")]), HIDDEN, WIDTH))))
    assert found.ffn == () and any("two halves" in s.reason for s in found.skipped), found.skipped
