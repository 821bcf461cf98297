"""Fidelity without retraining: the goal table and the ablation of every lever (docs/RESULTS.md).

Three models, each scored on data neither calibration nor the pruner ever saw:
* the shipped digits ViT: top-1 on its 450 held-out images (calibration: its training images);
* all-MiniLM-L6-v2 (tools/export_minilm.py): mean cosine between original and pruned sentence
  embeddings on 472 standard-library sentences (calibration: 2,000 third-party docstring sentences);
* a MiniLM package classifier (tools/export_minilm_classifier.py): accuracy on 500 held-out
  sentences, and agreement with the original's predictions (calibration: the same 2,000 sentences).

At 30 / 50 / 70 % fewer FLOPs (--target-flops 0.7 / 0.5 / 0.3, or --ratio 0.3 / 0.5 / 0.7 for the
uniform rows), the default configuration and one row per lever changed from it:

    python tools/bench_fidelity.py [--models digits minilm classifier] [--budgets 0.3 0.5 0.7] [--quick]

Writes docs/RESULTS.md (then the speed and cost tables are appended by tools/collect_results.py)
and one plot per model beside it; regenerates everything from scratch.

The whole ablation takes hours on a 2-core machine. `--rows FILE` keeps every measurement in a
JSON-lines file as it is taken (with the commit it was measured on) and reuses it on the next
invocation, so the table can be built in parts; `--from-rows` only renders what the file holds:

    python tools/bench_fidelity.py --rows build/fidelity_rows.jsonl --models minilm --configs default
    python tools/bench_fidelity.py --rows build/fidelity_rows.jsonl --from-rows
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from harness import BUILD, DOCS, MODELS, ROOT

from collect_results import collect
from eval_minilm import embed, pair_sims, spearman

from onnxsnp import prune
from onnxsnp.data.calibration import capture
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks

MINILM = BUILD / "minilm"


@dataclass(frozen=True)
class Config:
    name: str
    lever: str  # what differs from the default, for the table
    options: Callable[[float], dict]  # keyword arguments of onnxsnp.prune for a FLOPs cut
    samples: int | None = None  # calibration samples (None: all)


def _target(cut: float, **extra) -> dict:
    return {"target_flops": round(1 - cut, 4), **extra}


CONFIGS = [
    Config("default", "all samples, sequential refit, global allocation, OBS selection, projected Q/K and V",
           lambda cut: _target(cut)),
    Config("64 samples", "calibration size", lambda cut: _target(cut), 64),
    Config("256 samples", "calibration size", lambda cut: _target(cut), 256),
    Config("one-shot refit", "refit on the original model's activations", lambda cut: _target(cut, reconstruct="one-shot")),
    Config("uniform widths", "--ratio instead of the global allocation", lambda cut: {"ratio": cut}),
    Config("selection before refit", "V/FFN/heads by the criterion's scores, not OBS",
           lambda cut: _target(cut, selection="criterion")),
    Config("selected Q/K and V", "a choice of neurons (the paper's SNP, Q/K rescaled), not projections",
           lambda cut: _target(cut, reduction="select")),
    Config("one-pass refit", "no block-by-block reconstruction (uniform ratio, all samples)",
           lambda cut: {"ratio": cut, "reconstruct": "off"}),
    Config("v0.1 default", "one-pass refit, uniform ratio, 64 samples: the previous default",
           lambda cut: {"ratio": cut, "reconstruct": "off"}, 64),
    Config("no compensation", "uniform ratio, SNP criterion, nothing restored", lambda cut: {"ratio": cut, "compensate": "none"}),
]
QUICK = ("default", "v0.1 default", "no compensation")  # --quick: digits at 50 %, at most 256 samples


class Task:
    """A model, its calibration arrays, and scores of a pruned model (the first is the headline)."""

    name: str
    model: Path
    metrics: tuple[str, ...]

    def calibration(self, samples: int | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def score(self, path: Path) -> dict[str, float]:
        raise NotImplementedError

    def attention_feed(self) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Digits(Task):
    name, model, metrics = "digits ViT", MODELS / "digits_vit.onnx", ("top-1",)

    def __init__(self):
        from eval_digits import top1_accuracy

        held = np.load(MODELS / "digits_vit_heldout.npz")
        self.pixels, self.labels, self._top1 = held["pixel_values"], held["labels"], top1_accuracy
        self.train = _digits_training_images(float(held["mean"]), float(held["std"]))
        self.original = top1_accuracy(self.model, self.pixels, self.labels)

    def calibration(self, samples):
        return {"pixel_values": self.train[:samples]}

    def score(self, path):
        return {"top-1": self._top1(path, self.pixels, self.labels)}

    def attention_feed(self):
        return {"pixel_values": self.pixels[:64]}


def _digits_training_images(mean: float, std: float) -> np.ndarray:
    """The digits training split as tools/train_digits_vit.py makes it, in the order its
    calibration file draws from (seed 0): the shipped 128 calibration images come first."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from train_digits_vit import upsample

    digits = load_digits()
    train, _, _, _ = train_test_split(digits.data, digits.target, test_size=0.25, stratify=digits.target,
                                      random_state=0)
    images = ((upsample(train).numpy() - mean) / std).astype(np.float32)
    return images[np.random.default_rng(0).permutation(len(images))]


class MiniLM(Task):
    name, model, metrics = "all-MiniLM-L6-v2", MINILM / "minilm.onnx", ("cosine", "spearman")

    def __init__(self):
        data = np.load(MINILM / "eval.npz")
        self.ids, self.mask = data["input_ids"], data["attention_mask"]
        self.reference = embed(self.model, self.ids, self.mask)
        self.reference_sims = pair_sims(self.reference)
        self.corpus = dict(np.load(MINILM / "calib2000.npz"))

    def calibration(self, samples):
        return {k: v[:samples] for k, v in self.corpus.items()}

    def score(self, path):
        got = embed(path, self.ids, self.mask)
        return {"cosine": float((got * self.reference).sum(axis=1).mean()),
                "spearman": spearman(self.reference_sims, pair_sims(got))}

    def attention_feed(self):
        return {"input_ids": self.ids[:64], "attention_mask": self.mask[:64]}


class Classifier(MiniLM):
    name, model, metrics = "MiniLM package classifier", MINILM / "classifier.onnx", ("accuracy", "agreement")

    def __init__(self):
        data = np.load(MINILM / "classifier_eval.npz")
        self.ids, self.mask, self.labels = data["input_ids"], data["attention_mask"], data["labels"]
        self.corpus = dict(np.load(MINILM / "calib2000.npz"))
        self.predicted = self._predict(self.model)
        self.original = float((self.predicted == self.labels).mean())

    def _predict(self, path: Path) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"input_ids": self.ids, "attention_mask": self.mask})[0].argmax(axis=1)

    def score(self, path):
        predicted = self._predict(path)
        return {"accuracy": float((predicted == self.labels).mean()),
                "agreement": float((predicted == self.predicted).mean())}


class Rows:
    """Measurements kept in a JSON-lines file, one per (model, kind, key): appended as soon as they
    are taken, reused by later invocations (without a file: nothing kept, everything measured)."""

    def __init__(self, path: Path | None, measure: bool = True):
        self.path, self.measure, self.kept = path, measure, {}
        self.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() or "unknown"
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.kept[(entry["model"], entry["kind"], entry["key"])] = entry

    def get(self, task: "Task", kind: str, key: str, compute: Callable[[], object]):
        """The kept value, or the measured one (None where only kept values may be used)."""
        entry = self.kept.get((task.name, kind, key))
        if entry is not None:
            return entry["value"]
        if not self.measure:
            return None
        value = compute()
        entry = {"model": task.name, "kind": kind, "key": key, "commit": self.commit, "value": value}
        self.kept[(task.name, kind, key)] = entry
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as out:
                out.write(json.dumps(entry) + "\n")
        return value

    def commits(self) -> list[str]:
        return sorted({e["commit"] for e in self.kept.values()})


def run_config(task: Task, config: Config, cut: float, scratch: Path, cap: int | None = None) -> dict:
    started = time.perf_counter()
    samples = min(filter(None, (config.samples, cap)), default=None)
    pruned, report = prune(str(task.model), calib=task.calibration(samples), **config.options(cut))
    seconds = time.perf_counter() - started
    path = scratch / "pruned.onnx"
    onnx.save(pruned, str(path))
    row = {"config": config.name, "cut": cut, "flops_cut": 1 - report.flops_after / report.flops_before,
           "samples": report.calibration_samples, "seconds": round(seconds, 1), **task.score(path)}
    print(task.name, row, flush=True)
    return row


def attention_kl(task: Task, ratio: float) -> dict[str, list[float]]:
    """Per block: mean KL(P_original ‖ P_pruned) with only Q/K pairs removed (nothing compensated,
    then with the projection and refits): does SNP's choice keep the attention maps?"""
    g = ModelGraph(onnx.load(str(task.model)))
    probs = [g.node(b.anchor).output[0] for b in find_blocks(g).attention if g.node(b.anchor).op_type == "Softmax"]
    feed = task.attention_feed()
    reference = _capture(g.model, probs, feed)
    result = {}
    calib = task.calibration(256)
    for label, options in (("snp", {"criterion": "snp", "compensate": "none"}),
                           ("l2", {"criterion": "l2", "compensate": "none"}),
                           ("random", {"criterion": "random", "compensate": "none"}),
                           ("snp, projected + refit", {})):
        pruned, _ = prune(str(task.model), 0.0, qk_ratio=ratio, calib=calib, **options)
        got = _capture(pruned, probs, feed)
        result[label] = [_kl(reference[t], got[t], feed.get("attention_mask")) for t in probs]
    return result


def criteria(task: Task, ratios: list[float], scratch: Path) -> list[dict]:
    """The paper's claim, without any compensation: SNP's choice against weight norms and chance."""
    rows = []
    for criterion in ("snp", "snp-paper", "l2", "random"):
        for ratio in ratios:
            pruned, report = prune(str(task.model), ratio, criterion=criterion, compensate="none",
                                   calib=task.calibration(256))
            path = scratch / "criterion.onnx"
            onnx.save(pruned, str(path))
            rows.append({"criterion": criterion, "ratio": ratio, **task.score(path)})
            print(task.name, rows[-1], flush=True)
    return rows


def _capture(model: onnx.ModelProto, tensors: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    (_, values), = list(capture(model, tensors, feed, batch=len(next(iter(feed.values())))))
    return values


def _kl(p: np.ndarray, q: np.ndarray, mask: np.ndarray | None) -> float:
    p, q = p.astype(np.float64), q.astype(np.float64)
    terms = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=-1)  # (B, H, N)
    if mask is not None:  # padded query rows are not part of any real attention map
        return float((terms * mask[:, None, :]).sum() / (mask.sum() * terms.shape[1]))
    return float(terms.mean())


def _cell(task: Task, row: dict) -> str:
    metric = task.metrics[0]
    value = row[metric]
    if metric in ("top-1", "accuracy"):
        return f"{value:.2%} ({100 * (value - task.original):+.2f} pt)"
    return f"{value:.3f}"


def ablation_table(task: Task, rows: list[dict], budgets: list[float], configs: list[Config]) -> list[str]:
    head = f"| configuration | what differs | " + " | ".join(f"{b:.0%} fewer FLOPs" for b in budgets) + " |"
    lines = [head, "|---|---|" + "---|" * len(budgets)]
    for config in configs:
        cells = []
        for budget in budgets:
            row = next((r for r in rows if r["config"] == config.name and r["cut"] == budget), None)
            cells.append("—" if row is None else f"{_cell(task, row)}, −{row['flops_cut']:.1%}, {row['seconds']:.0f} s")
        lines.append(f"| {config.name} | {config.lever} | " + " | ".join(cells) + " |")
    return lines


def plot(task: Task, rows: list[dict], configs: list[Config], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task.metrics[0]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, config in enumerate(configs):
        points = sorted((r["flops_cut"], r[metric]) for r in rows if r["config"] == config.name)
        if points:
            axis.plot(*zip(*points), "-" if index == 0 else "--", marker="o", markersize=3, color=f"C{index % 10}",
                      label=config.name, linewidth=2.2 if index == 0 else 1.0)
    axis.set_xlabel("FLOPs removed")
    axis.set_ylabel(metric)
    axis.set_title(f"{task.name}: {metric} without retraining")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


GOALS = {"digits ViT": {0.5: ("top-1 drop ≤ 1 point", lambda r, t: r["top-1"] >= t.original - 0.01),
                        0.7: ("top-1 drop ≤ 3 points", lambda r, t: r["top-1"] >= t.original - 0.03)},
         "all-MiniLM-L6-v2": {0.3: ("cosine ≥ 0.95", lambda r, t: r["cosine"] >= 0.95),
                              0.5: ("cosine ≥ 0.90", lambda r, t: r["cosine"] >= 0.90)}}


def goal_lines(task: Task, rows: list[dict], budgets: list[float]) -> list[str]:
    lines = []
    for budget in budgets:
        row = next((r for r in rows if r["config"] == "default" and r["cut"] == budget), None)
        if row is None:
            continue
        goal = GOALS.get(task.name, {}).get(budget)
        verdict = "" if goal is None else f" | {goal[0]}: {'met' if goal[1](row, task) else 'missed'}"
        metrics = ", ".join(f"{m} {_format(m, row[m])}" for m in task.metrics)
        lines.append(f"| {task.name} | {budget:.0%} (measured −{row['flops_cut']:.1%}) | {metrics}{verdict or ' | —'} |")
    return lines


def _format(metric: str, value: float) -> str:
    return f"{value:.2%}" if metric in ("top-1", "accuracy", "agreement") else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "minilm", "classifier"],
                        choices=["digits", "minilm", "classifier"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="fractions of FLOPs removed")
    parser.add_argument("--configs", nargs="+", help="only these configurations (names as in the table)")
    parser.add_argument("--quick", action="store_true", help="digits only, a few configurations (a smoke run)")
    parser.add_argument("--out", type=Path, default=DOCS / "RESULTS.md")
    parser.add_argument("--rows", type=Path, help="keep and reuse measurements in this JSON-lines file")
    parser.add_argument("--from-rows", action="store_true", help="measure nothing: render what --rows holds")
    args = parser.parse_args()
    if args.from_rows and args.rows is None:
        parser.error("--from-rows needs --rows")
    store = Rows(args.rows, measure=not args.from_rows)
    started = time.perf_counter()
    chosen = [c for c in CONFIGS if (not args.configs or c.name in args.configs) and (not args.quick or c.name in QUICK)]
    factories = {"digits": Digits, "minilm": MiniLM, "classifier": Classifier}
    models = ["digits"] if args.quick else args.models
    tasks = []
    for name in models:
        if name != "digits" and not (MINILM / ("classifier.onnx" if name == "classifier" else "minilm.onnx")).exists():
            print(f"skipping {name}: run tools/export_minilm.py (and export_minilm_classifier.py) first")
            continue
        tasks.append(factories[name]())
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    goals, sections = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            budgets = [0.5] if args.quick else args.budgets
            measured = [store.get(task, "row", f"{config.name}@{cut}{' quick' if args.quick else ''}",
                                  lambda: run_config(task, config, cut, Path(scratch), 256 if args.quick else None))
                        for config in chosen for cut in budgets]
            rows = [r for r in measured if r is not None]
            shown = [c for c in chosen if any(r["config"] == c.name for r in rows)]
            if not rows:
                continue
            picture = out.parent / f"fidelity_{task.name.split()[0].lower().replace('-', '_')}.png"
            plot(task, rows, shown, picture)
            goals += goal_lines(task, rows, budgets)
            original = (f"{task.original:.2%}" if hasattr(task, "original") else "1.000 (itself)")
            sections += [f"## {task.name}", "", f"Original: {task.metrics[0]} {original}. Each cell: "
                         f"{task.metrics[0]} (change), FLOPs removed as measured on the written model, "
                         "the pruner's time (on this shared 2-core machine).", "", f"![{task.name}]({picture.name})", ""]
            sections += ablation_table(task, rows, budgets, shown) + [""]
            if args.quick:
                continue
            crit = store.get(task, "criteria", "0.3,0.5", lambda: criteria(task, [0.3, 0.5], Path(scratch)))
            kl = store.get(task, "attention-kl", "0.5", lambda: attention_kl(task, 0.5))
            if crit is None or kl is None:
                continue
            sections += [f"### {task.name}: criteria alone (no compensation, uniform ratio)", "",
                         "| criterion | ratio | " + " | ".join(task.metrics) + " |", "|---|---|" + "---|" * len(task.metrics)]
            sections += [f"| {r['criterion']} | {r['ratio']} | " + " | ".join(_format(m, r[m]) for m in task.metrics)
                         + " |" for r in crit] + [""]
            sections += [f"### {task.name}: attention-map error, half of the Q/K pairs removed (nothing else)", "",
                         "Mean KL(original ‖ pruned) of the attention probabilities per block (lower is better).", "",
                         "| Q/K pairs | " + " | ".join(f"block {i}" for i in range(len(kl["snp"]))) + " | mean |",
                         "|---|" + "---|" * (len(kl["snp"]) + 1)]
            sections += [f"| {c} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |"
                         for c, values in kl.items()] + [""]
    how = (f"one run, from scratch; {time.perf_counter() - started:.0f} s in all" if args.rows is None else
           f"rows measured in parts and kept in `{args.rows.name}`, on commit(s) {', '.join(store.commits())}")
    lines = ["# Fidelity without retraining", "",
             f"Generated by `python tools/bench_fidelity.py{' --quick' if args.quick else ''}` ({how}). No retraining anywhere; every score is on data that "
             "neither calibration nor the pruner saw. The default: every calibration sample given, block-by-block "
             "reconstruction on the pruned model's own activations, widths allocated globally by measured sensitivity "
             "(`--target-flops`), V/FFN neurons and heads chosen by structured OBS, Q/K and V projected onto each "
             "head's best directions.", "", "## Goals", "",
             "| model | FLOPs removed | default configuration | goal |", "|---|---|---|---|"] + goals + [""]
    lines += ["## Ablation: each lever changed alone", "",
              "Rows change one thing from the default; the uniform rows use `--ratio` (about the same FLOPs cut).",
              ""] + sections
    out.write_text("\n".join(lines) + "\n")
    if out.resolve() == (DOCS / "RESULTS.md").resolve():
        collect()  # the speed and cost tables follow the fidelity ones
    print("\n".join(lines))


if __name__ == "__main__":
    main()
