"""A BERT-family classifier with real accuracy to measure: which package a docstring sentence
comes from, read by the pretrained all-MiniLM-L6-v2 with a linear head.

The sentences are first sentences of docstrings of five packages (sympy, networkx, numpy,
matplotlib, pygments): `tools/data/package_sentences.tsv` (package, sentence), none of them in
the MiniLM calibration corpus or the standard-library evaluation set (`--rebuild-data`
regenerates the file from the packages installed here; the committed copy is the reference).
The head is a logistic regression on the normalised mean-pooled embeddings of the first
TRAIN_PER_CLASS sentences of each package; the rest are the evaluation set. The exported
graph takes input_ids and attention_mask and returns `logits` (encoder, pooling, L2
normalisation and the head in one ONNX file), so a pruner sees an ordinary classifier.

Writes build/minilm/classifier.onnx and classifier_eval.npz (input_ids, attention_mask,
labels); calibrate with build/minilm/calib2000.npz (run tools/export_minilm.py first).

    python tools/export_minilm_classifier.py [--out-dir build/minilm] [--rebuild-data]
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import torch

from export_minilm import (CORPUS, MAX_TOKENS, N_TOTAL, REPO, model_dir, package_sentences,
                           stdlib_sentences, tokenize)
from torch_models import HFEncoder, export_legacy

DATA = Path(__file__).resolve().parent / "data" / "package_sentences.tsv"
PACKAGES = ("sympy", "networkx", "numpy", "matplotlib", "pygments")
PER_CLASS = 220  # sentences kept per package (the smallest has a little more)
TRAIN_PER_CLASS = 120  # of which the head is fitted on these; the rest are evaluated


class Classifier(torch.nn.Module):
    """Encoder → masked mean pooling → L2 normalisation → linear head."""

    def __init__(self, encoder: torch.nn.Module, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.encoder = HFEncoder(encoder)
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
            self.head.bias.copy_(torch.from_numpy(bias.astype(np.float32)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(torch.nn.functional.normalize(pooled, dim=-1))


def rebuild_data() -> None:
    """Regenerate DATA: PER_CLASS sentences of each package, outside the calibration corpus and
    the standard-library sentences."""
    import random

    exclude = {s.lower() for s in stdlib_sentences(N_TOTAL)} | {s.lower() for s in CORPUS.read_text().splitlines()}
    pairs = package_sentences(PACKAGES, exclude)
    random.Random(0).shuffle(pairs)
    rows = []
    for package in PACKAGES:
        mine = [s for p, s in pairs if p == package]
        if len(mine) < PER_CLASS:
            raise RuntimeError(f"only {len(mine)} sentences for {package}, need {PER_CLASS}")
        rows += [(package, s) for s in mine[:PER_CLASS]]
    with DATA.open("w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows(rows)


def read_data() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(train sentences, labels, eval sentences, labels): the first TRAIN_PER_CLASS of each package train."""
    with DATA.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    train, train_y, test, test_y = [], [], [], []
    for label, package in enumerate(PACKAGES):
        mine = [s for p, s in rows if p == package]
        train += mine[:TRAIN_PER_CLASS]
        train_y += [label] * TRAIN_PER_CLASS
        test += mine[TRAIN_PER_CLASS:]
        test_y += [label] * (len(mine) - TRAIN_PER_CLASS)
    return train, np.array(train_y), test, np.array(test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "build" / "minilm")
    parser.add_argument("--rebuild-data", action="store_true", help=f"regenerate {DATA.relative_to(REPO)}")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.rebuild_data:
        rebuild_data()
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    train, train_y, test, test_y = read_data()
    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    length = max(len(ids) for ids in tokenizer(train + test, truncation=True, max_length=MAX_TOKENS)["input_ids"])
    train_tokens, test_tokens = tokenize(tokenizer, train, length), tokenize(tokenizer, test, length)
    with torch.no_grad():
        embed = Classifier(encoder, np.eye(encoder.config.hidden_size), np.zeros(encoder.config.hidden_size))
        features = embed(torch.from_numpy(train_tokens["input_ids"]), torch.from_numpy(train_tokens["attention_mask"]))
    head = LogisticRegression(C=10.0, max_iter=2000).fit(features.numpy(), train_y)
    model = Classifier(encoder, head.coef_, head.intercept_).eval()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "classifier.onnx"
    sample = (torch.from_numpy(train_tokens["input_ids"][:4]), torch.from_numpy(train_tokens["attention_mask"][:4]))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    export_legacy(model, sample, str(path), ["input_ids", "attention_mask"], ["logits"], axes, opset=17)
    np.savez(args.out_dir / "classifier_eval.npz", **test_tokens, labels=test_y)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], test_tokens)[0]
    with torch.no_grad():
        want = model(torch.from_numpy(test_tokens["input_ids"]), torch.from_numpy(test_tokens["attention_mask"]))
    print(f"{len(train)} training and {len(test)} evaluation sentences of {len(PACKAGES)} packages, length {length}")
    print(f"held-out accuracy {float((logits.argmax(1) == test_y).mean()):.4f} (onnxruntime); "
          f"torch vs onnxruntime max abs diff {float(np.abs(want.numpy() - logits).max()):.2e}")
    print(f"wrote {path} and {args.out_dir / 'classifier_eval.npz'} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
