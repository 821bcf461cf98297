"""Prune a fixed matrix of models and write every pruned model's bytes to a folder; `--compare`
checks two such folders byte for byte. A refactor that must not change behaviour runs it before
(on the parent commit) and after, then compares: any differing file names the case that changed.

The matrix: the shipped ViT (models/digits_vit.onnx with its calibration) with every criterion,
plus whole-block removal, a FLOPs target, head and residual-channel pruning; a tiny Llama decoder exported with
torch's dynamo exporter (the test suite's `llama-dynamo` fixture) the same way; and the hand-built
graphs of every attention form of the test suite (tests/graphs.py, tests/decoder_graphs.py).
A case that fails writes its error message instead, so a change in what fails is caught too.

    PYTHONPATH=tools python tests/prune_identity.py /tmp/before --models /tmp/identity-models
    PYTHONPATH=tools python tests/prune_identity.py /tmp/after --models /tmp/identity-models
    python tests/prune_identity.py --compare /tmp/before /tmp/after

It lives with the tests (whose hand-built graphs it prunes; tools/ never imports the tests) and is
no test itself: the "before" run needs the parent commit checked out.

The hand-built graphs go through the stages the tests call (match, score and plan, rewrite: the
whole pipeline wants shapes they do not declare). `--models` keeps the exported decoder between
the two runs: an export is not byte-stable across processes, and both runs must prune the same input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
CRITERIA = ("snp", "snp-paper", "l2", "random")


def _vit_cases() -> dict[str, tuple[str, dict]]:
    model, calib = str(ROOT / "models/digits_vit.onnx"), str(ROOT / "models/digits_vit_calib.npz")
    cases = {f"vit-{c}": (model, dict(ratio=0.5, calib=calib, criterion=c)) for c in CRITERIA}
    cases["vit-blocks"] = (model, dict(ratio=0.25, calib=calib, blocks=1))
    cases["vit-target-flops"] = (model, dict(calib=calib, target_flops=0.6))
    cases["vit-heads"] = (model, dict(ratio=0.25, calib=calib, heads=0.5, compensate="bias"))
    cases["vit-residual"] = (model, dict(ratio=0.25, calib=calib, residual=0.25))
    cases["vit-residual-lstsq"] = (model, dict(ratio=0.25, calib=calib, residual=0.25, compensate="lstsq"))
    return cases


def _llama_cases(folder: Path) -> dict[str, tuple[str, dict]]:
    from decoder_export import export_dynamo, tiny_llama
    from decoders import calibration

    path = folder / "llama-dynamo.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        export_dynamo(tiny_llama(), path)
    calib = calibration(100)
    cases = {f"llama-{c}": (str(path), dict(ratio=0.5, calib=calib, criterion=c)) for c in CRITERIA}
    cases["llama-blocks"] = (str(path), dict(ratio=0.25, calib=calib, blocks=1))
    cases["llama-target-flops"] = (str(path), dict(calib=calib, target_flops=0.7))
    cases["llama-heads"] = (str(path), dict(ratio=0.25, calib=calib, heads=0.5))
    cases["llama-residual"] = (str(path), dict(ratio=0.25, calib=calib, residual=0.25))
    return cases


def _graph_cases() -> dict[str, tuple[onnx.ModelProto, dict]]:
    """Every hand-built attention form, with its calibration feed (as the tests prune them)."""
    import decoder_graphs as dg
    import graphs

    x = {"x": np.random.default_rng(0).standard_normal((4, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)}
    encoders = {"softmax": graphs.softmax_attention(), "softmax-qdq": graphs.softmax_attention("tensor"),
                "fused-split": graphs.fused_qkv("Split"), "fused-gather": graphs.fused_qkv("Gather"),
                "fused-slice": graphs.fused_qkv("Slice"), "fused-split-first": graphs.fused_qkv(split_first=True),
                "fused-matmul": graphs.fused_matmul_scores(), "onnx-attention": graphs.onnx_attention(),
                "ort-attention": graphs.ort_attention(), "ort-mha": graphs.ort_multi_head_attention()}
    cases = {name: (model, x) for name, model in encoders.items()}
    for name, kwargs in {"decoder-half": {}, "decoder-interleaved": {"rotary": "interleaved"},
                         "decoder-qknorm-head": {"qk_norm": "head"}, "decoder-qknorm-all": {"qk_norm": "all"}}.items():
        model = dg.decoder_attention(**kwargs)
        feed = dg.feed(model, 6, style=kwargs.get("rotary", "half"))
        cases[name] = (model, {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in feed.items()})
    for name, separate in (("gqa-packed", False), ("gqa-separate", True)):
        model = dg.group_query_attention(separate)
        feed = {k: np.repeat(v, 4, axis=0) if k in ("x", "seqlens_k") else v for k, v in dg.gqa_feed(model, 6).items()}
        cases[name] = (model, feed)
    return cases


def prune_all(out: Path, models: Path, only: str | None) -> None:
    from onnxsnp import SnpError, prune
    from onnxsnp.ir.graph import ModelGraph
    from onnxsnp.match import find_blocks
    from onnxsnp.pipeline import make_plan
    from onnxsnp.plan import Ratios
    from onnxsnp.rewrite.rewriting import rewrite

    out.mkdir(parents=True, exist_ok=True)
    runs = {name: (lambda p=path, k=keywords: prune(p, **k)[0])
            for name, (path, keywords) in {**_vit_cases(), **_llama_cases(models)}.items()}
    for name, (model, feed) in _graph_cases().items():  # the stages the tests call: match, score and plan, rewrite
        # GroupQueryAttention's scalar total_sequence_length cannot be split into scoring batches
        for criterion in ("random",) if name.startswith("gqa") else ("snp", "random"):
            def run(model=model, feed=feed, criterion=criterion):
                g = ModelGraph(model)
                plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0, heads=0.5), criterion, feed, batch=1, seed=3)
                return rewrite(g, plan)
            runs[f"graph-{name}-{criterion}"] = run
    for name, run in runs.items():
        if only and only not in name:
            continue
        try:
            (out / f"{name}.onnx").write_bytes(run().SerializeToString())
        except (SnpError, ValueError) as error:  # what fails, and how, must stay the same too
            (out / f"{name}.error").write_text(f"{type(error).__name__}: {error}\n")
        print(name, flush=True)


def compare(before: Path, after: Path) -> int:
    names = sorted({p.name for p in before.iterdir()} | {p.name for p in after.iterdir()})
    differ = [n for n in names if not (before / n).exists() or not (after / n).exists()
              or (before / n).read_bytes() != (after / n).read_bytes()]
    for name in names:
        print(f"{'DIFFERS' if name in differ else 'same   '} {name}")
    print(f"{len(names) - len(differ)} of {len(names)} files byte-identical")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for the pruned models")
    parser.add_argument("--models", type=Path, default=Path("/tmp/identity-models"),
                        help="folder for the exported decoder (kept between runs)")
    parser.add_argument("--only", help="only the cases whose name contains this")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give a folder for the pruned models, or --compare BEFORE AFTER")
    prune_all(args.out, args.models, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
