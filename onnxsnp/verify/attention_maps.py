"""A few attention maps of the original and the pruned model, small enough for the report.

The report shows the heads whose attention changed most (the paper's Fig. 3): for one held-back
sample, the KL(original ‖ pruned) of every kept head, the few largest kept as downsampled maps.
A map is stored as one short base64 string of 8-bit codes on a square-root scale (attention
concentrates on a few tokens; a linear 8-bit code would round the rest of the map to zero), so
the JSON report stays small and readable.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

SAMPLE_HEADS = 4  # heads kept for the report, those with the largest KL
MAP_SIZE = 32  # at most this many query rows and key columns per stored map


@dataclass(frozen=True)
class AttentionSample:
    """One head's attention probabilities on one held-back sample, before and after pruning.

    Rows are queries, columns keys. A map with more than MAP_SIZE tokens on a side is stored as
    the mean over square bins of ⌈tokens / MAP_SIZE⌉ tokens. A stored value is
    `scale * (code / 255) ** 2` for the 8-bit `code`s, row-major, base64."""

    block: str
    head: int  # in the original model's numbering
    sample: int  # index among the held-back samples
    tokens: tuple[int, int]  # (queries, keys) of the full map (padding left out)
    shape: tuple[int, int]  # (rows, columns) stored
    kl: float  # mean over query rows of KL(original ‖ pruned)
    scale: float  # the largest value of either map
    original: str
    pruned: str

    def codes(self, which: str) -> np.ndarray:
        """The 8-bit codes of the "original" or "pruned" map, shaped (rows, columns)."""
        raw = base64.b64decode(getattr(self, which))
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.shape)

    def values(self, which: str) -> np.ndarray:
        return self.scale * (self.codes(which).astype(np.float64) / 255) ** 2


def sample_maps(inputs: dict[str, np.ndarray], original: dict[str, np.ndarray], pruned: dict[str, np.ndarray],
                probs: dict[str, tuple[str, np.ndarray]], mask_input: str | None = None, sample: int = 0,
                heads: int = SAMPLE_HEADS, size: int = MAP_SIZE) -> list[AttentionSample]:
    """The `heads` (block, head) pairs with the largest KL on `sample`, largest first. `probs`
    maps block names to their softmax tensor and kept heads (as attention_error reads them);
    maps not laid out as (samples, heads, queries, keys) are left out."""
    token_mask = inputs.get(mask_input) if mask_input else None
    candidates = []
    for name, (tensor, kept) in probs.items():
        p, q = original[tensor], pruned[tensor]
        if p.ndim != 4 or q.ndim != 4 or p.shape[0] <= sample:
            continue
        p, q = p[sample].astype(np.float64), q[sample].astype(np.float64)
        if p.shape[0] != q.shape[0]:  # whole heads removed: compare the kept ones
            p = p[kept]
        if p.shape != q.shape:
            continue
        p, q = _valid_tokens(p, q, None if token_mask is None else token_mask[sample])
        kl = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=-1).mean(axis=-1)
        numbering = kept if len(kept) == p.shape[0] else np.arange(p.shape[0])
        candidates += [(float(kl[h]), name, int(numbering[h]), p[h], q[h]) for h in range(p.shape[0])]
    candidates.sort(key=lambda c: -c[0])
    return [_stored(name, head, sample, kl, p, q, size) for kl, name, head, p, q in candidates[:heads]]


def _valid_tokens(p: np.ndarray, q: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The maps without padded tokens (rows and columns), where the mask fits them."""
    if mask is None or mask.ndim != 1 or p.shape[-1] != p.shape[-2] or p.shape[-1] != len(mask):
        return p, q
    keep = np.flatnonzero(mask > 0)
    if not len(keep):
        return p, q
    return p[..., keep[:, None], keep], q[..., keep[:, None], keep]


def _stored(block: str, head: int, sample: int, kl: float, p: np.ndarray, q: np.ndarray,
            size: int) -> AttentionSample:
    small = [_pool(m, size) for m in (p, q)]
    scale = max(float(m.max()) for m in small) or 1.0
    encoded = [base64.b64encode(np.round(np.sqrt(np.clip(m / scale, 0, 1)) * 255).astype(np.uint8).tobytes())
               .decode("ascii") for m in small]
    return AttentionSample(block, head, sample, (int(p.shape[0]), int(p.shape[1])),
                           (int(small[0].shape[0]), int(small[0].shape[1])), round(kl, 6),
                           float(f"{scale:.6g}"), *encoded)


def _pool(m: np.ndarray, size: int) -> np.ndarray:
    """The mean over square bins of ⌈tokens / size⌉ tokens (the last bin of an axis may be smaller)."""
    factor = -(-max(m.shape) // size)
    rows, columns = (np.arange(0, length, factor) for length in m.shape)
    sums = np.add.reduceat(np.add.reduceat(m, rows, axis=0), columns, axis=1)
    counts = np.outer(np.diff(np.r_[rows, m.shape[0]]), np.diff(np.r_[columns, m.shape[1]]))
    return sums / counts
