"""Keeping a head's best directions instead of a choice of its neurons.

A kept Q/K or V position may hold any linear combination of the head's original columns (the
plan's maps): the pruned model has the same shapes as with kept neurons, and the rewrite writes
the combined columns before it slices. Which combinations keep most, on calibration data:
- Q/K: the best rank-k approximation of the head's scores Q·Kᵀ — SNP's SVD of the scores, used
  to build the kept pairs instead of to rank the original ones;
- V: the best rank-k approximation of the head's contribution context·W_out, in the metric of
  the context's Gram.
"""
from __future__ import annotations

import numpy as np

from ..score.importance import PairStatistics
from .least_squares import NormalEquations, centred_gram
from ..threads import small_linear_algebra


@small_linear_algebra
def project_pairs(pairs: PairStatistics, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps putting into each head's first `kept` Q/K positions the best rank-`kept`
    approximation of its scores Q·Kᵀ: with upper-triangular Rq, Rk (RᵀR = the pooled Grams of
    Q and K) and Rq·Rkᵀ = U Σ Vᵀ, q' = Q·Rq⁻¹·U_k·Σ_k^½ and k' = K·Rk⁻¹·V_k·Σ_k^½, so that
    q'·k'ᵀ keeps the top `kept` singular directions of the scores on the calibration tokens."""
    heads, d, _ = pairs.gram_q.shape
    q_map, k_map = np.zeros((heads, d, kept)), np.zeros((heads, d, kept))
    for h in range(heads):
        roots = [cholesky(gram).T for gram in (pairs.gram_q[h], pairs.gram_k[h])]
        u, sigma, vt = np.linalg.svd(roots[0] @ roots[1].T)
        root = np.sqrt(sigma[:kept])
        q_map[h] = np.linalg.solve(roots[0], u[:, :kept] * root)
        k_map[h] = np.linalg.solve(roots[1], vt[:kept].T * root)
    return q_map, k_map


@small_linear_algebra
def project_values(block, equations: NormalEquations, prior: np.ndarray, heads: np.ndarray, kept: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each kept head's value path compressed to `kept` directions instead of `kept` of its
    neurons: the best rank-`kept` approximation of context·W_out in the metric of the context's
    Gram (L·Lᵀ): with Lᵀ·W_out = P Σ Qᵀ, the map is L⁻ᵀ·P_k and the output projection's rows
    for it P_kᵀ·Lᵀ·W_out. Returns the kept positions, the maps, the transform of the output
    projection's inputs [context, 1] into the new basis and its weights there (the refit's prior)."""
    d = block.head_dim
    n = block.heads * d
    gram = centred_gram(equations)
    transform = np.zeros((n + 1, n + 1))
    transform[n, n] = 1.0
    maps = np.zeros((len(heads), d, kept))
    projected = np.zeros_like(prior)
    for index, h in enumerate(heads):
        rows = np.arange(h * d, (h + 1) * d)
        lower = cholesky(gram[np.ix_(rows, rows)])
        left = np.linalg.svd(lower.T @ prior[rows], full_matrices=False)[0][:, :kept]
        maps[index] = np.linalg.solve(lower.T, left)
        transform[np.ix_(rows, rows[:kept])] = maps[index]
        projected[rows[:kept]] = left.T @ lower.T @ prior[rows]
    return np.tile(np.arange(kept), (len(heads), 1)), maps, transform, projected


def cholesky(gram: np.ndarray) -> np.ndarray:
    """Lower L with L·Lᵀ = Gram, made positive definite by a little jitter where it is not (dead
    neurons, fewer tokens than dimensions, rounding of float32 sums)."""
    d = len(gram)
    scale = max(float(np.trace(gram)) / d, 1e-30)
    for jitter in (1e-6, 1e-4, 1e-2, 1.0):
        try:
            return np.linalg.cholesky(gram + jitter * scale * np.eye(d))
        except np.linalg.LinAlgError:
            continue
    return np.sqrt(scale) * np.eye(d)
