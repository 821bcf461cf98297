"""The report's attention-map samples: which heads, how they are stored, and what they hold."""
from __future__ import annotations

import numpy as np

from onnxsnp.verify.attention_maps import sample_maps

SAMPLES, HEADS, TOKENS = 2, 4, 10


def _maps(rng: np.random.Generator, heads: int = HEADS, tokens: int = TOKENS) -> np.ndarray:
    logits = rng.normal(size=(SAMPLES, heads, tokens, tokens)) * 2
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p.astype(np.float64), q.astype(np.float64)
    return float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=-1).mean())


def _perturbed(p: np.ndarray, head: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    q = p.copy()
    noisy = q[:, head] * np.exp(strength * rng.normal(size=q[:, head].shape))
    q[:, head] = noisy / noisy.sum(axis=-1, keepdims=True)
    return q


def test_the_heads_that_changed_most_come_first_with_their_kl_and_maps():
    rng = np.random.default_rng(0)
    p = _maps(rng)
    q = _perturbed(_perturbed(p, 1, 2.0, rng), 3, 0.3, rng)
    found = sample_maps({"x": np.zeros((SAMPLES, 3))}, {"t": p}, {"t": q}, {"blk": ("t", np.arange(HEADS))}, heads=2)
    assert [s.head for s in found] == [1, 3]
    for s in found:
        assert s.block == "blk" and s.sample == 0 and s.tokens == (TOKENS, TOKENS) and s.shape == (TOKENS, TOKENS)
        assert np.isclose(s.kl, _kl(p[0, s.head], q[0, s.head]), atol=1e-6)
        # square-root codes: one code step near value v is about 2·sqrt(v·scale)/255
        for which, want in (("original", p[0, s.head]), ("pruned", q[0, s.head])):
            step = 2 * np.sqrt(want * s.scale) / 255 + s.scale / 255**2
            assert (np.abs(s.values(which) - want) <= step).all()
        assert np.isclose(s.scale, max(p[0, s.head].max(), q[0, s.head].max()), rtol=1e-5)


def test_removed_heads_are_left_out_and_kept_ones_keep_their_numbers():
    rng = np.random.default_rng(1)
    p = _maps(rng)
    kept = np.array([0, 3])
    q = _perturbed(p[:, kept], 1, 1.0, rng)  # the pruned model's second head is original head 3
    found = sample_maps({}, {"t": p}, {"t": q}, {"blk": ("t", kept)}, heads=4)
    assert sorted(s.head for s in found) == [0, 3] and found[0].head == 3
    assert np.isclose(found[0].kl, _kl(p[0, 3], q[0, 1]), atol=1e-6)


def test_large_maps_are_stored_as_bin_means_and_padding_is_left_out():
    rng = np.random.default_rng(2)
    tokens, size = 70, 32
    p = _maps(rng, heads=1, tokens=tokens)
    q = _perturbed(p, 0, 0.5, rng)
    factor = -(-tokens // size)
    (s,) = sample_maps({}, {"t": p}, {"t": q}, {"blk": ("t", np.arange(1))}, size=size)
    bins = -(-tokens // factor)
    assert s.tokens == (tokens, tokens) and s.shape == (bins, bins)
    corner = p[0, 0, :factor, :factor].mean()
    last = p[0, 0, (bins - 1) * factor:, (bins - 1) * factor:].mean()  # the smaller last bin
    for where, want in (((0, 0), corner), ((-1, -1), last)):
        assert abs(s.values("original")[where] - want) <= 2 * np.sqrt(want * s.scale) / 255 + s.scale / 255**2

    mask = np.ones((SAMPLES, tokens), dtype=np.int64)
    mask[0, -5:] = 0  # padding of sample 0
    (masked,) = sample_maps({"mask": mask}, {"t": p}, {"t": q}, {"blk": ("t", np.arange(1))}, "mask", size=size)
    assert masked.tokens == (tokens - 5, tokens - 5)
    valid = slice(0, tokens - 5)
    assert np.isclose(masked.kl, _kl(p[0, 0, valid, valid], q[0, 0, valid, valid]), atol=1e-6)


def test_maps_not_laid_out_by_sample_and_head_are_left_out():
    rng = np.random.default_rng(3)
    p = _maps(rng).reshape(SAMPLES * HEADS, TOKENS, TOKENS)
    assert sample_maps({}, {"t": p}, {"t": p}, {"blk": ("t", np.arange(HEADS))}) == []
