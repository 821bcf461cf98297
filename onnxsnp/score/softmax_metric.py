"""Q/K pairs of causal (decoder) attention, chosen and rescaled by what the softmax sees.

SNP keeps the Q/K pairs whose rank-1 score terms q_n·k_nᵀ line up with the top singular
directions of S = Q·Kᵀ, direction only, over all N×N entries. A decoder's softmax sees only the
causal half of S, is blind to a shift of a query's whole row, and weighs each entry by its
attention probability; its rotary pairs differ by orders of magnitude in norm, and the largest
(low-frequency, the "attention sink" scores) are the ones a direction-only score may cut.

This module measures the score error the way the softmax does. With P_i the original attention
distribution of query i and E_i = ŝ_i − s_i the error of its scores, the expected change of the
distribution is KL(P_i ‖ P̂_i) ≈ ½·Var_{j~P_i}(E_ij): a row shift costs nothing. With ŝ = Σ_n α_n·
scale·q̂_n k̂_nᵀ (α_n = 0 for removed pairs, 1 as sliced, a rescale otherwise), Σ_i Var_{P_i}(E_i)
is a quadratic in α, summed over calibration queries:

    cost(α) = αᵀ·F·α − 2·αᵀ·c + Σ_i Var_{P_i}(s_i)

F_ab = Σ_i Cov_{P_i}(scale·q̂_ia k̂_·a, scale·q̂_ib k̂_·b) and c_a = Σ_i Cov_{P_i}(scale·q̂_ia k̂_·a, s_i·).
Pairs are removed greedily where the cost left after the best rescale of the kept ones grows
least (optimal brain surgeon on this quadratic), and the kept ones get that rescale: selection
and compensation read the same sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..match import units
from ..match import AttentionBlock

CHUNK = 8  # head-samples per product
# Queries per dense block of the causal triangle: a block's queries i ∈ [a, b) and all keys j < b,
# the pairs above the diagonal carrying probability 0. Contiguous broadcasts instead of gathers over
# the (i, j) pairs (those were 45 % of a SmolLM2 prune); 16 queries of 128 tokens cover 1.12× the
# triangle, and 8 head-samples × 16 × 128 × d=64 float32 was 4 MB per product (now 8 × 33 rows of
# 16 × 128 for 32 rotary units and the score spread, 2 MB): built, scaled and multiplied while it is
# still in cache. 16 × 32 × 128 × 64 (17 MB) made the sums 1.5× slower (72 head-samples of 128
# tokens, one BLAS thread on the shared 2-core machine: 115–125 ms against 180–200 ms, the sums
# equal to 7e-8 of the largest F entry: float32 products grouped otherwise).
QUERY_BLOCK = 16
# Calibration tokens that add to the sums, at least and about: whole batches spread evenly over
# all of them. The sums cost more than a pass over the same tokens (docs/PRUNE_COST_DECODER.md),
# and the pairs they choose carry from other windows nearly as well as from the scored ones
# (docs/DECODERS_REAL.md, the oracle split); the refits, which want every token, get every batch.
SUMS_TOKENS = 16_384


def sums_from(index: int, batches: int, batch_tokens: int) -> bool:
    """Whether calibration batch `index` of `batches`, holding `batch_tokens` tokens, adds to the
    softmax's sums. A batch's own size decides, so that every worker holding it decides alike:
    all batches but the last hold as many tokens, and the smaller last one is read where
    `batches` of its size would not reach SUMS_TOKENS."""
    needed = -(-SUMS_TOKENS // max(batch_tokens, 1))
    return needed >= batches or index in {k * batches // needed for k in range(needed)}


@dataclass
class SoftmaxSums:
    """Per query head, summed over calibration queries (see the module docstring). With `units`
    (each head dim's unit, match.units.unit_of_dim) F and c are over units, not dims: every later
    use sums them so (a rotary pair shares one factor), and the products are 4× smaller."""

    fisher: np.ndarray  # (heads, d or units, d or units) F
    cross: np.ndarray  # (heads, d or units) c
    energy: np.ndarray  # (heads,) Σ_i Var_{P_i}(s_i): the cost of removing every pair
    queries: int = 0
    units: np.ndarray | None = None  # (d,) the unit of every dim where F and c are over units
    softcap: float | None = None  # the scores' soft cap (Gemma 2: cap·tanh(s/cap) before the softmax)

    @classmethod
    def empty(cls, heads: int, d: int, units: np.ndarray | None = None, softcap: float | None = None) -> "SoftmaxSums":
        width = d if units is None else int(units.max()) + 1
        return cls(np.zeros((heads, width, width)), np.zeros((heads, width)), np.zeros(heads), 0,
                   None if units is None else np.asarray(units), softcap)

    def merge(self, other: "SoftmaxSums") -> None:
        self.fisher += other.fisher
        self.cross += other.cross
        self.energy += other.energy
        self.queries += other.queries


def softmax_scale(block: AttentionBlock) -> float:
    return block.scale if block.scale is not None else 1.0 / np.sqrt(block.head_dim)


def add_sums(sums: SoftmaxSums, q_hat: np.ndarray, k_hat: np.ndarray, q: np.ndarray, k: np.ndarray,
             token_mask: np.ndarray | None, scale: float) -> None:
    """Add one batch: (samples·heads, N, d) stacks of the pruned model's q̂, k̂ and the original
    q, k (rotated, k repeated per query head), in (sample, head) order; `token_mask` (samples, N)."""
    heads, width = sums.cross.shape
    d = q.shape[-1]
    count, n = q.shape[0], q.shape[1]
    of = np.arange(d) if sums.units is None else sums.units
    # each unit's dims, (units, dims a unit): a unit's score term is the sum of its dims'
    members = np.argsort(of, kind="stable").reshape(width, -1)
    size = members.shape[1]
    valid = np.ones((count // heads, n), bool) if token_mask is None else token_mask[:, :n] > 0
    valid = np.repeat(valid, heads, axis=0)  # (samples·heads, N)
    # one product gives F, c and the energy: Z·Zᵀ with Z's rows √P_ij·(x_iju − x̄_iu) for every unit u
    # and √P_ij·(s_ij − μ_i) last, over the (i, j) pairs of a block of queries
    products = np.zeros((count, width + 1, width + 1))
    causal = np.tril(np.ones((n, n), bool))[None]  # causal: query i sees keys j ≤ i
    for start in range(0, count, CHUNK):
        part = slice(start, min(start + CHUNK, count))
        qh, kh = q_hat[part].astype(np.float32), k_hat[part].astype(np.float32)
        chunk = len(qh)
        scores = scale * (q[part].astype(np.float32) @ np.swapaxes(k[part].astype(np.float32), -1, -2))
        seen = causal & valid[part][:, None, :]
        # the softmax reads cap·tanh(s/cap) where the scores are soft-capped (Gemma 2); the score
        # terms below stay linear in s, tanh′ ≈ 1 where |s| ≪ cap
        capped = None if sums.softcap is None else sums.softcap * np.tanh(scores / sums.softcap)
        scores = np.where(seen, scores, -np.inf)
        capped = scores if capped is None else np.where(seen, capped, -np.inf)
        top = np.max(capped, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        weights = np.exp(capped - top)
        probs = weights / np.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
        probs *= valid[part][:, :, None]  # padded queries count for nothing
        finite = np.where(seen, scores, 0.0)
        mean_score = (probs * finite).sum(axis=-1)  # μ_i
        roots = np.sqrt(probs)  # 0 above the diagonal, for padded keys and queries: those add nothing
        # x_iju − x̄_iu = Σ_{a∈u} q̂_ia·(k̂_ja − m_ia) as one small product per unit: [q̂_iu, −Σ q̂_iu∘(m_i − c)]
        # · [k̂_ju − c, 1]. Keys centred on their mean c first (the same value in exact arithmetic):
        # a sink's large, nearly constant score terms would otherwise cancel in float32 and leave
        # noise larger than the other pairs' terms
        centred = kh - kh.mean(axis=1, keepdims=True)
        shifted = probs @ centred  # m_i − c, m_i = Σ_j P_ij k̂_j
        left = np.empty((chunk, width, n, size + 1), np.float32)
        left[..., :size] = qh[:, :, members].transpose(0, 2, 1, 3)
        left[..., size] = -(qh * shifted)[:, :, members].sum(axis=-1).transpose(0, 2, 1)
        right = np.ones((chunk, width, size + 1, n), np.float32)
        right[:, :, :size] = centred[:, :, members].transpose(0, 2, 3, 1)
        # one buffer for every block: a fresh array of this size is page-faulted in on each write
        buffer = np.empty((chunk, width + 1, min(QUERY_BLOCK, n) * n), np.float32)
        for first in range(0, n, QUERY_BLOCK):
            last = min(first + QUERY_BLOCK, n)
            rows = (last - first) * last
            np.matmul(left[:, :, first:last], right[:, :, :, :last],
                      out=buffer[:, :width, :rows].reshape(chunk, width, last - first, last))
            np.subtract(finite[:, first:last, :last], mean_score[:, first:last, None],
                        out=buffer[:, width, :rows].reshape(chunk, last - first, last))
            block = buffer[:, :, :rows]
            block.reshape(chunk, width + 1, last - first, last)[...] *= roots[:, None, first:last, :last]
            products[part] += block @ np.swapaxes(block, -1, -2)
    products = products.reshape(-1, heads, width + 1, width + 1).sum(axis=0)
    sums.fisher += scale ** 2 * products[:, :width, :width]
    sums.cross += scale * products[:, :width, width]
    sums.energy += products[:, width, width]
    sums.queries += int(valid[::heads].sum())


@dataclass(frozen=True)
class PairChoice:
    qk: np.ndarray  # (groups, kept dims) ascending
    factors: np.ndarray  # (groups, kept dims): the rescale of each kept dim (shared by a rotary pair)
    error_sliced: float  # cost / energy with the kept pairs as they are
    error_rescaled: float  # with the rescale


def _solve(fisher: np.ndarray, cross: np.ndarray, kept: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """β over `kept` minimising βᵀFβ − 2βᵀc + penalty·‖β − 1‖², and that minimum less the
    penalty's constant (what removing the others costs, up to the energy)."""
    if len(kept) == 0:
        return np.zeros(0), 0.0
    system = fisher[np.ix_(kept, kept)] + penalty * np.eye(len(kept))
    rhs = cross[kept] + penalty
    try:
        beta = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        beta = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return beta, float(-rhs @ beta)


def _unit_sums(block: AttentionBlock, sums: SoftmaxSums, ridge: float):
    """Per key/value group: F and c over units (a rotary pair is one unit, one factor), the energy,
    and the ridge penalty of each group."""
    d, r, width = block.head_dim, block.group_size, sums.cross.shape[-1]
    fisher = sums.fisher.reshape(block.groups, r, width, width).sum(axis=1)
    cross = sums.cross.reshape(block.groups, r, width).sum(axis=1)
    energy = sums.energy.reshape(block.groups, r).sum(axis=1)
    if sums.units is None:  # over dims: summed into units here
        to_units = units.unit_matrix(block, np.arange(d))  # (d, units)
        fisher, cross = to_units.T @ fisher @ to_units, cross @ to_units
    penalties = [ridge * max(float(np.mean(np.diag(f))), 1e-30) for f in fisher]
    return fisher, cross, energy, penalties


def _removals(block: AttentionBlock, unit_fisher, unit_cross, penalties, count: int):
    """Greedy removal down to `count` units per group: yields the alive units of every group
    after each round (each removal the one whose best rescale of the rest leaves the least error)."""
    total = unit_fisher.shape[-1]
    alive = [list(range(total)) for _ in range(block.groups)]
    shared = block.pairs_shared is not None
    while len(alive[0]) > count:
        costs = np.array([[_solve(unit_fisher[g], unit_cross[g], np.array([u for u in alive[g] if u != gone]),
                                  penalties[g])[1] for gone in alive[g]] for g in range(block.groups)])
        if shared:  # every group keeps the same pairs: the cheapest removal summed over the groups
            gone = alive[0][int(np.argmin(costs.sum(axis=0)))]
            alive = [[u for u in row if u != gone] for row in alive]
        else:
            alive = [[u for u in row if u != row[int(np.argmin(c))]] for row, c in zip(alive, costs)]
        yield alive


def _left(unit_fisher, unit_cross, energy, penalties, alive) -> tuple[list[np.ndarray], float]:
    """The rescale of the `alive` units of every group, and the score error it leaves (summed)."""
    factors, left = [], 0.0
    for g, kept in enumerate(alive):
        kept = np.asarray(kept, dtype=int)
        beta, _ = _solve(unit_fisher[g], unit_cross[g], kept, penalties[g])
        sub = unit_fisher[g][np.ix_(kept, kept)]
        left += float(beta @ sub @ beta - 2 * beta @ unit_cross[g][kept] + energy[g])
        factors.append(beta)
    return factors, max(left, 0.0)


def removal_curve(block: AttentionBlock, sums: SoftmaxSums, ridge: float) -> np.ndarray:
    """The softmax's score error (relative to its energy) left after the best rescale, by Q/K dims
    kept per head, 0 … d, along the greedy removal path (dims between whole units interpolated)."""
    unit_fisher, unit_cross, energy, penalties = _unit_sums(block, sums, ridge)
    size, total = units.unit_size(block), unit_fisher.shape[-1]
    scale = max(float(energy.sum()), 1e-30)
    full = _left(unit_fisher, unit_cross, energy, penalties, [range(total)] * block.groups)[1]
    kept_dims, errors = [total * size], [0.0]
    for alive in _removals(block, unit_fisher, unit_cross, penalties, 0):
        kept_dims.append(len(alive[0]) * size)
        errors.append(max(_left(unit_fisher, unit_cross, energy, penalties, alive)[1] - full, 0.0) / scale)
    return np.interp(np.arange(block.head_dim + 1), np.array(kept_dims[::-1]), np.array(errors[::-1]))


def choose_pairs(block: AttentionBlock, sums: SoftmaxSums, kept: int, ridge: float,
                 fixed: np.ndarray | None = None) -> PairChoice:
    """`kept` Q/K dims per key/value group (rounded to whole units), removed one unit at a time where
    the best rescale of the rest leaves the softmax's score error lowest; the rest rescaled.
    `fixed`: kept dims (groups, dims) chosen elsewhere: only the rescale is fitted on `sums` (a
    diagnosis separates the choice from the rescale with it)."""
    unit_fisher, unit_cross, energy, penalties = _unit_sums(block, sums, ridge)
    if fixed is not None:
        of = units.unit_of_dim(block)
        kept_units = np.array([np.unique(of[row]) for row in fixed])
    else:
        count = units.rounded(block, kept) // units.unit_size(block)
        alive = [list(range(unit_fisher.shape[-1])) for _ in range(block.groups)]
        for alive in _removals(block, unit_fisher, unit_cross, penalties, count):
            pass
        kept_units = np.array(alive)
    qk = units.dims_of(block, kept_units)
    betas, rescaled = _left(unit_fisher, unit_cross, energy, penalties, kept_units)
    sliced = sum(float(np.ones(len(k)) @ unit_fisher[g][np.ix_(k, k)] @ np.ones(len(k))
                       - 2 * unit_cross[g][k].sum() + energy[g]) for g, k in enumerate(kept_units))
    factors = [units.unit_matrix(block, qk[g]) @ beta for g, beta in enumerate(betas)]
    scale = max(float(energy.sum()), 1e-30)
    return PairChoice(qk, np.array(factors), max(sliced, 0.0) / scale, rescaled / scale)
