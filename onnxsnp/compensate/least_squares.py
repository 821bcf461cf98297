"""Least-squares refits of a layer whose inputs were pruned, and choosing which inputs to prune.

Everything is computed from sums over calibration tokens — X̃ᵀX̃, X̃ᵀY and ΣY² with X̃ = [X, 1],
kept per fold — so batches, folds and (later) workers merge by adding. The bias is never
penalised: solving with it free is ridge regression on centred data.

- `solve`: W' = argmin ‖X_K W + b − Y‖² + λ‖W − W₀‖², the ridge pulling towards the original
  weights (little data or a small cut leaves the layer as it was).
- `choose_ridge`: λ by K-fold cross-validation on the folds' own sums (`cross_validated_losses`).
- `Obs`: structured optimal brain surgeon. With H = X_cᵀX_c + λI and the refit W*, removing
  input rows R and refitting the rest raises the loss by tr(W*_Rᵀ (H⁻¹_RR)⁻¹ W*_R); greedily
  removing what raises it least chooses the inputs that the refit can best do without.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..threads import one_blas_thread, small_linear_algebra

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # λ relative to the mean diagonal of the kept inputs' Gram
DEFAULT_RIDGE = 1e-2
FOLDS = 4
RECONSTRUCTION_BATCH = 32  # samples per segment run at most (each runs half a block: a larger batch is cheap)


@dataclass
class NormalEquations:
    """Sums over tokens, per fold: xx = Σ x̃x̃ᵀ, xy = Σ x̃yᵀ (x̃ = [x, 1]), yy = Σ‖y‖²."""

    xx: np.ndarray  # (folds, n + 1, n + 1)
    xy: np.ndarray  # (folds, n + 1, m)
    yy: np.ndarray  # (folds,)

    @classmethod
    def empty(cls, inputs: int, outputs: int, folds: int = FOLDS) -> "NormalEquations":
        return cls(np.zeros((folds, inputs + 1, inputs + 1)), np.zeros((folds, inputs + 1, outputs)),
                   np.zeros(folds))

    @property
    def inputs(self) -> int:
        return self.xx.shape[1] - 1

    @property
    def count(self) -> float:
        return float(self.xx[:, -1, -1].sum())

    def add(self, x: np.ndarray, y: np.ndarray, fold: int, weights: np.ndarray | None = None) -> None:
        """x: (tokens, n), y: (tokens, m); `weights` (tokens,): each token's weight in the sums
        (default 1). Products in float32 (BLAS speed), sums in float64."""
        x = x.astype(np.float32, copy=False)
        y = y.astype(np.float32, copy=False)
        n = x.shape[1]
        fold %= self.xx.shape[0]
        if weights is None:
            column, count = x.sum(axis=0, dtype=np.float64), float(len(x))
            y_sum = y.sum(axis=0, dtype=np.float64)
        else:  # Σ w·x̃x̃ᵀ as the products of rows scaled by √w
            root = np.sqrt(weights).astype(np.float32)[:, None]
            x, y = x * root, y * root
            column, count = (x * root).sum(axis=0, dtype=np.float64), float(weights.sum())
            y_sum = (y * root).sum(axis=0, dtype=np.float64)
        self.xx[fold, :n, :n] += x.T @ x
        self.xx[fold, :n, n] += column
        self.xx[fold, n, :n] += column
        self.xx[fold, n, n] += count
        self.xy[fold, :n] += x.T @ y
        self.xy[fold, n] += y_sum
        self.yy[fold] += float(np.square(y, dtype=np.float64).sum())

    def merge(self, other: "NormalEquations") -> "NormalEquations":
        return NormalEquations(self.xx + other.xx, self.xy + other.xy, self.yy + other.yy)

    def transformed(self, transform: np.ndarray) -> "NormalEquations":
        """The sums for inputs x̃·T (T maps [x, 1] to new inputs, its last row and column keeping the 1)."""
        return NormalEquations(transform.T @ self.xx @ transform, transform.T @ self.xy, self.yy.copy())

    def total(self, leave_out: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        folds = [f for f in range(self.xx.shape[0]) if f != leave_out]
        # fold by fold, in order: the sums numpy's reduction over a fancy-indexed copy gives, bit
        # for bit, without copying every fold first (that copy was 6 % of a DeiT-S prune)
        xx, xy = self.xx[folds[0]].copy(), self.xy[folds[0]].copy()
        for fold in folds[1:]:
            xx += self.xx[fold]
            xy += self.xy[fold]
        return xx, xy, float(self.yy[folds].sum())


@dataclass(frozen=True)
class Fit:
    weight: np.ndarray  # [kept inputs, outputs]
    bias: np.ndarray  # [outputs]
    ridge: float  # relative λ used
    loss: float  # Σ‖X_K W + b − Y‖² on the data it was fitted on


def _centred(xx: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = xx.shape[0] - 1
    count = max(xx[n, n], 1.0)
    mean_x, mean_y = xx[:n, n] / count, xy[n] / count
    return xx[:n, :n] - count * np.outer(mean_x, mean_x), xy[:n] - count * np.outer(mean_x, mean_y), mean_x, mean_y


def centred_gram(equations: NormalEquations) -> np.ndarray:
    """Σ (x − x̄)(x − x̄)ᵀ over all tokens."""
    return _centred(*equations.total()[:2])[0]


def _penalty(gram: np.ndarray, ridge: float) -> float:
    return ridge * max(float(np.mean(np.diag(gram))), 1e-30)


def _loss(xx: np.ndarray, xy: np.ndarray, yy: float, weight: np.ndarray, bias: np.ndarray) -> float:
    """Σ‖X W + b − Y‖² from sums already restricted to the rows of W and the bias."""
    full = np.vstack([weight, bias[None]])
    return float(np.sum(full * (xx @ full)) - 2 * np.sum(full * xy) + yy)


def loss(xx: np.ndarray, xy: np.ndarray, yy: float, keep: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """Σ‖X_K W + b − Y‖² from the sums."""
    rows = np.r_[keep, xx.shape[0] - 1]
    return _loss(xx[np.ix_(rows, rows)], xy[rows], yy, weight, bias)


def solve(equations: NormalEquations, keep: np.ndarray, prior: np.ndarray, ridge: float = DEFAULT_RIDGE,
          leave_out: int | None = None) -> Fit:
    """The refit of the kept inputs `keep`; `prior`: the original weights of those rows."""
    xx, xy, yy = equations.total(leave_out)
    gram, cross, mean_x, mean_y = _centred(xx, xy)
    gram, cross = gram[np.ix_(keep, keep)], cross[keep]
    penalty = _penalty(gram, ridge)
    try:
        weight = np.linalg.solve(gram + penalty * np.eye(len(keep)), cross + penalty * prior)
    except np.linalg.LinAlgError:
        weight = prior.astype(np.float64)
    bias = mean_y - mean_x[keep] @ weight
    return Fit(weight, bias, ridge, loss(xx, xy, yy, keep, weight, bias))


def cross_validated_losses(equations: NormalEquations, keep: np.ndarray, prior: np.ndarray,
                           grid: tuple[float, ...] = RIDGE_GRID) -> np.ndarray:
    """Per λ of `grid`, Σ over folds of the held-out loss of `solve(…, leave_out=fold)` (inf where
    a fold's system is singular).

    A solve per fold and λ: one eigendecomposition per fold for every λ ((G + pI)⁻¹ =
    V·diag(1/(e + p))·Vᵀ) was measured slower for this 5-value grid (tools/bench_pair_sums.py:
    numpy's eigh of a 1,152-wide Gram costs more than five LU solves).

    The folds are independent: they run side by side on `_fold_workers()` threads (numpy releases
    the GIL in its solves and products), each on one BLAS thread. OpenBLAS's own threads on one
    solve at a time cost 2.3-2.6× the CPU seconds and wall time of one thread on the shared
    2-core machine (SmolLM2's fc2, 1,152 × 576 kept: 5.3-6.1 s against 2.3 s for the 20 solves,
    load 12; docs/PRUNE_COST_DECODER.md): a solve is many small panel steps at which the threads
    wait for each other, while whole folds never do. The losses are added in fold order, as
    before."""
    rows = np.r_[keep, equations.inputs]
    folds = range(equations.xx.shape[0])

    def held_out(fold: int) -> np.ndarray:
        return _fold_losses(equations, keep, prior, grid, rows, fold)

    with one_blas_thread():
        workers = min(_fold_workers(), len(folds))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                per_fold = list(pool.map(held_out, folds))
        else:
            per_fold = [held_out(fold) for fold in folds]
    errors = np.zeros(len(grid))
    for losses in per_fold:
        errors += losses
    return errors


def _fold_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _fold_losses(equations: NormalEquations, keep: np.ndarray, prior: np.ndarray, grid: tuple[float, ...],
                 rows: np.ndarray, fold: int) -> np.ndarray:
    """Per λ of `grid`, fold `fold`'s held-out loss of the refit on the other folds.

    The other folds' sums are added over the kept rows only (`rows`: those and the intercept's),
    and each λ's system is the Gram with the penalty added to a copy's diagonal: the numbers of
    `total`, `_centred` and `+ penalty · I` on the whole matrices, element for element, without
    their full-width copies (two folds side by side would hold them twice)."""
    losses = np.zeros(len(grid))
    others = [f for f in range(equations.xx.shape[0]) if f != fold]
    block = np.ix_(rows, rows)
    xx, xy = equations.xx[others[0]][block], equations.xy[others[0]][rows]  # fancy indexing: copies
    for other in others[1:]:  # in fold order, as `total` adds them
        xx += equations.xx[other][block]
        xy += equations.xy[other][rows]
    gram, cross, mean_x, mean_y = _centred_in_place(xx, xy)
    scale = max(float(np.mean(np.diag(gram))), 1e-30)
    # the held-out fold's sums over the kept rows, taken once for every λ
    held = (equations.xx[fold][block], equations.xy[fold][rows], float(equations.yy[fold]))
    diagonal = np.diag_indices(len(keep))
    unpenalised = gram[diagonal]  # a copy: put back after each λ (x + p − p need not be x)
    for index, ridge in enumerate(grid):
        penalty = ridge * scale
        gram[diagonal] += penalty
        try:
            weight = np.linalg.solve(gram, cross + penalty * prior)
        except np.linalg.LinAlgError:
            losses[index] = np.inf
            continue
        finally:
            gram[diagonal] = unpenalised
        losses[index] = _loss(*held, weight, mean_y - mean_x @ weight)
    return losses


def _centred_in_place(xx: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_centred`'s numbers, element for element, written over views of `xx` and `xy`."""
    n = xx.shape[0] - 1
    count = max(xx[n, n], 1.0)
    mean_x, mean_y = xx[:n, n] / count, xy[n] / count
    product = np.outer(mean_x, mean_x)
    product *= count
    gram = xx[:n, :n]
    gram -= product
    del product
    product = np.outer(mean_x, mean_y)
    product *= count
    cross = xy[:n]
    cross -= product
    return gram, cross, mean_x, mean_y


def choose_ridge(equations: NormalEquations, keep: np.ndarray, prior: np.ndarray,
                 grid: tuple[float, ...] = RIDGE_GRID, start: float | None = None) -> float:
    """The λ of `grid` with the least cross-validated loss (each fold predicted from the others),
    the grid walked from `start` (a λ of the grid, e.g. the previous layer's choice; else its
    middle) by `unimodal_argmin`: a λ's losses are the same numbers whichever others are evaluated
    with it, so where the curve is unimodal the choice is the whole grid's whatever the start."""
    if equations.xx.shape[0] < 2 or min(equations.xx[:, -1, -1]) == 0:
        return DEFAULT_RIDGE

    def losses(indices: list[int]) -> np.ndarray:
        return cross_validated_losses(equations, keep, prior, tuple(grid[i] for i in indices))

    return grid[unimodal_argmin(losses, len(grid), grid.index(start) if start in grid else len(grid) // 2)]


def unimodal_argmin(evaluate: Callable[[list[int]], np.ndarray], size: int, start: int) -> int:
    """np.argmin of `size` values that `evaluate(indices)` gives, evaluating only those a curve
    falling then rising needs: `start` and its neighbours, then one step at a time downhill.

    On SmolLM2 (32 calibration windows) the cross-validated ridge curve was strictly unimodal at
    all 60 refits, its least at the grid's top in 58 (docs/PRUNE_COST_DECODER.md, sixth round):
    from the previous layer's choice, 126 of the 300 λs (a solve per fold each) were evaluated.
    Where the values seen contradict a unimodal curve — `start` above both neighbours, a tie, a value that
    is not finite (a singular fold) — every value is evaluated and np.argmin taken, as before. A
    curve that dips twice beyond the values seen is not detected: the walk returns the local least
    (which then depends on `start`)."""
    known: dict[int, float] = {}

    def see(indices) -> bool:
        """Evaluate the indices not known yet; False where the known values rule out a descent."""
        missing = sorted({i for i in indices if 0 <= i < size} - known.keys())
        if missing:
            known.update(zip(missing, (float(v) for v in evaluate(missing))))
        values = list(known.values())
        return bool(np.all(np.isfinite(values))) and len(set(values)) == len(values)

    def whole_grid() -> int:
        see(range(size))
        return int(np.argmin([known[i] for i in range(size)]))

    if not see([start - 1, start, start + 1]):
        return whole_grid()
    lower = [step for step in (-1, 1) if start + step in known and known[start + step] < known[start]]
    if len(lower) == 2:  # a peak between two lower values: not one valley
        return whole_grid()
    at = start
    while lower and at + lower[0] in known and known[at + lower[0]] < known[at]:
        at += lower[0]
        if not see([at + lower[0]]):
            return whole_grid()
    return at


_HUGE = np.finfo(np.float64).max
_TRIANGLE_BLOCK = 96  # below this width a triangular block is inverted by LAPACK directly


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix through its Cholesky factor L:
    H⁻¹ = L⁻ᵀL⁻¹, L⁻¹ by blocks (`lower_inverse`). numpy's inv is an LU solve against the identity
    (≈ 2.7 n³ flops, much of it triangular solves); this is ≈ 1.7 n³, nearly all of it matrix
    products: 1.4-1.6× faster for OBS's 576- to 1,536-wide Hessians on one thread
    (docs/PRUNE_COST_DECODER.md). numpy has no triangular solve, hence the blocks. Raises
    LinAlgError where the matrix is not positive definite.

    The factor and its inverse are made on one BLAS thread whatever the width: OpenBLAS's threaded
    Cholesky of a 1,536-wide matrix took 1.9 s against 0.2 s on one thread on the shared 2-core
    machine, and the triangular inverse is many products of blocks narrower than threads.LARGE;
    the final n×n product keeps every thread."""
    with one_blas_thread():
        inverse = lower_inverse(np.linalg.cholesky(matrix))
    return inverse.T @ inverse


def lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]."""
    n = len(lower)
    if n <= _TRIANGLE_BLOCK:
        return np.tril(np.linalg.inv(lower))  # LU's pivoting may leave rounding above the diagonal
    half = n // 2
    first, second = lower_inverse(lower[:half, :half]), lower_inverse(lower[half:, half:])
    result = np.zeros_like(lower)
    result[:half, :half] = first
    result[half:, half:] = second
    result[half:, :half] = -(second @ (lower[half:, :half] @ first))
    return result


class Obs:
    """Greedy structured OBS over the input rows of one layer (see the module docstring).

    Rows are removed in `units` (arrays of row indices: one V neuron, a whole head, one FFN
    neuron); `removed_loss` accumulates the loss each removal adds, in the units of the sums.

    The inverse is updated lazily (SparseGPT's lazy batch updates): a removal of rows R changes it
    by −H⁻¹[:, R]·(H⁻¹_RR)⁻¹·H⁻¹[R, :], kept as that product's two factors; the columns a removal
    reads are the first inverse's less the factors so far, and its diagonal (the single costs) is
    kept up to date. Rewriting the whole n×n inverse at every removal was a third of OBS's time
    (32 removal rounds of a 1,536-wide fc2); the result is the same up to float64 rounding."""

    def __init__(self, equations: NormalEquations, prior: np.ndarray, ridge: float = DEFAULT_RIDGE):
        xx, xy, yy = equations.total()
        gram, cross, _, _ = _centred(xx, xy)
        penalty = _penalty(gram, ridge)
        hessian = gram + penalty * np.eye(len(gram))
        try:
            self._first = spd_inverse(hessian)
        except np.linalg.LinAlgError:  # not positive definite (rounding in the Gram beyond the ridge)
            try:
                self._first = np.linalg.inv(hessian)
            except np.linalg.LinAlgError:
                self._first = np.linalg.pinv(hessian)
        self.weight = self._first @ (cross + penalty * prior)
        self.alive = np.ones(len(gram), dtype=bool)
        self.removed_loss = 0.0
        self._diagonal = np.diag(self._first).copy()
        n = len(gram)
        self._columns_removed = np.zeros((n, 0))  # H⁻¹[:, R] of every removal so far, side by side
        self._solved_removed = np.zeros((0, n))  # (H⁻¹_RR)⁻¹·H⁻¹[R, :] of each, stacked

    def _inverse_columns(self, rows: np.ndarray, of: np.ndarray | None = None) -> np.ndarray:
        """The current inverse's columns `rows`, at rows `of` (all rows by default); rows already
        removed are 0 there."""
        if of is None:  # all rows: slices, not fancy-indexed copies of the n × (rows removed) factor
            columns = self._first[:, rows] - self._columns_removed @ self._solved_removed[:, rows]
            columns[~self.alive] = 0
            return columns
        columns = self._first[np.ix_(of, rows)] - self._columns_removed[of] @ self._solved_removed[:, rows]
        columns[~self.alive[of]] = 0
        return columns

    def costs(self, units: list[np.ndarray]) -> np.ndarray:
        """The loss each unit's removal would add now (with the rest refitted)."""
        result = np.empty(len(units))
        sizes = np.array([len(rows) for rows in units])
        for size in np.unique(sizes):
            at = np.flatnonzero(sizes == size)
            if size == 1:
                rows = np.array([units[i][0] for i in at])
                result[at] = np.einsum("ij,ij->i", self.weight[rows], self.weight[rows]) / np.maximum(
                    self._diagonal[rows], 1e-300)
            else:
                result[at] = self._block_costs(np.stack([units[i] for i in at]))
        return result

    def _block_costs(self, units: np.ndarray) -> np.ndarray:
        """`costs` of units of one size, (units, size) rows: their diagonal blocks of the inverse
        gathered and solved as one batch. One small solve per unit from Python was most of the
        V-neuron choice of grouped-query attention (3-row units, 64 per head and round); a
        singular block (rows already removed) goes through the per-unit solves, which raise."""
        first = self._first[units[:, :, None], units[:, None, :]]
        removed = self._columns_removed[units] @ np.swapaxes(self._solved_removed[:, units], 0, 1)
        blocks = first - removed
        blocks[~self.alive[units]] = 0
        weights = self.weight[units]
        try:
            return np.einsum("ukm,ukm->u", weights, np.linalg.solve(blocks, weights))
        except np.linalg.LinAlgError:
            return np.array([float(np.sum(self.weight[rows] * np.linalg.solve(self._inverse_columns(rows, rows),
                                                                             self.weight[rows]))) for rows in units])

    def single_costs(self) -> np.ndarray:
        """Per row, the loss of removing it alone (inf for rows already removed; a row still
        alive always costs less, even where its cost is not finite, so that the cheapest rows
        are always alive ones and every removal loop ends)."""
        diagonal = np.maximum(self._diagonal, 1e-300)
        cost = np.einsum("ij,ij->i", self.weight, self.weight) / diagonal
        return np.where(self.alive, np.nan_to_num(cost, nan=_HUGE, posinf=_HUGE), np.inf)

    @small_linear_algebra
    def remove(self, rows: np.ndarray) -> float:
        """Remove rows together, refitting the rest; returns the loss added. On one BLAS thread
        however wide the layer: its products are rank-|rows| updates, bound by memory, and 32
        removals from a 1,536-wide fc2 took 1.5 s on two threads against 0.5 s on one on the
        shared 2-core machine."""
        rows = np.asarray(rows)
        columns = self._inverse_columns(rows)
        block = columns[rows]
        try:
            solved_weight = np.linalg.solve(block, self.weight[rows])
            solved_inverse = np.linalg.solve(block, columns.T)
        except np.linalg.LinAlgError:
            solved_weight = np.linalg.lstsq(block, self.weight[rows], rcond=None)[0]
            solved_inverse = np.linalg.lstsq(block, columns.T, rcond=None)[0]
        added = float(np.sum(self.weight[rows] * solved_weight))
        self.weight -= columns @ solved_weight
        self._diagonal -= np.einsum("ik,ki->i", columns, solved_inverse)
        self._columns_removed = np.hstack([self._columns_removed, columns])
        self._solved_removed = np.vstack([self._solved_removed, solved_inverse])
        self.weight[rows] = 0
        self._diagonal[rows] = 0
        self.alive[rows] = False
        self.removed_loss += added
        return added


def solve_without_bias(equations: NormalEquations, keep: np.ndarray, prior: np.ndarray, ridge: float
                        ) -> np.ndarray:
    """The refit's weights where the layer has no bias to take an intercept."""
    xx, xy, _ = equations.total()
    gram, cross = xx[np.ix_(keep, keep)], xy[keep]
    penalty = _penalty(gram, ridge)
    return np.linalg.solve(gram + penalty * np.eye(len(keep)), cross + penalty * prior)


def activation_norms(equations: NormalEquations) -> np.ndarray:
    """‖x_i‖ over all tokens, per input."""
    xx = equations.total()[0]
    return np.sqrt(np.maximum(np.diag(xx)[:-1], 0.0))
