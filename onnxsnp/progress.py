"""Progress on stderr while pruning: every stage that runs longer than DELAY seconds says so, and
stages made of steps (calibration batches, half-blocks) show how far they are and an ETA. On a
terminal the steps draw a bar (tqdm); anywhere else — a redirected log, CI — everything is plain
lines, at most one per step and one every few seconds, never carriage-return frames.

Off unless `reporting(True)` is in effect (the CLI turns it on; `-q` and the Python API's default
leave it off)."""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

DELAY = 2.0  # seconds a stage runs before it is announced
EVERY = 10.0  # seconds between plain step lines (and the first and last step always)

_state = threading.local()
T = TypeVar("T")


def _stream() -> TextIO | None:
    return getattr(_state, "stream", None)


@contextmanager
def reporting(enabled: bool, stream: TextIO | None = None) -> Iterator[None]:
    """Progress lines on `stream` (stderr) within this block, if `enabled`."""
    previous = _stream()
    _state.stream = (stream or sys.stderr) if enabled else None
    try:
        yield
    finally:
        _state.stream = previous


def _line(stream: TextIO, text: str) -> None:
    stream.write(f"onnxsnp: {text}\n")
    stream.flush()


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


@contextmanager
def stage(name: str) -> Iterator[None]:
    """`name` announced once it has run DELAY seconds, and its duration when it ends."""
    stream = _stream()
    if stream is None:
        yield
        return
    started, announced = time.perf_counter(), threading.Event()

    def announce() -> None:
        announced.set()
        _line(stream, f"{name} …")

    timer = threading.Timer(DELAY, announce)
    timer.daemon = True
    if DELAY <= 0:  # every stage announced (tests), without a race against the timer thread
        announce()
    else:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if announced.is_set():
            _line(stream, f"{name}: done in {_seconds(time.perf_counter() - started)}")


class Steps:
    """Progress of a stage made of `total` steps; `step(label)` after each (a bar on a terminal,
    plain lines elsewhere: the first once the stage has run DELAY seconds, then every EVERY
    seconds, and the last)."""

    def __init__(self, name: str, total: int, unit: str):  # unit: plural ("batches")
        self.name, self.total, self.unit = name, total, unit
        self.stream, self.done, self.bar = _stream(), 0, None
        self.started = self.last = time.perf_counter()
        if self.stream is not None and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=name, total=total, unit=unit, leave=False, file=self.stream)

    def step(self, label: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            if label:
                self.bar.set_postfix_str(label[-30:])
            self.bar.update(1)
            if self.done >= self.total:
                self.bar.close()
            return
        now = time.perf_counter()
        shown = self.last != self.started  # a line was written already
        if self.stream is None or not (now - self.started >= DELAY and (not shown or now - self.last >= EVERY)
                                       or shown and self.done >= self.total):
            return
        eta = (now - self.started) / self.done * (self.total - self.done)
        left = f", about {_seconds(eta)} left" if self.done < self.total else ""
        where = f" ({label})" if label else ""
        _line(self.stream, f"{self.name}: {self.done}/{self.total} {self.unit}{where}, "
                           f"{_seconds(now - self.started)}{left}")
        self.last = now


def steps(items: Iterable[T], name: str, total: int, unit: str) -> Iterator[T]:
    """`items` passed through, one step counted after each is dealt with."""
    counter = Steps(name, total, unit)
    for item in items:
        yield item
        counter.step()
