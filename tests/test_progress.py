"""Progress lines: every stage that runs long enough is announced and timed, steps show how far
they are; into a file (not a terminal) they are plain lines, never carriage-return frames."""
from __future__ import annotations

import io

import pytest

from onnxsnp import progress
from onnxsnp.cli import main


def test_stages_and_steps_are_plain_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "EVERY", 0.0)
    out = io.StringIO()
    with progress.reporting(True, out):
        with progress.stage("loading"):
            pass
        counter = progress.Steps("reconstructing", 3, "half-blocks")
        for name in ("a", "b", "c"):
            counter.step(name)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[:2] == ["onnxsnp: loading …", lines[1]] and lines[1].startswith("onnxsnp: loading: done in")
    assert lines[2].startswith("onnxsnp: reconstructing: 1/3 half-blocks (a)") and "left" in lines[2]
    assert lines[-1].startswith("onnxsnp: reconstructing: 3/3 half-blocks (c)") and "left" not in lines[-1]


def test_nothing_is_written_when_reporting_is_off():
    out = io.StringIO()
    with progress.reporting(False, out):
        with progress.stage("loading"):
            pass
        progress.Steps("x", 2, "steps").step()
    assert out.getvalue() == ""


def test_the_cli_names_its_stages_in_a_redirected_log(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    path = exported("vit", "sdpa", True, "legacy")
    assert main([str(path), str(tmp_path / "out.onnx"), "--ratio", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    for name in ("loading the model", "matching attention and FFN blocks", "running the input model on",
                 "reconstructing block by block", "rewriting the graph", "verifying the pruned model", "writing"):
        assert f"onnxsnp: {name}" in err, name
