"""Compare sentence embeddings of pruned MiniLM ONNX models against the original.

Each model maps (input_ids, attention_mask) to last_hidden_state. Embeddings are made as
sentence-transformers does for all-MiniLM-L6-v2: mean of the token states under the
attention mask, then L2 normalisation. For every pruned model this prints

* the mean (and minimum) cosine between its embedding and the original's for each sentence;
* the Spearman correlation between the pairwise cosine similarities (upper triangle) of the
  original and of the pruned embeddings, i.e. whether the similarity ranking survives pruning.

Usage: python tools/eval_minilm.py ORIGINAL.onnx PRUNED.onnx [PRUNED2.onnx ...]
           [--data build/minilm/eval.npz] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCH = 32


def embed(model: Path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Masked-mean-pooled, L2-normalised sentence embeddings, shape (n, hidden)."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(input_ids), BATCH):
        ids, mask = input_ids[i:i + BATCH], attention_mask[i:i + BATCH]
        hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        # float64 so that identical models give cosine exactly 1 rather than 1 +- 1e-7.
        hidden, m = hidden.astype(np.float64), mask[..., None].astype(np.float64)
        # Same clamp as sentence-transformers' Pooling so an all-padding row cannot divide by 0.
        pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        out.append(pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None))
    return np.concatenate(out)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank, as Spearman's definition requires."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start index of each run of equal values, and each element's run id.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0)[run]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)))


def pair_sims(emb: np.ndarray) -> np.ndarray:
    """Cosine of every sentence pair (rows are unit vectors), upper triangle without diagonal."""
    return (emb @ emb.T)[np.triu_indices(len(emb), k=1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("pruned", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, default=Path("build/minilm/eval.npz"))
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = ap.parse_args()

    data = np.load(args.data)
    ids, mask = data["input_ids"].astype(np.int64), data["attention_mask"].astype(np.int64)
    t0 = time.perf_counter()
    ref = embed(args.original, ids, mask)
    ref_sims = pair_sims(ref)
    print(f"{args.original}: {len(ids)} sentences, seq {ids.shape[1]}, "
          f"{time.perf_counter() - t0:.1f} s")

    results = []
    for path in args.pruned:
        t0 = time.perf_counter()
        emb = embed(path, ids, mask)
        cos = (emb * ref).sum(1)
        res = {"model": str(path), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
               "spearman_pairwise": spearman(ref_sims, pair_sims(emb)),
               "seconds": round(time.perf_counter() - t0, 2)}
        results.append(res)
        print(f"{path}: mean cosine {res['mean_cosine']:.6f} (min {res['min_cosine']:.6f}), "
              f"Spearman of pairwise similarities {res['spearman_pairwise']:.6f}, "
              f"{res['seconds']:.1f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"original": str(args.original), "data": str(args.data),
                                         "n_sentences": int(len(ids)), "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
