"""What does pruning cost? onnxsnp's wall time and peak memory against one onnxruntime pass.

The goal ("a pruner that costs one calibration pass"): `python -m onnxsnp` should take at most
1.5× the time onnxruntime alone needs to run the same calibration samples, and peak at most 3×
the model file size in resident memory. Both are measured in the same run, each in a fresh
subprocess so that neither inherits the other's (or this script's) memory:

(a) onnxruntime alone: a child process creates an InferenceSession (CPUExecutionProvider,
    default threads, as onnxsnp's calibration does) and runs all samples in batches of 8
    (or the model's fixed batch). "ORT pass s" is timed inside the child, from session
    creation to the last run; the child's whole process wall time is printed as well.
(b) `python -m onnxsnp MODEL OUT --ratio 0.5 --calib CALIB --calib-samples N -q`: wall clock
    of the whole process (interpreter start, imports, load, scoring, rewrite, verification,
    write).

Peak RSS is each child's own ru_maxrss, read with os.wait4 on that child's pid (the same
number as getrusage(RUSAGE_SELF) inside it, and unlike RUSAGE_CHILDREN not the maximum over
every child this script waited for); each child is spawned by a bare launcher interpreter, so
that it does not start from this script's own peak (see LAUNCHER). MB = 10^6 bytes, for the file sizes too.

Model: a DeiT-B-shaped ViT by default (224×224, patch 16, 1000 classes, random weights seed 0,
legacy exporter, ~350 MB) exported to a temporary folder; `--preset` picks another shape,
`--model` an existing ONNX file (calibration then synthesized from its inputs' shapes).
Calibration: standard-normal float32 samples (seed 0) written to an .npz.

    python tools/bench_prune.py [--preset deit_tiny|deit_small|deit_base | --model FILE.onnx]
                                [--samples 64] [--out docs/PRUNE_COST.md] [--stages] [--smoke]

--stages: afterwards, run onnxsnp in-process under cProfile and print the 15 most expensive
functions by cumulative time and by own time, plus the time of each stage prune_model calls (cProfile slows
pure-Python code more than numpy/onnxruntime calls: read shares, not absolute seconds).
--smoke: deit_tiny, 16 samples, table written to a temporary file unless --out is given (CI).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import DOCS, ROOT, cpu_name, invocation, write_page

from collect_results import collect

PRESETS = ("deit_tiny", "deit_small", "deit_base")
BATCH = 8  # onnxsnp's calibration batch (calibration.DEFAULT_BATCH)
RATIO = 0.5
VARIANTS = {"default": [], "no-compensate": ["--no-compensate"]}  # extra onnxsnp arguments per row
TIME_TARGET = 1.5  # onnxsnp s ÷ ORT pass s
RSS_TARGET = 3.0  # onnxsnp peak RSS ÷ model file size
TOP_FUNCTIONS = 15
MB = 1e6
ORT_CHILD = "_ort_pass"  # hidden first argument: run as the onnxruntime-only child


@dataclass
class Measured:
    seconds: float  # wall clock of the whole child process
    peak_mb: float  # the child's ru_maxrss
    cpu_s: float  # its user + system CPU time: wall ≫ cpu/cores means it waited on a busy machine
    stdout: str


# Linux starts an exec'd child's ru_maxrss at the high-water mark of the memory it was spawned
# from (with vfork, the spawning process's own peak), so a child of this script would inherit
# whatever this script once held (a 1,024-sample calibration array). The launcher is a bare
# interpreter that spawns the measured command and reports that grandchild's wait4 usage.
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as report:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime}, report)
"""


def run_measured(cmd: list[str]) -> Measured:
    """Run cmd, returning its wall time and its own peak RSS (wait4 on its pid, in a launcher)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as usage_file:
        # output to files, not pipes: the launcher's wait4 does not drain pipes, so a chatty child could block
        started = time.perf_counter()
        launcher = subprocess.run([sys.executable, "-c", LAUNCHER, usage_file.name, *cmd], stdout=out, stderr=err,
                                  cwd=ROOT)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        usage = json.loads(Path(usage_file.name).read_text() or "{}")
    if launcher.returncode != 0 or usage.get("code") != 0:
        raise SystemExit(f"{shlex.join(cmd)} exited {usage.get('code', launcher.returncode)}:\n{stderr[-2000:]}")
    # Linux ru_maxrss is in KiB
    return Measured(seconds, usage["maxrss_kib"] * 1024 / MB, usage["cpu_s"], stdout)


def ort_pass(model: str, calib: str, batch: int) -> None:
    """The child of (a): one onnxruntime pass over the calibration samples; JSON on stdout.

    Only numpy and onnxruntime are imported, as a deployment's own inference script would."""
    import resource

    import onnxruntime as ort

    with np.load(calib) as data:
        feed = {k: data[k] for k in data.files}
    total = len(next(iter(feed.values())))
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for start in range(0, total, batch):
        sess.run(None, {k: v[start:start + batch] for k, v in feed.items()})
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def export(preset: str, folder: Path) -> Path:
    """A DeiT-shaped ViT with random weights (seed 0), legacy exporter, dynamic batch."""
    import torch
    from torch_models import DEIT_CONFIGS, VisionTransformer, export_legacy

    path = folder / f"{preset}.onnx"
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, num_classes=1000, **DEIT_CONFIGS[preset])
    export_legacy(model, (torch.randn(1, 3, 224, 224),), str(path), ["pixel_values"], ["logits"],
                  {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return path


def synthesize(model: Path, samples: int) -> tuple[dict[str, np.ndarray], int]:
    """Calibration arrays for every graph input of an existing model, and the batch to run it at.

    Floats are N(0,1); integer inputs (token ids, masks) are ones, valid for any vocabulary.
    A symbolic batch axis becomes `samples`; other symbolic axes 128 (a typical sequence)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(model), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    rng = np.random.default_rng(0)
    arrays, fixed = {}, None
    for value in graph.input:
        if value.name in weights:  # old exports list initializers as inputs too
            continue
        kind = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
        if dims and dims[0] is not None:
            fixed = dims[0]  # batch baked into the graph: onnxsnp runs at that batch too
        shape = [samples] + [d if d is not None else 128 for d in dims[1:]]
        dtype = tensor_dtype_to_np_dtype(kind.elem_type)
        if np.issubdtype(dtype, np.floating):
            arrays[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[value.name] = np.ones(shape, dtype=dtype)
    return arrays, fixed or BATCH


def onnxsnp_args(model: Path, out: Path, calib: Path, samples: int) -> list[str]:
    return [str(model), str(out), "--ratio", str(RATIO), "--calib", str(calib), "--calib-samples", str(samples), "-q"]


def profile_stages(model: Path, out: Path, calib: Path, samples: int) -> None:
    """onnxsnp's CLI in-process under cProfile: top functions by cumulative time, then by stage."""
    sys.path.insert(0, str(ROOT))
    from onnxsnp import cli, pipeline

    profiler = cProfile.Profile()
    code = profiler.runcall(cli.main, onnxsnp_args(model, out, calib, samples))
    if code != 0:
        raise SystemExit(f"onnxsnp exited {code} under the profiler")
    stats = pstats.Stats(profiler)
    print(f"\nonnxsnp under cProfile: top {TOP_FUNCTIONS} functions by cumulative time")
    stats.sort_stats("cumulative").print_stats(TOP_FUNCTIONS)
    # by own time: where the seconds are spent (onnxruntime's runs, Gram products, solves)
    print(f"\nonnxsnp under cProfile: top {TOP_FUNCTIONS} functions by own time")
    stats.sort_stats("tottime").print_stats(TOP_FUNCTIONS)
    # the stages: what cli._run_prune (load, write) and pipeline.prune_model (the rest) call, with
    # the cumulative time of those calls (the top list above is mostly these wrappers)
    keys = {(f.__code__.co_filename, f.__code__.co_firstlineno, f.__code__.co_name)
            for f in (cli._run_prune, pipeline.prune_model)}
    total = stats.total_tt
    callees = [(callee, ct) for callee, (_, _, _, _, callers) in stats.stats.items()
               for caller, (_, _, _, ct) in callers.items() if caller in keys and callee not in keys]
    print(f"stages: calls made by cli._run_prune and pipeline.prune_model (cumulative; {total:.2f} s in all "
          "under cProfile)")
    for (filename, line, name), seconds in sorted(callees, key=lambda c: c[1], reverse=True)[:TOP_FUNCTIONS]:
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if line else "built-in"
        print(f"  {seconds:8.2f} s {seconds / total:6.1%}  {name:<28} {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="deit_base", help="shape of the exported ViT")
    source.add_argument("--model", type=Path, help="an existing ONNX file instead of an export")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default docs/PRUNE_COST.md)")
    parser.add_argument("--stages", action="store_true", help="also profile onnxsnp in-process (cProfile)")
    parser.add_argument("--smoke", action="store_true", help="deit_tiny, 16 samples, temporary output (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.model, args.samples = "deit_tiny", None, 16
    if args.out is None and args.smoke:  # --smoke must not overwrite the committed table
        handle, name = tempfile.mkstemp(prefix="PRUNE_COST_smoke_", suffix=".md")
        os.close(handle)
        args.out = Path(name)
    args.out = args.out or DOCS / "PRUNE_COST.md"

    with tempfile.TemporaryDirectory(prefix="bench_prune_") as folder:  # exports removed even on failure
        scratch = Path(folder)
        if args.model:
            model, label = args.model.resolve(), args.model.name
            arrays, batch = synthesize(model, args.samples)
        else:
            started = time.perf_counter()
            model, label = export(args.preset, scratch), args.preset
            print(f"{label}: exported in {time.perf_counter() - started:.0f} s", flush=True)
            rng = np.random.default_rng(0)
            arrays = {"pixel_values": rng.standard_normal((args.samples, 3, 224, 224)).astype(np.float32)}
            batch = BATCH
        calib = scratch / "calib.npz"
        np.savez(calib, **arrays)
        del arrays
        # external weights (model.onnx.data) count toward the size onnxsnp has to hold
        file_mb = sum(p.stat().st_size for p in model.parent.glob(model.name + "*")) / MB

        ort_run = run_measured([sys.executable, str(Path(__file__).resolve()), ORT_CHILD,
                                str(model), str(calib), str(batch)])
        ort = json.loads(ort_run.stdout.strip().splitlines()[-1])
        print(f"onnxruntime pass: {ort['seconds']:.2f} s (process {ort_run.seconds:.2f} s), "
              f"CPU {ort_run.cpu_s:.2f} s, peak RSS {ort_run.peak_mb:.0f} MB", flush=True)
        pruned = scratch / "pruned.onnx"
        rows = []
        for variant, extra in VARIANTS.items():
            snp = run_measured([sys.executable, "-m", "onnxsnp", *onnxsnp_args(model, pruned, calib, args.samples),
                                *extra])
            print(f"onnxsnp ({variant}): {snp.seconds:.2f} s, CPU {snp.cpu_s:.2f} s, peak RSS {snp.peak_mb:.0f} MB",
                  flush=True)
            for leftover in scratch.glob("pruned.onnx*"):
                leftover.unlink()
            time_ratio, rss_ratio = snp.seconds / ort["seconds"], snp.peak_mb / file_mb
            rows.append(f"| {label} | {variant} | {file_mb:.1f} | {ort['seconds']:.2f} | {snp.seconds:.2f} | "
                        f"{time_ratio:.2f}{'' if time_ratio <= TIME_TARGET else ' (over target)'} | "
                        f"{ort_run.peak_mb:.0f} | {snp.peak_mb:.0f} | {snp.peak_mb / ort_run.peak_mb:.2f} | "
                        f"{rss_ratio:.2f}{'' if rss_ratio <= RSS_TARGET else ' (over target)'} |")

        command = invocation()
        import onnxruntime

        lines = [
            "# Pruning cost: onnxsnp against one onnxruntime pass",
            "",
            f"Generated by `{command.strip()}` (tools/bench_prune.py) on {platform.machine()} {cpu_name()}, "
            f"{os.cpu_count()} cores, onnxruntime {onnxruntime.__version__} CPUExecutionProvider, default threads. "
            f"{args.samples} standard-normal calibration samples (seed 0). ORT pass = session creation plus all "
            f"samples in batches of {batch}, in a fresh process; onnxsnp = the whole `python -m onnxsnp MODEL OUT "
            f"--ratio {RATIO} --calib CALIB --calib-samples {args.samples} -q` process. Peak RSS = each process's "
            f"ru_maxrss; MB = 10^6 bytes. Targets: time ratio ≤ {TIME_TARGET}, RSS ÷ file ≤ {RSS_TARGET}. "
            "Variants: the default (`--compensate lstsq`) and `--no-compensate` (SNP scoring and slicing alone).",
            "",
            "| model | variant | file MB | ORT pass s | onnxsnp s | onnxsnp ÷ ORT | ORT peak RSS MB | "
            "onnxsnp peak RSS MB | onnxsnp RSS ÷ ORT RSS | onnxsnp RSS ÷ file |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
        print("\n" + "\n".join(lines[-2 - len(rows):]))
        write_page(args.out, lines)
        if args.out.resolve().parent == (DOCS).resolve():
            collect()  # docs/RESULTS.md carries a copy of every table

        if args.stages:
            profile_stages(model, pruned, calib, args.samples)


if __name__ == "__main__":
    if sys.argv[1:2] == [ORT_CHILD]:
        ort_pass(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
