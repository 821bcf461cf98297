"""Where a decoder prune's peak resident memory goes (issues 25 and 31): the whole prune's peak,
each pipeline stage's peak, and one onnxruntime pass's peak over the same windows.

Model: the real SmolLM2-135M dynamo export that tools/bench_real_decoders.py builds (default
build/real/smollm2/model.onnx, its tokenizer.json beside it). Calibration: what `--calib-text`
makes of the Python language reference's topics (alternate topics, as bench_real_decoders.py):
`--windows` windows of 128 tokens; onnxsnp holds back an eighth of them (at most 64) for its
fidelity line and fits on the rest.

(a) onnxruntime alone, in a fresh process: prefill over every window in batches of 8
    (bench_prune_decoder.decoder_pass), its ru_maxrss;
(b) `prune_model(MODEL, ratio 0.25, calib=windows)` in a fresh process whose resident memory is
    sampled every 50 ms by a thread, each sample tagged with the pipeline stage running
    (pipeline.stage's names; the reconstruction's passes by their Shard method): each stage's peak
    and its first and last samples; and the process's ru_maxrss. `--code DIR` runs (b) with
    another checkout's onnxsnp (e.g. a worktree of master), so that before and after are measured
    on the same machine; `--save PATH` writes the pruned
    model (to compare before and after byte for byte).

    python tools/bench_prune_memory.py [--windows 64] [--model PATH] [--code DIR] [--save PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = "_prune_child"
WINDOW = 128
HERE = Path(__file__).resolve().parent


def windows(model: Path, count: int, every_topic: bool = False) -> np.ndarray:
    """`count` windows of the calibration topics, or of every topic (the calibration topics make
    482 windows: a cost run past that reads the held-out topics too, and scores no fidelity)."""
    from tokenizers import Tokenizer

    from onnxsnp.data.calib_text import stream_windows
    from bench_real_decoders import texts

    calibration, held_out = texts()
    return stream_windows(Tokenizer.from_file(str(model.parent / "tokenizer.json")),
                          calibration + held_out if every_topic else calibration, WINDOW, count)


def prune_child(model: str, calib: str, save: str) -> None:
    """(b), in this process: JSON on stdout."""
    import contextlib
    import resource
    import threading
    import time

    import onnxsnp.pipeline as pipeline
    from onnxsnp.compensate import batches
    from onnxsnp.options import make_options

    tag, peaks, stop = ["between stages, before the reconstruction"], {}, threading.Event()

    def sample() -> None:  # VmRSS from /proc (Linux): no dependency beyond the project's
        while not stop.is_set():
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
            seen = peaks.setdefault(tag[0], [rss, rss, rss])  # peak, first sample, last sample
            seen[0], seen[2] = max(seen[0], rss), rss
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    stage = pipeline.stage

    @contextlib.contextmanager
    def tagged(name: str):
        before, tag[0] = tag[0], name
        try:
            with stage(name):
                yield
        finally:
            tag[0] = f"between stages, after {name}" if before.startswith("between") else before

    pipeline.stage = tagged
    for method in ("prepare", "attention_targets", "ffn_targets", "equations", "finish", "advance_original"):
        original = getattr(batches.Shard, method)

        def wrapped(self, *args, _original=original, _name=method, **kwargs):
            before, tag[0] = tag[0], f"reconstruction: Shard.{_name}"
            try:
                return _original(self, *args, **kwargs)
            finally:
                tag[0] = before

        setattr(batches.Shard, method, wrapped)
    compensate = pipeline._compensate

    def compensating(*args, **kwargs):
        tag[0] = "reconstruction: the refits (between passes)"
        try:
            return compensate(*args, **kwargs)
        finally:
            tag[0] = "between stages, after the reconstruction"

    pipeline._compensate = compensating

    def within(owner, name: str, label: str) -> None:  # a part of a stage tagged apart (the rewrite's two)
        original = getattr(owner, name, None)
        if original is None:  # another checkout's code without it: the stage's tag alone
            return

        def wrapped(*args, **kwargs):
            before, tag[0] = tag[0], f"{tag[0]}: {label}"
            try:
                return original(*args, **kwargs)
            finally:
                tag[0] = before

        setattr(owner, name, wrapped)

    from onnxsnp.data import activation_ranges

    within(pipeline, "rewrite", "the editor (rewrite.rewriting)")
    within(activation_ranges.ActivationView, "restore", "activation pairs put back (ActivationView.restore)")
    with np.load(calib) as data:
        feed = {k: data[k] for k in ("input_ids", "attention_mask")}
    started = time.perf_counter()
    result = pipeline.prune_model(model, make_options(measure_latency=False, ratio=0.25), calib=feed)
    seconds = time.perf_counter() - started
    stop.set()
    if save:
        import onnx

        Path(save).parent.mkdir(parents=True, exist_ok=True)  # after a prune of minutes, not a failed save
        onnx.save(result.model, save, save_as_external_data=True, location=Path(save).name + ".data")
    fidelity = result.report.fidelity
    print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "stages": peaks, "perplexity": [fidelity.perplexity_before, fidelity.perplexity_after],
                      "held_out": fidelity.samples}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64, help="calibration windows of 128 tokens (64)")
    parser.add_argument("--model", type=Path, help="default: build/real/smollm2/model.onnx")
    parser.add_argument("--code", type=Path, help="prune with the onnxsnp of this checkout instead")
    parser.add_argument("--save", type=Path, help="write the pruned model here")
    parser.add_argument("--no-pass", action="store_true", help="skip (a), the onnxruntime pass")
    parser.add_argument("--every-topic", action="store_true",
                        help="windows of every topic, the held-out ones too (more than 482 windows)")
    args = parser.parse_args()
    from harness import BUILD

    model = (args.model or BUILD / "real" / "smollm2" / "model.onnx").resolve()
    weights_mb = sum(p.stat().st_size for p in model.parent.glob(model.name + "*")) / 2**20
    ids = windows(model, args.windows, args.every_topic)
    with tempfile.TemporaryDirectory(prefix="bench_prune_memory_") as folder:
        calib = Path(folder) / "calib.npz"
        np.savez(calib, input_ids=ids, attention_mask=np.ones_like(ids),
                 position_ids=np.broadcast_to(np.arange(WINDOW), ids.shape).copy())
        if not args.no_pass:
            run = subprocess.run([sys.executable, str(HERE / "bench_prune_decoder.py"), "_decoder_pass", str(model),
                                  str(calib), "8"], capture_output=True, text=True, check=True)
            ort = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"onnxruntime pass over {len(ids)} windows: {ort['seconds']:.1f} s, peak RSS {ort['peak_mb']:.0f} MB "
                  f"(weights {weights_mb:.0f} MB)", flush=True)
        code = (args.code or HERE.parent).resolve()
        # the checkout's onnxsnp first on the path (an editable install of another one comes after)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(HERE)]))
        run = subprocess.run([sys.executable, str(HERE / "bench_prune_memory.py"), CHILD, str(model), str(calib),
                              str(args.save or "")], capture_output=True, text=True, env=env)
        if run.returncode:
            raise SystemExit(f"the prune failed: {run.stderr.strip()[-2000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"onnxsnp ({code}) on {len(ids)} windows ({result['held_out']} held back): {result['seconds']:.0f} s, "
          f"peak RSS {result['peak_mb']:.0f} MB, perplexity {result['perplexity'][0]:.3f} → {result['perplexity'][1]:.3f}")
    # first and last: the samples at a stage's start and end (what the stage found, what it left;
    # a stage entered several times, as the passes are: its first entry and its last)
    print("| stage | peak RSS MB | first sample | last sample |\n|---|---|---|---|")
    for name, (peak, first, last) in sorted(result["stages"].items(), key=lambda item: -item[1][0]):
        print(f"| {name} | {peak:.0f} | {first:.0f} | {last:.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        prune_child(*sys.argv[2:])
    else:
        main()
