"""Rounding a refitted weight with error feedback (GPTQ, Frantar et al., arXiv 2210.17323).

A refitted weight is fresh float values. Rounded to the nearest level it gets a full
quantization error of its own on top of the input model's, which the refit cannot see. Given
the refit's Gram of its inputs H = Σ x xᵀ, the input rows are rounded in order instead, each
row's rounding error spread over the rows not yet rounded through H⁻¹, so that X·W_q follows
X·W rather than W_q following W. The scheme (levels, scales, zero points) is the caller's:
MatMulNBits blocks (nbits.py) or int8 per tensor / per channel (quantized.py).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

DAMPING = 0.01  # of H's mean diagonal, as GPTQ: keeps H⁻¹ defined where inputs are (nearly) dependent
LAZY_ROWS = 128  # rows whose errors are carried to the later rows at once (GPTQ's lazy batch)


def inverse_factor(gram: np.ndarray) -> np.ndarray | None:
    """U, the upper Cholesky factor of the damped H⁻¹ (H⁻¹ = UᵀU): its rows carry each row's
    error forward. None where H is not positive definite even damped."""
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) <= 0  # inputs that never fire: nothing to feed back through
    h[dead, dead] = 1.0
    h[np.diag_indices(len(h))] += DAMPING * np.mean(np.diag(h))
    try:
        return np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return None


def fed_back(weight: np.ndarray, factor: np.ndarray, rounded: Callable[[int, np.ndarray], np.ndarray],
             block: int = LAZY_ROWS, starting: Callable[[int, int, np.ndarray], None] | None = None) -> None:
    """Round the rows of `weight` (K rows, any trailing shape) in order: `rounded(row, values)`
    rounds one row as the earlier rows' errors left it (recording its levels) and returns what
    the levels stand for. `starting(start, end, rows)`, if given, sees each block of rows before
    its first is rounded (where a block's scale comes from its values)."""
    w = weight.astype(np.float64).copy()
    k = w.shape[0]
    for start in range(0, k, block):
        end = min(k, start + block)
        if starting is not None:
            starting(start, end, w[start:end])
        errors = np.zeros((end - start,) + w.shape[1:])
        for row in range(start, end):
            errors[row - start] = (w[row] - rounded(row, w[row])) / factor[row, row]
            w[row + 1:end] -= np.multiply.outer(factor[row, row + 1:end], errors[row - start])
        w[end:] -= np.tensordot(factor[start:end, end:].T, errors, axes=1)  # lazily, a block at a time
