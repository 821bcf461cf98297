"""--workers: one process against Ray workers, a curve over worker counts, on the same model and
calibration samples.

Each configuration is a fresh `python -m onnxsnp MODEL OUT --ratio 0.5 --calib CALIB -q -v
[--workers N]` process (other flags with --prune-args; a model of your own, a decoder, with
--model and --calib); the configurations are interleaved (1, N1, N2, …, 1, N1, …) so that a
busy machine slows them alike. Measured per run: wall time of the whole process (Ray's start
included), the driver's own peak RSS (ru_maxrss via os.wait4) and its RSS by kind at its largest sample, the Ray workers' peak RSS (the
processes below the run's titled ray::ShardWorker, sampled every 0.1 s from /proc: the largest
sum over the workers at one sample, and the largest single worker's peak) and the load average
before and after, and from the run's log (-v) what the driver sent the workers
(distributed.Traffic: bytes, puts and seconds at setup, of the half-blocks' original weights and
of the passes' current weights; the half-blocks' hold round trips). A preset's model is exported
in a child process, so that this process stays small (a child's ru_maxrss starts from the memory
of the process that forked it). Every pruned model is compared
with the first one-process model: "identical" means every initializer is bit-for-bit equal.

    python tools/bench_workers.py [--preset deit_tiny|deit_small|deit_base] [--samples 256]
                                  [--workers 2[,4,6]] [--repeats 2] [--out docs/SCALING_BENCH.md] [--smoke]
    python tools/bench_workers.py --model MODEL.onnx --calib CALIB.npz [--prune-args '--ratio 0.25'] …

--smoke: deit_tiny, 32 samples, one repeat, a temporary table (CI).

    python tools/bench_workers.py --worker-setup MODEL.onnx

prints what a worker is sent and holds for that model: its setup (distributed.ShardWorker, run
here without Ray) and what it adds to this process's RSS, and per half-block the weights it
receives and holds (against the whole model, which workers were sent before).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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


RESIDENT_KINDS = ("RssAnon", "RssFile", "RssShmem")  # what VmRSS sums (Linux /proc/PID/status)


def _resident_kinds(pid: int) -> dict[str, int]:
    """The driver's resident bytes by kind now: private (anonymous) memory, mapped files, and
    shared memory (Ray's object store is a shared mapping: what the driver reads from it zero-copy
    counts in its RSS as RssShmem)."""
    try:
        lines = (Path("/proc") / str(pid) / "status").read_text().splitlines()
    except OSError:  # gone meanwhile
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {kind: int(fields[kind].split()[0]) * 1024 for kind in RESIDENT_KINDS if kind in fields}


class WorkerMemory:
    """The largest sum of the Ray workers' RSS seen at one sample while the run lasts, the
    largest RSS seen of any one worker, and the driver's RSS by kind at its largest sample."""

    def __init__(self, root: int):
        self.root, self.peak, self.largest, self._stop = root, 0.0, 0.0, threading.Event()
        self.driver: dict[str, float] = {}
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            resident = _workers_rss(self.root)
            self.peak = max(self.peak, sum(resident.values()) / MB)
            self.largest = max(self.largest, max(resident.values(), default=0) / MB)
            kinds = {kind: size / MB for kind, size in _resident_kinds(self.root).items()}
            if sum(kinds.values()) > sum(self.driver.values()):
                self.driver = kinds
            self._stop.wait(0.1)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Measured:
    seconds: float  # wall time of the whole process
    driver_mb: float  # the process's own peak RSS
    workers_mb: float  # the workers' largest summed RSS at one sample
    worker_mb: float  # the largest one worker reached
    load: tuple[float, float]  # the 1-minute load average before and after
    traffic: dict | None  # distributed.Traffic.summary(), from the run's log (None in one process)
    driver_kinds: dict[str, float]  # the driver's RSS by kind (RESIDENT_KINDS, MB) at its largest sample
    floor_mb: float  # this process's peak RSS when it spawned the run: the least driver_mb can read


def traffic_of(log: str) -> dict | None:
    """The workers' traffic summary a run logged at -v (distributed.TRAFFIC_LOG), if any."""
    from onnxsnp.compensate.distributed import TRAFFIC_LOG

    lines = [line.split(TRAFFIC_LOG, 1)[1] for line in log.splitlines() if TRAFFIC_LOG in line]
    return json.loads(lines[-1]) if lines else None


def run(cmd: list[str]) -> Measured:
    """One fresh process under the sampler (see the module's docstring)."""
    load = os.getloadavg()[0]
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        with WorkerMemory(proc.pid) as workers:
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        err.seek(0)
        log = err.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{log[-2000:]}")
    return Measured(seconds, usage.ru_maxrss * 1024 / MB, workers.peak, workers.largest, (load, os.getloadavg()[0]),
                    traffic_of(log), workers.driver, floor)


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


def identical_apart(a: Path, b: Path) -> bool:
    """identical() in a child process. Loading two models here raised this process's peak RSS to
    theirs, and every later run's driver, forked from this process, started its ru_maxrss from that
    peak: on SmolLM2 every run after the first comparison read ~1.4 GB however many workers it had,
    which the table once took for the driver growing with its workers."""
    script = "import sys; from pathlib import Path; from bench_workers import identical; " \
             "sys.exit(0 if identical(Path(sys.argv[1]), Path(sys.argv[2])) else 1)"
    done = subprocess.run([sys.executable, "-c", script, str(a), str(b)], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), str(ROOT)])})
    if done.returncode not in (0, 1):
        raise SystemExit(f"comparing {a} with {b} failed:\n{done.stderr[-2000:]}")
    return done.returncode == 0


def traffic_cells(traffic: dict | None) -> str:
    """What the driver put for the workers: at setup (the weightless model, blocks and halves;
    the batches), the half-blocks' original weights and the passes' current weights (MB and
    puts), the seconds of all puts and the half-blocks' hold round trips."""
    if traffic is None:
        return "– | – | – | – | – |"
    half, current = traffic["half_weights"], traffic["current_weights"]
    puts = sum(traffic[c]["seconds"] for c in ("setup", "batches", "half_weights", "current_weights"))
    return (f"{traffic['setup']['bytes'] / MB:.1f} + {traffic['batches']['bytes'] / MB:.2f} | "
            f"{half['bytes'] / MB:.1f} ({half['puts']}) | {current['bytes'] / MB:.1f} ({current['puts']}) | "
            f"{puts:.2f} | {traffic['hold_seconds']:.2f} |")


def kinds_cell(kinds: dict[str, float]) -> str:
    """anon / file / shmem MB (RESIDENT_KINDS' order)."""
    return " / ".join(f"{kinds.get(kind, 0):.0f}" for kind in RESIDENT_KINDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="deit_small")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--model", type=Path, help="an ONNX file instead of the preset (a decoder: with --calib)")
    parser.add_argument("--calib", type=Path, help="calibration .npz for --model (default: the preset's samples)")
    parser.add_argument("--prune-args", default="--ratio 0.5", help="the pruning flags of every run")
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
    if args.model is not None and args.calib is None:
        raise SystemExit("--model needs --calib (the preset's random pixels fit only the preset)")
    args.out = args.out or DOCS / "SCALING_BENCH.md"
    counts = [1] + sorted({int(c) for c in str(args.workers).split(",")} - {1})
    flags = shlex.split(args.prune_args)

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as folder:
        scratch = Path(folder)
        model = args.model.resolve() if args.model else export_apart(args.preset, scratch)
        calib = args.calib.resolve() if args.calib else scratch / "calib.npz"
        if args.calib is None:
            rng = np.random.default_rng(0)
            np.savez(calib, pixel_values=rng.standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
        # -v: the log carries the workers' traffic (distributed.TRAFFIC_LOG)
        base = [sys.executable, "-m", "onnxsnp", str(model), "OUT", *flags, "--calib", str(calib), "-q", "-v"]
        results: dict[int, list[Measured]] = {count: [] for count in counts}
        same, reference = [], None
        for repeat in range(args.repeats):
            for count in counts:
                out = scratch / f"w{count}_{repeat}.onnx"
                cmd = [str(out) if a == "OUT" else a for a in base] + (["--workers", str(count)] if count > 1 else [])
                measured = run(cmd)
                results[count].append(measured)
                print(f"workers {count}: {measured.seconds:.1f} s, driver peak {measured.driver_mb:.0f} MB, "
                      f"workers peak {measured.workers_mb:.0f} MB (one worker {measured.worker_mb:.0f} MB), "
                      f"driver at its sampled peak {kinds_cell(measured.driver_kinds)} MB "
                      f"(floor {measured.floor_mb:.0f} MB), "
                      f"load {measured.load[0]:.1f} → {measured.load[1]:.1f}, traffic {measured.traffic}", flush=True)
                if reference is None:  # kept where written: a large model's weights file names it
                    reference = out
                else:
                    same.append(identical_apart(reference, out))
                    for written in scratch.glob(f"{out.name}*"):  # with its weights file, if any
                        written.unlink()

    import onnxruntime
    import ray

    def median(count: int, field: str) -> float:
        return float(np.median([getattr(r, field) for r in results[count]]))

    one = median(1, "seconds")
    def kinds(count: int) -> str:  # the median run's (by driver peak) breakdown
        ordered = sorted(results[count], key=lambda r: r.driver_mb)
        return kinds_cell(ordered[len(ordered) // 2].driver_kinds)

    rows = [f"| 1 (this process) | {one:.1f} | 1.00 | {median(1, 'driver_mb'):.0f} | {kinds(1)} | – | – | "
            f"{traffic_cells(None)}"]
    rows += [f"| {count} Ray workers | {median(count, 'seconds'):.1f} | {median(count, 'seconds') / one:.2f} | "
             f"{median(count, 'driver_mb'):.0f} | {kinds(count)} | {median(count, 'workers_mb'):.0f} | "
             f"{median(count, 'worker_mb'):.0f} | {traffic_cells(results[count][0].traffic)}" for count in counts[1:]]
    loads = [value for measured in results.values() for r in measured for value in r.load]
    floor = max(r.floor_mb for measured in results.values() for r in measured)
    what = (f"{args.model.name} ({calib.name}: {dict(np.load(calib)).get('input_ids', np.zeros((0, 0))).shape} "
            "input_ids)" if args.model else f"{args.preset} shape (224×224, random weights seed 0), {args.samples} "
            "standard-normal calibration samples")
    lines = [
        "# --workers: one process against Ray workers",
        "",
        f"Generated by `{invocation()}` "
        f"on {platform.machine()} {cpu_name()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
        f"Ray {ray.__version__}. Model: {what}, `{args.prune_args}`, default compensation (block-by-block "
        f"reconstruction). Medians of {args.repeats} runs per configuration, interleaved; each run a fresh process "
        "(Ray's start-up included). Driver at its sampled peak: its RSS by kind at the 0.1 s sample where it "
        "was largest, private (RssAnon) / mapped files (RssFile) / shared memory (RssShmem: Ray's object store, "
        "read zero-copy) MB. The driver's ru_maxrss starts from the peak of this process, which spawned it: "
        f"at most {floor:.0f} MB here (the models are compared in a child process). Worker RSS: the workers' resident memory, sampled every 0.1 s: the "
        "largest sum at one sample, and the largest one worker reached. Sent: what the driver put into Ray's "
        "object store (each put read by every worker): MB at setup (model, blocks, halves + batches), the "
        "half-blocks' original weights and the passes' current weights, MB (puts); the seconds of all puts, and "
        "of the half-blocks' hold round trips (put, delivery, the workers' swap). 1-minute load average at the "
        f"runs' starts and ends: {min(loads):.1f}–{max(loads):.1f} (other jobs on the machine).",
        "",
        f"Pruned models identical (every initializer bit for bit) to the one-process model: "
        f"{sum(same)} of {len(same)}.",
        "",
        "| workers | wall s | ÷ one process | driver peak RSS MB | driver at its sampled peak: anon / file / shmem MB "
        "| workers' peak RSS MB (sum) | one worker's peak RSS MB "
        "| sent at setup MB | half-blocks' weights MB (puts) | current weights MB (puts) | puts s | holds s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    write_page(args.out, lines)
    if not all(same):
        raise SystemExit("a pruned model from the workers differs from the one-process model")


if __name__ == "__main__":
    main()
