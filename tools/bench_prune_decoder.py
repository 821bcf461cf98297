"""What does pruning a decoder cost? onnxsnp's wall time and peak memory against one onnxruntime
pass over the same calibration tokens (issue 25: ≤ 3× the pass, peak RSS ≤ 1.5× the pass's plus
the weights).

Model: a Llama with SmolLM2-135M's shape (hidden 576, 9 query / 3 KV heads of 64, rotary,
SwiGLU 1536, vocabulary 49,152; untied output head) and random weights (seed 0): speed does not
depend on the weight values. `--layers` keeps fewer of its 30 layers for a quick run. Exported by
torch's dynamo exporter with a KV cache (tools/decoder_export.py), cached under build/.
Calibration: `--windows` windows of 128 random token ids (seed 0), with their attention mask and
position ids, in an .npz.

(a) onnxruntime alone, in a fresh process: session creation and every window in batches of 8
    (prefill: the KV cache inputs empty), default threads; "ORT pass s" is timed inside it.
(b) `python -m onnxsnp MODEL OUT --ratio 0.25 --calib CALIB --calib-samples N -q` (the default
    block-by-block reconstruction), wall clock of the whole process; `--code DIR` adds the same
    run of another checkout's onnxsnp (e.g. `git archive` of an older commit), so that before and
    after are measured in one run on the same machine. The ORT pass runs again after the onnxsnp
    runs: the machine's load drifts, and both passes are in the table.

Peak RSS: each process's own ru_maxrss (bench_prune.run_measured, through a bare launcher).
The header says whether threadpoolctl (an install requirement) is importable: without it onnxsnp's
one-BLAS-thread limits (onnxsnp/threads.py) are no-ops, and on a busy machine OpenBLAS's threads
make its many small products many times slower (a profile taken so overstates them).

    python tools/bench_prune_decoder.py [--layers 30] [--windows 512] [--code before=DIR ...]
                                        [--out docs/PRUNE_COST_DECODER.md]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import BUILD, DOCS, cpu_name, invocation, write_page

from bench_prune import BATCH, MB, run_measured

WINDOW = 128
RATIO = 0.25  # as the SmolLM2 runs of docs/DECODERS_REAL.md
SHAPE = dict(vocab=49152, hidden=576, heads=9, kv_heads=3, intermediate=1536, positions=2048)  # SmolLM2-135M
ORT_CHILD = "_decoder_pass"
NOTES = "## Where the time goes"  # from this heading on, the page is hand-written (kept_notes)
# another checkout's onnxsnp, run as `python -m onnxsnp` would run it (-m would put the working
# directory, this checkout, first on sys.path)
RUN_FROM = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'onnxsnp'; "
            "runpy.run_module('onnxsnp', run_name='__main__', alter_sys=True)")


def decoder_pass(model: str, calib: str, batch: int) -> None:
    """The child of (a): one prefill pass; JSON on stdout. Only numpy and onnxruntime imported."""
    import resource

    import onnxruntime as ort

    with np.load(calib) as data:
        feed = {k: data[k] for k in data.files}
    total = len(feed["input_ids"])
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    empty = {i.name: [d if isinstance(d, int) else 0 for d in i.shape[1:]] for i in sess.get_inputs()
             if i.name not in feed}  # the KV cache: past length 0
    for start in range(0, total, batch):
        part = {k: v[start:start + batch] for k, v in feed.items()}
        rows = len(part["input_ids"])
        part.update({name: np.zeros([rows, *dims], np.float32) for name, dims in empty.items()})
        sess.run(None, part)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def export(layers: int, build: Path) -> Path:
    path = build / f"smollm2_shape_{layers}l" / "model.onnx"
    if path.exists():
        return path
    from decoder_export import export_dynamo, tiny_llama

    path.parent.mkdir(parents=True, exist_ok=True)
    export_dynamo(tiny_llama(layers=layers, **SHAPE), path)
    return path


def kept_notes(page: Path) -> list[str]:
    """The page's hand-written part, from its NOTES heading on (a measured breakdown of where the
    time goes, taken with a profiler, not by this tool): a regenerated table keeps it."""
    if not page.exists():
        return []
    text = page.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith(NOTES)), None)
    return [] if start is None else ["", *text[start:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="layers of the SmolLM2-shaped Llama (30)")
    parser.add_argument("--windows", type=int, default=512, help="calibration windows of 128 tokens (512)")
    parser.add_argument("--code", nargs="*", default=[], metavar="LABEL=DIR",
                        help="also measure the onnxsnp package found in DIR, labelled LABEL")
    parser.add_argument("--build", type=Path, default=BUILD / "bench_prune_decoder")
    parser.add_argument("--out", type=Path, default=DOCS / "PRUNE_COST_DECODER.md")
    args = parser.parse_args()
    started = time.perf_counter()
    model = export(args.layers, args.build)
    print(f"model {model} ({time.perf_counter() - started:.0f} s)", flush=True)
    file_mb = sum(p.stat().st_size for p in model.parent.glob(model.name + "*")) / MB
    runs = [(label, ["-c", RUN_FROM, str(Path(folder).resolve())])
            for label, _, folder in (item.partition("=") for item in args.code)]
    runs.append(("this checkout", ["-m"]))
    with tempfile.TemporaryDirectory(prefix="bench_prune_decoder_") as folder:
        scratch = Path(folder)
        calib = scratch / "calib.npz"
        ids = np.random.default_rng(0).integers(3, SHAPE["vocab"], (args.windows, WINDOW))
        np.savez(calib, input_ids=ids, attention_mask=np.ones_like(ids),
                 position_ids=np.broadcast_to(np.arange(WINDOW), ids.shape).copy())

        def ort() -> tuple[dict, float]:
            run = run_measured([sys.executable, str(Path(__file__).resolve()), ORT_CHILD, str(model), str(calib),
                                str(BATCH)])
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"onnxruntime pass: {result['seconds']:.2f} s, peak RSS {run.peak_mb:.0f} MB", flush=True)
            return result, run.peak_mb

        passes = [ort()]
        measured = []
        for label, launch in runs:
            pruned = scratch / "pruned.onnx"
            module = ["onnxsnp"] if launch == ["-m"] else []
            snp = run_measured([sys.executable, *launch, *module, str(model), str(pruned), "--ratio", str(RATIO),
                                "--calib", str(calib), "--calib-samples", str(args.windows), "-q"])
            print(f"onnxsnp ({label}): {snp.seconds:.1f} s, CPU {snp.cpu_s:.1f} s, peak RSS {snp.peak_mb:.0f} MB",
                  flush=True)
            for leftover in scratch.glob("pruned.onnx*"):
                leftover.unlink()
            measured.append((label, snp))
        passes.append(ort())
    seconds = float(np.mean([p[0]["seconds"] for p in passes]))
    ort_peak = max(p[1] for p in passes)
    pass_text = " / ".join(f"{p[0]['seconds']:.1f}" for p in passes)
    rows = [f"| {label} | {args.layers} | {file_mb:.0f} | {args.windows * WINDOW:,} | {pass_text} | {snp.seconds:.1f} | "
            f"{snp.seconds / seconds:.2f} | {ort_peak:.0f} | {snp.peak_mb:.0f} | "
            f"{snp.peak_mb / (ort_peak + file_mb):.2f} |" for label, snp in measured]
    import onnxruntime

    lines = [
        "# Pruning cost of a decoder against one onnxruntime pass",
        "",
        f"Generated by `{invocation()}` on "
        f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
        f"threadpoolctl {'present' if importlib.util.find_spec('threadpoolctl') else 'ABSENT (BLAS threads unlimited)'} "
        "(see the tool's docstring). Model: a Llama of SmolLM2-135M's shape, random weights, the given number of "
        f"layers; calibration windows of {WINDOW} tokens. ORT pass: prefill in batches of {BATCH}, in a fresh "
        "process, run before and after the onnxsnp runs (both shown; the ratio is to their mean). onnxsnp: the "
        f"whole `python -m onnxsnp MODEL OUT --ratio {RATIO} --calib CALIB --calib-samples N -q` process. Goals "
        "(issue 25): onnxsnp ≤ 3 × the pass, peak RSS ≤ 1.5 × (the pass's + the weights).",
        "",
        "| onnxsnp | layers | file MB | tokens | ORT pass s (before / after) | onnxsnp s | onnxsnp ÷ ORT | "
        "ORT peak RSS MB | onnxsnp peak RSS MB | RSS ÷ (ORT RSS + file) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_page(args.out, lines + kept_notes(args.out))
    print("\n".join(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == [ORT_CHILD]:
        decoder_pass(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
