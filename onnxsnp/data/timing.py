"""Timing onnxruntime sessions against each other: the interleaved loop (the report's latency
figures, the timed --target-latency budgets and tools/harness.py's benchmarks all use it), the
clock they read, and the cached decode step a language model is timed on."""
from __future__ import annotations

import functools
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TypeVar

import numpy as np

from .kv_cache import fitted

T = TypeVar("T")


class TimeBase(Enum):
    """What a timing's milliseconds count (the value: how a report says it)."""
    THREAD_CPU = "CPU time of the calling thread"
    WALL = "wall time"

    @property
    def clock(self) -> Callable[[], float]:
        return time.thread_time if self is TimeBase.THREAD_CPU else time.perf_counter


def time_base(threads: int) -> TimeBase:
    """How a session with `threads` intra-op threads is timed. With one, onnxruntime runs every
    kernel on the thread that calls run() (no pool: measured, the process's CPU time during a
    decode step of SmolLM2's int4 folder was the calling thread's within 0.1 %), so that
    thread's CPU time is the run's work without the slices other jobs of a loaded machine took
    from it: with two CPU-bound jobs beside it on 2 cores, the step's wall median went 12.2 -> 36.1
    ms and its CPU time 8.15 -> 8.16 ms (docs/DECODER_SPEED.md). It is the latency an idle machine
    would give, and what the timed budgets compare; memory-bandwidth contention stays in it. With
    more threads the work runs on others, and where the platform's thread clock is not exact
    (Windows: GetThreadTimes counts scheduler ticks of ~15 ms), wall time is used."""
    exact = time.get_clock_info("thread_time").implementation.startswith("clock_gettime")
    return TimeBase.THREAD_CPU if threads == 1 and exact else TimeBase.WALL


def decode_feed(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The last token of `feed`'s first sample as a decode step after a prefill of the tokens
    before it (the same total length as the sample, which the model ran on: a longer one may pass
    its rotary caches): past_* ← the prefill's present_* (matched by what follows the prefix:
    ".0.key"), the token ids' and positions' last column, the mask of the whole sample; None for a
    model without a past input, or with an input of another kind."""
    first = {name: value[:1] for name, value in feed.items()}
    past = [name for name, value in first.items() if is_past(name, value)]
    tokens = {name: value for name, value in first.items() if name not in past}
    if not past or any(v.ndim != 2 or v.dtype.kind not in "iu" or v.shape[1] < 2 for v in tokens.values()):
        return None
    prefill = fitted(sess, {**first, **{name: value[:, :-1] for name, value in tokens.items()}})
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, prefill)))
    presents = {re.sub(r"^present", "", name): value for name, value in outputs.items() if name.startswith("present")}
    step: dict[str, np.ndarray] = {}
    for name in past:
        suffix = re.sub(r"^past(_key_values)?", "", name)
        if suffix not in presents:
            return None
        step[name] = presents[suffix]
    for name, value in tokens.items():
        step[name] = value if "mask" in name.lower() else value[:, -1:]
    return step


def is_past(name: str, value: np.ndarray) -> bool:
    return "past" in name.lower() and value.ndim >= 4


def prompt_tokens(feed: dict[str, np.ndarray]) -> int | None:
    """The tokens a run of a language model with a KV cache prefills on `feed` (its token ids'
    length); None for a model without a past input, whose run is not a prefill."""
    if not any(is_past(name, value) for name, value in feed.items()):
        return None
    ids = [value for name, value in feed.items() if value.ndim == 2 and value.dtype.kind in "iu"
           and not any(word in name.lower() for word in ("mask", "position"))]
    return int(ids[0].shape[1]) if ids else None


def interleaved_rounds(measures: Sequence[Callable[[], T]], rounds: int, budget_s: float = math.inf,
                       min_rounds: int = 5) -> list[list[T]]:
    """What each measure returns, called once per round, round by round, so that the machine's slow
    phases hit all alike; `rounds` rounds, or `min_rounds` once `budget_s` is spent. (tools/harness.py
    times its benchmarks with this loop too.)"""
    results: list[list[T]] = [[] for _ in measures]
    started = time.perf_counter()
    for done in range(rounds):
        if done >= min_rounds and time.perf_counter() - started > budget_s:
            break
        for measure, bucket in zip(measures, results):
            bucket.append(measure())
    return results


def run_ms(sess, feed: dict[str, np.ndarray], clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds of one run of `sess` on `feed`, on `clock` (seconds)."""
    start = clock()
    sess.run(None, feed)
    return (clock() - start) * 1000


def interleaved_medians(sessions: list, feeds: list[dict[str, np.ndarray]], rounds: int, budget_s: float,
                        min_rounds: int = 5, base: TimeBase = TimeBase.WALL) -> tuple[float, ...]:
    """Median milliseconds per run of each (warmed-up) session, interleaved (`interleaved_rounds`),
    counted in `base` (the budget is always wall time: it bounds how long the timing takes)."""
    measures = [functools.partial(run_ms, sess, own, base.clock) for sess, own in zip(sessions, feeds)]
    return tuple(statistics.median(times) for times in interleaved_rounds(measures, rounds, budget_s, min_rounds))
