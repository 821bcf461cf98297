"""Fidelity without retraining: which neurons to keep, and what compensation restores.

For ratios 0.1 … 0.7, criteria snp / l2 / random and whole-head pruning at equal FLOPs (heads
and FFN neurons cut by the ratio instead of Q/K/V neurons), each without and with compensation
(--compensate none / lstsq):
* the shipped digits ViT: top-1 on its held-out split (calibration: 128 training images);
* all-MiniLM-L6-v2 (run tools/export_minilm.py first): mean cosine between original and pruned
  sentence embeddings on 472 held-out sentences, and the Spearman correlation of their pairwise
  similarities (calibration: 128 other sentences);
* attention-map error: with only Q/K pairs pruned, the KL divergence between the original and
  pruned attention probabilities of every block — the paper's claim is that SNP's choice keeps
  attention maps where weight norms do not.
Writes docs/RESULTS.md and PNG plots beside it; regenerates everything from scratch:

    python tools/bench_fidelity.py [--ratios 0.1 0.2 0.3 0.4 0.5 0.6 0.7] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from collect_results import collect  # noqa: E402
from eval_digits import top1_accuracy  # noqa: E402
from eval_minilm import embed, pair_sims, spearman  # noqa: E402

from onnxsnp import prune  # noqa: E402
from onnxsnp.calibration import capture  # noqa: E402
from onnxsnp.graph import ModelGraph  # noqa: E402
from onnxsnp.matching import find_blocks  # noqa: E402

# name: (criterion, keyword arguments for a ratio r)
CONFIGS = {
    "snp": ("snp", lambda r: {"ratio": r}),
    "l2": ("l2", lambda r: {"ratio": r}),
    "random": ("random", lambda r: {"ratio": r}),
    "heads (snp)": ("snp", lambda r: {"ratio": 0.0, "heads": r, "ffn_ratio": r}),
}


class Task:
    """A model, its calibration file and a score of a pruned model (higher is better)."""

    def __init__(self, name: str, model: Path, calib: Path):
        self.name, self.model, self.calib = name, model, calib

    def score(self, path: Path) -> dict[str, float]:
        raise NotImplementedError


class Digits(Task):
    def __init__(self):
        super().__init__("digits ViT", ROOT / "models" / "digits_vit.onnx", ROOT / "models" / "digits_vit_calib.npz")
        data = np.load(ROOT / "models" / "digits_vit_heldout.npz")
        self.pixels, self.labels = data["pixel_values"], data["labels"]

    def score(self, path: Path) -> dict[str, float]:
        return {"top-1": top1_accuracy(path, self.pixels, self.labels)}

    def attention_feed(self) -> dict[str, np.ndarray]:
        return {"pixel_values": self.pixels[:64]}


class MiniLM(Task):
    def __init__(self, folder: Path):
        super().__init__("all-MiniLM-L6-v2", folder / "minilm.onnx", folder / "calib.npz")
        data = np.load(folder / "eval.npz")
        self.ids, self.mask = data["input_ids"], data["attention_mask"]
        self.reference = embed(self.model, self.ids, self.mask)
        self.reference_sims = pair_sims(self.reference)

    def score(self, path: Path) -> dict[str, float]:
        got = embed(path, self.ids, self.mask)
        return {"cosine": float((got * self.reference).sum(axis=1).mean()),
                "spearman": spearman(self.reference_sims, pair_sims(got))}

    def attention_feed(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.ids[:64], "attention_mask": self.mask[:64]}


def sweep(task: Task, ratios: list[float], scratch: Path) -> list[dict]:
    rows = []
    for config, (criterion, kwargs) in CONFIGS.items():
        for compensate in ("none", "lstsq"):
            for ratio in ratios:
                pruned, report = prune(str(task.model), criterion=criterion, calib=str(task.calib), calib_samples=128,
                                       compensate=compensate, **kwargs(ratio))
                path = scratch / "pruned.onnx"
                onnx.save(pruned, str(path))
                rows.append({"config": config, "compensate": compensate, "ratio": ratio,
                             "flops_cut": 1 - report.flops_after / report.flops_before, **task.score(path)})
                print(task.name, rows[-1], flush=True)
    return rows


def attention_kl(task: Task, ratio: float, scratch: Path) -> dict[str, list[float]]:
    """Per block: mean KL(P_original ‖ P_pruned) over heads and query rows, Q/K pairs pruned only."""
    g = ModelGraph(onnx.load(str(task.model)))
    probs = [g.node(b.anchor).output[0] for b in find_blocks(g).attention if g.node(b.anchor).op_type == "Softmax"]
    feed = task.attention_feed()
    reference = _capture(g.model, probs, feed)
    result = {}
    for label, criterion, compensate in (("snp", "snp", "none"), ("l2", "l2", "none"), ("random", "random", "none"),
                                         ("snp + Q/K rescale", "snp", "lstsq")):
        pruned, _ = prune(str(task.model), ratio=0.0, qk_ratio=ratio, criterion=criterion, calib=str(task.calib),
                          calib_samples=128, compensate=compensate)
        got = _capture(pruned, probs, feed)
        result[label] = [_kl(reference[t], got[t], feed.get("attention_mask")) for t in probs]
    return result


def _capture(model: onnx.ModelProto, tensors: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    (_, values), = list(capture(model, tensors, feed, batch=len(next(iter(feed.values())))))
    return values


def _kl(p: np.ndarray, q: np.ndarray, mask: np.ndarray | None) -> float:
    p, q = p.astype(np.float64), q.astype(np.float64)
    terms = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=-1)  # (B, H, N)
    if mask is not None:  # padded query rows are not part of any real attention map
        return float((terms * mask[:, None, :]).sum() / (mask.sum() * terms.shape[1]))
    return float(terms.mean())


def plot(rows: list[dict], metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, config in enumerate(CONFIGS):
        for compensate, style in (("lstsq", "-"), ("none", "--")):
            points = [r for r in rows if r["config"] == config and r["compensate"] == compensate]
            axis.plot([100 * r["flops_cut"] for r in points], [r[metric] for r in points], style, marker="o",
                      markersize=3, color=f"C{index}", label=f"{config}, {'lstsq' if compensate == 'lstsq' else 'none'}")
    axis.set_xlabel("FLOPs removed (%)")
    axis.set_ylabel(metric)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(rows: list[dict], metrics: list[str]) -> list[str]:
    lines = ["| config | compensation | ratio | FLOPs removed | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for r in rows:
        values = " | ".join(f"{r[m]:.2%}" if m == "top-1" else f"{r[m]:.3f}" for m in metrics)
        lines.append(f"| {r['config']} | {r['compensate']} | {r['ratio']} | {r['flops_cut']:.1%} | {values} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--quick", action="store_true", help="ratios 0.3 and 0.5, digits only (a smoke run)")
    parser.add_argument("--minilm", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args()
    ratios = [0.3, 0.5] if args.quick else args.ratios
    started = time.perf_counter()
    tasks: list[Task] = [Digits()]
    if not args.quick and (args.minilm / "minilm.onnx").exists():
        tasks.append(MiniLM(args.minilm))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Fidelity without retraining", "",
             "Generated by `python tools/bench_fidelity.py` (one run, from scratch). `ratio` is the fraction removed "
             "from Q/K pairs, V and FFN neurons of every layer; `heads (snp)` removes that fraction of whole heads "
             "and of FFN neurons instead (equal FLOPs). Compensation `lstsq` (the default) refits the output "
             "projection and fc2 by ridge least squares and rescales the kept Q/K pairs, each piece kept only if it "
             "raises fidelity on held-back calibration samples; `none` switches it off.", ""]
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            rows = sweep(task, ratios, Path(scratch))
            metrics = ["top-1"] if isinstance(task, Digits) else ["cosine", "spearman"]
            picture = out.parent / f"fidelity_{'digits' if isinstance(task, Digits) else 'minilm'}.png"
            plot(rows, metrics[0], f"{task.name}: {metrics[0]} vs FLOPs removed", picture)
            lines += [f"## {task.name}", "", f"![{task.name}]({picture.name})", ""] + table(rows, metrics) + [""]
            kl = attention_kl(task, 0.5, Path(scratch))
            lines += [f"### {task.name}: attention-map error, half of the Q/K pairs pruned (nothing else)", "",
                      "Mean KL(original ‖ pruned) of the attention probabilities per block (lower is better); "
                      "criteria without compensation, then SNP with the least-squares Q/K rescale.", "",
                      "| criterion | " + " | ".join(f"block {i}" for i in range(len(kl["snp"]))) + " | mean |",
                      "|---|" + "---|" * (len(kl["snp"]) + 1)]
            lines += [f"| {c} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |"
                      for c, values in kl.items()]
            lines.append("")
    lines += [f"Total run time {time.perf_counter() - started:.0f} s.", ""]
    out.write_text("\n".join(lines))
    if out.resolve() == (ROOT / "docs" / "RESULTS.md").resolve():
        collect()  # the speed and cost tables follow the fidelity ones
    print("\n".join(lines))


if __name__ == "__main__":
    main()
