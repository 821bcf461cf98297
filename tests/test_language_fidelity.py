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


def test_fidelity_in_blocks_is_the_fidelity_of_the_whole(monkeypatch):
    from onnxsnp.verify import verification

    rng = np.random.default_rng(3)
    original = [rng.normal(size=(9, 5, 120)).astype(np.float32), rng.normal(size=(9, 7)).astype(np.float32)]
    pruned = [o + 0.3 * rng.normal(size=o.shape).astype(np.float32) for o in original]
    whole = verification.fidelity(original, pruned)
    # blocks of the first output: 256 columns (the floor) of 600, two rows at a time
    monkeypatch.setattr(verification, "_BLOCK_VALUES", 2 * verification._MIN_COLUMNS)
    blocked = verification.fidelity(original, pruned)
    for name in ("output_cosine", "centred_cosine", "relative_error", "max_abs_diff", "top1_agreement"):
        assert getattr(blocked, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    # against the definitions, computed directly in float64 over whole rows
    cosines, centred, errors = [], [], []
    for ref, got in zip(original, pruned):
        a, b = ref.reshape(9, -1).astype(np.float64), got.reshape(9, -1).astype(np.float64)
        mean = a.mean(axis=0)
        for out, (x, y) in ((cosines, (a, b)), (centred, (a - mean, b - mean))):
            out.extend((x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
        errors.extend(np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1))
    assert whole.output_cosine == pytest.approx(np.mean(cosines), rel=1e-12)
    assert whole.centred_cosine == pytest.approx(np.mean(centred), rel=1e-12)
    assert whole.relative_error == pytest.approx(np.mean(errors), rel=1e-12)
    assert whole.max_abs_diff == max(float(np.abs(g.astype(np.float64) - o).max()) for o, g in zip(original, pruned))


def test_perplexity_in_blocks_of_positions_is_the_perplexity_of_the_whole(monkeypatch):
    from onnxsnp.verify import verification

    rng = np.random.default_rng(4)
    ids = rng.integers(0, VOCAB, (SAMPLES, TOKENS))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # padding at the start of one sample: the blocks skip its positions
    logits = [rng.normal(size=(SAMPLES, TOKENS, VOCAB)).astype(np.float32) for _ in range(2)]
    feed = {"input_ids": ids, "attention_mask": mask}
    whole = language_model_fidelity(["logits"], logits[:1], logits[1:], feed, "attention_mask")
    monkeypatch.setattr(verification, "_BLOCK_VALUES", 2 * VOCAB)  # two positions at a time
    blocked = language_model_fidelity(["logits"], logits[:1], logits[1:], feed, "attention_mask")
    assert blocked["tokens"] == whole["tokens"] == SAMPLES * (TOKENS - 1) - 2
    for name in ("perplexity_before", "perplexity_after"):
        assert blocked[name] == pytest.approx(whole[name], rel=1e-12), name
        # the definition: exp of the mean negative log-softmax of the next token over used positions
        row = logits[0 if name == "perplexity_before" else 1].astype(np.float64)
        log_softmax = row - np.log(np.exp(row).sum(axis=-1, keepdims=True))
        used = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
        picked = np.take_along_axis(log_softmax[:, :-1], ids[:, 1:, None], axis=-1)[..., 0][used]
        assert whole[name] == pytest.approx(float(np.exp(-picked.mean())), rel=1e-12), name
