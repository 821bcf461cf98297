"""The tiny-Llama rows of docs/QUANTIZED.md (decoder section): each int8 form of
tests/test_decoder_int8.py pruned at its ratio and set against quantize(prune(fp32)), with the
slow test's own helpers. Not a test itself (it lives with the tests, whose helpers it runs).

    PYTHONPATH=.:tools python tests/int8_decoder_table.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

import test_decoder_int8 as t
from decoder_export import export_dynamo, tiny_llama
from decoders import calibration, run, step_feed
from onnxsnp import prune


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="int8-decoder-"))
    source = folder / "llama.onnx"
    onnx.save(onnx.load(str(export_dynamo(tiny_llama(), folder / "export.onnx"))), str(source))
    original = onnx.load(str(source))
    ids = np.random.default_rng(99).integers(3, t.VOCAB, (4, 16))  # the fidelity test's held-out ids
    truth = run(original, step_feed(original, ids))["logits"]
    score = lambda m: t.cosine(run(m, step_feed(m, ids))["logits"], truth)  # noqa: E731
    calib = calibration(t.VOCAB)
    float_pruned, report = prune(str(source), ratio=t.RATIO, calib=calib)
    onnx.save(float_pruned, str(folder / "pruned.onnx"))
    print(f"prune(fp32) {score(float_pruned):.4f}, FLOPs cut {1 - report.flops_after / report.flops_before:.1%}")
    print("| form | int8 unpruned | prune(int8) | quantize(prune(fp32)) | gap | cache, int8 unpruned | cache, prune(int8) |")
    for form in t.FORMS:
        quantized = onnx.load(str(t.quantize(form, source, folder / f"{form}.onnx")))
        pruned, _ = prune(str(folder / f"{form}.onnx"), ratio=t.RATIO, calib=calib)
        reference = onnx.load(str(t.quantize(form, folder / "pruned.onnx", folder / f"pruned-{form}.onnx")))
        ours, theirs = score(pruned), score(reference)
        gap, scale = t.cache_gap(pruned, ids[:2, :9])
        original_gap, _ = t.cache_gap(quantized, ids[:2, :9])
        print(f"| {form} | {score(quantized):.4f} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} | "
              f"{original_gap / scale:.4f} | {gap / scale:.4f} |", flush=True)


if __name__ == "__main__":
    main()
