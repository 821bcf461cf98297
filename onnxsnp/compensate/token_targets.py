"""What a refit fits, token by token: a batch's real tokens, each token's weight in a decoder's
refit, and the target of a half whose branch is normalised before the residual Add (Gemma 3,
OLMo 2). Pure functions of arrays: the passes over the batches (batches.py) call them."""
from __future__ import annotations

import numpy as np

from ..score.importance import _as_tokens


def tokens(x: np.ndarray, samples: int, mask: np.ndarray | None) -> np.ndarray:
    """(real tokens, features): padded positions left out."""
    stacked = _as_tokens(x, samples)
    if mask is not None and mask.shape == stacked.shape[:2]:
        return stacked[mask > 0]
    return stacked.reshape(-1, stacked.shape[-1])


def branch_rms(branch: np.ndarray, eps: float) -> np.ndarray:
    return np.sqrt(np.mean(np.square(branch), axis=-1, keepdims=True) + eps)


def sandwich_target(missing: np.ndarray, branch: np.ndarray, gamma: np.ndarray, eps: float, samples: int,
                    mask: np.ndarray | None, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A refit's target and token weights where the branch b is normalised before the Add
    (x + γ·b/rms(b)): what the sum misses, mapped back through the norm linearised at the original
    branch, m = b + rms(b)·missing'/γ (missing' = missing − γ·b/rms(b), the drift of the stream),
    then moved onto the sphere ‖u‖ = ‖b‖ (on_sphere), and each token weighed by 1/rms(b)², as an
    error in b reaches the stream. The norm undoes any change of the branch's size: a target off
    that sphere is met at another scale, the branch's own signal with it (Gemma 3 270M, where the
    stream's drift mapped through the norm outweighed the branch: layer 2's attention kept a
    relative error of 0.60 after its refit, 0.23 with the target on the sphere; perplexity at
    --ratio 0.25 1.17× instead of 1.25× on the same windows, docs/DECODERS_GEMMA3.md). Channels
    whose γ is small next to the others cannot carry a correction: their target stays the original
    branch."""
    scale = branch_rms(branch, eps)
    usable = np.abs(gamma) >= 0.1 * np.median(np.abs(gamma))
    wanted = np.where(usable, missing * scale / np.where(usable, gamma, 1.0), branch)
    mapped = on_sphere(wanted, branch, np.where(usable, gamma, 0.0))
    inverse = 1.0 / np.square(tokens(scale, samples, mask)[:, 0].astype(np.float64))
    weights = inverse if weights is None else weights * inverse
    return mapped, weights / weights.mean()


def on_sphere(wanted: np.ndarray, branch: np.ndarray, gamma: np.ndarray, steps: int = 60) -> np.ndarray:
    """Per token, the u with ‖u‖ = ‖branch‖ (over the channels with γ ≠ 0) nearest `wanted` in the
    metric γ² — the stream's, where the branch arrives as γ·u/rms(u): with a Lagrange multiplier
    λ > −min γ², u = γ²·m/(γ² + λ), whose size falls as λ grows, so λ is found by bisection (per
    token, vectorised). Channels with γ = 0 keep b."""
    shape = wanted.shape
    m = wanted.reshape(-1, shape[-1]).astype(np.float64)
    b = branch.reshape(-1, shape[-1]).astype(np.float64)
    g2 = np.square(gamma.astype(np.float64))
    free = g2 > 0
    if not free.any():
        return branch.astype(np.float32)
    budget = np.maximum(np.square(b[:, free]).sum(-1, keepdims=True), 1e-30)
    g2f, mf = g2[free], m[:, free]
    low = np.full((len(m), 1), -g2f.min() * (1 - 1e-9))
    high = np.full((len(m), 1), 1.0)

    def size(lam: np.ndarray) -> np.ndarray:
        return np.square(g2f * mf / (g2f + lam)).sum(-1, keepdims=True)

    while (grow := size(high) > budget).any():
        high = np.where(grow, high * 4, high)
    for _ in range(steps):  # ‖u(λ)‖² falls as λ grows
        middle = (low + high) / 2
        big = size(middle) > budget
        low, high = np.where(big, middle, low), np.where(big, high, middle)
    u = b.copy()
    u[:, free] = g2f * mf / (g2f + (low + high) / 2)
    return u.reshape(shape).astype(np.float32)


def norm_weights(stream: np.ndarray) -> np.ndarray:
    """Each token's weight in a decoder's refit: 1 / its mean square in the original stream, so that
    the error counted is the error after the next RMSNorm (SmolLM2-135M's first token has 90 to 24,000
    times the median token's mean square from layer 5 on: unweighted, its error takes the refit). Mean 1."""
    weights = 1.0 / np.maximum(np.mean(np.square(stream, dtype=np.float64), axis=-1), 1e-30)
    return weights / weights.mean()
