"""Score stage: the neuron-scoring criteria, one class each (`--criterion`).

- snp (default): Q/K pairs by the SVD attention-score criterion (and, in the block-by-block
  reconstruction, by the error the softmax sees); V and FFN neurons by their calibration
  activation norm times the norm of their outgoing weights (on real data this kept far more of
  the output than the paper's weight redundancy, SNP.md §6); with the refit's statistics, by what
  the refit can do without (structured OBS).
- snp-paper: Q/K as snp; V and FFN neurons by the paper's inter-neuron redundancy.
- l2: weight norms (a Q/K pair: ‖w_q‖·‖w_k‖).
- random: seeded uniform scores (a floor for the others).

Every criterion goes through the same mechanics (the same count removed in every head of a
layer, the same refits): only the choice of units differs. The one-pass scorer (importance.py)
and the reconstruction (reconstruction.py) ask the same object; activations are passed as a
callable because only the criteria that read them have them measured.
"""
from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np

from ..match import units
from ..ir.graph import ModelGraph
from ..match import AttentionBlock, FfnBlock, Linear

Activations = Callable[[], np.ndarray]  # ‖x_i‖ over the calibration tokens, per input of the layer after


class CriterionName(str, Enum):
    SNP = "snp"
    SNP_PAPER = "snp-paper"
    L2 = "l2"
    RANDOM = "random"


CRITERIA = tuple(name.value for name in CriterionName)


# --- weights -------------------------------------------------------------------------------------
def output_weights(g: ModelGraph, linear: Linear, offset: int = 0, width: int | None = None) -> np.ndarray:
    """The [in, out] weight columns of `linear` from `offset` on (`width` of them)."""
    weight = g.constant(linear.weight)
    assert weight is not None
    weight = weight.T if linear.transposed else weight
    width = weight.shape[1] - offset if width is None else width
    return weight[:, offset:offset + width].astype(np.float64)


def input_weights(g: ModelGraph, linear: Linear) -> np.ndarray:
    """The [in, out] weight of `linear`; row i holds what input feature i feeds forward."""
    weight = g.constant(linear.weight)
    assert weight is not None
    return (weight.T if linear.transposed else weight).astype(np.float64)


def redundancy(columns: np.ndarray) -> np.ndarray:
    """SNP's redundancy score of each column: Σ_l (1 - |cos(w_i, w_l)|). Low = repeats others."""
    unit = columns / (np.linalg.norm(columns, axis=0, keepdims=True) + 1e-12)
    return (1.0 - np.abs(unit.T @ unit)).sum(axis=1)


def _value_weights(g: ModelGraph, block: AttentionBlock) -> np.ndarray:
    return output_weights(g, block.v, block.column_offsets[2], block.groups * block.head_dim)


def _outgoing(g: ModelGraph, linear: Linear) -> np.ndarray:
    """‖row i‖ of the layer reading input i: how much of that input it passes on."""
    return np.linalg.norm(input_weights(g, linear), axis=1)


# --- the criteria --------------------------------------------------------------------------------
class Criterion:
    """What each kind of unit is worth under one criterion (higher: keep). Scores are per query
    head and dimension for Q/K, (heads, d); per key/value head for V, (groups, d) and heads,
    (groups,); per neuron for an FFN, (hidden,)."""

    name: CriterionName
    measures_qk = False  # needs q and k on calibration data (pair statistics)
    measures_values = False  # needs the attention's V output
    measures_hidden = False  # needs the FFN's hidden activations
    selects_by_refit = False  # with the refit's statistics: structured OBS, and projections where they apply
    pairs_by_softmax = False  # Q/K pairs by the error the softmax sees (softmax_metric.py)

    def pair_scores(self, g: ModelGraph, block: AttentionBlock, pairs, rng: np.random.Generator) -> np.ndarray:
        return pairs.mean_scores()

    def value_scores(self, g: ModelGraph, block: AttentionBlock, activations: Activations,
                     rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def head_scores(self, g: ModelGraph, block: AttentionBlock, activations: Activations,
                    rng: np.random.Generator) -> np.ndarray:
        """A key/value head with its query heads: the size of what it adds to the output,
        ‖attn·V output‖ × ‖W_out rows‖ summed over its neurons on calibration data."""
        contribution = activations() * _outgoing(g, block.out)
        return units.per_group(block, contribution.reshape(block.heads, block.head_dim)).sum(axis=1)

    def ffn_scores(self, g: ModelGraph, block: FfnBlock, activations: Activations,
                   rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def channel_scores(self, width: int, measured: Callable[[], np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Residual channels: `measured` (the --residual-criterion's scores)."""
        return measured()


class Snp(Criterion):
    name = CriterionName.SNP
    measures_qk = measures_values = measures_hidden = True
    selects_by_refit = pairs_by_softmax = True

    def value_scores(self, g, block, activations, rng):
        contribution = activations() * _outgoing(g, block.out)
        return units.per_group(block, contribution.reshape(block.heads, -1))

    def ffn_scores(self, g, block, activations, rng):
        return activations() * _outgoing(g, block.fc2)


class SnpPaper(Criterion):
    name = CriterionName.SNP_PAPER
    measures_qk = measures_values = True
    selects_by_refit = True

    def value_scores(self, g, block, activations, rng):
        return redundancy(_value_weights(g, block)).reshape(block.groups, -1)

    def ffn_scores(self, g, block, activations, rng):
        return redundancy(output_weights(g, block.fc1, block.columns[0], block.hidden))


class L2(Criterion):
    name = CriterionName.L2

    def pair_scores(self, g, block, pairs, rng):
        q_off, k_off, _ = block.column_offsets
        d = block.head_dim
        k_norms = np.linalg.norm(output_weights(g, block.k, k_off, block.groups * d), axis=0)
        return (np.linalg.norm(output_weights(g, block.q, q_off, block.heads * d), axis=0).reshape(-1, d)
                * np.repeat(k_norms.reshape(-1, d), block.group_size, axis=0))

    def value_scores(self, g, block, activations, rng):
        return np.linalg.norm(_value_weights(g, block), axis=0).reshape(block.groups, -1)

    def head_scores(self, g, block, activations, rng):
        v_norms = np.linalg.norm(_value_weights(g, block), axis=0).reshape(block.groups, -1)
        contribution = np.repeat(v_norms, block.group_size, axis=0).reshape(-1) * _outgoing(g, block.out)
        return units.per_group(block, contribution.reshape(block.heads, block.head_dim)).sum(axis=1)

    def ffn_scores(self, g, block, activations, rng):
        return np.linalg.norm(output_weights(g, block.fc1, block.columns[0], block.hidden), axis=0)


class Random(Criterion):
    name = CriterionName.RANDOM

    def pair_scores(self, g, block, pairs, rng):
        return rng.random((block.heads, block.head_dim))

    def value_scores(self, g, block, activations, rng):
        return rng.random((block.groups, block.head_dim))

    def head_scores(self, g, block, activations, rng):
        return rng.random(block.groups)

    def ffn_scores(self, g, block, activations, rng):
        return rng.random(block.hidden)

    def channel_scores(self, width, measured, rng):
        return rng.random(width)


_BY_NAME: dict[CriterionName, Criterion] = {c.name: c for c in (Snp(), SnpPaper(), L2(), Random())}


def criterion(name: str | CriterionName) -> Criterion:
    """The criterion called `name`; ValueError names the known ones."""
    try:
        return _BY_NAME[CriterionName(name)]
    except ValueError:
        raise ValueError(f"unknown criterion {name!r}: one of {', '.join(CRITERIA)}") from None
