"""The HTML report: its tables, charts and attention maps, and that a real browser renders them."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphs
from conftest import ROOT
from onnxsnp import prune
from onnxsnp.verify.attention_maps import MAP_SIZE, SAMPLE_HEADS
from onnxsnp.cli import main
from onnxsnp.report.html import render
from onnxsnp.report.html_charts import PALETTE
from onnxsnp.report.report import CURVE_FRACTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1100, 2600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A FLOPs-target run on the shipped model (the global allocation measures sensitivity)."""
    folder = tmp_path_factory.mktemp("html")
    assert main([str(ROOT / "models" / "digits_vit.onnx"), str(folder / "out.onnx"), "--target-flops", "0.5",
                 "--calib", str(ROOT / "models" / "digits_vit_calib.npz"), "--html", str(folder / "r.html"),
                 "--report", str(folder / "r.json"), "-q"]) == 0
    return (folder / "r.html").read_text(), json.loads((folder / "r.json").read_text()), folder / "r.html"


@pytest.mark.slow  # a FLOPs-target run with its survey, and a browser: seconds
def test_html_has_the_summary_fidelity_and_a_kept_width_bar_per_group_and_block(run):
    text, report, _ = run
    assert "latency, 1 thread" in text
    f = report["fidelity"]
    for value in (f"centred cosine {f['centred_cosine']:.4f}", f"relative error {f['relative_error']:.4f}"):
        assert value in text
    attention = [b for b in report["blocks"] if b["kind"] == "attention"]
    ffn = [b for b in report["blocks"] if b["kind"] == "ffn"]
    cells = re.findall(r'<td class="bar (\w+)"[^>]*>([^<]+)</td>', text)
    kept = {group: [value for g, value in cells if g == group] for group in ("heads", "qk", "v", "ffn")}
    assert kept["heads"] == [f"{b['heads_after']} / {b['heads']}" for b in attention]
    assert kept["qk"] == [f"{b['qk_dim_after']} / {b['qk_dim_before']}" for b in attention]
    assert kept["v"] == [f"{b['v_dim_after']} / {b['v_dim_before']}" for b in attention]
    assert kept["ffn"] == [f"{b['ffn_dim_after']} / {b['ffn_dim_before']}" for b in ffn]
    assert len({value for value in kept["ffn"]}) > 1  # the allocation gave the blocks different widths


@pytest.mark.slow  # a FLOPs-target run with its survey: seconds
def test_html_says_how_the_cut_was_shared(run):
    text, report, _ = run
    parts = re.search(r"<p>FLOPs cut by part \(cost model\): ([^<]+)\.</p>", text).group(1)
    assert report["cut"]
    for c in report["cut"]:
        assert f"({c['share']:.1%})" in parts


@pytest.mark.slow  # a FLOPs-target run with its survey, and a browser: seconds
def test_html_shows_the_measured_sensitivity_and_the_refit(run):
    text, report, _ = run
    layers = report["allocation"]["layers"]
    for layer in layers:
        assert f"<td>{layer['name']}</td><td>{layer['predicted_loss']:.3g}</td>" in text
        assert layer["curves"]["kept"] == list(CURVE_FRACTIONS)
    drawn = re.findall(r'<polyline class="line" points="([^"]+)"', text)
    assert len(drawn) == 4 * len(layers)  # Q/K, V, heads and FFN curves of every layer
    halves = report["reconstruction"]["halves"]
    for half in halves:
        assert re.search(rf"<td>{re.escape(half['name'])}</td><td>{half['ridge']:g}</td>"
                         rf".*?>{half['error_sliced']:.3g}</td>.*?>{half['error_refitted']:.3g}</td>", text)
    cells = re.findall(r'<td class="bar (sliced|refitted)"', text)
    assert cells.count("sliced") == cells.count("refitted") == len(halves)


@pytest.mark.slow  # a FLOPs-target run with its survey, and a browser: seconds
def test_the_report_carries_a_few_small_attention_maps_drawn_side_by_side(run):
    import matplotlib.image

    text, report, _ = run
    samples = report["attention_maps"]
    kept_heads = sum(b["heads_after"] for b in report["blocks"] if b["kind"] == "attention")
    assert len(samples) == min(SAMPLE_HEADS, kept_heads)
    assert [s["kl"] for s in samples] == sorted((s["kl"] for s in samples), reverse=True)
    for s in samples:
        assert max(s["shape"]) <= MAP_SIZE and s["tokens"][0] > MAP_SIZE  # the shipped model's maps are larger
        for which in ("original", "pruned"):
            assert len(s[which]) == 4 * -(-s["shape"][0] * s["shape"][1] // 3)  # base64 of one byte per cell
    # the report stays readable: no array in it grows with tokens or samples
    assert _longest_list(report) <= max(len(report["blocks"]), len(report["reconstruction"]["halves"]))
    images = re.findall(r'<img class="map" alt="([^"]*)"[^>]*width="(\d+)" height="(\d+)" src="data:image/png;'
                        r'base64,([^"]+)"', text)
    assert len(images) == 2 * len(samples)
    for (label, width, height, data), (s, which) in zip(images, [(s, w) for s in samples
                                                                  for w in ("original", "pruned")]):
        assert label.startswith(f"{which}: {s['block']}, head {s['head']}")
        pixels = (matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3] * 255).round()
        codes = np.frombuffer(base64.b64decode(s[which]), dtype=np.uint8).reshape(s["shape"])
        assert (pixels == PALETTE[codes]).all()  # one PNG pixel per stored cell, in the palette
        cell = int(width) // s["shape"][1]  # drawn enlarged, cells square
        assert cell > 1 and (int(height), int(width)) == (s["shape"][0] * cell, s["shape"][1] * cell)


def test_fused_attention_says_there_is_no_map_and_ratios_say_nothing_was_surveyed():
    model = graphs.ort_attention()  # com.microsoft.Attention: no Softmax in the graph
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                 [1, graphs.TOKENS, graphs.WIDTH]))
    calib = {"x": np.random.default_rng(0).normal(size=(16, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)}
    _, report = prune(model, 0.5, calib=calib)
    assert report.attention_maps == [] and set(report.attention_kl.values()) == {None}
    text = render(report)
    assert "the attention is a fused op (no Softmax tensor to read)" in text
    assert '<img class="map"' not in text and "Sensitivity per layer" in text and "Not measured" in text


def _longest_list(value) -> int:
    if isinstance(value, dict):
        return max([_longest_list(v) for v in value.values()] + [0])
    if isinstance(value, list):
        return max([len(value)] + [_longest_list(v) for v in value])
    return 0


@pytest.mark.slow  # a FLOPs-target run with its survey, and a browser: seconds
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_chromium_renders_the_charts_and_maps(run, tmp_path):
    import matplotlib.image

    text, _, page = run
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(np.int64)
    colour = pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]

    def count(*rgb: tuple[int, int, int]) -> int:
        return int(np.isin(colour, [r << 16 | g << 8 | b for r, g, b in rgb]).sum())

    purple = count((148, 103, 189))  # the attention-error bars
    maps = count(*(tuple(int(c) for c in p) for p in PALETTE))
    drawn = sum(int(w) * int(h) for w, h in re.findall(r'<img class="map"[^>]*width="(\d+)" height="(\d+)"', text))
    assert purple > 500
    assert maps > 0.9 * drawn  # every attention map fully on screen, in the palette's colours
    tints = [tuple(int(m[i:i + 2], 16) for i in (1, 3, 5))
             for m in re.findall(r'class="bar qk"[^>]*linear-gradient\(to right,(#[0-9a-f]{6})', text)]
    assert count(*set(tints)) > 1000  # the kept-width bars of the Q/K column
