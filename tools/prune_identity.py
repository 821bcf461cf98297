"""Prune a fixed matrix of models and write every pruned model's bytes to a folder; `--compare`
checks two such folders byte for byte. A refactor that must not change behaviour runs it before
(on the parent commit) and after, then compares: any differing file names the case that changed.

The matrix: the shipped ViT (models/digits_vit.onnx with its calibration) with every criterion,
plus whole-block removal, a FLOPs target and head pruning; a tiny Llama decoder exported with
torch's dynamo exporter (the test suite's `llama-dynamo` fixture) the same way; and the hand-built
graphs of every attention form of the test suite (tests/graphs.py, tests/decoder_graphs.py).
A case that fails writes its error message instead, so a change in what fails is caught too.

    PYTHONPATH=tests:tools python tools/prune_identity.py /tmp/before --models /tmp/identity-models
    PYTHONPATH=tests:tools python tools/prune_identity.py /tmp/after --models /tmp/identity-models
    python tools/prune_identity.py --compare /tmp/before /tmp/after

`--models` keeps the exported decoder between the two runs: an export is not byte-stable across
processes, and both runs must prune the same input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
CRITERIA = ("snp", "snp-paper", "l2", "random")


def _vit_cases() -> dict[str, tuple[str, dict]]:
    model, calib = str(ROOT / "models/digits_vit.onnx"), str(ROOT / "models/digits_vit_calib.npz")
    cases = {f"vit-{c}": (model, dict(ratio=0.5, calib=calib, criterion=c)) for c in CRITERIA}
    cases["vit-blocks"] = (model, dict(ratio=0.25, calib=calib, blocks=1))
    cases["vit-target-flops"] = (model, dict(calib=calib, target_flops=0.6))
    cases["vit-heads"] = (model, dict(ratio=0.25, calib=calib, heads=0.5, compensate="bias"))
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
    return cases


def _graph_cases(folder: Path) -> dict[str, tuple[str, dict]]:
    import decoder_graphs as dg
    import graphs

    built = {"softmax": graphs.softmax_attention(), "softmax-qdq": graphs.softmax_attention("tensor"),
             "fused-split": graphs.fused_qkv("Split"), "fused-gather": graphs.fused_qkv("Gather"),
             "fused-slice": graphs.fused_qkv("Slice"), "fused-split-first": graphs.fused_qkv(split_first=True),
             "fused-matmul": graphs.fused_matmul_scores(), "onnx-attention": graphs.onnx_attention(),
             "ort-attention": graphs.ort_attention(), "ort-mha": graphs.ort_multi_head_attention(),
             "decoder-half": dg.decoder_attention(), "decoder-interleaved": dg.decoder_attention(rotary="interleaved"),
             "decoder-qknorm-head": dg.decoder_attention(qk_norm="head"),
             "decoder-qknorm-all": dg.decoder_attention(qk_norm="all"),
             "gqa-packed": dg.group_query_attention(), "gqa-separate": dg.group_query_attention(separate=True)}
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name, model in built.items():
        path = folder / f"{name}.onnx"
        onnx.save(model, str(path))
        for criterion in ("snp", "random"):
            cases[f"graph-{name}-{criterion}"] = (str(path), dict(ratio=0.5, criterion=criterion, calib_samples=8,
                                                                 heads=0.5))
    return cases


def prune_all(out: Path, models: Path, only: str | None) -> None:
    from onnxsnp import SnpError, prune

    out.mkdir(parents=True, exist_ok=True)
    cases = {**_vit_cases(), **_llama_cases(models), **_graph_cases(models / "graphs")}
    for name, (path, keywords) in cases.items():
        if only and only not in name:
            continue
        try:
            pruned, _ = prune(path, **keywords)
            (out / f"{name}.onnx").write_bytes(pruned.SerializeToString())
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
                        help="folder for the exported decoder and the hand-built graphs (kept between runs)")
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
