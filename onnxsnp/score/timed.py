"""A latency budget checked by the clock before the reconstruction spends its time on it.

The latency model (costs.py) scales each profiled node's time by the share of its work a plan
keeps. Kernels are not linear in their widths (a narrower MatMul runs at another efficiency,
some ops shrink with no cut), so an allocation can run faster or slower than predicted: BERT-base
at `--target-speedup 2` ran 2.19× (docs/SPEED_LATENCY_TARGET.md). A model's time is fixed by its
shapes, not by its weights, so the allocated widths are rewritten with sliced weights (nothing
refitted: cheap) and timed against the original, interleaved, one intra-op thread, as users run
it, on the calling thread's CPU clock (data/timing.py's time_base: on a loaded machine the wall
clock moved the original's own decode step 3.3x between checks, and the search chased that).
While the measured time misses the goal by more than TOLERANCE, the goal in predicted
milliseconds is scaled by measured ÷ predicted and the widths are allocated again, at most
ROUNDS times; the widths measured closest to the goal win. A correction that would remove nothing
is never timed: on a model made of per-op overhead, noise can put the unpruned model nearest the goal.

The allocation moves in steps of very different sizes: an FFN step is a few neurons of one block,
while an attention move of an onnxruntime-genai folder (one head size for the model) takes every
block's key/value group or head width at once, and the latency model, profiled on a prefill,
mispredicts a decode step's attention more than its FFNs. So the measured time jumps where the
attention decision changes (SmolLM2's int4 folder: 1.10×, then 1.42× and 1.61×, for a goal of
1.3×). Once trials lie on both sides of the goal, the attention widths and removed blocks (the
"decision") are fixed and only the FFN widths are searched, between the trials of that decision:
for each decision of the two trials closest to the goal, the FFN widths that would meet it are
estimated, and the one the curves predict to lose less is timed next.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..data.calibration import Weights, session
from ..data.kv_cache import fitted
from ..data.timing import TimeBase, decode_feed, interleaved_medians, is_past, time_base
from ..errors import SnpError
from ..plan import TimedStep, Widths

log = logging.getLogger("onnxsnp")

TOLERANCE = 0.03  # measured time within this share of the goal ends the check (the goal's 5 % less noise)
ROUNDS = 6  # timed allocations at most: the first and five corrections (the FFN search needs a few)
TIMING_ROUNDS = 15  # interleaved runs of original and candidate per check ...
TIMING_BUDGET_S = 6.0  # ... or fewer (at least MIN_TIMING_ROUNDS) once this is spent
MIN_TIMING_ROUNDS = 5


@dataclass(frozen=True)
class Trial:
    goal_predicted_ms: float  # the goal the allocation was given, in the latency model's milliseconds
    predicted_ms: float  # what the latency model predicts for the allocated widths
    before_ms: float  # the original's median, measured beside the candidate
    after_ms: float  # the candidate's median
    goal_ms: float  # the measured goal: the original's time ÷ the speedup, or the latency asked for
    ffn_only: bool = False  # allocated with the attention widths of an earlier trial fixed (the FFN search)

    @property
    def miss(self) -> float:
        """How far the measured time is from the goal, as a share of it (+: too slow)."""
        return self.after_ms / self.goal_ms - 1

    def as_dict(self) -> dict:
        return {"goal_predicted_ms": round(self.goal_predicted_ms, 4), "predicted_ms": round(self.predicted_ms, 4),
                "measured_ms_before": round(self.before_ms, 4), "measured_ms_after": round(self.after_ms, 4),
                "measured_speedup": round(self.before_ms / max(self.after_ms, 1e-12), 4),
                "goal_ms": round(self.goal_ms, 4), "ffn_only": self.ffn_only}


@dataclass(frozen=True)
class Timed:
    widths: Widths
    trials: tuple[Trial, ...]
    chosen: int  # the trial whose widths are kept
    stopped: str  # why the check ended
    step: TimedStep  # what was timed
    base: TimeBase  # what its milliseconds count


class Clock:
    """Times candidates against the original (data/timing.py's interleaved_medians, after a warm-up);
    the original's session is made once. On a model with a KV cache, `step` DECODE times one new
    token after a prefill of the sample (each model stepping through its own, maybe narrower,
    cache: timing.decode_feed); otherwise, and where the sample cannot be stepped, one run."""

    def __init__(self, original: onnx.ModelProto, feed: dict[str, np.ndarray], weights: Weights | None = None,
                 step: TimedStep = TimedStep.DECODE):
        self._original = session(original, threads=1, weights=weights)
        self._feed = feed
        self.base = time_base(1)
        self.step = TimedStep.PREFILL
        if step is TimedStep.DECODE and any(is_past(name, value) for name, value in feed.items()):
            self._original_feed = decode_feed(self._original, feed)
            if self._original_feed is not None:
                self.step = TimedStep.DECODE
        if self.step is TimedStep.PREFILL:
            self._original_feed = fitted(self._original, feed)
        self._original.run(None, self._original_feed)

    def compare(self, candidate: onnx.ModelProto) -> tuple[float, float]:
        """Median milliseconds per run (or per decode step): (original, candidate)."""
        other = session(candidate, threads=1)
        own = decode_feed(other, self._feed) if self.step is TimedStep.DECODE else fitted(other, self._feed)
        if own is None:
            raise SnpError("the pruned candidate's decode step could not be fed (its cache outputs do not match its "
                           "past inputs): use --timed-step prefill")
        feeds = [self._original_feed, own]
        other.run(None, own)
        before, after = interleaved_medians([self._original, other], feeds, TIMING_ROUNDS, TIMING_BUDGET_S,
                                            MIN_TIMING_ROUNDS, self.base)
        return before, after


Allocate = Callable[[float, Widths | None], Widths]


def timed_widths(goal_predicted_ms: float, measured_goal: Callable[[float], float], allocate: Allocate,
                 predict: Callable[[Widths], float], build: Callable[[Widths], onnx.ModelProto], clock: Clock,
                 original_predicted_ms: float, loss: Callable[[Widths], float] | None = None) -> Timed:
    """Widths whose measured time meets the goal: `allocate(goal in predicted ms, fixed)` chooses
    widths (with `fixed` Widths: those attention widths and removed blocks, FFN widths only),
    `predict` is the latency model's time for them, `build` rewrites them (sliced weights),
    `measured_goal(original's measured ms)` is the goal in measured milliseconds;
    `original_predicted_ms` is the latency model's time for the unpruned model; `loss`: the
    allocation's predicted loss of widths (which attention decision the FFN search keeps)."""
    trials: list[Trial] = []
    found: list[Widths] = []
    goal, fixed = goal_predicted_ms, None
    stopped = f"{ROUNDS} timed allocations"
    for _ in range(ROUNDS):
        try:
            widths = allocate(goal, fixed)
        except SnpError as why:  # the corrected goal is out of reach: keep what was found
            if not found:
                raise
            stopped = f"a corrected goal of {goal:.2f} predicted ms is out of reach ({why})"
            break
        if widths in found:
            stopped = "the correction chose widths already timed"
            break
        predicted = predict(widths)
        if found and predicted >= original_predicted_ms:
            stopped = "the correction removes nothing"
            break
        before, after = clock.compare(build(widths))
        trial = Trial(goal, predicted, before, after, measured_goal(before), fixed is not None)
        trials.append(trial)
        found.append(widths)
        log.info("timed allocation %d%s: predicted %.2f ms, measured (%s) %.2f -> %.2f ms (goal %.2f ms, %+.1f%%)",
                 len(trials), " (FFN widths only)" if fixed is not None else "", predicted, clock.step.value,
                 before, after, trial.goal_ms, 100 * trial.miss)
        if abs(trial.miss) <= TOLERANCE:
            stopped = f"measured within {TOLERANCE:.0%} of the goal"
            break
        goal, fixed = _next_goal(trials, found, allocate, loss)
        if not math.isfinite(goal) or goal <= 0:
            stopped = "the measured time gives no usable correction"
            break
    chosen = min(range(len(trials)), key=lambda i: abs(math.log1p(trials[i].miss)))
    return Timed(found[chosen], tuple(trials), chosen, stopped, clock.step, clock.base)


def decision(widths: Widths) -> tuple:
    """What the FFN search keeps fixed: the attention widths and the removed blocks."""
    return tuple(sorted(widths.attention.items())), widths.removed_layers


def _next_goal(trials: list[Trial], found: list[Widths], allocate: Allocate,
               loss: Callable[[Widths], float] | None) -> tuple[float, Widths | None]:
    """Where to aim the latency model next, and the widths whose attention to keep (None: the
    allocation chooses). Before trials fall on both sides of the goal, measured ≈ c · predicted
    near the last plan, so the prediction is scaled to where the measurement would meet the goal.
    After, for the attention decision of each of the two trials closest to the goal (too slow, too
    fast), the predicted goal of its FFN widths alone: between its own trials on both sides
    (linear in the miss), else scaled from its trial closest to the goal; of the two, the one whose
    widths the curves predict to lose less (and that was not timed yet)."""
    slow = [i for i, t in enumerate(trials) if t.miss > 0]
    fast = [i for i, t in enumerate(trials) if t.miss < 0]
    if not (slow and fast):
        last = trials[-1]
        return last.goal_ms * last.predicted_ms / max(last.after_ms, 1e-12), found[-1] if last.ffn_only else None
    a = min(slow, key=lambda i: trials[i].miss)
    b = max(fast, key=lambda i: trials[i].miss)
    options = []
    for kept in dict.fromkeys((decision(found[a]), decision(found[b]))):
        own = [i for i in range(len(trials)) if decision(found[i]) == kept]
        goal = _aim([trials[i] for i in own])
        if not math.isfinite(goal) or goal <= 0:
            continue
        try:
            widths = allocate(goal, found[own[0]])
        except SnpError:
            continue
        options.append((loss(widths) if loss else 0.0, widths in found, goal, found[own[0]]))
    if not options:
        return math.nan, None
    _, _, goal, fixed = min(options, key=lambda o: (o[1], o[0]))
    return goal, fixed


def _aim(trials: list[Trial]) -> float:
    """The predicted ms at which these trials (of one attention decision) would meet the goal."""
    slow = [t for t in trials if t.miss > 0]
    fast = [t for t in trials if t.miss < 0]
    if slow and fast:
        a = min(slow, key=lambda t: t.miss)
        b = max(fast, key=lambda t: t.miss)
        share = a.miss / (a.miss - b.miss)
        return a.predicted_ms + share * (b.predicted_ms - a.predicted_ms)
    t = min(trials, key=lambda t: abs(t.miss))
    return t.goal_ms * t.predicted_ms / max(t.after_ms, 1e-12)
