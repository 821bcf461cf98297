"""Where a prune's CPU time and page faults go: runs `python -m onnxsnp ARGS` in this process with
the functions below wrapped in `getrusage` probes, and prints per function its calls, wall, user and
system seconds and minor page faults, each exclusive of the other wrapped functions it calls
(docs/PRUNE_COST_DECODER.md, fourth round). Minor faults are the pages the kernel zero-fills for
freshly allocated buffers: a third of a decoder prune's CPU time was system time.

    PYTHONPATH=.:tools python tools/profile_prune_faults.py MODEL OUT --ratio 0.25 --calib CALIB -q

Wrapped functions called from worker threads are not split out: getrusage counts the whole
process, so their CPU goes to the main thread's wrapped caller (e.g. cross_validated_losses).
A function is patched where it is defined: a caller that imported it by name before the patch
(`from .x import f`) calls the original, which then counts toward the caller."""
from __future__ import annotations

import atexit
import functools
import importlib
import resource
import runpy
import sys
import threading
import time

TARGETS = [
    ("onnxsnp.io.loading", "load_model"),
    ("onnxsnp.pipeline", "prepare"), ("onnxsnp.pipeline", "_compensate"), ("onnxsnp.pipeline", "_rewritten"),
    ("onnxsnp.pipeline", "finish"), ("onnxsnp.pipeline", "prune_model"),
    ("onnxsnp.verify.verification", "check_structure"),
    ("onnxsnp.compensate.least_squares", "spd_inverse"),
    ("onnxsnp.compensate.least_squares", "solve_without_bias"),
    ("onnxsnp.compensate.least_squares", "solve"),
    ("onnxsnp.compensate.least_squares", "_loss"),
    ("onnxsnp.compensate.least_squares", "cross_validated_losses"),
    ("onnxsnp.compensate.least_squares", "_centred"),
    ("onnxsnp.score.importance", "add_sums"),
    ("onnxsnp.compensate.reconstruction", "choose_pairs"),
    ("onnxsnp.compensate.reconstruction", "solve_without_bias"),
    ("onnxsnp.compensate.reconstruction.Reconstructor", "_choose_values"),
    ("onnxsnp.verify.observation", "_probe_run"),
    ("onnxsnp.verify.verification", "fidelity"),
    ("onnxsnp.verify.verification", "language_model_fidelity"),
    ("onnxsnp.compensate.least_squares.NormalEquations", "add"),
    ("onnxsnp.compensate.least_squares.Obs", "__init__"),
    ("onnxsnp.compensate.least_squares.Obs", "remove"),
    ("onnxsnp.compensate.least_squares.Obs", "costs"),
    ("onnxruntime.InferenceSession", "run"),
    ("onnxruntime.InferenceSession", "__init__"),
    ("onnxsnp.compensate.batches.Shard", "finish"),
    ("onnxsnp.compensate.batches.Shard", "targets"),
    ("onnxsnp.compensate.batches.Shard", "equations"),
    ("onnxsnp.compensate.batches.Shard", "prepare"),
    ("onnxsnp.compensate.batches.Shard", "attention_targets"),
    ("onnxsnp.heap", "release_heap"),
    ("onnxsnp.data.calibration", "join_outputs"),
    ("onnx", "save_model"),
]
totals: dict[str, list[float]] = {}  # label → [user, system, faults, wall, calls]
stack: list[list[float]] = []  # per active wrapped call: what its wrapped callees used
callers: list[str] = []  # the labels of the active wrapped calls
BY_CALLER = {"InferenceSession.run", "InferenceSession.__init__"}  # split by the wrapped function calling them


def _now() -> tuple[float, float, float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt, time.perf_counter()


def _wrap(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # a pool's worker (the CV's
            return original(*args, **kwargs)  # folds): its CPU counts toward the caller in the main thread
        start = _now()
        stack.append([0.0, 0.0, 0.0, 0.0])
        shown = f"{label} < {callers[-1]}" if label in BY_CALLER and callers else label
        callers.append(label)
        try:
            return original(*args, **kwargs)
        finally:
            used = [e - s for e, s in zip(_now(), start)]
            callees = stack.pop()
            callers.pop()
            if stack:
                stack[-1] = [a + b for a, b in zip(stack[-1], used)]
            row = totals.setdefault(shown, [0.0, 0.0, 0.0, 0.0, 0])
            for i in range(4):
                row[i] += used[i] - callees[i]
            row[4] += 1

    setattr(owner, name, wrapped)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    for part in parts[cut:]:
        owner = getattr(owner, part)
    return owner


def _report(start: tuple[float, float, float, float], imported: tuple[float, float, float, float]) -> None:
    end = _now()
    out = sys.stderr
    print(f"imports: user {imported[0] - start[0]:.2f} s, system {imported[1] - start[1]:.2f} s, "
          f"faults {imported[2] - start[2]:.0f}", file=out)
    print(f"{'function (exclusive; a run < its wrapped caller)':58s} {'calls':>5s} {'wall s':>7s} {'user s':>7s} {'sys s':>7s} {'faults':>9s}",
          file=out)
    for label, (user, system, faults, wall, calls) in sorted(totals.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        print(f"{label:58s} {calls:5d} {wall:7.2f} {user:7.2f} {system:7.2f} {faults:9.0f}", file=out)
    print(f"whole process: wall {end[3] - start[3]:.2f} s, user {end[0] - start[0]:.2f} s, "
          f"system {end[1] - start[1]:.2f} s, faults {end[2] - start[2]:.0f}", file=out)


def main() -> None:
    start = _now()
    for module, name in TARGETS:
        _wrap(_resolve(module), name, f"{module.split('.')[-1]}.{name}")
    imported = _now()
    atexit.register(_report, start, imported)
    sys.argv = ["onnxsnp", *sys.argv[1:]]
    runpy.run_module("onnxsnp", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
