"""The survey's predicted loss per half-block against the loss the reconstruction realises, on a
real decoder (the bench's models and windows, tools/bench_real_decoders.py).

For each run (label, options) it records, per half-block (attention, FFN):
- predicted: the survey's curve at the widths the run keeps (sensitivity.py's unit: the squared
  error the half adds to the residual stream over the stream's own, per token, as the next RMSNorm
  sees it; loss_by_part's terms);
- realised: the same quantity measured on the reconstruction's calibration streams, pruned
  against original, after the half (mean over tokens of ‖x̂ − x‖² / ‖x‖²), and its increment over
  the stream's error before the half — what the half added, the refit's correction included;
- the share of that error in the stream's massive channels (the 4 with the most energy);
then the run's held-out perplexity and next-token agreement (as the bench measures them).
Writes JSON (one object per run) to --out.

    python tools/probe_allocation.py --model gemma3 --calibration 24 \
        --runs '[["uniform", {"ratio": 0.25}], ["alloc", {"target_flops": 0.919}]]' --out /tmp/probe.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

if "--code" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))

import bench_real_decoders as bench
from tokenizers import Tokenizer

import onnxsnp.pipeline as pipeline
from onnxsnp.compensate import batches as batches_module
from onnxsnp.compensate.reconstruction import Reconstructor
from onnxsnp.data.calib_text import stream_windows
from onnxsnp.options import make_options
from onnxsnp.score.allocation import part_losses

MASSIVE = 4


def relative_error(pruned: np.ndarray, original: np.ndarray, samples: int, mask) -> tuple[float, float, int]:
    """Σ over tokens of ‖x̂ − x‖² / ‖x‖², the same sum restricted to the massive channels, tokens."""
    x = batches_module.tokens(original, samples, mask).astype(np.float64)
    e = batches_module.tokens(pruned, samples, mask).astype(np.float64) - x
    energy = np.square(x).sum(-1)
    massive = np.argsort(-np.square(x).sum(0))[:MASSIVE]
    return (float((np.square(e).sum(-1) / energy).sum()), float((np.square(e[:, massive]).sum(-1) / energy).sum()),
            len(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(bench.MODELS), default="gemma3")
    parser.add_argument("--build", type=Path, default=bench.BUILD)
    parser.add_argument("--calibration", type=int, default=24)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--code", type=Path)
    args = parser.parse_args()
    build_model = bench.MODELS[args.model][0]
    source = build_model(args.build)
    tokenizer = Tokenizer.from_file(str(source.parent / "tokenizer.json"))
    calibration_texts, heldout_texts = bench.texts()
    calibration = stream_windows(tokenizer, calibration_texts, bench.WINDOW, args.calibration)
    heldout = stream_windows(tokenizer, heldout_texts, bench.WINDOW, args.heldout)
    calib = {"input_ids": calibration, "attention_mask": np.ones_like(calibration)}
    cached = Path(f"/tmp/probe_reference_{args.model}_{args.heldout}.npz")  # the original's scores, once
    if not cached.exists():
        np.savez(cached, *bench.scores(onnx.load(str(source)), heldout))
    with np.load(cached) as saved:
        reference_picked, reference = saved["arr_0"], saved["arr_1"]
    base = float(np.exp(-reference_picked.mean()))
    print(f"original perplexity {base:.3f}", flush=True)

    captured: dict = {}
    survey = pipeline.survey

    def capturing_survey(*a, **k):
        captured["curves"] = survey(*a, **k)
        return captured["curves"]

    pipeline.survey = capturing_survey
    run = Reconstructor.run

    def capturing_run(self, shards, widths, progress=lambda _: None):
        captured["widths"], captured["matches"] = widths, self.matches
        return run(self, shards, widths, progress)

    Reconstructor.run = capturing_run
    finish = batches_module.Shard.finish

    def measuring_finish(self, number, weights):
        finish(self, number, weights)
        sums = [relative_error(item.pruned, item.original, item.samples, item.mask) for item in self.batches]
        count = sum(s[2] for s in sums)
        captured.setdefault("stream", {})[number] = (sum(s[0] for s in sums) / count, sum(s[1] for s in sums) / count)

    batches_module.Shard.finish = measuring_finish

    results = []
    for label, extra in json.loads(args.runs):
        captured.pop("stream", None)
        started = time.time()
        result = pipeline.prune_model(str(source), make_options(measure_latency=False, **extra), calib=calib)
        seconds = time.time() - started
        report = result.report
        written = Path(f"/tmp/probe_pruned_{args.model}.onnx")  # scored from a file, the pruner's memory gone
        onnx.save(result.model, str(written), save_as_external_data=True, location=written.name + ".data")
        del result
        gc.collect()
        picked, best = bench.scores(onnx.load(str(written)), heldout)
        widths, matches = captured["widths"], captured["matches"]
        value = float(np.exp(-picked.mean()))
        row = {"label": label, "options": extra, "flops_cut": 1 - report.flops_after / report.flops_before,
               "perplexity": value, "ratio": value / base, "agreement": float((best == reference).mean()),
               "seconds": round(seconds), "halves": report.reconstruction["halves"], "layers": []}
        predicted = part_losses(captured["curves"], matches, widths) if "curves" in captured else None
        stream = captured["stream"]
        before = 0.0
        for index, layer in enumerate(matches.layers):
            w = widths.attention[layer.attention.name]
            entry = {"name": layer.name, "v": w.v, "qk": w.qk, "heads": w.heads, "ffn": widths.ffn[layer.ffn.name]}
            for number, part in ((2 * index, "attention"), (2 * index + 1, "ffn")):
                after, massive = stream.get(number, (before, 0.0))
                entry[f"{part}_realised"] = after
                entry[f"{part}_added"] = after - before
                entry[f"{part}_massive_share"] = massive / max(after, 1e-30)
                before = after
            if predicted is not None:
                entry["predicted"] = {k.value: v for k, v in predicted[index].items()}
            row["layers"].append(entry)
        results.append(row)
        print(f"{label}: FLOPs −{row['flops_cut']:.1%}, perplexity {value:.2f} ({value / base:.3f}×), "
              f"agreement {row['agreement']:.1%}, {seconds:.0f} s", flush=True)
        args.out.write_text(json.dumps({"original": base, "runs": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
