"""Which Q/K head dims go together, for every criterion and compensation alike.

- Grouped-query attention: key neuron j of key/value head g meets query neuron j of every query
  head of group g, so (g, j) with those query neurons is one unit; scores measured per query
  head are summed over the group.
- Rotary embeddings rotate pairs of dims by one angle — (j, j + d/2) after rotate_half,
  (2j, 2j + 1) interleaved — so a pair is kept or removed whole (a rotation of q/k directions
  would break the position encoding, so Q/K are chosen, never projected, there). A partial
  rotary embedding (match/partial_rotary.py) rotates pairs (j, j + r/2) of its first r dims; the
  rest are cut in adjacent pairs.
- An op whose rotary cache holds one column per pair for all heads (GroupQueryAttention with
  do_rotary, ONNX's RotaryEmbedding) needs the same pairs in every head.
"""
from __future__ import annotations

import math

import numpy as np

from . import AttentionBlock
from .blocks import RotaryStyle


def unit_of_dim(block: AttentionBlock) -> np.ndarray:
    """For every head dim, the index of its unit within the head."""
    d = block.head_dim
    dims = np.arange(d)
    if not block.rotary:
        return dims
    if block.rotary[0].style is RotaryStyle.INTERLEAVED:
        return dims // 2
    rotated = block.rotary[0].rotated or d
    # partial rotary: the passed-through dims after the rotated pairs go in adjacent pairs, so that
    # every unit is two dims (the criteria count kept dims in units of one size)
    return np.where(dims < rotated, dims % (rotated // 2), rotated // 2 + (dims - rotated) // 2)


def unit_size(block: AttentionBlock) -> int:
    return 2 if block.rotary else 1


def rounded(block: AttentionBlock, kept: int) -> int:
    """Kept Q/K dims per head, rounded up to whole units (and to the multiple an op requires);
    all of them where a QK-norm needs its whole head."""
    if block.qk_whole:
        return block.head_dim
    size = math.lcm(unit_size(block), block.width_multiple)
    return min(block.head_dim, -(-kept // size) * size)


def per_group(block: AttentionBlock, per_head: np.ndarray) -> np.ndarray:
    """(query heads, …) summed over each key/value group: (groups, …)."""
    return per_head.reshape(block.groups, block.group_size, *per_head.shape[1:]).sum(axis=1)


def unit_scores(block: AttentionBlock, scores: np.ndarray) -> np.ndarray:
    """(groups or query heads, d) dim scores → (groups, units) unit scores."""
    if len(scores) != block.groups:
        scores = per_group(block, scores)
    units = unit_of_dim(block)
    totals = np.zeros((len(scores), units.max() + 1))
    np.add.at(totals, (slice(None), units), scores)
    return totals


def keep_qk(block: AttentionBlock, scores: np.ndarray, kept: int) -> np.ndarray:
    """The `kept` (rounded to whole units) highest-scoring Q/K dims of every key/value group,
    (groups, kept), ascending; the same in every group where the block needs that."""
    totals = unit_scores(block, scores)
    if block.pairs_shared:
        totals = np.broadcast_to(totals.sum(axis=0, keepdims=True), totals.shape)
    count = rounded(block, kept) // unit_size(block)
    chosen = np.argsort(-totals, axis=1, kind="stable")[:, :count]
    return dims_of(block, chosen)


def dims_of(block: AttentionBlock, units: np.ndarray) -> np.ndarray:
    """(groups, units) unit indices → (groups, dims) head dims, ascending."""
    of = unit_of_dim(block)
    return np.stack([np.flatnonzero(np.isin(of, row)) for row in units])


def unit_matrix(block: AttentionBlock, dims: np.ndarray) -> np.ndarray:
    """(len(dims), units among them) 0/1: which kept dim belongs to which kept unit (a factor per
    unit acts on both dims of a rotary pair)."""
    of = unit_of_dim(block)[dims]
    kept = np.unique(of)
    return (of[:, None] == kept[None, :]).astype(np.float64)


def obs_values(block: AttentionBlock, obs, heads: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept key/value heads (ascending) and `v` kept V neurons in each, (heads, v), removed one by
    one where optimal brain surgeon (`obs`, over the output projection's input rows) says the refit
    loses least: whole heads first, then one neuron from every kept head a round (equal widths).
    With grouped-query attention a V neuron feeds the output projection once per query head of
    its group: those rows go together."""
    d, r = block.head_dim, block.group_size

    def rows(group: int, neurons) -> np.ndarray:  # the output projection's input rows of V neurons
        return ((group * r + np.arange(r))[:, None] * d + np.asarray(neurons)[None, :]).reshape(-1)

    alive = list(range(block.groups))
    while len(alive) > heads:
        gone = int(np.argmin(obs.costs([rows(h, np.arange(d)) for h in alive])))
        obs.remove(rows(alive.pop(gone), np.arange(d)))
    for _ in range(d - v):
        if r == 1:
            single = obs.single_costs()
            obs.remove(np.array([h * d + int(np.argmin(single[h * d:(h + 1) * d])) for h in alive]))
            continue
        removed = []
        for h in alive:
            left = np.flatnonzero(obs.alive[h * r * d:h * r * d + d])
            removed.append(rows(h, [left[int(np.argmin(obs.costs([rows(h, [n]) for n in left])))]]))
        obs.remove(np.concatenate(removed))
    kept = np.array(alive)
    return kept, np.stack([np.flatnonzero(obs.alive[h * r * d:h * r * d + d]) for h in kept])
