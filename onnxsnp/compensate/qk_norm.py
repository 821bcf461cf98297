"""Q/K dims cut within the heads of a per-head QK-norm (Qwen3, Gemma 3): the norm's weight γ.

The norm computes y = γ ⊙ x / √(ms(x) + ε), ms the mean of x² over the head's dims, before the
rotary embedding and the scores. With dims cut, the graph's ReduceMean averages over the kept
ones (ms_kept), so every kept value is √(ms_full/ms_kept) times what it was, token by token; no
exact correction exists without computing the removed dims, which is what the cut saves. γ, one
entry per head dim shared by all heads, is written per head and carries:

- the Q/K rescale chosen with the pairs (AttentionKeep.q_map/k_map's diagonal: a factor per kept
  dim and key/value group). It cannot go into the projection's columns as elsewhere: the norm
  would divide it out;
- `QkNormCut.CALIBRATED`: per head, √(mean ms_kept/ms_full) over the calibration tokens
  (AttentionKeep.norm_scales, from match.qk_norm.kept_mean_square), undoing the statistic's
  average change; `QkNormCut.SLICED` leaves the statistic as it falls.

The zeroed-weights form (masking.py: removed dims' columns zero, the width kept) averages over
all d dims, ms = (d'/d)·ms_kept: γ·√(d'/d) and ε·(d'/d) there compute exactly what the sliced
model does.
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import ModelGraph
from ..match.blocks import QkNormCut
from ..match.qk_norm import gain_shape, kept_mean_square
from ..plan import AttentionKeep

Slot = tuple[str, int]


def cuts_within(keep: AttentionKeep) -> bool:
    """Does `keep` cut dims within the heads of a per-head QK-norm (whose γ must then be written)?"""
    block = keep.block
    return block.qk_norm is not None and block.qk_whole is None and keep.qk.shape[1] < block.head_dim


def _factors(keep: AttentionKeep, mapping: np.ndarray | None) -> np.ndarray:
    """The Q/K rescale of every kept dim of every kept group, (kept groups, kept dims): the map's
    diagonal (a selection map: the only kind a QK-norm block is given, as γ can take no rotation)."""
    if mapping is None:
        return np.ones(keep.qk.shape)
    rows = np.arange(len(keep.qk))[:, None]
    picked = mapping[rows, keep.qk, np.arange(keep.qk.shape[1])[None, :]]
    if not np.allclose(mapping.sum(axis=1), picked):
        raise ValueError(f"{keep.block.name}: a QK-norm's γ can take a rescale of the kept dims, not a projection")
    return picked


def gains(g: ModelGraph, keep: AttentionKeep, zeroed: bool, q_factor: float = 1.0) -> list[tuple[Slot, np.ndarray]]:
    """New values for q's and k's γ (and, `zeroed`, ε) slots: per kept head over the kept dims
    (the sliced model), or (`zeroed`) per head over all d dims with the zeroed-weights form's
    scale; `q_factor` multiplies q's γ (the scale's standard form for the new width)."""
    block, norm = keep.block, keep.block.qk_norm
    assert norm is not None
    d, r, kept = block.head_dim, block.group_size, keep.qk.shape[1]
    scale_q, scale_k = keep.norm_scales if keep.norm_scales is not None else (np.ones(block.heads),
                                                                              np.ones(block.groups))
    extra = np.sqrt(kept / d) if zeroed else 1.0
    found = []
    for part, (slot, mapping) in enumerate(zip(norm.gains, (keep.q_map, keep.k_map))):
        gamma = g.constant(g.node(slot[0]).input[slot[1]])
        original = gamma.reshape(-1).astype(np.float64)
        factors = _factors(keep, mapping) * (q_factor if part == 0 else 1.0) * extra
        copies = r if part == 0 else 1  # q: every query head of a group reads its key head's dims
        heads = block.heads if part == 0 else block.groups
        scales = scale_q if part == 0 else scale_k
        if zeroed:
            value = np.tile(original, (heads, 1))
            for row, group in enumerate(keep.heads):
                for copy in range(copies):
                    head = group * copies + copy
                    value[head, keep.qk[row]] = original[keep.qk[row]] * factors[row] * scales[head]
        else:
            rows = [original[keep.qk[row]] * factors[row] * scales[group * copies + copy]
                    for row, group in enumerate(keep.heads) for copy in range(copies)]
            value = np.stack(rows)
        width = value.shape[1]
        found.append((slot, value.reshape(gain_shape(len(value), norm.heads_axes[part], width)).astype(gamma.dtype)))
    if zeroed:
        for slot in norm.epsilons:
            epsilon = g.constant(g.node(slot[0]).input[slot[1]])
            found.append((slot, np.asarray(epsilon * (kept / d), dtype=epsilon.dtype)))  # an array, even 0-d
    return found


def slots(keep_block) -> list[Slot]:
    """The γ and ε slots a cut within the heads may write (none where Q/K stay whole)."""
    norm = keep_block.qk_norm
    if norm is None or keep_block.qk_whole is not None:
        return []
    return list(norm.gains) + list(norm.epsilons)


def calibrated_norm(block, pairs, qk: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """QkNormCut.CALIBRATED with dims cut within the heads: each head's γ factor √(mean ms_kept/
    ms_full) over the calibration tokens, q's over every query head and k's over every key/value
    head, for the kept dims `qk` (key/value heads, kept); None otherwise (γ as it is)."""
    norm = block.qk_norm
    if norm is None or norm.cut is not QkNormCut.CALIBRATED or qk.shape[1] == block.head_dim:
        return None
    if pairs.norm_energy is None or not pairs.norm_tokens:
        raise ValueError(f"{block.name}: no calibration statistics of q and k before their norms")
    energy_q, energy_k = pairs.norm_energy
    per_query = np.repeat(qk, block.group_size, axis=0)  # every query head reads its group's dims
    return (np.sqrt(kept_mean_square(energy_q, pairs.norm_tokens, per_query)),
            np.sqrt(kept_mean_square(energy_k, pairs.norm_tokens, qk)))
