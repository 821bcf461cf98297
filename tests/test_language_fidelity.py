"""A language model's fidelity is read as its users read it: perplexity before and after on the
held-back text, next-token agreement (onnxsnp.verify.verification.language_model_fidelity)."""
from __future__ import annotations

import numpy as np
import pytest

from onnxsnp.verify.verification import Fidelity, language_model_fidelity

VOCAB, SAMPLES, TOKENS = 11, 3, 6


def test_uniform_logits_are_as_perplexed_as_the_vocabulary_is_large():
    ids = np.random.default_rng(0).integers(0, VOCAB, (SAMPLES, TOKENS))
    uniform = np.zeros((SAMPLES, TOKENS, VOCAB), np.float32)
    found = language_model_fidelity(["logits"], [uniform], [uniform], {"input_ids": ids}, None)
    assert found["perplexity_before"] == pytest.approx(VOCAB)
    assert found["perplexity_after"] == pytest.approx(VOCAB)
    assert found["tokens"] == SAMPLES * (TOKENS - 1)


def test_perplexity_is_of_the_next_token_and_padding_is_left_out():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (SAMPLES, TOKENS))
    mask = np.ones_like(ids)
    mask[0, TOKENS - 2:] = 0  # two padded positions at the end of the first sample
    certain = np.full((SAMPLES, TOKENS, VOCAB), -30.0, np.float32)
    certain[:, :-1][np.arange(SAMPLES)[:, None], np.arange(TOKENS - 1)[None], ids[:, 1:]] = 30.0  # knows the next token
    wrong = np.roll(certain, 1, axis=-1)  # sure of another token: agreement 0
    found = language_model_fidelity(["present.0.key", "logits"], [None, certain], [None, wrong],
                                    {"input_ids": ids, "attention_mask": mask}, "attention_mask")
    assert found["tokens"] == SAMPLES * (TOKENS - 1) - 2
    assert found["perplexity_before"] == pytest.approx(1.0, abs=1e-6)
    assert found["perplexity_after"] > 1e20
    assert found["next_token_agreement"] == 0.0
    fidelity = Fidelity(SAMPLES, 0.5, 1.0, None, **found)
    assert fidelity.perplexity_ratio == found["perplexity_after"] / found["perplexity_before"]
    assert fidelity.as_dict()["perplexity_ratio"] == fidelity.perplexity_ratio


def test_models_without_logits_over_token_ids_have_none():
    ids = np.zeros((SAMPLES, TOKENS), np.int64)
    hidden = np.zeros((SAMPLES, TOKENS, 4), np.float32)
    assert language_model_fidelity(["last_hidden_state"], [hidden], [hidden], {"input_ids": ids}, None) == {}
    assert language_model_fidelity(["logits"], [hidden[:, 0]], [hidden[:, 0]], {"input_ids": ids}, None) == {}
    assert "perplexity_ratio" not in Fidelity(SAMPLES, 1.0, 0.0, None).as_dict()


def test_fidelity_in_chunks_of_samples_is_the_fidelity_of_the_whole(monkeypatch):
    from onnxsnp.verify import verification

    rng = np.random.default_rng(3)
    original = [rng.normal(size=(9, 5, 40)).astype(np.float32), rng.normal(size=(9, 7)).astype(np.float32)]
    pruned = [o + 0.3 * rng.normal(size=o.shape).astype(np.float32) for o in original]
    whole = verification.fidelity(original, pruned)
    monkeypatch.setattr(verification, "_CHUNK_BYTES", 8 * 40 * 5 * 2)  # two samples of the first output at a time
    chunked = verification.fidelity(original, pruned)
    for name in ("output_cosine", "centred_cosine", "relative_error", "max_abs_diff", "top1_agreement"):
        assert getattr(chunked, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
