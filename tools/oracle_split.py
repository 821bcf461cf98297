"""ORACLE, for diagnosis only (never a pruner option): the block-by-block reconstruction's choice of
what to keep (Q/K pairs, key/value heads and V neurons, FFN neurons) made on one calibration set,
its refits (the Q/K rescale, the output projection's and fc2's least squares with their
cross-validated ridge) on another. Which of the two fits does not carry from the calibration
windows to other windows of a text (tools/bench_real_decoders.py `--oracle choose-*`)?

A prune records its choices (`recording`); a second prune on other data is made to keep exactly
those (`forcing`) and fits everything else on its own data. Both patch the class the pipeline
instantiates (onnxsnp.pipeline.Reconstructor) for the duration of a `with`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

import onnxsnp.pipeline as pipeline
from onnxsnp.compensate.reconstruction import QK_RIDGE, Reconstructor
from onnxsnp.score.softmax_metric import choose_pairs


@dataclass
class Choices:
    """Per block name: the kept Q/K dims (groups, dims), the kept (heads, V neurons), the kept FFN
    neurons — what a recording prune chose."""

    pairs: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    hidden: dict[str, np.ndarray] = field(default_factory=dict)

    def count(self) -> int:
        return len(self.pairs) + len(self.values) + len(self.hidden)


def _reconstructor(choices: Choices, force: bool) -> type[Reconstructor]:
    """A Reconstructor that records its choices into `choices`, or (`force`) keeps the recorded ones
    and fits only the rescales and refits on its own calibration data."""

    class Split(Reconstructor):
        def _pair_choice(self, block, sums, kept: int):
            if force:
                return choose_pairs(block, sums, kept, QK_RIDGE, fixed=choices.pairs[block.name])
            choice = super()._pair_choice(block, sums, kept)
            choices.pairs[block.name] = choice.qk
            return choice

        def _choose_pairs(self, block, pairs, kept: int) -> np.ndarray:
            if force:
                return choices.pairs[block.name]
            choices.pairs[block.name] = qk = super()._choose_pairs(block, pairs, kept)
            return qk

        def _choose_values(self, block, equations, prior, width, projecting=False):
            if projecting:  # the projection fits V's subspace itself: not a choice to carry over
                raise NotImplementedError("the split oracle does not separate a projected V (--reduction project "
                                          "on attention without grouped queries)")
            if force:
                return choices.values[block.name]
            choices.values[block.name] = kept = super()._choose_values(block, equations, prior, width, projecting)
            return kept

        def _choose_hidden(self, block, equations, prior, kept: int) -> np.ndarray:
            if force:
                return choices.hidden[block.name]
            choices.hidden[block.name] = hidden = super()._choose_hidden(block, equations, prior, kept)
            return hidden

    return Split


@contextmanager
def _patched(cls: type[Reconstructor]) -> Iterator[None]:
    before = pipeline.Reconstructor
    pipeline.Reconstructor = cls
    try:
        yield
    finally:
        pipeline.Reconstructor = before


def recording(choices: Choices):
    """Prunes inside the `with` record what they keep into `choices`."""
    return _patched(_reconstructor(choices, force=False))


def forcing(choices: Choices):
    """Prunes inside the `with` keep what `choices` recorded; rescales and refits are their own."""
    return _patched(_reconstructor(choices, force=True))
