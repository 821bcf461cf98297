"""Global allocation: measured curves, unit costs, and the greedy choice of widths."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

from conftest import ROOT
from onnxsnp import SnpError, prune
from onnxsnp.score.allocation import allocate, part_losses, unit_costs
from onnxsnp.score.costs import CutPart
from onnxsnp.plan import AttentionKeep, FfnKeep, PrunePlan
from onnxsnp.score.sensitivity import Curve, LayerSensitivity

DIGITS = ROOT / "models" / "digits_vit.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"


@pytest.fixture(scope="module")
def digits(digits_costs):
    return digits_costs


def _curves(matches, steepness: list[float]) -> list[LayerSensitivity]:
    """Loss (width − kept)² × steepness for every group of block i."""
    result = []
    for layer, steep in zip(matches.layers, steepness):
        def curve(width: int) -> Curve:
            kept = np.arange(1, width + 1, dtype=float)
            return Curve(kept, steep * ((width - kept) / width) ** 2)
        d, heads, hidden = layer.attention.head_dim, layer.attention.heads, layer.ffn.hidden
        result.append(LayerSensitivity(layer.name, curve(d), curve(d), curve(heads), curve(hidden), 100.0))
    return result


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_unit_costs_predict_the_cost_model(digits, kind):
    """The cost model is linear in kept widths: units × widths + the rest equals its cost of the plan."""
    g, matches, costs = digits
    units = unit_costs(costs, matches, kind)
    rng = np.random.default_rng(0)
    attention, ffn, predicted = [], [], 0.0
    for layer, unit in zip(matches.layers, units):
        block, mlp = layer.attention, layer.ffn
        heads, qk, v, hidden = 3, int(rng.integers(1, 16)), int(rng.integers(1, 16)), int(rng.integers(10, 256))
        chosen = np.sort(rng.choice(block.heads, heads, replace=False))
        attention.append(AttentionKeep(block, np.tile(np.arange(qk), (heads, 1)), np.tile(np.arange(v), (heads, 1)),
                                       chosen))
        ffn.append(FfnKeep(mlp, np.arange(hidden)))
        full = block.heads * block.head_dim * (unit.qk + unit.v) + mlp.hidden * unit.ffn
        predicted += heads * (qk * unit.qk + v * unit.v) + hidden * unit.ffn - full
    whole = costs.macs_total * 2 if kind == "flops" else costs.params_total
    assert costs.cost(PrunePlan(tuple(attention), tuple(ffn)), kind) == pytest.approx(whole + predicted, rel=1e-9)


def test_allocation_cuts_where_it_costs_least(digits):
    g, matches, costs = digits
    units = unit_costs(costs, matches, "flops")
    total = costs.macs_total * 2
    steep = [1.0, 50.0, 1.0, 50.0]  # blocks 1 and 3 lose fifty times more per unit removed
    widths, predicted = allocate(_curves(matches, steep), matches, units, total, 0.6 * total)
    kept = [widths.ffn[layer.ffn.name] + widths.attention[layer.attention.name].qk for layer in matches.layers]
    assert kept[0] < kept[1] and kept[2] < kept[3]
    assert len(predicted) == len(matches.layers)
    plan = PrunePlan(tuple(AttentionKeep(b, np.tile(np.arange(w.qk), (w.heads, 1)), np.tile(np.arange(w.v), (w.heads, 1)),
                                         np.arange(w.heads)) for b in matches.attention
                           for w in [widths.attention[b.name]]),
                     tuple(FfnKeep(b, np.arange(widths.ffn[b.name])) for b in matches.ffn))
    assert costs.cost(plan, "flops") <= 0.6 * total


def _plan(matches, widths) -> PrunePlan:
    return PrunePlan(tuple(AttentionKeep(b, np.tile(np.arange(w.qk), (w.heads, 1)), np.tile(np.arange(w.v), (w.heads, 1)),
                                         np.arange(w.heads)) for b in matches.attention
                           for w in [widths.attention[b.name]]),
                     tuple(FfnKeep(b, np.arange(widths.ffn[b.name])) for b in matches.ffn))


def test_one_head_size_allocation_meets_the_budget_with_one_attention_width(digits):
    """onnxruntime-genai folders hold one head size: the allocation moves every block's attention
    together, so the widths it returns are the folder's (genai.one_head_size changes nothing) and
    still meet the budget, where block-by-block widths widened afterwards cost more than it."""
    from onnxsnp.io.genai import one_head_size

    g, matches, costs = digits
    units = unit_costs(costs, matches, "flops")
    total = costs.macs_total * 2
    curves = _curves(matches, [1.0, 50.0, 1.0, 50.0])
    widths, _ = allocate(curves, matches, units, total, 0.6 * total, one_head_size=True)
    assert len({(w.heads, w.qk, w.v) for w in widths.attention.values()}) == 1
    assert all(w.qk == w.v for w in widths.attention.values())
    assert one_head_size(widths) == widths
    cost = costs.cost(_plan(matches, widths), "flops")
    ffn_step = max(u.ffn * max(1, layer.ffn.hidden // 64) for u, layer in zip(units, matches.layers))
    assert 0.6 * total - ffn_step <= cost <= 0.6 * total  # a coarse last move's overshoot given back to the FFNs
    free, _ = allocate(curves, matches, units, total, 0.6 * total)
    assert free != one_head_size(free)  # the blocks' own widths differ: widening them is what fell short
    assert costs.cost(_plan(matches, one_head_size(free)), "flops") > 0.6 * total


def test_an_unreachable_budget_fails_cleanly(digits):
    g, matches, costs = digits
    units = unit_costs(costs, matches, "flops")
    total = costs.macs_total * 2
    with pytest.raises(SnpError, match="budget"):
        allocate(_curves(matches, [1.0] * 4), matches, units, total, 0.01 * total)


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_the_cut_splits_by_part_as_the_unit_costs_count_it(digits, kind):
    """Block 0 removed; in block 1 one head fewer, then Q/K pairs and V neurons within the three
    kept heads, and FFN neurons: each part is credited what its units cost (unit_costs, from the
    same cost model), and the parts sum to the plan's whole cut."""
    g, matches, costs = digits
    units = unit_costs(costs, matches, kind)
    block, mlp = matches.layers[1].attention, matches.layers[1].ffn
    d, heads, qk, v, hidden = block.head_dim, block.groups - 1, block.head_dim - 6, block.head_dim - 4, mlp.hidden - 56
    attention = tuple(AttentionKeep(b, np.tile(np.arange(qk), (heads, 1)), np.tile(np.arange(v), (heads, 1)),
                                    np.arange(heads)) if b is block else
                      AttentionKeep(b, np.tile(np.arange(d), (b.groups, 1)), np.tile(np.arange(d), (b.groups, 1)),
                                    np.arange(b.groups)) for b in matches.attention)
    ffn = tuple(FfnKeep(b, np.arange(hidden if b is mlp else b.hidden)) for b in matches.ffn)
    plan = PrunePlan(attention, ffn, removed_layers=(matches.layers[0],))
    removed = costs.removed_by_part(plan, kind)
    u0, u1 = units[0], units[1]
    first = matches.layers[0]
    whole_first = (first.attention.groups * (first.attention.head_dim * (u0.qk + u0.v) + u0.head)
                   + first.ffn.hidden * u0.ffn + u0.rest)
    expected = {CutPart.BLOCKS: whole_first, CutPart.HEADS: d * (u1.qk + u1.v) + u1.head,
                CutPart.QK: heads * (d - qk) * u1.qk, CutPart.V: heads * (d - v) * u1.v,
                CutPart.FFN: (mlp.hidden - hidden) * u1.ffn, CutPart.RESIDUAL: 0.0}
    scale = costs.original(kind)
    for part in CutPart:
        assert removed[part] == pytest.approx(expected[part], abs=1e-9 * scale), part
    assert sum(removed.values()) == pytest.approx(scale - costs.cost(plan, kind), abs=1e-9 * scale)


def test_the_allocations_loss_splits_by_part(digits):
    """part_losses are the terms of the loss the allocation predicted per block: they sum to it,
    and a removed block's loss is its whole-block loss."""
    g, matches, costs = digits
    units = unit_costs(costs, matches, "flops")
    total = costs.macs_total * 2
    curves = _curves(matches, [1.0, 50.0, 1.0, 50.0])
    curves[0] = replace(curves[0], block=1e-3)  # block 0 loses least removed whole
    for blocks in (0, 1):
        widths, predicted = allocate(curves, matches, units, total, 0.6 * total, max_blocks=blocks)
        assert widths.removed_layers == tuple(range(blocks))
        split = part_losses(curves, matches, widths)
        assert [sum(parts.values()) for parts in split] == pytest.approx(predicted, rel=1e-12)
        for i, parts in enumerate(split):
            assert (set(parts) == {CutPart.BLOCKS}) == (i in widths.removed_layers)
        assert any(parts.get(CutPart.QK, 0) > 0 for parts in split) and any(parts.get(CutPart.FFN, 0) > 0
                                                                          for parts in split)


@pytest.mark.slow  # a sensitivity survey of the shipped model: seconds
def test_target_is_met_with_widths_that_differ_by_block():
    _, report = prune(str(DIGITS), calib=str(DIGITS_CALIB), target_flops=0.5)
    assert report.flops_after <= 0.5 * report.flops_before * 1.02  # the cost model counts MatMul/Gemm/Conv
    widths = {(b.qk_dim_after, b.v_dim_after) for b in report.blocks if b.kind == "attention"}
    widths |= {b.ffn_dim_after for b in report.blocks if b.kind == "ffn"}
    assert len(widths) > 2
    assert report.allocation is not None and len(report.allocation["layers"]) == 4
