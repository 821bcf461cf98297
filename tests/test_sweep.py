"""`onnxsnp sweep`: several budgets from one calibration; each model the same as its own run."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT
from onnxsnp import prune
from onnxsnp.cli import main
from onnxsnp.errors import SnpError
from onnxsnp.sweeping import parse_goals

MODEL = ROOT / "models" / "digits_vit.onnx"
CALIB = ROOT / "models" / "digits_vit_calib.npz"
GOALS = (0.8, 0.5)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    before = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    code = main(["sweep", str(MODEL), "--targets", ",".join(map(str, GOALS)), "--out", str(folder),
                 "--calib", str(CALIB), "--calib-samples", "64", "-q"])
    assert code == 0
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == before
    return folder


@pytest.mark.slow  # the sweep, and each budget run again: seconds
def test_sweep_writes_every_budget_and_the_trade_off(swept):
    rows = list(csv.DictReader((swept / "sweep.csv").open()))
    assert [float(r["goal"]) for r in rows] == sorted(GOALS, reverse=True)
    for row in rows:
        model = onnx.load(str(swept / row["file"]))
        onnx.checker.check_model(model)
        kept = int(row["flops_after"]) / int(row["flops_before"])
        assert kept <= float(row["goal"]) + 0.01  # the allocation meets its FLOPs goal (measured on the file)
        assert 0.9 < float(row["output_cosine"]) <= 1.0 + 1e-6
    assert int(rows[1]["flops_after"]) < int(rows[0]["flops_after"])
    page = (swept / "sweep.html").read_text()
    assert page.count("<svg") >= 1 and "target_0.5.onnx" in page
    assert (swept / "sweep.md").read_text().count("\n") == len(GOALS) + 2


@pytest.mark.slow  # the sweep, and each budget run again: seconds
def test_a_swept_model_equals_its_own_run(swept):
    """Sharing calibration, batches and the survey across budgets changes nothing: the model at
    each budget has exactly the weights of a separate `--target-flops` run."""
    for goal in GOALS:
        alone, _ = prune(str(MODEL), target_flops=goal, calib=str(CALIB), calib_samples=64, progress=False,
                         measure_latency=False)
        mine, theirs = weights(onnx.load(str(swept / f"target_{goal:g}.onnx"))), weights(alone)
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)


@pytest.mark.parametrize("text", ["", "1.5", "0.5,0.5", "0,0.5", "a,b"])
def test_bad_targets_are_refused(text):
    with pytest.raises(SnpError, match="--targets"):
        parse_goals(text)


@pytest.mark.parametrize("extra", [["--targets", "0.5,2"], ["--targets", "0.5", "--kind", "time"], []])
def test_bad_sweeps_fail_in_one_line(tmp_path, capsys, extra):
    code = main(["sweep", str(MODEL), "--out", str(tmp_path / "out"), "--calib", str(CALIB), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_out_must_be_a_folder(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("x")
    assert main(["sweep", str(MODEL), "--targets", "0.5", "--out", str(taken), "--calib", str(CALIB)]) == 2
    assert "not a folder" in capsys.readouterr().err and taken.read_text() == "x"


@pytest.mark.slow  # the sweep, and each budget run again: seconds
def test_the_page_plots_fidelity_against_speed_with_the_original_and_the_front(swept):
    """The chart a choice is made from: one point per budget, the original as a point of its own,
    the budgets no other beats on both axes ringed, tick labels that differ from each other."""
    import re

    from onnxsnp.report.html_charts import pareto

    page = (swept / "sweep.html").read_text()
    rows = list(csv.DictReader((swept / "sweep.csv").open()))
    chart = page.split("<svg")[1]
    assert chart.count('class="point"') == len(rows) and chart.count('class="original"') == 1
    fidelity = [float(r["centred_cosine"]) for r in rows]
    speed = [float(r["speedup"]) if r["speedup"] else int(r["flops_before"]) / int(r["flops_after"]) for r in rows]
    assert chart.count('class="pareto"') == len(pareto(list(zip(speed, fidelity)))) >= 1
    labels = re.findall(r'text-anchor="end">([^<]+)</text>', chart)
    assert len(labels) == len(set(labels)) >= 5


def test_the_front_is_what_no_other_point_beats():
    from onnxsnp.report.html_charts import pareto

    assert pareto([(1.2, 0.99), (1.5, 0.97), (1.4, 0.96), (2.0, 0.90), (1.1, 0.98)]) == [0, 1, 3]


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.slow  # the sweep, and each budget run again: seconds
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_chromium_draws_the_trade_off(swept, tmp_path):
    import subprocess

    import matplotlib.image

    shot = tmp_path / "sweep.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                    f"--screenshot={shot}", (swept / "sweep.html").as_uri()], check=True, capture_output=True,
                   timeout=120)
    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(np.int64)
    colour = pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]
    assert (colour == (255 << 16 | 127 << 8 | 14)).sum() > 40 * len(GOALS)  # the budgets' orange points
    assert (colour == (44 << 16 | 160 << 8 | 44)).sum() > 50  # the original's green square
