"""How the pruner's cost grows: onnxsnp's time and peak memory against one onnxruntime pass, for
several model sizes and calibration-set sizes (the measurement of tools/bench_prune.py, whose
helpers this uses, repeated over a grid).

For every preset (a DeiT-shaped ViT, random weights seed 0) and every sample count: one
onnxruntime pass over the samples in a fresh process, then `python -m onnxsnp MODEL OUT --ratio
0.5 --calib CALIB --calib-samples N -q` (the default: block-by-block reconstruction) in a fresh
process; wall time and each process's own peak RSS. Seconds per sample show whether the cost is
linear in the samples; the ratio to the onnxruntime pass, whether it is linear in model size.
`--code LABEL=DIR` also measures the onnxsnp package in DIR (another checkout, e.g. `git archive
COMMIT onnxsnp | tar -x -C DIR`) on the same model and samples, right after this checkout's run:
before/after rows measured side by side, under the same load.

    python tools/bench_prune_curve.py [--presets deit_small deit_base] [--samples 64 256 1024]
                                      [--grid PRESET:N,N ...] [--code LABEL=DIR ...]
                                      [--out docs/PRUNE_COST_CURVE.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import DOCS, TOOLS, cpu_name, invocation, write_page

from bench_prune import BATCH, ORT_CHILD, PRESETS, export, onnxsnp_args, run_measured
from bench_prune_decoder import RUN_FROM

MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=["deit_small", "deit_base"])
    parser.add_argument("--samples", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--grid", nargs="+", metavar="PRESET:N,N",
                        help="per preset its own sample counts (e.g. deit_small:64,256,1024 deit_base:64,256), "
                             "instead of --presets × --samples")
    parser.add_argument("--code", nargs="*", default=[], metavar="LABEL=DIR",
                        help="also measure the onnxsnp package found in DIR, labelled LABEL (rows side by side)")
    parser.add_argument("--out", type=Path, default=DOCS / "PRUNE_COST_CURVE.md")
    args = parser.parse_args()
    # this checkout first, then each other one: python -m onnxsnp would import this checkout's
    # package (the children run in ROOT), so another one is put first on sys.path (RUN_FROM)
    launches = [("this checkout", ["-m", "onnxsnp"])] + [
        (label, ["-c", RUN_FROM, str(Path(folder).resolve())])
        for label, _, folder in (item.partition("=") for item in args.code)]
    grid = {preset: args.samples for preset in args.presets}
    if args.grid:
        grid = {}
        for item in args.grid:
            preset, _, counts = item.partition(":")
            if preset not in PRESETS or not counts:
                parser.error(f"--grid wants PRESET:N,N with PRESET one of {', '.join(PRESETS)}, got {item!r}")
            grid[preset] = [int(c) for c in counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prune_curve_") as folder:
        scratch = Path(folder)
        for preset, counts in grid.items():
            model = export(preset, scratch)
            file_mb = sum(p.stat().st_size for p in scratch.glob(model.name + "*")) / MB
            for samples in counts:
                calib = scratch / "calib.npz"
                rng = np.random.default_rng(0)
                np.savez(calib, pixel_values=rng.standard_normal((samples, 3, 224, 224)).astype(np.float32))
                ort_run = run_measured([sys.executable, str(TOOLS / "bench_prune.py"), ORT_CHILD, str(model),
                                        str(calib), str(BATCH)])
                ort = json.loads(ort_run.stdout.strip().splitlines()[-1])
                for label, launch in launches:
                    pruned = scratch / "pruned.onnx"
                    snp = run_measured([sys.executable, *launch, *onnxsnp_args(model, pruned, calib, samples)])
                    for leftover in scratch.glob("pruned.onnx*"):
                        leftover.unlink()
                    name = preset if not args.code else f"{preset} ({label})"
                    row = (f"| {name} | {file_mb:.0f} | {samples} | {ort['seconds']:.2f} | {snp.seconds:.1f} | "
                           f"{snp.seconds / samples:.3f} | {snp.seconds / ort['seconds']:.2f} | "
                           f"{ort_run.peak_mb:.0f} | {snp.peak_mb:.0f} | {snp.peak_mb / ort_run.peak_mb:.2f} | "
                           f"{snp.peak_mb / (ort_run.peak_mb + file_mb):.2f} | {ort_run.cpu_s:.1f} | {snp.cpu_s:.1f} | "
                           f"{snp.cpu_s / ort_run.cpu_s:.2f} |")
                    print(row, flush=True)
                    rows.append(row)
            model.unlink()
    import onnxruntime

    lines = [
        "# Pruning cost by model and calibration size",
        "",
        f"Generated by `{invocation()}` "
        f"on {platform.machine()} {cpu_name()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}. "
        "ORT pass: session creation and every sample in batches of "
        f"{BATCH}, in a fresh process. onnxsnp: the whole `python -m onnxsnp MODEL OUT --ratio 0.5 --calib CALIB "
        "--calib-samples N -q` process (default: block-by-block reconstruction). Peak RSS: each process's "
        "ru_maxrss, each spawned by a bare launcher so that it does not start from this script's own peak "
        "(bench_prune.LAUNCHER); MB = 10^6 bytes; CPU s: a process's user + system seconds (ORT's: the whole "
        "child's, with its interpreter start and the calibration file's load; less sensitive to a busy machine "
        "than wall time). Goals (issue 25): "
        "onnxsnp ≤ 3 × the ORT pass, peak RSS ≤ 1.5 × (the ORT pass's + the model file).",
        "",
        "| model | file MB | samples | ORT pass s | onnxsnp s | onnxsnp s per sample | onnxsnp ÷ ORT | "
        "ORT peak RSS MB | onnxsnp peak RSS MB | RSS ÷ ORT RSS | RSS ÷ (ORT RSS + file) | ORT CPU s | "
        "onnxsnp CPU s | CPU ÷ ORT CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_page(args.out, lines)


if __name__ == "__main__":
    main()
