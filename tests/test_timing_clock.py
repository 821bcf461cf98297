"""Which clock the timings read (data/timing.py's TimeBase): a one-thread session on the calling
thread's CPU clock, where the time other jobs of a loaded machine take from it is not counted;
wall time for more threads or an inexact thread clock. Fake clocks only: nothing here is timed."""
from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsnp.data import timing
from onnxsnp.data.timing import TimeBase, interleaved_medians, time_base
from onnxsnp.score.timed import Clock
from onnxsnp.verify.verification import latency

EXACT = "clock_gettime(CLOCK_THREAD_CPUTIME_ID)"
WORK_MS = (3.0, 2.0)  # each fake session's own work per run
WAIT_MS = (0.0, 40.0, 5.0, 25.0, 10.0, 60.0, 0.0)  # per round: the time other jobs hold the core
CPU_TICK_S, WALL_TICK_S = 0.002, 1.0  # the counting clocks' steps per reading (a run reads each twice)


class FakeTime:
    """A thread CPU clock and a wall clock; a fake session's run advances both by its work, the
    wall clock also by the round's wait."""

    def __init__(self, implementation: str = EXACT):
        self.cpu = self.wall = 0.0
        self.implementation = implementation

    def thread_time(self) -> float:
        return self.cpu

    def perf_counter(self) -> float:
        return self.wall

    def get_clock_info(self, name: str):
        return types.SimpleNamespace(implementation=self.implementation if name == "thread_time" else "")


class FakeSession:
    def __init__(self, clock: FakeTime, work_ms: float):
        self.clock, self.work_ms, self.runs = clock, work_ms, 0

    def run(self, outputs, feed):
        wait = WAIT_MS[self.runs % len(WAIT_MS)]
        self.runs += 1
        self.clock.cpu += self.work_ms / 1000
        self.clock.wall += (self.work_ms + wait) / 1000


class CountingTime(FakeTime):
    """Each reading steps its clock by a fixed tick (a real session's run advances neither)."""

    def thread_time(self) -> float:
        self.cpu += CPU_TICK_S
        return self.cpu

    def perf_counter(self) -> float:
        self.wall += WALL_TICK_S
        return self.wall


def identity() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("threads", "implementation", "base"), [
    (1, EXACT, TimeBase.THREAD_CPU), (2, EXACT, TimeBase.WALL), (0, EXACT, TimeBase.WALL),
    (1, "GetThreadTimes()", TimeBase.WALL)])
def test_one_thread_is_timed_on_its_cpu_clock_where_that_clock_is_exact(monkeypatch, threads, implementation, base):
    monkeypatch.setattr(timing, "time", FakeTime(implementation))
    assert time_base(threads) is base


@pytest.mark.parametrize("base", list(TimeBase))
def test_the_medians_count_the_base_clock(monkeypatch, base):
    """On the thread clock the waits are not counted: each session's median is its work; on the
    wall clock they are, and the medians are those of work + wait."""
    fake = FakeTime()
    monkeypatch.setattr(timing, "time", fake)
    sessions = [FakeSession(fake, work) for work in WORK_MS]
    rounds = len(WAIT_MS)
    medians = interleaved_medians(sessions, [{}, {}], rounds, budget_s=float("inf"), base=base)
    if base is TimeBase.THREAD_CPU:
        assert medians == pytest.approx(WORK_MS)
    else:
        assert medians == pytest.approx([work + float(np.median(WAIT_MS[:rounds])) for work in WORK_MS])


def test_the_search_and_the_report_read_the_thread_clock(monkeypatch):
    """The --target-speedup check (timed.Clock) and the report's latency time a one-thread session:
    both medians are the thread clock's step per run, not the wall clock's."""
    model, feed = identity(), {"x": np.ones((1, 4), np.float32)}
    monkeypatch.setattr(timing, "time", CountingTime())
    clock = Clock(model, feed)
    assert clock.base is TimeBase.THREAD_CPU
    assert clock.compare(model) == pytest.approx((1000 * CPU_TICK_S, 1000 * CPU_TICK_S))
    assert latency(model, model, feed) == pytest.approx((1000 * CPU_TICK_S, 1000 * CPU_TICK_S))
