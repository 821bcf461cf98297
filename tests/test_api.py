"""The Python API: `onnxsnp.prune`, `sweep`, `inspect` and `options` with the command line's
options as keywords, calibration from raw data, one-line SnpErrors, and a help page that shows
the API."""
from __future__ import annotations

import csv
import pydoc

import onnx
import pytest

import onnxsnp
from conftest import ROOT

MODEL = ROOT / "models" / "digits_vit.onnx"
CALIB = ROOT / "models" / "digits_vit_calib.npz"


@pytest.mark.parametrize("keywords, named", [({"qk_ratoi": 0.3}, "qk_ratoi"), ({"heads": 1.5}, "--heads"),
                                             ({"calib_text": "a.txt", "calib": "b.npz"}, "calib_text=")])
def test_a_bad_keyword_is_a_one_line_snp_error_naming_it(keywords, named):
    with pytest.raises(onnxsnp.SnpError) as error:
        onnxsnp.prune(str(MODEL), **keywords)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_help_shows_the_api():
    text = pydoc.render_doc(onnxsnp, renderer=pydoc.plaintext)
    description = text.split("PACKAGE CONTENTS")[0]
    for name in ("prune(", "sweep(", "inspect(", "Report", "SnpError", "calib_text"):
        assert name in description, name
    assert set(onnxsnp.__all__) <= set(dir(onnxsnp))
    assert onnxsnp.prune.__doc__ and "calib_images" in onnxsnp.prune.__doc__


def test_prune_takes_a_text_file_and_the_tokenizer_beside_the_model(tmp_path, torch):
    from test_calib_data import SENTENCES, export_text_model  # exports with torch

    model = export_text_model(tmp_path / "text")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES))
    pruned, report = onnxsnp.prune(str(model), 0.3, calib_text=str(texts), max_length=24, calib_samples=10,
                                   measure_latency=False)
    assert report.calibration.startswith(str(texts)) and "tokenizer" in report.calibration
    assert report.calibration_samples + report.holdout_samples == 10
    assert report.flops_after < report.flops_before
    onnx.checker.check_model(pruned)


@pytest.mark.slow  # a sweep: seconds
def test_sweep_writes_one_model_per_budget_and_the_page(tmp_path):
    result = onnxsnp.sweep(str(MODEL), [0.8, 0.6], tmp_path / "out", calib=str(CALIB), calib_samples=32,
                           measure_latency=False)
    assert [row.goal for row in result.rows] == [0.8, 0.6]
    for row in result.rows:
        assert (tmp_path / "out" / row.file).exists()
        assert row.flops_after / row.flops_before == pytest.approx(row.goal, abs=0.05)
    assert [float(r["goal"]) for r in csv.DictReader((tmp_path / "out" / "sweep.csv").open())] == [0.8, 0.6]
    assert (tmp_path / "out" / "sweep.html").read_text().startswith("<!")


def test_inspect_lists_what_is_matched():
    found = onnxsnp.inspect(str(MODEL))
    assert found.matches.attention and found.matches.ffn and not found.matches.skipped
