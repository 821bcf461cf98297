"""Pruning in a deployment pipeline: SNP before onnxruntime's dynamic int8 quantization and its
transformers optimizer, against quantization alone. onnxruntime CPU, one thread, batch 1.

Per model, these variants are written and timed interleaved in one run (tools/harness.py: one
intra-op thread, 3 warm-up runs, then round by round, median and min):

    original                      the exported model
    quantize                      onnxruntime.quantization.quantize_dynamic (int8 weights)
    optimize → quantize           onnxruntime.transformers.optimizer.optimize_model, then quantize
    prune                         onnxsnp.prune(ratio=0.5)  (SNP's default ratio)
    prune → quantize
    prune → optimize → quantize   the optimizer told the pruned width (heads × kept Q/K width)

Models: the shipped digits ViT (trained: held-out top-1 of each variant too), a DeiT-S-shaped
ViT (224×224, patch 16, 384 wide, 12 layers, 6 heads) and a BERT-base-shaped encoder
(transformers BertModel, base config, sequence 128), both with random weights (seed 0):
their latency is what counts, their fidelity says only how far each step moves the outputs.
Fidelity: mean over held-out samples of the cosine between the variant's and the original's
first output, each sample flattened.

    python tools/bench_pipeline.py [--models digits_vit deit_small bert_base] [--runs 30]
                                   [--out docs/PIPELINE.md] [--smoke]

--smoke: the digits ViT and tiny ViT/BERT exports (2 layers, 32 wide), 5 runs, written to a
temporary file unless --out is given (for CI: seconds).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from harness import DOCS, MODELS, cpu_name, interleaved, invocation, write_page

from collect_results import collect

from onnxsnp import prune

RATIO = 0.5
CALIB_SAMPLES = 32
EVAL_SAMPLES = 16
SEQUENCE = 128  # BERT-base benchmark length
SMOKE_SEQUENCE = 16


class Variant(Enum):
    ORIGINAL = "original"
    QUANTIZE = "quantize"
    OPTIMIZE_QUANTIZE = "optimize → quantize"
    PRUNE = "prune"
    PRUNE_QUANTIZE = "prune → quantize"
    PRUNE_OPTIMIZE_QUANTIZE = "prune → optimize → quantize"


@dataclass(frozen=True)
class Bench:
    """One model of the benchmark: how to make it and its inputs."""
    name: str
    family: str  # "vit" or "bert": the optimizer's model type
    make: Callable[[Path], Path]
    inputs: Callable[[int, int], dict[str, np.ndarray]]  # (samples, seed) -> feed
    labels: np.ndarray | None = None  # held-out labels, for top-1 (the digits model)
    eval_feed: dict[str, np.ndarray] | None = None  # fixed held-out inputs instead of inputs(EVAL_SAMPLES, 2)


def _digits() -> Bench:
    with np.load(MODELS / "digits_vit_heldout.npz") as data:
        held_out = {"pixel_values": data["pixel_values"].astype(np.float32)}
        labels = data["labels"].astype(np.int64)
    with np.load(MODELS / "digits_vit_calib.npz") as data:
        calib = data["pixel_values"].astype(np.float32)

    def inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
        return {"pixel_values": calib[:samples] if seed == 1 else held_out["pixel_values"][:samples]}

    return Bench("digits_vit", "vit", lambda folder: MODELS / "digits_vit.onnx", inputs, labels, held_out)


def _vit(name: str, size: int, patch: int, classes: int, **config) -> Bench:
    def make(folder: Path) -> Path:
        import torch
        from torch_models import VisionTransformer, export_legacy

        torch.manual_seed(0)
        model = VisionTransformer(img_size=size, patch_size=patch, num_classes=classes, **config)
        path = folder / f"{name}.onnx"
        export_legacy(model, (torch.randn(1, 3, size, size),), str(path), ["pixel_values"], ["logits"],
                      {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        return path

    def inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
        return {"pixel_values": np.random.default_rng(seed).standard_normal((samples, 3, size, size), np.float32)}

    return Bench(name, "vit", make, inputs)


def _bert(name: str, sequence: int, **config) -> Bench:
    def make(folder: Path) -> Path:
        import torch
        from torch_models import HFEncoder, export_legacy
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = HFEncoder(BertModel(BertConfig(attn_implementation="eager", **config)).eval())
        ids = torch.randint(0, config["vocab_size"], (1, sequence))
        path = folder / f"{name}.onnx"
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"}}
        export_legacy(model, (ids, torch.ones_like(ids)), str(path), ["input_ids", "attention_mask"],
                      ["last_hidden_state"], axes)
        return path

    def inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
        ids = np.random.default_rng(seed).integers(0, config["vocab_size"], (samples, sequence), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    return Bench(name, "bert", make, inputs)


BENCHES: dict[str, Callable[[], Bench]] = {
    "digits_vit": _digits,
    "deit_small": lambda: _vit("deit_small", 224, 16, 1000, embed_dim=384, depth=12, num_heads=6),
    "bert_base": lambda: _bert("bert_base", SEQUENCE, vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                               num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
    "tiny_vit": lambda: _vit("tiny_vit", 32, 8, 10, embed_dim=32, depth=2, num_heads=4),
    "tiny_bert": lambda: _bert("tiny_bert", SMOKE_SEQUENCE, vocab_size=100, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
}
DEFAULT_MODELS = ["digits_vit", "deit_small", "bert_base"]
SMOKE_MODELS = ["digits_vit", "tiny_vit", "tiny_bert"]


def quantize(source: Path, target: Path, optimized: bool = False) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the optimizer's com.microsoft ops defeat the quantizer's shape inference; untyped tensors
    # in these models are float
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if optimized else {}
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, extra_options=extra)
    return target


def optimize(source: Path, target: Path, family: str, heads: int, width: int) -> tuple[Path, int]:
    """The optimizer with the attention shape given; returns the path and the fused attention ops."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(source), model_type=family, num_heads=heads, hidden_size=heads * width)
    model.save_model_to_file(str(target))
    fused = sum(node.op_type in ("Attention", "MultiHeadAttention") for node in model.model.graph.node)
    return target, fused


def variants(bench: Bench, source: Path, folder: Path) -> tuple[dict[Variant, Path], dict[str, int]]:
    """Every variant's file, and the attention ops the optimizer fused before/after pruning."""
    pruned, report = prune(str(source), ratio=RATIO, calib=bench.inputs(CALIB_SAMPLES, 1), calib_samples=CALIB_SAMPLES)
    paths = {Variant.ORIGINAL: source, Variant.PRUNE: folder / f"{bench.name}_pruned.onnx"}
    onnx.save(pruned, str(paths[Variant.PRUNE]))
    del pruned
    block = next(b for b in report.blocks if b.kind == "attention")
    optimized, fused_before = optimize(source, folder / f"{bench.name}_opt.onnx", bench.family, block.heads,
                                       block.qk_dim_before)
    pruned_optimized, fused_after = optimize(paths[Variant.PRUNE], folder / f"{bench.name}_pruned_opt.onnx",
                                             bench.family, block.heads_after, block.qk_dim_after)
    paths[Variant.QUANTIZE] = quantize(source, folder / f"{bench.name}_int8.onnx")
    paths[Variant.OPTIMIZE_QUANTIZE] = quantize(optimized, folder / f"{bench.name}_opt_int8.onnx", optimized=True)
    paths[Variant.PRUNE_QUANTIZE] = quantize(paths[Variant.PRUNE], folder / f"{bench.name}_pruned_int8.onnx")
    paths[Variant.PRUNE_OPTIMIZE_QUANTIZE] = quantize(pruned_optimized, folder / f"{bench.name}_pruned_opt_int8.onnx",
                                                      optimized=True)
    return {v: paths[v] for v in Variant}, {"before": fused_before, "after": fused_after}


def outputs(path: Path, feed: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    """The first output over the feed, one flattened row per sample."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total = next(iter(feed.values())).shape[0]
    rows = [sess.run(None, {k: v[i:i + batch] for k, v in feed.items()})[0] for i in range(0, total, batch)]
    return np.concatenate(rows).reshape(total, -1).astype(np.float64)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def run_bench(bench: Bench, folder: Path, runs: int) -> list[str]:
    started = time.perf_counter()
    source = bench.make(folder)
    paths, fused = variants(bench, source, folder)
    print(f"{bench.name}: variants written in {time.perf_counter() - started:.0f} s", flush=True)
    timings = dict(zip(paths, interleaved(list(paths.values()), bench.inputs(1, 2), runs=runs)))
    held_out = bench.eval_feed or bench.inputs(EVAL_SAMPLES, 2)
    reference = outputs(source, held_out)
    base_ms = timings[Variant.ORIGINAL]["median_ms"]
    rows = []
    for variant, path in paths.items():
        got = outputs(path, held_out)
        cosine = mean_cosine(got, reference)
        top1 = f" {np.mean(got.argmax(axis=1) == bench.labels):.2%} |" if bench.labels is not None else ""
        median, fastest = timings[variant]["median_ms"], timings[variant]["min_ms"]
        rows.append(f"| {variant.value} | {path.stat().st_size / 2**20:.2f} | {median:.2f} ({fastest:.2f}) | "
                    f"{base_ms / median:.2f}× | {cosine:.4f} |{top1}")
        print(f"  {variant.value:<28} {median:8.2f} ms  {base_ms / median:5.2f}x  cosine {cosine:.4f}{top1}",
              flush=True)
    versus = timings[Variant.QUANTIZE]["median_ms"] / timings[Variant.PRUNE_QUANTIZE]["median_ms"]
    versus_opt = (timings[Variant.OPTIMIZE_QUANTIZE]["median_ms"]
                  / timings[Variant.PRUNE_OPTIMIZE_QUANTIZE]["median_ms"])
    header = ["", f"#### {bench.name}", "",
              f"Attention ops fused by the optimizer: {fused['before']} before pruning, {fused['after']} after. "
              f"Prune → quantize is {versus:.2f}× as fast as quantize alone; prune → optimize → quantize "
              f"{versus_opt:.2f}× as fast as optimize → quantize.", "",
              "| variant | file MB | ms median (min) | speedup vs original | output cosine vs original |"
              + (" held-out top-1 |" if bench.labels is not None else ""),
              "|---|---|---|---|---|" + ("---|" if bench.labels is not None else "")]
    return header + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, choices=list(BENCHES))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="markdown tables (default docs/PIPELINE.md)")
    parser.add_argument("--smoke", action="store_true", help="digits and tiny models, 5 runs (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.runs = args.models or SMOKE_MODELS, 5
        if args.out is None:  # --smoke must not overwrite the committed table
            handle, name = tempfile.mkstemp(prefix="PIPELINE_smoke_", suffix=".md")
            os.close(handle)
            args.out = Path(name)
    args.models = args.models or DEFAULT_MODELS
    args.out = args.out or DOCS / "PIPELINE.md"

    sections = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as folder:
        for name in args.models:
            sections += run_bench(BENCHES[name](), Path(folder), args.runs)
            for path in Path(folder).iterdir():  # at most one model's variants on disk at a time
                path.unlink()

    command = invocation()
    header = [
        "# Pipeline: prune, then quantize (and optimize)",
        "",
        f"Generated by `{command.strip()}` (tools/bench_pipeline.py). `onnxsnp.prune(ratio={RATIO})` calibrated "
        f"on {CALIB_SAMPLES} samples (the digits model: its calibration file; the others: random inputs, seed 1); "
        f"`onnxruntime.quantization.quantize_dynamic` (int8 weights, dynamic per-tensor activations; after the "
        f"optimizer with `DefaultTensorType` float); `onnxruntime.transformers.optimizer.optimize_model` (model "
        f"type bert or vit, num_heads and hidden size given: the pruned model's are heads × kept Q/K width). "
        f"Latency: onnxruntime {ort.__version__} CPUExecutionProvider, one intra-op thread, batch 1 "
        f"(BERT-base sequence {SEQUENCE}), all six variants of a model timed interleaved round by round in one "
        f"process, {args.runs} rounds after 3 warm-up runs, median (min); {platform.machine()} {cpu_name()}. "
        "The machine was shared with other jobs while this ran: absolute times are noisy, the interleaving keeps "
        "the ratios between variants fair. Fidelity: mean per-sample cosine between each variant's and the "
        f"original's output on held-out inputs ({EVAL_SAMPLES} random samples; the digits model: its 450 "
        "held-out images, with top-1). DeiT-S and BERT-base have random weights: their cosines show how far each "
        "step moves the outputs, not task accuracy.",
    ]
    write_page(args.out, header + sections)
    if args.out.resolve().parent == (DOCS).resolve():
        collect()  # docs/RESULTS.md carries a copy of every table


if __name__ == "__main__":
    main()
