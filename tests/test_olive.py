"""The Olive pass: real Olive workflows (olive-ai) with SnpPruning between the input model and
onnxruntime quantization, run through Olive's own command line and through onnxsnp.olive.run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import ROOT, feed_for, run
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks

pytest.importorskip("olive")
pytestmark = pytest.mark.slow

# Olive reports usage to a Microsoft endpoint unless told not to; nothing outside is reachable here
ENV = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"}
QUANTIZED = {"MatMulInteger", "DynamicQuantizeMatMul"}


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def head_widths(model) -> set[int]:
    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return {block.head_dim for block in find_blocks(ModelGraph(model)).attention}


def int8_weights(path) -> list[tuple[int, ...]]:
    """Shapes of the 2-D int8 weights quantization wrote (a quantized model has no attention onnxsnp reads)."""
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sorted(tuple(t.dims) for t in onnx.load(str(path)).graph.initializer if t.data_type in int8 and len(t.dims) == 2)


def workflow(model, snp: dict, out) -> dict:
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "passes": {"snp": {"type": "SnpPruning", **snp}, "quantize": {"type": "OnnxDynamicQuantization"}},
        "output_dir": str(out / "output"),
        "cache_dir": str(out / "cache"),
        "log_severity_level": 3,
    }


def output_model(out):
    models = sorted((out / "output").rglob("*.onnx"))
    assert len(models) == 1, models
    return models[0]


def test_olive_run_with_the_package_config(exported, tmp_path):
    """`olive run --config WORKFLOW --package-config FILE`, the file from `python -m onnxsnp.olive`."""
    source = exported("bert", "eager", True)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feed_for(source, batch=16, seed=4))
    config = tmp_path / "workflow.json"
    config.write_text(json.dumps(workflow(source, {"ratio": 0.5, "calib": str(calib), "calib_samples": 16},
                                          tmp_path)))
    package = tmp_path / "olive_package.json"
    subprocess.run([sys.executable, "-m", "onnxsnp.olive", "--package-config", str(package)], check=True, cwd=ROOT,
                   env=ENV, timeout=300)
    assert "SnpPruning" in json.loads(package.read_text())["passes"]
    done = subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(config), "--package-config",
                           str(package)], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    final = output_model(tmp_path)
    assert QUANTIZED & {node.op_type for node in onnx.load(str(final)).graph.node}
    # the same pruning outside Olive: Olive's output is that model, quantized
    from onnxruntime.quantization import quantize_dynamic

    from onnxsnp import prune

    pruned, _ = prune(str(source), ratio=0.5, calib=str(calib), calib_samples=16)
    assert head_widths(source) == {8} and head_widths(pruned) == {4}
    onnx.save(pruned, str(tmp_path / "pruned.onnx"))
    quantize_dynamic(str(tmp_path / "pruned.onnx"), str(tmp_path / "pruned_int8.onnx"))
    assert int8_weights(final) == int8_weights(tmp_path / "pruned_int8.onnx")
    feed = feed_for(source, batch=4)
    for got, want in zip(run(str(final), feed), run(pruned, feed)):
        assert cosine(got, want) > 0.999


LOADER = """
import sys

import torch

sys.path.insert(0, {tools!r})
from torch_models import VisionTransformer


def load(model_path=None):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                             num_heads=4).eval()
"""


def test_conversion_then_snp_then_quantization(tmp_path, monkeypatch):
    """A PyTorch model through Olive's OnnxConversion, SnpPruning calibrated on an image folder,
    then OnnxDynamicQuantization, with onnxsnp.olive.run."""
    from PIL import Image

    from onnxsnp.olive import run as run_workflow

    (tmp_path / "loader.py").write_text(LOADER.format(tools=str(ROOT / "tools")))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = workflow(None, {"ratio": 0.5, "calib_images": str(images), "image_size": "32x32"}, tmp_path)
    config["input_model"] = {
        "type": "PyTorchModel", "model_script": str(tmp_path / "loader.py"), "model_loader": "load",
        "io_config": {"input_names": ["pixel_values"], "input_shapes": [[1, 3, 32, 32]], "input_types": ["float32"],
                      "output_names": ["logits"], "dynamic_axes": {"pixel_values": {"0": "batch"},
                                                                   "logits": {"0": "batch"}}}}
    config["passes"] = {"convert": {"type": "OnnxConversion", "target_opset": 17}, **config["passes"]}
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    run_workflow(config)
    final = output_model(tmp_path)
    assert QUANTIZED & {node.op_type for node in onnx.load(str(final)).graph.node}
    # the loader's ViT: width 32, 4 heads of 8, FFN 128, 2 blocks; ratio 0.5 halves heads' and FFN widths
    width, kept_heads, kept_ffn = 32, 4 * 8 // 2, 128 // 2
    per_block = [(width, 3 * kept_heads), (kept_heads, width), (width, kept_ffn), (kept_ffn, width)]
    assert [s for s in int8_weights(final) if s != (width, 10)] == sorted(per_block * 2)  # (32, 10): the head
    pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert run(str(final), {"pixel_values": pixels})[0].shape == (3, 10)


@pytest.mark.parametrize("model, snp, message", [
    ("flat", {}, "onnxsnp: no prunable attention found"),
    ("bert", {"calib": "c.npz", "calib_text": "t.txt"}, "onnxsnp: give one of calib / calib_text"),
    ("bert", {"image_size": "32"}, "onnxsnp: image_size applies only with calib_images"),
])
def test_a_model_or_option_onnxsnp_refuses_fails_the_workflow(exported, tmp_path, monkeypatch, model, snp, message):
    from onnx import TensorProto, helper

    from onnxsnp.olive import run as run_workflow

    if model == "flat":  # no attention at all
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
        source = tmp_path / "flat.onnx"
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])),
                  str(source))
    else:
        source = exported("bert", "eager", True)
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    config = workflow(source, snp, tmp_path)
    del config["passes"]["quantize"]
    with pytest.raises(ValueError, match=message):
        run_workflow(config)
    assert not list((tmp_path / "output").rglob("*.onnx"))


def test_the_pass_the_command_line_and_the_api_default_alike():
    """option_schema decides each option's default: the Olive pass once took 64 calibration samples
    where the command line takes all. The pass takes every option the schema gives it, with the
    schema's type, and the command line's parser parses to the same values."""
    from onnxsnp.cli import _prune_parser
    from onnxsnp.olive import SnpPruning
    from onnxsnp.option_schema import OPTIONS, Front

    config = SnpPruning._default_config(None)
    command_line = vars(_prune_parser().parse_args(["in.onnx", "out.onnx"]))
    for spec in OPTIONS:
        assert (spec.name in config) == (Front.OLIVE in spec.fronts), spec.name
        if spec.name in config:
            assert config[spec.name].default_value == spec.plain_default, spec.name
            assert config[spec.name].type_ == spec.config_type, spec.name
            if Front.CLI_PRUNE in spec.fronts:
                assert command_line[spec.name] == config[spec.name].default_value, spec.name
