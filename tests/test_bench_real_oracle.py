"""tools/bench_real_decoders.py --oracle: the diagnosis's calibration windows are what it says —
"in-sample" fits on every scored window (none in the pruner's held-back last eighth), "heldout-text"
on none of them."""
from __future__ import annotations

import numpy as np
import pytest

import bench_real_decoders
from onnxsnp.data.calib_text import stream_windows

WINDOW = bench_real_decoders.WINDOW
pytestmark = pytest.mark.slow  # a tokenizers vocabulary: not in the fast tier's install


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def _rows(windows: np.ndarray, among: np.ndarray) -> list[bool]:
    return [bool((among == row).all(axis=1).any()) for row in windows]


def test_in_sample_fits_on_every_scored_window_and_heldout_text_on_none():
    words = [f"w{i}" for i in range(997)]
    tokenizer = _tokenizer(words)
    # a stream of 60 windows whose every window differs (the words cycle with a prime period)
    texts = [" ".join(words[(t * WINDOW + i) % len(words)] for i in range(WINDOW)) for t in range(60)]
    scored, count = 8, 24
    heldout = stream_windows(tokenizer, texts, WINDOW, scored)
    inside = bench_real_decoders.oracle_calibration(tokenizer, texts, heldout, count, "in-sample")
    fitted = inside[:count - count // 8]  # what the pruner fits on (it holds back the last eighth)
    assert len(inside) == count
    assert all(_rows(heldout, fitted)) and not any(_rows(heldout, inside[count - count // 8:]))
    assert len(np.unique(inside, axis=0)) == count
    other = bench_real_decoders.oracle_calibration(tokenizer, texts, heldout, count, "heldout-text")
    assert len(other) == count and not any(_rows(heldout, other))
