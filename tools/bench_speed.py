"""Does a pruned model run as much faster as its FLOPs cut promises? onnxruntime CPU, batch 1.

DeiT-T/S/B-shaped ViTs (224×224, patch 16, 1000 classes) and a BERT-base-shaped encoder
(768 wide, 12 layers, 12 heads, FFN 3072, sequence 128), random weights (seed 0), exported with
the legacy exporter and pruned with `onnxsnp.prune(ratio=r)` on synthetic calibration: this
measures speed only, not accuracy. Each pruned model is timed interleaved with its original
(tools/harness.py: one intra-op thread, warm-up, median and min over the runs). Per point:
FLOPs cut = MACs before / MACs after, speedup = median before / median after, and
speedup ÷ FLOPs cut; points below 0.95 are marked "below target".

    python tools/bench_speed.py [--models deit_tiny deit_small deit_base bert_base] [--ratios 0.3 0.5 0.7]
                                [--runs 30] [--align N] [--out docs/SPEED.md] [--profile] [--smoke]
                                [--ort-optimizer]

--ort-optimizer: instead, run both models through onnxruntime.transformers.optimizer (model type
bert or vit, num_heads and the pruned hidden size given) and time the optimized pair; the table
also counts the fused Attention ops, and goes to docs/SPEED_OPTIMIZED.md by default.

--profile also runs onnxruntime's profiler on the original and each pruned model (10 runs) and
prints where the time goes per op type. --smoke: deit_tiny at ratio 0.5, 5 runs, written to a
temporary file unless --out is given (for CI).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from harness import DOCS, cpu_name, interleaved, invocation, write_page

from collect_results import collect

from onnxsnp import prune

MODELS = ["deit_tiny", "deit_small", "deit_base", "bert_base"]
SEQUENCE = 128  # BERT benchmark length
CALIB_SAMPLES = 16
TARGET = 0.95  # speedup ÷ FLOPs cut below this is reported as "below target"
PROFILE_RUNS = 10
TOP_OPS = 8
LAYOUT_OPS = ("Reshape", "Transpose", "Split", "Squeeze", "Slice", "Concat")


def export(name: str, folder: Path) -> Path:
    """Export one model (random weights, seed 0) into folder with the legacy exporter."""
    import torch
    from torch_models import DEIT_CONFIGS, HFEncoder, VisionTransformer, export_legacy

    path = folder / f"{name}.onnx"
    torch.manual_seed(0)
    if name == "bert_base":
        from transformers import BertConfig, BertModel

        # tiny_bert's construction at BERT-base size (tiny_bert caps positions at 64)
        cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, attn_implementation="eager")
        ids = torch.randint(0, 30522, (1, SEQUENCE))
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"}}
        export_legacy(HFEncoder(BertModel(cfg).eval()), (ids, torch.ones_like(ids)), str(path),
                      ["input_ids", "attention_mask"], ["last_hidden_state"], axes)
    else:
        model = VisionTransformer(img_size=224, patch_size=16, num_classes=1000, **DEIT_CONFIGS[name])
        export_legacy(model, (torch.randn(1, 3, 224, 224),), str(path), ["pixel_values"], ["logits"],
                      {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    return path


def inputs(name: str, samples: int) -> dict[str, np.ndarray]:
    """Synthetic inputs. BERT's are built here at sequence 128 rather than left to onnxsnp's
    synthetic default (32 tokens), so that the reported MACs are those of the timed shape."""
    rng = np.random.default_rng(0)
    if name == "bert_base":
        ids = rng.integers(0, 30522, (samples, SEQUENCE), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {"pixel_values": rng.standard_normal((samples, 3, 224, 224)).astype(np.float32)}


def profile(path: Path, feed: dict[str, np.ndarray], folder: Path) -> dict[str, float]:
    """Milliseconds per run by op type, from onnxruntime's profiler over PROFILE_RUNS runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as in the latency runs
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(PROFILE_RUNS + 1):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    # the first run is a warm-up (allocations, first-touch of weights): drop its events
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    warm = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        # each node has a *_kernel_time event (the op itself) plus fence events without op_name
        if e.get("cat") == "Node" and e["ts"] >= warm and "op_name" in e.get("args", {}):
            totals[e["args"]["op_name"]] += e["dur"] / 1000 / PROFILE_RUNS
    return dict(totals)


def print_profile(label: str, before: dict[str, float], after: dict[str, float]) -> None:
    """The union of both models' top op types, side by side: ms per run and share of the total."""
    top = sorted(before, key=before.get, reverse=True)[:TOP_OPS]
    top += [op for op in sorted(after, key=after.get, reverse=True)[:TOP_OPS] if op not in top]
    # layout ops always shown: pruning rewrites their shapes, so they are the first suspects when
    # the speedup falls short of the FLOPs cut
    top += [op for op in LAYOUT_OPS if op not in top and (op in before or op in after)]
    total_b, total_a = sum(before.values()) or 1.0, sum(after.values()) or 1.0
    print(f"\nprofile {label} ({PROFILE_RUNS} runs, ms/run by op type; top {TOP_OPS} of each, and layout ops)")
    print(f"  {'op type':<22}{'original':>18}{'pruned':>18}{'after/before':>14}")
    for op in top:
        b, a = before.get(op, 0.0), after.get(op, 0.0)
        ratio = f"{a / b:.2f}" if b else "–"
        print(f"  {op:<22}{b:>9.3f} ({b / total_b:5.1%}){a:>9.3f} ({a / total_a:5.1%}){ratio:>14}")
    print(f"  {'all ops':<22}{total_b:>9.3f}{'':9}{total_a:>9.3f}{'':9}{total_a / total_b:>14.2f}")


def optimized(name: str, source: Path, target: Path, report, folder: Path) -> tuple[list[Path], tuple[int, int]]:
    """Both models through onnxruntime.transformers.optimizer; returns their paths and how many
    attention ops it fused in each."""
    from onnxruntime.transformers.optimizer import optimize_model

    block = next(b for b in report.blocks if b.kind == "attention")
    paths, counts = [], []
    for path, heads, width in ((source, block.heads, block.heads * block.qk_dim_before),
                               (target, block.heads_after, block.heads_after * block.qk_dim_after)):
        model = optimize_model(str(path), model_type="bert" if name == "bert_base" else "vit",
                               num_heads=heads, hidden_size=width)
        out = folder / f"{path.stem}_optimized.onnx"
        model.save_model_to_file(str(out))
        paths.append(out)
        counts.append(sum(node.op_type in ("Attention", "MultiHeadAttention") for node in model.model.graph.node))
    return paths, (counts[0], counts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--align", type=int, default=1, help="passed to prune(align=N)")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default docs/SPEED.md)")
    parser.add_argument("--profile", action="store_true", help="print onnxruntime profiles per op type")
    parser.add_argument("--smoke", action="store_true", help="deit_tiny, ratio 0.5, 5 runs (CI)")
    parser.add_argument("--ort-optimizer", action="store_true",
                        help="time both models after onnxruntime.transformers.optimizer")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.ratios, args.runs = ["deit_tiny"], [0.5], 5
    if args.out is None and args.smoke:  # --smoke must not overwrite the committed table
        handle, name = tempfile.mkstemp(prefix="SPEED_smoke_", suffix=".md")
        os.close(handle)
        args.out = Path(name)
    args.out = args.out or DOCS / ("SPEED_OPTIMIZED.md" if args.ort_optimizer else "SPEED.md")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as folder:  # exports removed even on failure
        scratch = Path(folder)
        for name in args.models:
            started = time.perf_counter()
            source = export(name, scratch)
            print(f"{name}: exported in {time.perf_counter() - started:.0f} s", flush=True)
            feed = inputs(name, 1)
            base_profile = profile(source, feed, scratch) if args.profile else {}
            for ratio in args.ratios:
                started = time.perf_counter()
                pruned, report = prune(str(source), ratio=ratio, align=args.align, calib=inputs(name, CALIB_SAMPLES),
                                       calib_samples=CALIB_SAMPLES)
                target = scratch / f"{name}_{ratio}.onnx"
                onnx.save(pruned, str(target))
                del pruned  # deit_base copies are ~350 MB each
                pruned_s = time.perf_counter() - started
                timed, fused = [source, target], ""
                if args.ort_optimizer:
                    timed, counts = optimized(name, source, target, report, scratch)
                    fused = f" {counts[0]} / {counts[1]} |"
                before, after = interleaved(timed, feed, runs=args.runs)
                cut = report.macs_before / report.macs_after
                speedup = before["median_ms"] / after["median_ms"]
                mark = "" if speedup / cut >= TARGET else " below target"
                rows.append(f"| {name} | {ratio} | {report.macs_before / 1e9:.3f} → {report.macs_after / 1e9:.3f} | "
                            f"{cut:.2f}× | {before['median_ms']:.2f} ({before['min_ms']:.2f}) | "
                            f"{after['median_ms']:.2f} ({after['min_ms']:.2f}) | {speedup:.2f}× | "
                            f"{speedup / cut:.3f}{mark} |{fused}")
                print(f"{name} r={ratio}: pruned in {pruned_s:.0f} s; GMACs {report.macs_before / 1e9:.3f} → "
                      f"{report.macs_after / 1e9:.3f} (cut {cut:.2f}×); median {before['median_ms']:.2f} → "
                      f"{after['median_ms']:.2f} ms (speedup {speedup:.2f}×); ratio {speedup / cut:.3f}{mark}",
                      flush=True)
                if args.profile:
                    print_profile(f"{name} r={ratio}", base_profile, profile(target, feed, scratch))
                for path in {target, *timed} - {source}:
                    path.unlink()
            source.unlink()  # before the next export: keeps at most one model and one pruned copy on disk

    command = invocation()
    header = [
        "# Speed: pruned models against their FLOPs cut",
        "",
        f"Generated by `{command.strip()}` (tools/bench_speed.py). Random weights (seed 0), legacy ONNX export, "
        f"`onnxsnp.prune(ratio=r, align={args.align}, calib_samples={CALIB_SAMPLES})` on synthetic calibration. "
        f"onnxruntime {ort.__version__} CPUExecutionProvider, one intra-op thread, batch 1 "
        f"(ViTs 224×224, BERT sequence {SEQUENCE}); {args.runs} runs per model after 3 warm-up runs, original and "
        f"pruned interleaved round by round; {platform.machine()} {cpu_name()}.",
        "",
        f"FLOPs cut = MACs before / MACs after; speedup = median before / median after; "
        f"\"below target\" where speedup ÷ FLOPs cut < {TARGET}.",
        "",
        "| model | ratio | GMACs before → after | FLOPs cut | before ms median (min) | after ms median (min) "
        "| speedup | speedup ÷ FLOPs cut |" + (" fused attention ops before / after |" if args.ort_optimizer else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if args.ort_optimizer else ""),
    ]
    if args.ort_optimizer:
        header[0] = "# Speed after onnxruntime's transformers optimizer"
        header[2] += (" Both models then went through `onnxruntime.transformers.optimizer.optimize_model` (model type "
                      "bert or vit, num_heads and hidden size given: the pruned model's are heads × kept Q/K width); "
                      "the optimized pair is what is timed.")
    write_page(args.out, header + rows)
    if args.out.resolve().parent == (DOCS).resolve():
        collect()  # docs/RESULTS.md carries a copy of every table


if __name__ == "__main__":
    main()
