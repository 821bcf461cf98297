"""--workers: one process against Ray workers, a curve over worker counts, on the same model and
calibration samples.

Each configuration is a fresh `python -m onnxsnp MODEL OUT --ratio 0.5 --calib CALIB -q
[--workers N]` process; the configurations are interleaved (1, N1, N2, …, 1, N1, …) so that a
busy machine slows them alike. Measured per run: wall time of the whole process (Ray's start
included), the driver's own peak RSS (ru_maxrss via os.wait4), the Ray workers' peak RSS (the
processes below the run's titled ray::ShardWorker, sampled every 0.1 s from /proc: the largest
sum over the workers at one sample, and the largest single worker's peak) and the load average
before and after. The model is exported in a child process, so that this process stays small (a child's
ru_maxrss starts from the memory of the process that forked it). Every pruned model is compared
with the first one-process model: "identical" means every initializer is bit-for-bit equal.

    python tools/bench_workers.py [--preset deit_tiny|deit_small|deit_base] [--samples 256]
                                  [--workers 2[,4,6]] [--repeats 2] [--out docs/SCALING_BENCH.md] [--smoke]

--smoke: deit_tiny, 32 samples, one repeat, a temporary table (CI).

    python tools/bench_workers.py --worker-setup MODEL.onnx

prints what a worker is sent and holds for that model: its setup (distributed.ShardWorker, run
here without Ray) and what it adds to this process's RSS, and per half-block the weights it
receives and holds (against the whole model, which workers were sent before).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from harness import DOCS, ROOT, cpu_name, invocation, write_page

from bench_prune import PRESETS

MB = 1e6
WORKER_TITLE = "ray::ShardWorker"


def _descendants(root: int) -> set[int]:
    """The processes below `root` (Ray's workers are the raylet's children, the raylet the
    driver's): other jobs' Ray workers on the machine are not counted."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the parent pid is the field after the parenthesised command name
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    below, grown = set(), {root}
    while grown:
        grown = {pid for pid, parent in parents.items() if parent in grown} - below
        below |= grown
    return below


def _workers_rss(root: int) -> dict[int, int]:
    """Bytes resident in each Ray worker process below `root` now, by pid (Linux /proc)."""
    resident = {}
    for pid in _descendants(root):
        entry = Path("/proc") / str(pid)
        try:
            if WORKER_TITLE.encode() not in (entry / "cmdline").read_bytes():
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    resident[pid] = int(line.split()[1]) * 1024
        except OSError:  # gone meanwhile
            continue
    return resident


class WorkerMemory:
    """The largest sum of the Ray workers' RSS seen at one sample while the run lasts, and the
    largest RSS seen of any one worker."""

    def __init__(self, root: int):
        self.root, self.peak, self.largest, self._stop = root, 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            resident = _workers_rss(self.root)
            self.peak = max(self.peak, sum(resident.values()) / MB)
            self.largest = max(self.largest, max(resident.values(), default=0) / MB)
            self._stop.wait(0.1)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


Measured = tuple[float, float, float, float, float, float]


def run(cmd: list[str]) -> Measured:
    """Wall seconds, the process's own peak RSS (MB), the workers' summed and largest single peak
    RSS (MB), the 1-minute load average before and after."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        with WorkerMemory(proc.pid) as workers:
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{err.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / MB, workers.peak, workers.largest, load, os.getloadavg()[0]


def export_apart(preset: str, folder: Path) -> Path:
    """bench_prune.export in a child process: torch never enters this one (see the docstring)."""
    script = f"import sys; from pathlib import Path; from bench_prune import export; print(export({preset!r}, Path(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), str(ROOT)])})
    if done.returncode != 0:
        raise SystemExit(f"export of {preset} failed:\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def worker_setup(path: Path) -> None:
    """What a worker is sent and holds (distributed.ShardWorker, run here without Ray): its
    setup's RSS above this process, and per half-block the weights it receives and holds."""
    import gc
    import pickle

    import onnx

    from onnxsnp.compensate import distributed, worker_graph
    from onnxsnp.compensate.halves import detached, plan_segments
    from onnxsnp.heap import release_heap
    from onnxsnp.ir.graph import ModelGraph
    from onnxsnp.ir.sizes import raw_bytes
    from onnxsnp.match import find_blocks

    def resident() -> float:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")) / MB

    model = onnx.load(str(path))
    g = ModelGraph(model)
    matches = find_blocks(g)
    halves = plan_segments(g, matches)
    light, held = worker_graph.weightless(model)
    setup = pickle.dumps((light, held, matches, detached(halves)))
    reads = [worker_graph.half_reads(g, h, held) for pair in halves for h in pair]
    sizes = [sum(raw_bytes(g.initializers[n]) for n in names) for names in reads]
    whole = sum(raw_bytes(t) for t in model.graph.initializer)
    print(f"{path.name}: {whole / MB:.1f} MB of initializers; a worker's setup {len(setup) / MB:.2f} MB "
          f"(before: the whole model, {whole / MB:.1f} MB); per half-block it is sent and holds "
          f"{min(sizes) / MB:.2f}–{max(sizes) / MB:.2f} MB ({len(sizes)} halves, {sum(sizes) / MB:.1f} MB in all)")
    gc.collect()
    base = resident()
    worker = distributed.ShardWorker(*pickle.loads(setup), True, 0, 1)
    print(f"+ a worker's setup (weightless graph, the driver's blocks and halves): {resident() - base:+.0f} MB")
    largest = max(range(len(reads)), key=lambda n: sizes[n])
    worker.hold(largest, worker_graph.values(g, reads[largest]))
    print(f"+ holding the largest half-block's weights: {resident() - base:+.0f} MB")
    worker._release()
    gc.collect()
    release_heap()
    print(f"after they are dropped: {resident() - base:+.0f} MB")


def identical(a: Path, b: Path) -> bool:
    import onnx
    from onnx import numpy_helper

    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a)).graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="deit_small")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--workers", default="2", help="worker counts to compare with one process, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default docs/SCALING_BENCH.md)")
    parser.add_argument("--smoke", action="store_true", help="deit_tiny, 32 samples, one repeat, temporary output")
    parser.add_argument("--worker-setup", type=Path, help="only print what a worker is sent and holds for this model")
    args = parser.parse_args()
    if args.worker_setup:
        return worker_setup(args.worker_setup)
    if args.smoke:
        args.preset, args.samples, args.repeats = "deit_tiny", 32, 1
        if args.out is None:
            handle, name = tempfile.mkstemp(prefix="SCALING_smoke_", suffix=".md")
            os.close(handle)
            args.out = Path(name)
    args.out = args.out or DOCS / "SCALING_BENCH.md"
    counts = [1] + sorted({int(c) for c in str(args.workers).split(",")} - {1})

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as folder:
        scratch = Path(folder)
        model = export_apart(args.preset, scratch)
        rng = np.random.default_rng(0)
        calib = scratch / "calib.npz"
        np.savez(calib, pixel_values=rng.standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
        base = [sys.executable, "-m", "onnxsnp", str(model), "OUT", "--ratio", "0.5", "--calib", str(calib), "-q"]
        results: dict[int, list[Measured]] = {count: [] for count in counts}
        same, reference = [], scratch / "reference.onnx"
        for repeat in range(args.repeats):
            for count in counts:
                out = scratch / f"w{count}_{repeat}.onnx"
                cmd = [str(out) if a == "OUT" else a for a in base] + (["--workers", str(count)] if count > 1 else [])
                measured = run(cmd)
                results[count].append(measured)
                print(f"workers {count}: {measured[0]:.1f} s, driver peak {measured[1]:.0f} MB, "
                      f"workers peak {measured[2]:.0f} MB (one worker {measured[3]:.0f} MB), "
                      f"load {measured[4]:.1f} → {measured[5]:.1f}", flush=True)
                if not reference.exists():
                    out.rename(reference)
                else:
                    same.append(identical(reference, out))
                    out.unlink()

    import onnxruntime
    import ray

    def median(count: int, field: int) -> float:
        return float(np.median([r[field] for r in results[count]]))

    one = median(1, 0)
    rows = [f"| 1 (this process) | {one:.1f} | 1.00 | {median(1, 1):.0f} | – | – |"]
    rows += [f"| {count} Ray workers | {median(count, 0):.1f} | {median(count, 0) / one:.2f} | {median(count, 1):.0f} | "
             f"{median(count, 2):.0f} | {median(count, 3):.0f} |" for count in counts[1:]]
    loads = [value for measured in results.values() for r in measured for value in r[4:]]
    lines = [
        "# --workers: one process against Ray workers",
        "",
        f"Generated by `{invocation()}` "
        f"on {platform.machine()} {cpu_name()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
        f"Ray {ray.__version__}. Model: {args.preset} shape (224×224, random weights seed 0), "
        f"{args.samples} standard-normal calibration samples, `--ratio 0.5`, default compensation (block-by-block "
        f"reconstruction). Medians of {args.repeats} runs per configuration, interleaved; each run a fresh process "
        "(Ray's start-up included). Worker RSS: the workers' resident memory, sampled every 0.1 s: the "
        "largest sum at one sample, and the largest one worker reached. 1-minute load average at the runs' "
        f"starts and ends: {min(loads):.1f}–{max(loads):.1f} (other jobs on the machine).",
        "",
        f"Pruned models identical (every initializer bit for bit) to the one-process model: "
        f"{sum(same)} of {len(same)}.",
        "",
        "| workers | wall s | ÷ one process | driver peak RSS MB | workers' peak RSS MB (sum) | one worker's peak RSS MB |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    write_page(args.out, lines)
    if not all(same):
        raise SystemExit("a pruned model from the workers differs from the one-process model")


if __name__ == "__main__":
    main()
