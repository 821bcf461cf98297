"""The clock's correction of a latency budget (timed.py), on a fake allocation and clock whose
kernels run a fixed factor faster or slower than the latency model predicts."""
import math

import pytest

from onnxsnp.data.timing import TimeBase
from onnxsnp.errors import SnpError
from onnxsnp.plan import AttentionWidth, TimedStep, Widths
from onnxsnp.score.timed import ROUNDS, TOLERANCE, decision, timed_widths

ORIGINAL_MS = 100.0
SPEEDUP = 2.0


def widths(units: int) -> Widths:
    return Widths({"attention": AttentionWidth(1, 4, 4)}, {"ffn": units})


class FakeClock:
    """Measures a candidate (its predicted ms, passed through `build`) at `factor` × predicted."""

    step = TimedStep.PREFILL
    base = TimeBase.THREAD_CPU

    def __init__(self, factor):
        self.factor = factor
        self.calls = 0

    def compare(self, predicted_ms):
        self.calls += 1
        return ORIGINAL_MS, self.factor(predicted_ms) if callable(self.factor) else self.factor * predicted_ms


def run(factor, reachable_ms: float = 0.0):
    clock = FakeClock(factor)

    def allocate(goal: float, fixed: Widths | None) -> Widths:
        if goal < reachable_ms:
            raise SnpError("the budget cannot be met")
        return widths(int(goal))  # one unit per predicted millisecond, rounded down: within the goal

    return timed_widths(ORIGINAL_MS / SPEEDUP, lambda before: before / SPEEDUP, allocate,
                        lambda w: float(w.ffn["ffn"]), lambda w: float(w.ffn["ffn"]), clock, ORIGINAL_MS), clock


def test_a_prediction_that_holds_is_timed_once():
    timed, clock = run(1.0)
    assert clock.calls == 1 and len(timed.trials) == 1 and timed.chosen == 0
    assert timed.widths == widths(int(ORIGINAL_MS / SPEEDUP))
    assert abs(timed.trials[0].miss) <= TOLERANCE and "within" in timed.stopped
    assert timed.base is clock.base  # the report says what the trials' milliseconds count


@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_a_constant_error_is_corrected_in_one_more_allocation(factor):
    timed, clock = run(factor)
    goal_ms = ORIGINAL_MS / SPEEDUP
    assert len(timed.trials) == 2 and timed.chosen == 1
    first, second = timed.trials
    assert first.miss == pytest.approx(factor - 1)
    assert second.goal_predicted_ms == pytest.approx(goal_ms / factor)  # aimed where the clock meets the goal
    assert timed.widths == widths(int(goal_ms / factor))
    assert abs(second.miss) <= TOLERANCE
    assert second.as_dict()["measured_speedup"] == pytest.approx(ORIGINAL_MS / second.after_ms, rel=1e-3)


def test_the_closest_measured_widths_win_when_no_correction_lands():
    # the clock's error grows with the cut, so each correction overshoots: ROUNDS trials, the best kept
    timed, clock = run(lambda predicted: predicted * (1 + 0.4 * (ORIGINAL_MS / SPEEDUP) / predicted) ** 2)
    assert len(timed.trials) == clock.calls == ROUNDS
    misses = [abs(math.log1p(t.miss)) for t in timed.trials]
    assert timed.chosen == misses.index(min(misses))
    assert timed.widths == widths(int(timed.trials[timed.chosen].goal_predicted_ms))


def test_an_unreachable_correction_keeps_what_was_timed():
    timed, clock = run(2.0, reachable_ms=ORIGINAL_MS / SPEEDUP)  # the corrected goal (25 ms) is out of reach
    assert len(timed.trials) == 1 and clock.calls == 1
    assert "out of reach" in timed.stopped and timed.widths == widths(int(ORIGINAL_MS / SPEEDUP))


def test_an_unreachable_goal_is_an_error():
    with pytest.raises(SnpError):
        run(1.0, reachable_ms=ORIGINAL_MS)


def test_trials_on_both_sides_of_the_goal_are_interpolated():
    # a step in the clock: every plan predicted at most 40 ms measures 0.5 × predicted, others 1.25 ×
    timed, clock = run(lambda predicted: predicted * (0.5 if predicted <= 40 else 1.25))
    first, second, third = timed.trials[:3]
    assert first.miss == pytest.approx(0.25) and second.miss < 0  # too slow, then far too fast
    share = first.miss / (first.miss - second.miss)
    expected = first.predicted_ms + share * (second.predicted_ms - first.predicted_ms)
    assert third.goal_predicted_ms == pytest.approx(expected) and third.ffn_only


def test_a_correction_that_removes_nothing_is_never_timed():
    # the first plan measures 4x too fast; the corrected goal lies beyond the unpruned model
    timed, clock = run(0.25)
    first = timed.trials[0]
    assert first.goal_ms / first.after_ms > ORIGINAL_MS / first.goal_predicted_ms  # correction aims past the original
    assert len(timed.trials) == clock.calls == 1 and "removes nothing" in timed.stopped
    assert timed.widths == widths(int(ORIGINAL_MS / SPEEDUP))


# --- the FFN search once the attention decision is fixed ---------------------------------------
# A model of two key/value groups and FFN_UNITS FFN units. The latency model predicts a unit at
# 1 ms and a group at GROUP_MS; the clock measures a unit at UNIT_FACTOR ms and a group at twice
# its prediction (a decode step's attention, which a prefill's profile underrates). The allocation
# removes a group once its goal is at most GROUP_GOAL_MS, and fills the rest with FFN units.
FFN_UNITS, GROUP_MS, UNIT_FACTOR, GROUP_GOAL_MS = 100, 20.0, 1.2, 65.0


def _two_group_widths(groups: int, units: int) -> Widths:
    return Widths({"attention": AttentionWidth(groups, 4, 4)}, {"ffn": units})


def _predict(w: Widths) -> float:
    return w.ffn["ffn"] + GROUP_MS * w.attention["attention"].heads


def _measure(w: Widths) -> float:
    return UNIT_FACTOR * w.ffn["ffn"] + 2 * GROUP_MS * w.attention["attention"].heads


class WidthsClock:
    step = TimedStep.DECODE
    base = TimeBase.THREAD_CPU

    def __init__(self):
        self.timed = []

    def compare(self, w: Widths):
        self.timed.append(w)
        return _measure(_two_group_widths(2, FFN_UNITS)), _measure(w)


def _search(group_loss: float):
    """The timed search with a group's predicted loss `group_loss` (an FFN unit's: 1)."""
    def allocate(goal: float, fixed: Widths | None) -> Widths:
        groups = fixed.attention["attention"].heads if fixed else (2 if goal > GROUP_GOAL_MS else 1)
        units = int(goal - GROUP_MS * groups)
        if units < 1:
            raise SnpError("the budget cannot be met")
        return _two_group_widths(groups, min(units, FFN_UNITS))

    def loss(w: Widths) -> float:
        return (FFN_UNITS - w.ffn["ffn"]) + group_loss * (2 - w.attention["attention"].heads)

    clock = WidthsClock()
    original = _predict(_two_group_widths(2, FFN_UNITS))
    return timed_widths(original / SPEEDUP, lambda before: before / SPEEDUP, allocate, _predict, lambda w: w, clock,
                        original, loss), clock


@pytest.mark.parametrize("group_loss", [5.0, 50.0])
def test_the_ffn_search_keeps_the_attention_that_loses_less(group_loss):
    """The first allocation keeps both groups and measures too slow; the correction removes one
    and measures too fast: a step no FFN-width correction can cross. The search then fixes the
    attention of one of the two and moves the FFN alone: the decision whose FFN widths meeting the
    goal lose less (a group worth 5 units: the one-group decision; 50: both groups), and lands."""
    timed, clock = _search(group_loss)
    first, second = timed.trials[:2]
    assert first.miss > TOLERANCE and second.miss < -TOLERANCE
    assert decision(clock.timed[0]) != decision(clock.timed[1])
    goal_ms = _measure(_two_group_widths(2, FFN_UNITS)) / SPEEDUP
    # the FFN widths of each decision that would meet the goal, from the clock's own model
    units = {g: int((goal_ms - 2 * GROUP_MS * g) / UNIT_FACTOR) for g in (1, 2)}
    groups = min((1, 2), key=lambda g: (FFN_UNITS - units[g]) + group_loss * (2 - g))
    assert all(t.ffn_only for t in timed.trials[2:]) and len(timed.trials) > 2
    assert all(w.attention["attention"].heads == groups for w in clock.timed[2:])
    assert timed.widths.attention["attention"].heads == groups
    assert abs(timed.trials[timed.chosen].miss) <= TOLERANCE and "within" in timed.stopped
