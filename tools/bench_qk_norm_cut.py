"""Q/K dims within the heads of a per-head QK-norm on a real checkpoint (Gemma 3 270M, the real-decoder
bench's export): the attention alone pruned — V only (what `--qk-norm-cut off` leaves to cut), then
Q/K only with the norm's statistic over the kept dims as it falls (`sliced`) and with each head's γ
rescaled by the calibration's mean ms_kept/ms_full (`calibrated`) — held-out perplexity, next-token
agreement, the measured FLOPs cut, and the reconstruction's per-layer attention half errors (the
refit's relative error as sliced and after, averaged over the layers) → a table on stdout.

    python tools/bench_qk_norm_cut.py --build build/real [--calibration 16] [--heldout 8] [--ratios 0.25,0.5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if "--code" in sys.argv:  # another checkout's onnxsnp (a git worktree), as bench_real_decoders takes it
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))

import numpy as np
import onnx

from bench_real_decoders import BUILD, WINDOW, gemma3, scores, texts
from onnxsnp.data.calib_text import stream_windows
from onnxsnp.options import make_options
from onnxsnp.pipeline import prune_model


def runs(ratios: list[float]) -> list[tuple[str, dict]]:
    found = []
    for ratio in ratios:
        found += [(f"V {ratio}", {"qk_ratio": 0.0, "v_ratio": ratio, "ffn_ratio": 0.0}),
                  (f"Q/K {ratio}, sliced", {"qk_ratio": ratio, "v_ratio": 0.0, "ffn_ratio": 0.0, "qk_norm_cut": "sliced"}),
                  (f"Q/K {ratio}, calibrated", {"qk_ratio": ratio, "v_ratio": 0.0, "ffn_ratio": 0.0,
                                               "qk_norm_cut": "calibrated"})]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--calibration", type=int, default=16, help="calibration windows of 128 tokens")
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows of 128 tokens")
    parser.add_argument("--ratios", default="0.25,0.5", help="the cuts, each measured V only and Q/K only")
    parser.add_argument("--only", help="run only the labels containing this text")
    parser.add_argument("--code", type=Path, help="measure the onnxsnp of this checkout instead (a git worktree)")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    source = gemma3(args.build)
    tokenizer = Tokenizer.from_file(str(source.parent / "tokenizer.json"))
    calibration_texts, heldout_texts = texts()
    calibration = stream_windows(tokenizer, calibration_texts, WINDOW, args.calibration)
    heldout = stream_windows(tokenizer, heldout_texts, WINDOW, args.heldout)
    calib = {"input_ids": calibration, "attention_mask": np.ones_like(calibration)}
    reference_picked, reference = scores(onnx.load(str(source)), heldout)
    base = float(np.exp(-reference_picked.mean()))
    print(f"calibration {len(calibration)} windows, held-out {len(heldout)} windows of {WINDOW} tokens", flush=True)
    print("| options | FLOPs | perplexity | × original | next-token agreement | attention half error, sliced → "
          "refitted (mean over layers) | prune time |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    print(f"| original | – | {base:.2f} | 1.00× | 100.0 % | – | – |", flush=True)
    for label, options in runs([float(r) for r in args.ratios.split(",")]):
        if args.only and args.only not in label:
            continue
        started = time.time()
        result = prune_model(str(source), make_options(measure_latency=False, **options), calib=calib)
        picked, best = scores(result.model, heldout)
        report = result.report
        value = float(np.exp(-picked.mean()))
        halves = [h for h in report.reconstruction["halves"] if h["name"].endswith("(attention)")]
        before = np.mean([h["error_sliced"] for h in halves])
        after = np.mean([h["error_refitted"] for h in halves])
        print(f"| {label} | −{1 - report.flops_after / report.flops_before:.2%} | {value:.2f} | {value / base:.3f}× | "
              f"{float((best == reference).mean()):.1%} | {before:.4f} → {after:.4f} | {time.time() - started:.0f} s |",
              flush=True)
        del result


if __name__ == "__main__":
    main()
