"""Top-1 accuracy of digits ONNX models on the held-out split written by train_digits_vit.py.

Needs only numpy and onnxruntime, so it can score pruned models anywhere onnxsnp runs.

    python tools/eval_digits.py MODEL.onnx [MODEL2.onnx ...] [--data models/digits_vit_heldout.npz]
                                [--json results.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from harness import MODELS

EVAL_BATCH = 256  # bounds memory for larger models; the split has only 450 samples


def top1_accuracy(model_path: Path, pixel_values: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    predictions = [
        session.run(None, {"pixel_values": pixel_values[start:start + EVAL_BATCH]})[0].argmax(axis=1)
        for start in range(0, len(pixel_values), EVAL_BATCH)
    ]
    return float((np.concatenate(predictions) == labels).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files taking pixel_values")
    parser.add_argument("--data", type=Path, default=MODELS / "digits_vit_heldout.npz")
    parser.add_argument("--json", type=Path, help="also write {model path: accuracy} here")
    args = parser.parse_args(argv)

    with np.load(args.data) as data:
        pixel_values = data["pixel_values"].astype(np.float32)
        labels = data["labels"].astype(np.int64)

    results: dict[str, float] = {}
    for model_path in args.models:
        results[str(model_path)] = top1_accuracy(model_path, pixel_values, labels)
        print(f"{model_path}: top-1 {results[str(model_path)]:.4f} ({len(labels)} samples)")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
