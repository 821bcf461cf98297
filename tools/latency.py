"""Side-by-side onnxruntime CPU latency of several models, measured fairly on a noisy machine.

One intra-op thread (two threads on these machines flip between a fast and a slow phase), a
warm-up, then the models are run round by round, interleaved, so that a slow phase of the
machine hits all of them alike. Median and minimum per model; speedups are ratios of medians.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(paths: list[str | Path], feed: dict[str, np.ndarray], runs: int = 30, warmup: int = 3,
                threads: int = 1) -> list[dict[str, float]]:
    """Per model: median and min latency in milliseconds over `runs` interleaved rounds."""
    sessions = [session(path, threads) for path in paths]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, bucket in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, feed)
            bucket.append((time.perf_counter() - start) * 1000)
    return [{"median_ms": statistics.median(t), "min_ms": min(t)} for t in times]


def cpu_name() -> str:
    """The processor's model name, for the header of a benchmark table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
