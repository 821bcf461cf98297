"""The report's split of the FLOPs cut by part: from the cost model, summing to the measured cut,
in the text table and the JSON."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT
from onnxsnp import prune
from onnxsnp.report.report import PART_NAMES, BlockKind
from onnxsnp.score.costs import CutPart

DIGITS = ROOT / "models" / "digits_vit.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"


def test_uniform_ratios_report_each_parts_share_of_the_measured_cut():
    """Heads, Q/K pairs, V neurons and FFN neurons all cut: each is a part of the split, the parts
    sum to the cut measured on the written model (the cost model counts the same products), and
    without a measured allocation no loss is claimed."""
    _, report = prune(str(DIGITS), calib=str(DIGITS_CALIB), ratio=0.3, heads=0.25, measure_latency=False)
    assert [c.part for c in report.cut] == [CutPart.HEADS, CutPart.QK, CutPart.V, CutPart.FFN]
    assert sum(c.flops_removed for c in report.cut) == pytest.approx(report.flops_before - report.flops_after,
                                                                     abs=len(report.cut))
    assert sum(c.share for c in report.cut) == pytest.approx(1.0, abs=1e-3)
    assert all(c.flops_removed > 0 and c.loss is None and c.loss_per_gflop is None for c in report.cut)
    table = report.table()
    assert "FLOPs cut by part (cost model" in table
    for c in report.cut:
        assert f"{PART_NAMES[c.part]} " in table and f"({c.share:.1%})" in table

    data = json.loads(json.dumps(report.as_dict()))  # as cli --report writes it
    assert {b["kind"] for b in data["blocks"]} == {"attention", "ffn"}
    assert [c["part"] for c in data["cut"]] == ["heads", "qk", "v", "ffn"]
    assert [c["flops_removed"] for c in data["cut"]] == [c.flops_removed for c in report.cut]
    assert all(isinstance(b.kind, BlockKind) for b in report.blocks)


def test_a_removed_block_and_residual_channels_are_parts_of_their_own():
    """--blocks and --residual: the removed block is credited whole, the residual cut last (it
    scales what the other parts kept), and the parts still sum to the measured cut."""
    _, report = prune(str(DIGITS), calib=str(DIGITS_CALIB), ratio=0.2, residual=0.25, blocks=1, measure_latency=False)
    assert len(report.removed_blocks) == 1 and report.residual_width is not None
    assert [c.part for c in report.cut] == [CutPart.BLOCKS, CutPart.QK, CutPart.V, CutPart.FFN, CutPart.RESIDUAL]
    assert sum(c.flops_removed for c in report.cut) == pytest.approx(report.flops_before - report.flops_after,
                                                                     abs=len(report.cut))
    # one of the four equal blocks: under a fourth of the model, which also embeds and classifies
    assert 0 < report.cut[0].flops_removed / report.flops_before < 0.25 and "whole blocks" in report.table()


def test_ratio_zero_reports_no_cut():
    _, report = prune(str(DIGITS), calib=str(DIGITS_CALIB), ratio=0.0, measure_latency=False)
    assert report.cut == [] and "FLOPs cut by part" not in report.table()


@pytest.mark.slow  # a sensitivity survey of the shipped model: seconds
def test_a_measured_allocation_reports_loss_per_flop_by_part():
    """--target-flops: each part's loss is the allocation's per-block losses of that part summed,
    and its loss per GFLOP that over the part's FLOPs; the table compares attention with the FFNs."""
    _, report = prune(str(DIGITS), calib=str(DIGITS_CALIB), target_flops=0.5, measure_latency=False)
    layers = report.allocation["layers"]
    for c in report.cut:
        loss = sum(layer["loss_by_part"].get(c.part.value, 0.0) for layer in layers)
        assert c.loss == pytest.approx(loss, abs=1e-6)
        assert c.loss_per_gflop == pytest.approx(loss / (c.flops_removed / 1e9), rel=1e-3)
    for layer in layers:
        assert sum(layer["loss_by_part"].values()) == pytest.approx(layer["predicted_loss"], abs=1e-5)
    table = report.table()
    assert "loss/GFLOP" in table and "the FFNs' loss per FLOP" in table
