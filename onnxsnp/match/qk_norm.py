"""Per-head QK-norms (Qwen3, Gemma 3): what a cut within the heads needs to know of them, and the
matches with such cuts allowed (`QkNormCut`, off by default: docs/DECODER_FAMILIES.md).

An RMSNorm over each head's q (or k) divides by the root mean square over the head's dims. Cut
dims out and the graph's ReduceMean averages over the kept ones: every kept value is scaled by
√(ms_full / ms_kept) of its own token. compensate/qk_norm.py writes γ per head to carry the Q/K
rescale and the compensation; here the norm is checked to be one whose γ and ε can be written:
a written-out RMS norm (no centring, no β) with a γ of one entry per head dim and a scalar ε, on
a tensor whose heads axis is known."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..ir.graph import ModelGraph
from .blocks import AttentionBlock, Matches, QkNorm, QkNormCut
from .layout import Axes
from .norms import Norm, rms_gain


def qk_norm_parts(g: ModelGraph, norms: list[Norm], axes: list[Axes], head_dim: int) -> QkNorm | str:
    """The γ and ε slots of q's and k's per-head norms, or why a cut within the heads cannot
    rescale them."""
    gains, epsilons, heads = [], [], []
    for norm, where in zip(norms, axes):
        if rms_gain(g, norm) is None or len(norm.nodes) == 1:
            return f"{norm.output} is not a written-out RMS norm (an op's γ is one vector for every head)"
        if len(norm.channel_inputs) != 1:
            return f"{norm.output} has no weight γ per head dim"
        node, index = norm.channel_inputs[0]
        gamma = g.constant(g.node(node).input[index])
        if gamma is None or gamma.size != head_dim or gamma.shape[-1] != head_dim:
            return f"{norm.output}: its γ is not one entry per head dim"
        found = [(n, i) for n in sorted(norm.nodes) if g.node(n).op_type == "Add"
                 for i, t in enumerate(g.node(n).input) if (v := g.constant(t)) is not None and v.size == 1]
        if len(found) != 1:
            return f"{norm.output}: cannot tell its ε"
        if where.heads is None or where.merged:
            return f"{norm.output}: cannot tell the heads axis of the tensor it normalises"
        gains.append((node, index))
        epsilons.append(found[0])
        heads.append(where.heads)
    return QkNorm((gains[0], gains[1]), (epsilons[0], epsilons[1]), (heads[0], heads[1]))


def gain_shape(heads: int, heads_axis: int, width: int) -> tuple[int, ...]:
    """γ written per head: (heads, 1, …, width), broadcasting along the normalised tensor's heads axis."""
    return (heads,) + (1,) * (-heads_axis - 2) + (width,)


def released(matches: Matches, cut: QkNormCut) -> Matches:
    """The matches with Q/K dims within the heads of every per-head QK-norm allowed (`cut` says how
    the norm is compensated); unchanged for QkNormCut.OFF."""
    if cut is QkNormCut.OFF:
        return matches
    new = {b.name: _release(b, cut) for b in matches.attention}
    return replace(matches, attention=tuple(new[b.name] for b in matches.attention),
                   layers=tuple(replace(layer, attention=new[layer.attention.name]) for layer in matches.layers))


def _release(block: AttentionBlock, cut: QkNormCut) -> AttentionBlock:
    if block.qk_norm is None:  # none, one over all heads (OLMo 2), or one whose γ cannot be written per head
        return block
    return replace(block, qk_whole=None, qk_norm=replace(block.qk_norm, cut=cut))


def kept_mean_square(energy: np.ndarray, tokens: float, kept: np.ndarray) -> np.ndarray:
    """Per head, the mean over calibration tokens of ms_kept / ms_full, from `energy` (heads, d):
    Σ_t x_j² / ms_full(t) (each token's dims normalised by its own mean square: they sum to d) and
    the kept dims of each head (heads, kept)."""
    rows = np.arange(len(kept))[:, None]
    return energy[rows, kept].sum(axis=1) / (kept.shape[1] * max(tokens, 1e-30))


def normalized(g: ModelGraph, block: AttentionBlock, x: np.ndarray, part: int) -> np.ndarray:
    """(samples, tokens, heads·d) q (`part` 0) or k (1) from the projection through the block's
    per-head QK-norm, as the graph computes it (γ and ε as exported)."""
    norm = block.qk_norm
    assert norm is not None
    d = block.head_dim
    gamma_slot, epsilon_slot = norm.gains[part], norm.epsilons[part]
    gamma = g.constant(g.node(gamma_slot[0]).input[gamma_slot[1]]).reshape(-1).astype(np.float64)
    epsilon = float(g.constant(g.node(epsilon_slot[0]).input[epsilon_slot[1]]).reshape(-1)[0])
    heads = x.reshape(*x.shape[:-1], -1, d).astype(np.float64)
    heads = gamma * heads / np.sqrt(np.mean(heads ** 2, axis=-1, keepdims=True) + epsilon)
    return heads.reshape(x.shape)


def norm_energy(x: np.ndarray, d: int, mask: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Per head and dim, Σ over tokens of x_j² / ms(x) (each token's head normalised by its own mean
    square over the d dims), from (samples, tokens, heads·d) values before the norm; and the tokens
    counted (a `mask` (samples, tokens) leaves padding out)."""
    heads = x.reshape(*x.shape[:2], -1, d).astype(np.float64)
    squares = heads ** 2
    share = squares / np.maximum(squares.mean(axis=-1, keepdims=True), 1e-30)
    if mask is not None and mask.shape[:2] == x.shape[:2]:
        share = share * (mask > 0)[..., None, None]
        return share.sum(axis=(0, 1)), float((mask > 0).sum())
    return share.sum(axis=(0, 1)), float(x.shape[0] * x.shape[1])
