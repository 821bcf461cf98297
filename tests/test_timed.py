"""The clock's correction of a latency budget (timed.py), on a fake allocation and clock whose
kernels run a fixed factor faster or slower than the latency model predicts."""
import math

import pytest

from onnxsnp.errors import SnpError
from onnxsnp.plan import AttentionWidth, TimedStep, Widths
from onnxsnp.score.timed import ROUNDS, TOLERANCE, timed_widths

ORIGINAL_MS = 100.0
SPEEDUP = 2.0


def widths(units: int) -> Widths:
    return Widths({"attention": AttentionWidth(1, 4, 4)}, {"ffn": units})


class FakeClock:
    """Measures a candidate (its predicted ms, passed through `build`) at `factor` × predicted."""

    step = TimedStep.PREFILL

    def __init__(self, factor):
        self.factor = factor
        self.calls = 0

    def compare(self, predicted_ms):
        self.calls += 1
        return ORIGINAL_MS, self.factor(predicted_ms) if callable(self.factor) else self.factor * predicted_ms


def run(factor, reachable_ms: float = 0.0):
    clock = FakeClock(factor)

    def allocate(goal: float) -> Widths:
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
    expected = first.goal_predicted_ms + share * (second.goal_predicted_ms - first.goal_predicted_ms)
    assert third.goal_predicted_ms == pytest.approx(expected)


def test_a_correction_that_removes_nothing_is_never_timed():
    # the first plan measures 4x too fast; the corrected goal lies beyond the unpruned model
    timed, clock = run(0.25)
    first = timed.trials[0]
    assert first.goal_ms / first.after_ms > ORIGINAL_MS / first.goal_predicted_ms  # correction aims past the original
    assert len(timed.trials) == clock.calls == 1 and "removes nothing" in timed.stopped
    assert timed.widths == widths(int(ORIGINAL_MS / SPEEDUP))
