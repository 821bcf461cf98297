"""Compensation: refits that restore a pruned layer's output from calibration statistics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxsnp import prune
from onnxsnp.cli import main
from onnxsnp.compensate.compensation import Statistics
from onnxsnp.match import Linear

ROOT = Path(__file__).resolve().parent.parent


class Constants:
    """Stands in for ModelGraph where only constants are read."""

    def __init__(self, **values):
        self.values = values

    def constant(self, name):
        return self.values[name]


def layer(inputs: int, outputs: int, transposed: bool = False) -> Linear:
    return Linear("fc2", "W", 1, transposed, "add", "b", 0, "x", "y", inputs, outputs)


def refit(weight, bias, linear, keep, x, mode):
    stats = Statistics.empty(Constants(W=weight, b=bias), linear, keep)
    for chunk in np.array_split(x, 3):  # accumulated batch by batch, as in a calibration pass
        stats.add(chunk)
    return stats.solve(mode)


def test_least_squares_recovers_removed_inputs_that_kept_ones_explain():
    rng = np.random.default_rng(0)
    kept_inputs = rng.standard_normal((500, 6))
    mixing = rng.standard_normal((6, 2))
    x = np.concatenate([kept_inputs, kept_inputs @ mixing + 0.5], axis=1)  # inputs 6, 7 are redundant
    weight, bias = rng.standard_normal((8, 3)), rng.standard_normal(3)
    keep = np.arange(6)
    import onnxsnp.compensate.compensation as compensation

    ridge, compensation.RIDGE = compensation.RIDGE, 1e-9
    try:
        result = refit(weight, bias, layer(8, 3), keep, x, "lstsq")
    finally:
        compensation.RIDGE = ridge
    np.testing.assert_allclose(kept_inputs @ result.weight + result.bias, x @ weight + bias, rtol=1e-5, atol=1e-5)


def test_bias_mode_folds_the_mean_contribution():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 5))
    x[:, 4] = 2.0  # a removed input that is constant: its contribution is exactly its mean
    weight, bias = rng.standard_normal((5, 2)), np.zeros(2)
    result = refit(weight.T, bias, layer(5, 2, transposed=True), np.arange(4), x, "bias")
    np.testing.assert_allclose(x[:, :4] @ result.weight + result.bias, x @ weight + bias, atol=1e-5)


@pytest.mark.slow  # prunes the shipped model end to end: seconds
def test_compensation_improves_the_shipped_model():
    model, calib = ROOT / "models" / "digits_vit.onnx", ROOT / "models" / "digits_vit_calib.npz"
    # 64 samples: 8 held back for the report, 8 for choosing the one-pass pieces, 48 fitted
    cosines = {mode: prune(str(model), ratio=0.5, calib=str(calib), compensate=mode,
                           calib_samples=64)[1].fidelity.output_cosine for mode in ("none", "bias", "lstsq")}
    assert cosines["lstsq"] > cosines["none"] and cosines["bias"] > cosines["none"]


@pytest.mark.parametrize("flags,mode", [(["--no-compensate"], "none"), (["--compensate", "bias"], "bias"), ([], "lstsq")])
def test_cli_compensation_flags(tmp_path, flags, mode):
    report = tmp_path / "r.json"
    assert main([str(ROOT / "models" / "digits_vit.onnx"), str(tmp_path / "o.onnx"), "--ratio", "0.3",
                 "--calib-samples", "16", "--report", str(report), "-q", *flags]) == 0
    assert json.loads(report.read_text())["compensation"] == mode


@pytest.mark.slow  # prunes the shipped model end to end: seconds
def test_rescaling_kept_qk_pairs_restores_scores():
    """Least-squares factors on the kept Q/K pairs bring the pruned model closer to the original."""
    from onnxsnp import prune

    model, calib = ROOT / "models" / "digits_vit.onnx", ROOT / "models" / "digits_vit_calib.npz"
    cosines = [prune(str(model), 0.0, qk_ratio=0.75, calib=str(calib), reduction="select",
                     rescale_qk=flag)[1].fidelity.output_cosine for flag in (False, True)]
    assert cosines[1] > cosines[0]


def test_unpruned_output_projection_is_left_alone_by_one_pass_compensation():
    """Only Q/K pruned, bias mode (one pass): V is whole, so the output projection keeps its exact
    weights. (The block-by-block reconstruction refits it anyway, to absorb the Q/K change.)"""
    from onnxsnp.ir.graph import ModelGraph

    model = ROOT / "models" / "digits_vit.onnx"
    pruned, _ = prune(str(model), ratio=0.0, qk_ratio=0.5, calib=str(ROOT / "models" / "digits_vit_calib.npz"),
                      compensate="bias")
    original = ModelGraph(__import__("onnx").load(str(model)))
    after = ModelGraph(pruned)
    proj = [n for n in pruned.graph.node if n.name.endswith("attn/proj/MatMul")]
    assert proj and all(np.array_equal(after.constant(n.input[1]), original.constant(
        original.node(n.name).input[1])) for n in proj)


@pytest.mark.slow  # prunes the shipped model end to end: seconds
def test_fp16_model_with_default_compensation(tmp_path):
    """fp16 activations must not overflow the Q/K statistics (scores are accumulated in float64)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = tmp_path / "digits_fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(ROOT / "models" / "digits_vit.onnx")), keep_io_types=True),
              str(source))
    pruned, report = prune(str(source), ratio=0.5, calib=str(ROOT / "models" / "digits_vit_calib.npz"))
    assert report.fidelity.output_cosine > 0.8
    assert {t.data_type for t in pruned.graph.initializer if t.data_type in (1, 10)} == {10}
