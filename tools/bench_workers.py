"""--workers: one process against N Ray workers, on the same model and calibration samples.

Each configuration is a fresh `python -m onnxsnp MODEL OUT --ratio 0.5 --calib CALIB -q
[--workers N]` process; the configurations are interleaved (1, N, 1, N, …) so that a busy machine
slows them alike. Measured per run: wall time of the whole process (Ray's start included), the
driver's own peak RSS (ru_maxrss via os.wait4) and the Ray workers' peak RSS (their processes —
titled ray::ShardWorker — sampled every 0.1 s from /proc, summed over workers at each sample).
Every pruned model is compared with the first one-process model: "identical" means every
initializer is bit-for-bit equal.

    python tools/bench_workers.py [--preset deit_tiny|deit_small|deit_base] [--samples 256]
                                  [--workers 2] [--repeats 2] [--out docs/SCALING_BENCH.md] [--smoke]

--smoke: deit_tiny, 32 samples, one repeat, a temporary table (CI).
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

from bench_prune import PRESETS, export

MB = 1e6
WORKER_TITLE = "ray::ShardWorker"


def _workers_rss() -> int:
    """Bytes resident in the Ray worker processes now (Linux /proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if WORKER_TITLE.encode() not in (entry / "cmdline").read_bytes():
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:  # gone meanwhile
            continue
    return total


class WorkerMemory:
    """The largest sum of the Ray workers' RSS seen while the run lasts."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _workers_rss() / MB)
            self._stop.wait(0.1)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, the process's own peak RSS (MB) and the workers' summed peak RSS (MB)."""
    with tempfile.TemporaryFile() as err, WorkerMemory() as workers:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{err.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / MB, workers.peak


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
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default docs/SCALING_BENCH.md)")
    parser.add_argument("--smoke", action="store_true", help="deit_tiny, 32 samples, one repeat, temporary output")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.samples, args.repeats = "deit_tiny", 32, 1
        if args.out is None:
            handle, name = tempfile.mkstemp(prefix="SCALING_smoke_", suffix=".md")
            os.close(handle)
            args.out = Path(name)
    args.out = args.out or DOCS / "SCALING_BENCH.md"

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as folder:
        scratch = Path(folder)
        model = export(args.preset, scratch)
        rng = np.random.default_rng(0)
        calib = scratch / "calib.npz"
        np.savez(calib, pixel_values=rng.standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
        base = [sys.executable, "-m", "onnxsnp", str(model), "OUT", "--ratio", "0.5", "--calib", str(calib), "-q"]
        results: dict[int, list[tuple[float, float, float]]] = {1: [], args.workers: []}
        same, reference = [], scratch / "reference.onnx"
        for repeat in range(args.repeats):
            for count in (1, args.workers):
                out = scratch / f"w{count}_{repeat}.onnx"
                cmd = [str(out) if a == "OUT" else a for a in base] + (["--workers", str(count)] if count > 1 else [])
                measured = run(cmd)
                results[count].append(measured)
                print(f"workers {count}: {measured[0]:.1f} s, driver peak {measured[1]:.0f} MB, "
                      f"workers peak {measured[2]:.0f} MB", flush=True)
                if not reference.exists():
                    out.rename(reference)
                else:
                    same.append(identical(reference, out))
                    out.unlink()

    import onnxruntime
    import ray

    def median(count: int, field: int) -> float:
        return float(np.median([r[field] for r in results[count]]))

    one, many = median(1, 0), median(args.workers, 0)
    rows = [f"| 1 (this process) | {one:.1f} | 1.00 | {median(1, 1):.0f} | – |",
            f"| {args.workers} Ray workers | {many:.1f} | {many / one:.2f} | {median(args.workers, 1):.0f} | "
            f"{median(args.workers, 2):.0f} |"]
    lines = [
        "# --workers: one process against Ray workers",
        "",
        f"Generated by `{invocation()}` "
        f"on {platform.machine()} {cpu_name()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
        f"Ray {ray.__version__}. Model: {args.preset} shape (224×224, random weights seed 0), "
        f"{args.samples} standard-normal calibration samples, `--ratio 0.5`, default compensation (block-by-block "
        f"reconstruction). Medians of {args.repeats} runs per configuration, interleaved; each run a fresh process "
        "(Ray's start-up included). Worker RSS: the workers' resident memory summed, sampled every 0.1 s.",
        "",
        f"Pruned models identical (every initializer bit for bit) to the one-process model: "
        f"{sum(same)} of {len(same)}.",
        "",
        "| workers | wall s | ÷ one process | driver peak RSS MB | workers' peak RSS MB (sum) |",
        "|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    write_page(args.out, lines)
    if not all(same):
        raise SystemExit("a pruned model from the workers differs from the one-process model")


if __name__ == "__main__":
    main()
