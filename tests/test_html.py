"""The HTML report: its charts, and that a real browser renders them."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from onnxsnp.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html")
    assert main([str(ROOT / "models" / "digits_vit.onnx"), str(folder / "out.onnx"), "--ratio", "0.5", "--heads",
                 "0.25", "--calib", str(ROOT / "models" / "digits_vit_calib.npz"), "--html", str(folder / "r.html"),
                 "-q"]) == 0
    return folder / "r.html"


def test_html_has_the_table_and_one_bar_per_group_and_block(page):
    text = page.read_text()
    assert "<table>" in text and "latency, 1 thread" in text
    bars = re.findall(r'<rect class="bar"[^>]*><title>([^<]+)</title>', text)
    kept = [b for b in bars if not b.startswith("KL")]
    assert len(kept) == 4 * 3 + 4  # q/k, v, heads for 4 attention blocks; ffn for 4 FFN blocks
    assert sum(b.startswith("KL") for b in bars) == 4  # attention-map error of every block


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_chromium_renders_the_charts(page, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    blue = np.abs(pixels - np.array([31, 119, 180]) / 255).max(axis=-1) < 0.05  # the q/k bars
    purple = np.abs(pixels - np.array([148, 103, 189]) / 255).max(axis=-1) < 0.05  # the attention-error bars
    assert blue.sum() > 1000 and purple.sum() > 500
