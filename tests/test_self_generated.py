"""tools/bench_real_decoders.py --generated: the windows the original writes itself are sampled
through its KV cache as decoders.greedy decodes (a nucleus of one token is greedy), seeded, without
the banned ids; beside the real windows the pruner fits on the real windows it would fit on alone
and holds back the real ones it would hold back (pipeline._split)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import bench_real_decoders
from decoders import greedy, sample
from onnxsnp.pipeline import _split

pytestmark = pytest.mark.slow  # a torch export and a tokenizers vocabulary: not in the fast tier's install
VOCAB, PROMPT, LENGTH = 100, 4, 12


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from decoder_export import export_dynamo, tiny_llama

    return onnx.load(str(export_dynamo(tiny_llama(vocab=VOCAB), tmp_path_factory.mktemp("selfgen") / "m.onnx")))


def _prompts(count: int) -> np.ndarray:
    return np.random.default_rng(3).integers(3, VOCAB, (count, PROMPT))


def test_a_one_token_nucleus_is_greedy_decoding(model):
    prompts = _prompts(3)
    made = sample(model, prompts, LENGTH, seed=0, top_p=1e-9, batch=2)
    assert made.shape == (3, LENGTH) and (made[:, :PROMPT] == prompts).all()
    for prompt, row in zip(prompts, made):
        assert row.tolist() == greedy(model, prompt.tolist(), LENGTH - PROMPT)


def test_sampling_is_seeded_and_never_draws_a_banned_id(model):
    prompts = _prompts(4)
    banned = list(range(3, VOCAB // 2))  # half the vocabulary, so that a draw of them would be seen
    first = sample(model, prompts, LENGTH, seed=7, top_p=1.0, banned=banned)
    assert (first == sample(model, prompts, LENGTH, seed=7, top_p=1.0, banned=banned)).all()
    assert not (first == sample(model, prompts, LENGTH, seed=8, top_p=1.0, banned=banned)).all()
    assert not np.isin(first[:, PROMPT:], banned).any()


@pytest.mark.parametrize("real, count", [(64, 192), (24, 40), (8, 8)])
def test_the_pruner_fits_and_holds_back_the_real_windows_it_would_alone(monkeypatch, real, count):
    from tokenizers import Tokenizer, models

    windows = np.arange(real * bench_real_decoders.WINDOW).reshape(real, -1)
    made = -1 - np.arange(count * bench_real_decoders.WINDOW).reshape(count, -1)  # told apart by sign
    monkeypatch.setattr(bench_real_decoders, "sample", lambda *a, **k: made)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    mixed = bench_real_decoders.with_generated(None, tokenizer, windows, count, PROMPT, 0.95, False)
    fitted, held = (part["ids"] for part in _split({"ids": mixed}, None))
    alone_fitted, alone_held = (part["ids"] for part in _split({"ids": windows}, None))
    assert (fitted[fitted[:, 0] >= 0] == alone_fitted).all() and (held[held[:, 0] >= 0] == alone_held).all()
    assert len(mixed) == real + count and len(np.unique(mixed, axis=0)) == real + count
    only = bench_real_decoders.with_generated(None, tokenizer, windows, count, PROMPT, 0.95, True)
    assert (only == made).all()
