"""What a pruning decides, as immutable values passed from scoring to compensation to rewriting.

A block keeps some of its units: for attention, whole heads and, within each kept head, Q/K
pairs and V neurons (the same count in every head, so the head reshape stays uniform); for an
FFN, hidden neurons. A kept Q/K or V position may hold a *mapped* column instead of the original
one: column j of kept head i becomes Σ_m w[head i, m]·map[i, m, j] (weights and bias alike).
Selection is the map that picks columns; SNP's rescale of kept pairs multiplies them; the
projection compensation puts the best few directions of a head into its first positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from .match import AttentionBlock, FfnBlock, Layer
from .match.residual import ResidualStream


@dataclass(frozen=True)
class Ratios:
    """Fraction removed from each group, 0 <= r < 1: Q/K pairs, V and FFN neurons per layer,
    and whole heads per attention block."""

    qk: float
    v: float
    ffn: float
    heads: float = 0.0
    blocks: int = 0  # whole transformer blocks removed, those that change the stream least
    block_indices: tuple[int, ...] = ()  # or exactly these blocks (0-based, in graph order)
    align: int = 1  # kept widths rounded up to a multiple of this, for fast kernels
    residual: float = 0.0  # residual-stream channels removed (everywhere in the stream at once)


@dataclass(frozen=True)
class AttentionKeep:
    """With grouped-query attention, "heads" are key/value heads (each with its group of query
    heads): the Q/K positions of a kept group hold for its key head and all its query heads."""

    block: AttentionBlock
    qk: np.ndarray  # (kept heads, kept) positions within each kept head, ascending
    v: np.ndarray
    heads: np.ndarray  # kept head indices, ascending
    q_map: np.ndarray | None = None  # (kept heads, head_dim, kept pairs): what the kept q positions hold
    k_map: np.ndarray | None = None
    v_map: np.ndarray | None = None  # (kept heads, head_dim, kept V)
    # a per-head QK-norm cut within the heads (compensate/qk_norm.py): each head's γ factor for the
    # changed statistic, q's over all query heads and k's over all key/value heads (None: 1)
    norm_scales: tuple[np.ndarray, np.ndarray] | None = None

    def qk_columns(self) -> np.ndarray:
        return head_columns(self.heads, self.qk, self.block.head_dim)

    def v_columns(self) -> np.ndarray:
        return head_columns(self.heads, self.v, self.block.head_dim)

    def query_heads(self) -> np.ndarray:
        """The kept query heads (the kept heads themselves, without grouped-query attention)."""
        r = self.block.group_size
        return (self.heads[:, None] * r + np.arange(r)[None, :]).reshape(-1)

    def out_rows(self) -> np.ndarray:
        """The output projection's kept input rows: the kept V neurons of every kept query head."""
        return head_columns(self.query_heads(), np.repeat(self.v, self.block.group_size, axis=0), self.block.head_dim)

    def changes_something(self) -> bool:
        d = self.block.head_dim
        mapped = any(m is not None for m in (self.q_map, self.k_map, self.v_map))
        return mapped or self.qk.shape[1] < d or self.v.shape[1] < d or len(self.heads) < self.block.groups


@dataclass(frozen=True)
class FfnKeep:
    block: FfnBlock
    hidden: np.ndarray  # kept hidden neurons, ascending

    def changes_something(self) -> bool:
        return len(self.hidden) < self.block.hidden


@dataclass(frozen=True)
class Refit:
    """New weights for a layer whose inputs were pruned, in [kept inputs, outputs] layout."""

    weight: np.ndarray
    bias: np.ndarray | None
    # Σ x xᵀ of the kept inputs over the calibration tokens, kept where the weight is quantized again
    # after the rewrite (int8, MatMulNBits): rounding then follows X·W, not W (feedback.py)
    gram: np.ndarray | None = None


@dataclass(frozen=True)
class PrunePlan:
    attention: tuple[AttentionKeep, ...]
    ffn: tuple[FfnKeep, ...]
    scale_values: dict[str, np.ndarray] = field(default_factory=dict)  # run-time scales, frozen to these
    removed_layers: tuple[Layer, ...] = ()
    stream: ResidualStream | None = None  # set when residual channels are removed
    stream_keep: np.ndarray | None = None  # the kept channels, ascending
    norm_corrections: dict[str, tuple[float, float]] = field(default_factory=dict)  # LayerNorm: (γ scale, β shift/γ)
    refits: dict[str, Refit] = field(default_factory=dict)  # projection node → its weights after pruning


def head_columns(heads: np.ndarray, kept: np.ndarray, head_dim: int) -> np.ndarray:
    return (heads[:, None] * head_dim + kept).reshape(-1)


def kept_count(width: int, ratio: float, align: int = 1) -> int:
    """Neurons kept when `ratio` of `width` is removed (at least one), rounded up to a multiple
    of `align` where the width allows."""
    kept = max(1, width - int(round(ratio * width)))
    if align > 1:
        kept = min(width, -(-kept // align) * align)
    return kept


def selection_map(kept: np.ndarray, head_dim: int, scales: np.ndarray | None = None) -> np.ndarray:
    """The map that picks positions `kept` (kept heads, k) of each head, times `scales`."""
    heads, count = kept.shape
    result = np.zeros((heads, head_dim, count))
    rows = np.arange(heads)[:, None]
    result[rows, kept, np.arange(count)[None, :]] = 1.0 if scales is None else scales
    return result


class TimedStep(Enum):
    """What a latency budget times on a language model with a KV cache (other models: one run)."""
    DECODE = "decode"  # one new token through the cache: what generation repeats per token
    PREFILL = "prefill"  # a whole prompt with an empty cache


class Selection(Enum):
    OBS = "obs"  # V neurons, heads and FFN neurons by the loss the refit is left with
    CRITERION = "criterion"  # by the criterion's scores before the refit


class Reduction(Enum):
    PROJECT = "project"  # a head's kept Q/K pairs and V neurons hold its best few directions
    SELECT = "select"  # they are a choice of its original neurons (SNP's Q/K pairs rescaled)


class Propagation(Enum):
    SEQUENTIAL = "sequential"  # each block sees the pruned model's own stream
    ONE_SHOT = "one-shot"  # each block sees the original stream
    OFF = "off"  # no reconstruction: the one-pass compensation (onepass.py) instead


@dataclass(frozen=True)
class AttentionWidth:
    heads: int  # heads kept
    qk: int  # Q/K pairs kept per head
    v: int  # V neurons kept per head


@dataclass(frozen=True)
class Widths:
    """What each block keeps: by attention block name, by FFN block name; removed layers."""

    attention: dict[str, AttentionWidth]
    ffn: dict[str, int]
    removed_layers: tuple[int, ...] = ()
