"""Where the time goes: each node's measured time in onnxruntime, for latency budgets.

The original model is run a few times on one sample under onnxruntime's profiler, in the
session users run (graph optimizations on, one intra-op thread unless told otherwise). The
optimizer fuses and renames nodes (MatMul + scale → FusedMatMul, Add + Gelu → BiasGelu, a Conv
→ its NCHWc form), so a profiled node is traced back to the original nodes it replaced: by
name where it kept one, else through the optimized graph (saved beside the profile) to the
original tensors it writes, and back from their producers through the tensors the optimized
graph no longer has. Its time is shared among them (by MACs where they have any).

The profiler adds its own cost to every node, so the node times are scaled to the run time
measured without it; what no node accounts for (the session's overhead, nodes that cannot be
traced) is kept apart and never scaled. Every op also costs a fixed dispatch time however small
its tensors (the fastest node's time): pruning removes it only with the node.
"""
from __future__ import annotations

import bisect
import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..data.calibration import Weights, session
from ..data.timing import time_base
from ..ir.graph import ModelGraph

PROFILE_RUNS = 5  # timed runs after the warm-up, at least; each node's time is its median over them
# and at least this long, at most MAX_PROFILE_RUNS: a small model's nodes take microseconds, and over
# 5 runs their times (the fastest of them the dispatch cost every op keeps) moved so much that the
# same tiny int4 Llama, profiled twice in a row, left 54 % and 96 % of its time out of any cut's reach
PROFILE_SECONDS = 0.2
MAX_PROFILE_RUNS = 200
WARMUP_RUNS = 2
MAX_TRACE = 64  # original nodes one fused node may stand for (a bound on the backward walk)


@dataclass(frozen=True)
class NodeTimes:
    """Milliseconds per run of the original model on one sample (one batch for fixed-batch models)."""

    node_ms: dict[str, float]  # original node name → its measured time (a fused node's time shared out)
    overhead_ms: float  # the rest of a run: session overhead and nodes not traced back
    threads: int
    runs: int
    dispatch_ms: float = 0.0  # what any op costs, however small (kept while the node is)

    @property
    def total_ms(self) -> float:
        return self.overhead_ms + sum(self.node_ms.values())

    def scaled(self, scale: dict[str, float]) -> float:
        """Milliseconds per run with each node's work scaled by `scale` (absent: 1, 0: removed)."""
        total = self.overhead_ms
        for name, ms in self.node_ms.items():
            factor = scale.get(name, 1.0)
            fixed = min(self.dispatch_ms, ms)
            total += fixed + (ms - fixed) * factor if factor > 0 else 0.0
        return total


def profile_nodes(g: ModelGraph, feed: dict[str, np.ndarray], macs: dict[str, int], threads: int = 1,
                  runs: int = PROFILE_RUNS, weights: Weights | None = None) -> NodeTimes:
    """Each original node's time per run on `feed` (one sample), profiled after a warm-up."""
    with tempfile.TemporaryDirectory(prefix="onnxsnp_profile_") as folder:
        optimized = Path(folder) / "optimized.onnx"

        def configure(options) -> None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "profile")
            options.optimized_model_filepath = str(optimized)
            # the optimized graph's weights go to a file beside it, never read back (and no 2 GB limit)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             "optimized.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
            options.inter_op_num_threads = 1

        sess = session(g.model, threads=threads, weights=weights, configure=configure)
        for _ in range(WARMUP_RUNS):
            sess.run(None, feed)
        runs = _timed_runs(lambda: sess.run(None, feed), runs)
        events = json.loads(Path(sess.end_profiling()).read_text())
        fused = onnx.load(str(optimized), load_external_data=False) if optimized.exists() else None
        del sess
    run_ms = _plain_run_ms(g, feed, threads, runs, weights)
    per_node = _node_times(events, runs)
    tracer = _Tracer(g, fused)
    node_ms: dict[str, float] = defaultdict(float)
    for name, ms in per_node.items():
        covered = tracer.originals(name)
        if not covered:
            continue
        weights_of = [macs.get(n, 0) for n in covered]
        total = sum(weights_of)
        for original, weight in zip(covered, weights_of):
            node_ms[original] += ms * (weight / total if total else 1 / len(covered))
    traced = sum(node_ms.values())
    factor = min(run_ms / traced, 1.0) if traced > 0 else 1.0  # the profiler's own cost per node, scaled out
    node_ms = {name: ms * factor for name, ms in node_ms.items()}
    dispatch = min((ms for ms in per_node.values() if ms > 0), default=0.0) * factor
    return NodeTimes(node_ms, max(run_ms - traced * factor, 0.0), threads, runs, dispatch)


def _timed_runs(run, least: int) -> int:
    """Runs `run` at least `least` times and for PROFILE_SECONDS, at most MAX_PROFILE_RUNS; how many."""
    done, started = 0, time.perf_counter()
    while done < least or (time.perf_counter() - started < PROFILE_SECONDS and done < MAX_PROFILE_RUNS):
        run()
        done += 1
    return done


def _plain_run_ms(g: ModelGraph, feed: dict[str, np.ndarray], threads: int, runs: int,
                  weights: Weights | None) -> float:
    """The median run time without the profiler, as users run the model, on the clock the timed
    checks read (time_base: the calling thread's CPU time for one thread), so that the latency
    model's milliseconds and the measured ones are the same kind."""
    sess = session(g.model, threads=threads, weights=weights)
    clock = time_base(threads).clock
    times = []
    for done in range(WARMUP_RUNS + runs):
        started = clock()
        sess.run(None, feed)
        if done >= WARMUP_RUNS:
            times.append((clock() - started) * 1000)
    return statistics.median(times)


def _node_times(events: list[dict], runs: int) -> dict[str, float]:
    """Each profiled node's median time per run (ms) over the last `runs` runs (warm-up runs left
    out): a run the machine preempted in one node moves that node's mean, not its median."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    if not model_runs:
        return {}
    starts = [e["ts"] for e in model_runs]
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(model_runs))
    for e in events:
        # each node has a *_kernel_time event (the op itself) besides fence events without op_name
        if e.get("cat") == "Node" and e["ts"] >= starts[0] and "op_name" in e.get("args", {}):
            run = bisect.bisect_right(starts, e["ts"]) - 1
            per_run[e["name"].removesuffix("_kernel_time")][run] += e["dur"] / 1000
    return {name: statistics.median(times) for name, times in per_run.items()}


class _Tracer:
    """Maps a node of onnxruntime's optimized graph back to the original nodes it stands for."""

    def __init__(self, g: ModelGraph, fused: onnx.ModelProto | None):
        self.g = g
        self.original_tensors = set(g.producer)
        self.fused_nodes = {n.name: n for n in fused.graph.node} if fused is not None else {}
        self.fused_consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.surviving: set[str] = set()  # tensors the optimized graph still has
        if fused is not None:
            self.surviving |= {i.name for i in fused.graph.input} | {t.name for t in fused.graph.initializer}
            for node in fused.graph.node:
                self.surviving |= set(node.input) | set(node.output)
                for tensor in node.input:
                    self.fused_consumers[tensor].append(node)

    def originals(self, name: str) -> list[str]:
        if name in self.g.nodes:
            return [name]
        node = self.fused_nodes.get(name)
        if node is None:
            return []
        ends = self._original_outputs(node)
        covered: list[str] = []
        queue = [self.g.producer[t] for t in ends]
        while queue and len(covered) < MAX_TRACE:
            current = queue.pop()
            if current in covered:
                continue
            covered.append(current)
            for tensor in self.g.node(current).input:
                # fused away (and not a constant folded into a weight): part of this node's work
                if tensor in self.g.producer and tensor not in self.surviving and not self.g.is_constant(tensor):
                    queue.append(self.g.producer[tensor])
        return covered

    def _original_outputs(self, node: onnx.NodeProto, hops: int = 3) -> list[str]:
        """The original tensors `node` writes, or (a layout node the optimizer inserted) those its
        consumers write, up to `hops` nodes on."""
        found = [t for t in node.output if t in self.original_tensors]
        if found or hops == 0:
            return found
        return [t for out in node.output for consumer in self.fused_consumers.get(out, [])
                for t in self._original_outputs(consumer, hops - 1)]
