"""What a half-block's cut costs at the end of a decoder, not where it is made.

The survey (sensitivity.py) measures each half's loss where it is added to the residual stream.
In a decoder the blocks after it answer to that error: Gemma 3 270M's layer-2 attention turned
layer 1's cut into ten times its size in the stream (and into its four massive channels), while
layer 0's, counted by one mean(γ²) of its post-norm, was counted ten times too large
(docs/DECODERS_GEMMA3.md). So for each half one cut is made for real — a quarter of its V neurons
or FFN neurons gone, the rest refitted as the survey refits them — on the original stream, and
the stream it leaves is carried through every later half with the original weights; its error in
the last stream (mean over tokens of ‖x̂ − x‖² / ‖x‖², what the final norm sees) over the
survey's curve at that width is the factor the half's curves are multiplied by. The curves then
share one unit, the last stream's error, as the final perplexity does; their shapes stay the
survey's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compensate.batches import Shard, tokens
from ..compensate.least_squares import DEFAULT_RIDGE, NormalEquations, solve, solve_without_bias
from ..plan import Refit

TRIAL_KEPT = 0.75  # the share of a group's units the measured cut keeps (about the cuts asked of decoders)
FLOOR = 1e-12  # a curve below this at the trial width cannot be calibrated: its factor stays 1


@dataclass(frozen=True)
class Trial:
    """One measured cut of a half: the refitted layer's kept input rows and their refit."""

    linear: object  # match.blocks.Linear: the output projection or fc2
    rows: np.ndarray
    refit: Refit
    width: float  # units kept per group, where the half's curve is read


def trial_refit(equations: NormalEquations, linear, rows: np.ndarray, prior: np.ndarray) -> Refit:
    """The refit of the kept rows as the survey's curves assume it (the survey's ridge)."""
    if linear.bias is None:
        return Refit(solve_without_bias(equations, rows, prior[rows], DEFAULT_RIDGE), None)
    fit = solve(equations, rows, prior[rows], DEFAULT_RIDGE)
    return Refit(fit.weight, fit.bias)


def relative_error(pruned: np.ndarray, original: np.ndarray, samples: int, mask) -> tuple[float, int]:
    """Σ over real tokens of ‖x̂ − x‖² / ‖x‖², and the tokens counted."""
    x = tokens(original, samples, mask).astype(np.float64)
    e = tokens(pruned, samples, mask).astype(np.float64) - x
    return float((np.square(e).sum(-1) / np.maximum(np.square(x).sum(-1), 1e-30)).sum()), len(x)


class Downstream:
    """The survey's batches carried to the last stream: the original's once, then each trial's."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.halves = [h for pair in shard.halves for h in pair]
        self.last = [self._carry(0, item, item.original) for item in shard.batches]

    def _carry(self, first: int, item, stream: np.ndarray) -> np.ndarray:
        """`stream` (the input of half `first`) through half `first` and every later one, original weights."""
        for half in self.halves[first:]:
            end = half.segment.outputs[0]
            stream = self.shard.run_half(half, item, stream, self.shard.original, [end])[end]
            self.shard.shapes[(end, item.index)] = stream.shape
        return stream

    def last_error(self, number: int, starts: list[np.ndarray], weights: dict) -> float:
        """The last stream's error (mean over tokens) when half `number` runs with `weights` on
        `starts` (its original input streams) and the halves after it with the original weights."""
        half, total, count = self.halves[number], 0.0, 0
        end = half.segment.outputs[0]
        for item, start, reference in zip(self.shard.batches, starts, self.last):
            after = self.shard.run_half(half, item, start, weights, [end])[end]
            error, n = relative_error(self._carry(number + 1, item, after), reference, item.samples, item.mask)
            total, count = total + error, count + n
        return total / max(count, 1)

    def factor(self, reconstructor, number: int, starts: list[np.ndarray], trial: Trial | None,
               predicted: float) -> float:
        """The factor from the survey's unit at half `number` to the last stream's error: the
        trial cut's measured last-stream error over the curve's `predicted` loss at its width."""
        if trial is None or predicted < FLOOR:
            return 1.0
        saved = dict(reconstructor.weights.values)
        try:
            reconstructor.weights.set_inputs(trial.linear, trial.rows, trial.refit)
            measured = self.last_error(number, starts, reconstructor.weights.values)
        finally:
            reconstructor.weights.values = saved
        return measured / predicted
