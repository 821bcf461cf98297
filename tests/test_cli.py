"""The command line: the happy path, and bad input that must fail cleanly (exit 2, one line,
no traceback, no output file, input untouched)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphs
from conftest import ROOT
from onnxsnp.cli import main
from onnxsnp.report.inspection import inspect_model


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prune_writes_model_table_and_report(exported, tmp_path, capsys):
    source = exported("vit", "manual", True)
    before = digest(source)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    assert main([str(source), str(out), "--ratio", "0.5", "--calib-samples", "16", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "params" in printed and "FLOPs" in printed and "fidelity" in printed
    data = json.loads(report.read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "fidelity", "blocks"):
        assert key in data
    assert data["flops_after"] < data["flops_before"]
    block = next(b for b in data["blocks"] if b["kind"] == "attention")
    assert (block["qk_dim_before"], block["qk_dim_after"], block["v_dim_before"], block["v_dim_after"]) == (8, 4, 8, 4)
    onnx.checker.check_model(onnx.load(str(out)))
    assert digest(source) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_group_ratios_override_the_common_ratio(exported, tmp_path, capsys):
    source = exported("bert", "eager", True)
    report = tmp_path / "r.json"
    assert main([str(source), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--qk-ratio", "0.25", "--v-ratio", "0",
                 "--ffn-ratio", "0.75", "--calib-samples", "8", "--report", str(report), "-q"]) == 0
    assert capsys.readouterr().out == ""
    blocks = json.loads(report.read_text())["blocks"]
    attention = [b for b in blocks if b["kind"] == "attention"]
    ffn = [b for b in blocks if b["kind"] == "ffn"]
    assert {(b["qk_dim_after"], b["v_dim_after"]) for b in attention} == {(6, 8)}
    assert {b["ffn_dim_after"] for b in ffn} == {16}


def test_calibration_file_is_used(exported, tmp_path, capsys):
    source = exported("bert", "sdpa", True)
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    mask = np.ones((12, 10), dtype=np.int64)
    mask[:, 7:] = 0  # padded tail: must not break scoring
    np.savez(calib, input_ids=rng.integers(0, 100, (12, 10)), attention_mask=mask)
    assert main([str(source), str(tmp_path / "o.onnx"), "--calib", str(calib), "--ratio", "0.3"]) == 0
    captured = capsys.readouterr()
    assert "synthetic" not in captured.err
    assert "calib.npz" in captured.out


def test_inspect_lists_blocks(exported, capsys):
    assert main(["inspect", str(exported("vit", "sdpa", False))]) == 0
    printed = capsys.readouterr().out
    assert "2 attention block(s)" in printed and "fused-qkv" in printed and "2 FFN block(s)" in printed
    assert "block-by-block reconstruction (--compensate lstsq): yes" in printed


def test_inspect_says_when_reconstruction_cannot_run(tmp_path, capsys):
    """A lone attention without a residual stream: no half-block segments, so inspect says the
    one-pass refit runs instead, and why."""
    path = tmp_path / "lone.onnx"
    onnx.save(graphs.softmax_attention(), path)
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "block-by-block reconstruction (--compensate lstsq): no, the one-pass refit runs instead: " in printed


def test_inspect_json_is_what_the_table_says(exported, capsys):
    path = exported("vit", "sdpa", False)
    assert main(["inspect", str(path), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    matches = inspect_model(str(path)).matches
    assert found["prunable"] is True
    assert [b["name"] for b in found["attention"]] == [b.name for b in matches.attention]
    assert [(f["name"], f["hidden"]) for f in found["ffn"]] == [(f.name, f.hidden) for f in matches.ffn]
    assert found["reconstruction"] == "yes"


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_exits_2_when_nothing_can_be_pruned(tmp_path, capsys, as_json):
    """A pipeline's pre-check: a model without attention or FFN blocks is not prunable (exit 2)."""
    path = mlp_model(tmp_path / "mlp.onnx")
    assert main(["inspect", str(path)] + (["--json"] if as_json else [])) == 2
    captured = capsys.readouterr()
    assert "nothing to prune" in captured.err and len(captured.err.strip().splitlines()) == 1
    if as_json:
        assert json.loads(captured.out)["prunable"] is False


def mlp_model(path):
    """A valid model without attention."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


BAD_CASES = {
    "missing input": lambda src, tmp: ([str(tmp / "nope.onnx"), str(tmp / "out.onnx")], "not found"),
    "not onnx": lambda src, tmp: ([_write(tmp / "text.onnx", b"hello, this is not a model\n" * 20),
                                   str(tmp / "out.onnx")], "onnx"),
    "truncated": lambda src, tmp: ([_write(tmp / "cut.onnx", src.read_bytes()[: len(src.read_bytes()) // 2]),
                                    str(tmp / "out.onnx")], ""),
    "no attention": lambda src, tmp: ([str(mlp_model(tmp / "mlp.onnx")), str(tmp / "out.onnx")], "attention"),
    "ratio too big": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--ratio", "1.0"], "ratio"),
    "ratio negative": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--ratio", "-0.1"], "ratio"),
    "ratio nan": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--ratio", "nan"], "ratio"),
    "ratio text": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--ratio", "half"], "ratio"),
    "output folder missing": lambda src, tmp: ([str(src), str(tmp / "no" / "dir" / "out.onnx")], "folder"),
    "output is input": lambda src, tmp: ([str(src), str(src)], "input"),
    "calib missing key": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--calib",
                                            _npz(tmp / "c.npz", wrong=np.zeros((4, 3, 32, 32), np.float32))], "lacks"),
    "calib wrong shape": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--calib",
                                            _npz(tmp / "c.npz", pixel_values=np.zeros((4, 3, 16, 16), np.float32))],
                                           "shape"),
    "calib nan": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--calib",
                                    _npz(tmp / "c.npz", pixel_values=np.full((4, 3, 32, 32), np.nan, np.float32))],
                                   "nan"),
    "calib not npz": lambda src, tmp: ([str(src), str(tmp / "out.onnx"), "--calib",
                                        _write(tmp / "c.npz", b"garbage")], "npz"),
}


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_cleanly(exported, tmp_path, capsys, case):
    source = tmp_path / "model.onnx"
    source.write_bytes(exported("vit", "manual", True).read_bytes())
    argv, hint = BAD_CASES[case](source, tmp_path)
    before = digest(source)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("onnxsnp")
    assert "Traceback" not in "\n".join(err)
    assert hint.lower() in errors[0].lower()
    assert digest(source) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # no output, no temp file


@pytest.mark.slow  # a Python process: seconds
def test_module_entry_point_exit_code(tmp_path):
    """`python -m onnxsnp` really exits with 2 and a single stderr line."""
    result = subprocess.run([sys.executable, "-m", "onnxsnp", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not found" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_heads_combine_with_neuron_ratios(exported, tmp_path):
    report = tmp_path / "r.json"
    assert main([str(exported("vit", "manual", True)), str(tmp_path / "o.onnx"), "--ratio", "0.25", "--heads", "0.5",
                 "--calib-samples", "8", "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    attention = [b for b in data["blocks"] if b["kind"] == "attention"]
    assert {(b["heads"], b["heads_after"], b["qk_dim_after"], b["v_dim_after"]) for b in attention} == {(4, 2, 6, 6)}
    assert data["ratios"]["heads"] == 0.5


@pytest.mark.slow  # prunes and times the shipped model: seconds
def test_verbose_logs_stages_and_report_has_size_and_latency(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([str(ROOT / "models" / "digits_vit.onnx"), str(tmp_path / "o.onnx"), "--ratio", "0.5",
                 "--calib-samples", "16", "--report", str(report), "-v"]) == 0
    captured = capsys.readouterr()
    assert "onnxsnp: loaded and matched" in captured.err and "rewritten and verified" in captured.err
    assert "latency, 1 thread" in captured.out and "weights" in captured.out
    data = json.loads(report.read_text())
    assert data["weight_bytes_after"] < data["weight_bytes_before"]
    assert data["latency_ms_before"] > 0 and data["latency_ms_after"] > 0
