"""Pruning the int8 model a user downloads against pruning the float model and quantizing after.

For each quantized form (onnxruntime's quantize_static in QDQ format, per tensor and per
channel, and in QOperator format, per tensor; quantize_dynamic, int8 weights) and each FLOPs target, two int8 models are compared:

* prune(int8): the quantized original pruned by onnxsnp, written back in the same form;
* quantize(prune(fp32)): the float original pruned, then quantized the same way (the bar).

Fidelity is scored against the float original on held-out data: all-MiniLM-L6-v2
(tools/export_minilm.py): mean cosine of sentence embeddings on 200 evaluation sentences;
the DeiT-S-shaped ViT (random weights, seed 0: no pretrained DeiT-S is available offline):
mean cosine of the logits on 32 held-out random images. Latency: onnxruntime CPU, one
intra-op thread, quantized original and prune(int8) interleaved (tools/harness.py), batch 1;
the speedup (median before / after) is set against the FLOPs cut (FLOPs before / after).

Quantizer settings (what a user would pass): static QDQ and QOperator quantize only the MatMuls
(op_types_to_quantize=["MatMul"]: QuantizeLinear → QLinearMatMul → DequantizeLinear in QOperator), MinMax calibration on the first 64 calibration samples (32
images), onnxruntime's default types, per tensor or per channel; quantize_dynamic: int8 weights,
per tensor, no reduce_range. The pruner calibrates on 128 sentences (MiniLM, from the
2,000-sentence corpus of tools/export_minilm.py) or 32 random images (ViT). With the default op types MiniLM's attention-mask Where and the
masked score Add (float32 min, about -3.4e38) get a QDQ pair whose scale is ~1e36, every attention
score rounds to the same value, and the unpruned int8 model scores 0.35 against fp32.

    python tools/bench_quantized.py [--models minilm deit_s] [--forms qdq-tensor qdq-channel qoperator dynamic]
                                    [--budgets 0.7 0.5] [--rows build/quantized_rows.jsonl]
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from harness import BUILD, DOCS, ROOT, cpu_name, interleaved


from onnxsnp import prune

FORMS = ("qdq-tensor", "qdq-channel", "qoperator", "dynamic")
QUANT_SAMPLES = 64  # calibration samples of the static quantizer
PRUNE_SAMPLES = 128  # calibration samples of the pruner
RUNS = 30


def quantize(form: str, source: Path, target: Path, calib: dict[str, np.ndarray]) -> Path:
    """`source` quantized in `form` by onnxruntime (settings in the module docstring)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if form == "dynamic":
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        return target
    count = min(QUANT_SAMPLES, len(next(iter(calib.values()))))
    feeds = [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, count, 8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    quantize_static(str(source), str(target), Reader(),
                    quant_format=QuantFormat.QOperator if form == "qoperator" else QuantFormat.QDQ,
                    per_channel=form == "qdq-channel", op_types_to_quantize=["MatMul"])
    return target


class MiniLM:
    name = "all-MiniLM-L6-v2"

    def __init__(self, folder: Path, scratch: Path):
        from eval_minilm import embed

        self.embed, self.source = embed, folder / "minilm.onnx"
        if not self.source.exists():
            raise SystemExit(f"{self.source} is missing: run tools/export_minilm.py --out-dir {folder}")
        data = np.load(folder / "eval.npz")
        self.ids, self.mask = data["input_ids"][:200].astype(np.int64), data["attention_mask"][:200].astype(np.int64)
        self.reference = embed(self.source, self.ids, self.mask)
        corpus = np.load(folder / "calib2000.npz")
        self.calib = {k: v[:PRUNE_SAMPLES].astype(np.int64) for k, v in corpus.items()}
        self.feed = {"input_ids": self.ids[:1], "attention_mask": self.mask[:1]}

    def score(self, path: Path) -> float:
        return float((self.embed(path, self.ids, self.mask) * self.reference).sum(axis=1).mean())


class DeitS:
    name = "DeiT-S-shaped ViT (random weights)"

    def __init__(self, folder: Path, scratch: Path):
        import torch
        from torch_models import DEIT_CONFIGS, VisionTransformer, export_legacy

        self.source = scratch / "deit_s.onnx"
        torch.manual_seed(0)
        model = VisionTransformer(img_size=224, patch_size=16, num_classes=1000, **DEIT_CONFIGS["deit_small"])
        export_legacy(model.eval(), (torch.randn(1, 3, 224, 224),), str(self.source), ["pixel_values"], ["logits"],
                      {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        rng = np.random.default_rng(0)
        # 32 images of 197 tokens: 6,304 positions, about as many as MiniLM's 128 padded sentences (6,144)
        self.calib = {"pixel_values": rng.standard_normal((32, 3, 224, 224)).astype(np.float32)}
        self.held = rng.standard_normal((32, 3, 224, 224)).astype(np.float32)  # drawn after: not calibration
        self.reference = self._logits(self.source)
        self.feed = {"pixel_values": self.held[:1]}

    def _logits(self, path: Path) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = np.concatenate([session.run(None, {"pixel_values": self.held[i:i + 8]})[0] for i in range(0, 32, 8)])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def score(self, path: Path) -> float:
        return float((self._logits(path) * self.reference).sum(axis=1).mean())


TASKS = {"minilm": MiniLM, "deit_s": DeitS}


# the commit whose code runs: read once, as the modules were imported at start
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip() or "unknown"
if subprocess.run(["git", "status", "--porcelain", "onnxsnp"], cwd=ROOT, capture_output=True, text=True).stdout:
    COMMIT += "+changes"  # onnxsnp differs from the commit


def measure(task, form: str, budget: float, scratch: Path, float_pruned: Path, quantized: Path) -> dict:
    """One row: both int8 models of `form` at `budget`, scored and timed."""
    reference = quantize(form, float_pruned, scratch / f"ref_{form}_{budget}.onnx", task.calib)
    started = time.perf_counter()
    pruned, report = prune(str(quantized), target_flops=budget, calib=task.calib)
    seconds = time.perf_counter() - started
    target = scratch / f"pruned_{form}_{budget}.onnx"
    onnx.save(pruned, str(target))
    del pruned
    before, after = interleaved([quantized, target], task.feed, runs=RUNS)
    return {"model": task.name, "form": form, "budget": budget, "commit": COMMIT,
            "int8": task.score(quantized), "float_pruned": task.score(float_pruned), "prune_int8": task.score(target), "quantize_pruned": task.score(reference),
            "flops_cut": report.flops_before / report.flops_after, "speedup": before["median_ms"] / after["median_ms"],
            "ms_before": before["median_ms"], "ms_after": after["median_ms"], "prune_s": round(seconds, 1)}


def render(rows: list[dict], command: str) -> str:
    # the docstring's paragraphs, bullets kept on their own lines
    about = [p.replace("\n* ", "\0").replace("\n", " ").replace("\0", "\n* ") for p in __doc__.split("\n\n")[1:5]]
    lines = ["# Pruning quantized models (issue 29)", "", "Reproduce (after `python tools/export_minilm.py`, which "
             "writes build/minilm):", "", f"    {command}", "", *[line for p in about for line in (p, "")],
             "| model | form | --target-flops | int8 unpruned | prune(fp32) | prune(int8) | quantize(prune(fp32)) | "
             "gap | FLOPs cut | speedup | speedup ÷ cut |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = r["prune_int8"] - r["quantize_pruned"]
        lines.append(f"| {r['model']} | {r['form']} | {r['budget']} | {r['int8']:.3f} | {r['float_pruned']:.3f} | "
                     f"{r['prune_int8']:.3f} | "
                     f"{r['quantize_pruned']:.3f} | {gap:+.3f} | {r['flops_cut']:.2f}× | {r['speedup']:.2f}× | "
                     f"{r['speedup'] / r['flops_cut']:.2f} |")
    lines += ["", "gap: prune(int8) − quantize(prune(fp32)); the goal is gap ≥ −0.01 and speedup ÷ cut ≥ 0.9. "
              f"Scores are cosines against the float original. Latency: {RUNS} interleaved rounds, batch 1, one "
              f"thread, on {platform.machine()} {cpu_name()} shared with other jobs (noisy); int8 kernels differ "
              f"between CPUs (VNNI, AVX2), so other machines give other speedups. Measured on commit(s) "
              f"{', '.join(sorted({r['commit'] for r in rows}))}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "deit_s"], choices=TASKS)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--minilm-dir", type=Path, default=BUILD / "minilm")
    parser.add_argument("--rows", type=Path, help="JSON-lines file: rows kept as measured and reused")
    parser.add_argument("--from-rows", action="store_true", help="only render what --rows holds")
    parser.add_argument("--out", type=Path, default=DOCS / "QUANTIZED.md")
    parser.add_argument("--keep", type=Path, help="write the models here (default: a temporary folder)")
    args = parser.parse_args()
    kept = [json.loads(line) for line in args.rows.read_text().splitlines()] if args.rows and args.rows.exists() else []
    done = {(r["model"], r["form"], r["budget"]) for r in kept}
    if not args.from_rows:
        with tempfile.TemporaryDirectory(prefix="bench_quantized_") as folder:
            scratch = args.keep or Path(folder)
            scratch.mkdir(parents=True, exist_ok=True)
            for name in args.models:
                task = TASKS[name](args.minilm_dir, scratch)
                wanted = [(f, b) for b in args.budgets for f in args.forms if (task.name, f, b) not in done]
                quantized = {f: quantize(f, task.source, scratch / f"{f}.onnx", task.calib) for f, _ in wanted}
                for budget in sorted({b for _, b in wanted}, reverse=True):
                    float_pruned, _ = prune(str(task.source), target_flops=budget, calib=task.calib)
                    onnx.save(float_pruned, str(scratch / f"float_pruned_{budget}.onnx"))
                    del float_pruned
                    for form in [f for f, b in wanted if b == budget]:
                        row = measure(task, form, budget, scratch, scratch / f"float_pruned_{budget}.onnx",
                                      quantized[form])
                        print(json.dumps(row), flush=True)
                        kept.append(row)
                        if args.rows:
                            args.rows.parent.mkdir(parents=True, exist_ok=True)
                            with args.rows.open("a") as out:
                                out.write(json.dumps(row) + "\n")
    command = "python tools/bench_quantized.py " + shlex.join(
        ["--models", *args.models, "--budgets", *map(str, args.budgets)]
        + (["--forms", *args.forms] if args.forms != list(FORMS) else []))
    args.out.write_text(render(kept, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
