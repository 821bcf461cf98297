"""The calibration batches of a block-by-block reconstruction, and every pass over them.

A `Shard` holds some of the batches, each with its streams at the current cut: the original
model's, the pruned model's, and the current half-block's target. The reconstructor decides
(which units go, how a layer is refitted); a shard runs the half-blocks over its batches and
hands back sums. A batch's fold is its global index mod FOLDS (the refits' cross-validation
folds); `owner` says which of `count` shards holds it, and each statistic comes back in a form
whose merge is exact:

- normal equations per fold, each summed from zero in batch order, as one process sums them. Up
  to FOLDS shards hold whole folds and return each fold's sum, which the merge places. More shards
  split folds into contiguous runs: the shard holding a fold's first batch returns its run's sum
  (the same bits as one process's sum over those batches), every later batch of the fold comes
  back on its own and the merge adds it to the fold in batch order — the additions one process
  makes. (Adding a later run's partial sum instead would regroup the float sums: not the same bits.)
- the Q/K pair statistics per batch, added in global batch order by the caller.

So any number of shards up to the number of batches give the numbers one shard holding every
batch gives, bit for bit: that is what lets `--workers` (distributed.py) spread the batches over
processes or machines.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..ir.graph import ModelGraph, attribute
from ..errors import SnpError
from ..heap import release_heap
from ..score.importance import (PairStatistics, PairSums, projected, query_key, query_key_tensors,
                                rotary_tables)
from ..score.softmax_metric import softmax_scale, sums_from
from .least_squares import FOLDS, NormalEquations
from ..match import Matches
from ..match.blocks import QkNormCut
from ..match.units import unit_of_dim
from .halves import drop_arenas, embeddings
from .token_targets import branch_rms, norm_weights, sandwich_target, tokens
from .segments import SegmentRunner, cut

CACHE_BYTES = 2 * 2**30  # a refitted layer's inputs are kept for the next stream up to this size

Slot = tuple[str, int]


@dataclass(frozen=True)
class Workers:
    """Where the batches are held: `count` Ray worker processes, on the cluster at `address` or on
    a local Ray instance started for the run (count 1 without an address: this process)."""

    count: int = 1
    address: str | None = None


@dataclass
class Batch:
    index: int  # among all the shards' batches, in calibration order
    inputs: dict[str, np.ndarray]  # model inputs of this batch, and side tensors captured with the first stream
    samples: int
    mask: np.ndarray | None
    original: np.ndarray | None = None  # the original stream at the current cut
    pruned: np.ndarray | None = None  # the pruned model's stream there
    target: np.ndarray | None = None  # the original pre-norm sum of the current half
    branch: np.ndarray | None = None  # a sandwich-normed half's original output (before its norm)


@dataclass(frozen=True)
class AttentionSums:
    """An attention half's statistics from one shard."""

    pairs: tuple[tuple[int, PairStatistics], ...]  # (batch index, that batch's pair statistics)
    scales: tuple[tuple[int, dict[str, np.ndarray]], ...]  # (batch index, frozen scale tensors' values)


def split_batches(feed: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    total = next(iter(feed.values())).shape[0]
    return [{k: v[start:start + batch] for k, v in feed.items()} for start in range(0, total, batch)]


def owner(index: int, count: int, total: int) -> int:
    """The shard, of `count`, that holds batch `index` of `total`. Up to FOLDS shards: whole folds
    (fold mod count). More: the batches in fold-major order (fold 0's in batch order, then fold
    1's, …) cut into `count` contiguous runs of near-equal length, so a fold is split over
    consecutive shards and each shard holds at most one fold's non-leading part (FoldSums)."""
    fold = index % FOLDS
    if count <= FOLDS:
        return fold % count
    before = sum(len(range(f, total, FOLDS)) for f in range(fold))  # batches of the earlier folds
    return (before + index // FOLDS) * count // total


def check_workers(count: int, total: int, batch: int) -> None:
    """Every shard must hold a batch (an empty one would sit idle through every pass)."""
    if count > total:
        raise SnpError(f"--workers {count}: the reconstruction has {total} calibration batch"
                       f"{'es' if total > 1 else ''} of up to {batch} samples, one per worker at least: "
                       f"use at most {total} workers or more calibration samples")


@dataclass(frozen=True)
class FoldSums:
    """A shard's normal equations (module docstring): row r of `equations` is fold `folds[r]`
    summed from the fold's first batch, in batch order, over this shard's run of it; `batches`
    holds (batch index, that batch's one-row sums) for the batches of folds whose first batch
    another shard holds."""

    folds: tuple[int, ...]
    equations: NormalEquations
    batches: tuple[tuple[int, NormalEquations], ...] = ()


def _pass(method):
    """A pass over the batches: its sessions' arenas (halves.drop_arenas), then the heap it churned
    through, go back to the system after it (heap.py; without this the reconstruction's memory
    grows with every block)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            drop_arenas(self.halves)
            release_heap()

    return wrapper


def _shape_value(node, shape: tuple[int, ...]) -> np.ndarray:
    start, end = attribute(node, "start", 0), attribute(node, "end", None)
    return np.array(shape[start:end] if end is not None else shape[start:], dtype=np.int64)


class Shard:
    """Some calibration batches and the passes over them; `halves` come from
    reconstruction.plan_segments, `original` holds the original value of every slot."""

    def __init__(self, g: ModelGraph, matches: Matches, halves: list, original: dict[Slot, np.ndarray],
                 sequential: bool = True, rank: int = 0, count: int = 1):
        self.g, self.matches, self.halves, self.original = g, matches, halves, original
        self.sequential = sequential  # False: the original stream is fed on (Propagation.ONE_SHOT)
        self.rank, self.count = rank, count
        self.total = 0  # batches among all the shards
        self.batches: list[Batch] = []
        self._first: list[np.ndarray] | None = []
        self._cache: list[np.ndarray] | None = None
        self.shapes: dict[tuple[str, int], tuple[int, ...]] = {}  # cut tensor, batch index → shape (side tensors)

    def half(self, number: int):
        """Half-block `number`: 2 × layer + (0 attention, 1 FFN)."""
        return self.halves[number // 2][number % 2]

    # --- running segments ----------------------------------------------------------------------
    def run(self, runner: SegmentRunner, item: Batch, values: dict[str, np.ndarray], weights: dict,
            tensors: list[str]) -> dict[str, np.ndarray]:
        """`runner` on one batch: its model inputs, `values` (stream tensors), side tensors."""
        feed = dict(item.inputs)
        feed.update(values)
        for tensor in runner.segment.side:
            node = self.g.producer_of(tensor)
            if node.op_type == "Shape" and (node.input[0], item.index) in self.shapes:
                feed[tensor] = _shape_value(node, self.shapes[(node.input[0], item.index)])
        return runner.run(feed, weights, tensors)

    def run_half(self, half, item: Batch, stream: np.ndarray, weights: dict, tensors: list[str]
                 ) -> dict[str, np.ndarray]:
        return self.run(half.runner, item, {half.residual: stream}, weights, tensors)

    # --- the batches ---------------------------------------------------------------------------
    @_pass
    def prepare(self, parts: list[dict[str, np.ndarray]], mask_name: str | None, restartable: bool = True) -> None:
        """This shard's batches of `parts` (all the calibration batches, in order), with the
        first block's input (the embeddings run once). `restartable`: that input is also kept for
        `restart` (another run at other widths); a single run does without that extra stream."""
        first = self.halves[0][0]
        prefix, early = embeddings(self.g, self.halves)
        prefix_runner = SegmentRunner(self.g, prefix) if prefix.nodes else None
        self.total = len(parts)
        for index, inputs in enumerate(parts):
            if owner(index, self.count, self.total) != self.rank:
                continue
            inputs = dict(inputs)
            item = Batch(index, inputs, next(iter(inputs.values())).shape[0],
                         inputs.get(mask_name) if mask_name else None)
            if prefix_runner is not None:
                values = prefix_runner.run(inputs, {})
                inputs.update({t: values[t] for t in early})
                item.original = values[first.residual]
            else:
                item.original = inputs[first.residual]
            item.pruned = item.original
            self.shapes[(first.residual, index)] = item.original.shape
            self.batches.append(item)
        self._first = [item.original for item in self.batches] if restartable else None

    @_pass
    def restart(self) -> None:
        """The batches at the first block again, for another run at other widths."""
        if self._first is None:
            raise RuntimeError("these batches were prepared for one run only (restartable=False)")
        for item, first in zip(self.batches, self._first):
            item.original = item.pruned = first
            item.target = None
        self._cache = None

    def counts(self) -> tuple[int, int]:
        """Samples and real tokens held."""
        return (sum(b.samples for b in self.batches),
                sum(len(tokens(b.original, b.samples, b.mask)) for b in self.batches))

    # --- passes ----------------------------------------------------------------------------------
    @_pass
    def advance_original(self, number: int) -> None:
        """A removed block's half: only the original stream moves on."""
        half = self.half(number)
        end = half.segment.outputs[0]
        for item in self.batches:
            item.original = self.run_half(half, item, item.original, self.original, [end])[end]
            self.shapes[(end, item.index)] = item.original.shape
            if not self.sequential:
                item.pruned = item.original

    def targets(self, half, capture: list[str],
                each: Callable[[Batch, dict[str, np.ndarray]], None] = lambda *_: None) -> None:
        """Original half on the original stream: the target sum and the next original stream;
        `each` gets the `capture`d tensors of every batch (nothing else keeps them)."""
        end = half.segment.outputs[0]
        for item in self.batches:
            values = self.run_half(half, item, item.original, self.original,
                                   list(dict.fromkeys([half.branch, end] + capture)))
            branch = values[half.branch].astype(np.float32)
            if half.branch_gain is None:
                item.target = branch + item.original
            else:  # x + LN(f(x)): the sum the Add sees
                gamma, eps = half.branch_gain
                item.target = gamma * branch / branch_rms(branch, eps) + item.original
                item.branch = branch
            item.original = values[end]
            self.shapes[(end, item.index)] = item.original.shape
            each(item, values)

    @_pass
    def ffn_targets(self, number: int) -> None:
        self.targets(self.half(number), [])

    @_pass
    def attention_targets(self, number: int, pairs_needed: PairSums = PairSums.ALL) -> AttentionSums:
        """The targets of attention half `number`, with every batch's Q/K pair statistics: SNP's
        scores on the pruned model's q and k (sequential) against the original scores — not
        gathered where no pair is cut (PairSums.NONE: they cost seconds per layer), only the
        softmax's sums where those choose the pairs (PairSums.SOFTMAX)."""
        half = self.half(number)
        block = self.matches.layers[number // 2].attention
        scales = [s.tensor for s in block.frozen_scales]
        tables = rotary_tables(self.g, block)  # a written-out rotary embedding's cos/sin, to rotate q̂, k̂ alike
        pairs, scale_values = [], []
        calibrated = block.qk_norm is not None and block.qk_norm.cut is QkNormCut.CALIBRATED

        def score(item: Batch, values: dict[str, np.ndarray]) -> None:
            if scales:
                scale_values.append((item.index, {t: np.array(values[t]) for t in scales}))
            if pairs_needed is PairSums.NONE or (pairs_needed is PairSums.SOFTMAX and not sums_from(
                    item.index, self.total, item.samples * item.original.shape[1])):
                return  # no pair is cut, or enough queries chose them (the targets come from every batch)
            statistics = PairStatistics.empty(block.heads, block.head_dim,
                                              causal_scale=softmax_scale(block) if block.causal else None,
                                              units=unit_of_dim(block), softcap=block.softcap,
                                              softmax_only=pairs_needed is PairSums.SOFTMAX)
            q, k = query_key(self.g, block, values, item.samples)
            if self.sequential:  # the pruned model's q and k, the original scores
                pruned = {half.residual: item.pruned}
                if half.projection_inputs is not None:
                    pruned = self.run(half.projection_inputs, item, pruned, {},
                                      list(half.projection_inputs.segment.outputs))
                pruned.update({t: values[t] for t in tables})
                q_hat, k_hat = query_key(self.g, block, pruned, item.samples, from_inputs=True)
                statistics.add(q_hat, k_hat, item.mask, q, k)
            else:
                statistics.add(q, k, item.mask)
            if calibrated:  # q and k before their per-head norms, as the pruned model computes them
                inputs = {half.residual: item.pruned}
                if half.projection_inputs is not None:
                    inputs = self.run(half.projection_inputs, item, inputs, {}, list(half.projection_inputs.segment.outputs))
                statistics.add_norm_energy(*projected(self.g, block, inputs, item.samples), block.head_dim, item.mask)
            pairs.append((item.index, statistics))

        self.targets(half, query_key_tensors(block) + scales + tables, score)
        return AttentionSums(tuple(pairs), tuple(scale_values))

    def leads(self, index: int) -> bool:
        """Whether this shard holds the first batch of batch `index`'s fold (and so, its runs being
        contiguous, every batch of the fold before `index`)."""
        return owner(index % FOLDS, self.count, self.total) == self.rank

    @_pass
    def equations(self, number: int, weights: dict[Slot, np.ndarray]) -> FoldSums:
        """Sums for refitting the layer after half `number`'s pruned group (output projection, fc2):
        its inputs in the pruned model against target − pruned residual input. Those inputs are
        also kept, where they fit in CACHE_BYTES (the next stream is then computed from them)."""
        half, linear = self.half(number), self.linear(number)
        folds = tuple(sorted({item.index % FOLDS for item in self.batches if self.leads(item.index)}))
        row = {fold: position for position, fold in enumerate(folds)}
        equations = NormalEquations.empty(linear.in_features, linear.out_features, len(folds))
        alone = []
        cache: list[np.ndarray] | None = []
        size = 0
        normalised = self.matches.layers[number // 2].attention.causal
        for item in self.batches:
            x = self.run(half.refit_inputs, item, {half.residual: item.pruned}, weights, [linear.input])[linear.input]
            y = item.target - item.pruned
            weights_ = norm_weights(tokens(item.target, item.samples, item.mask)) if normalised else None
            if half.branch_gain is not None:
                y, weights_ = sandwich_target(y, item.branch, *half.branch_gain, item.samples, item.mask, weights_)
            x_tokens, y_tokens = tokens(x, item.samples, item.mask), tokens(y, item.samples, item.mask)
            if self.leads(item.index):
                equations.add(x_tokens, y_tokens, row[item.index % FOLDS], weights_)
            else:
                alone.append((item.index, NormalEquations.empty(linear.in_features, linear.out_features, 1)))
                alone[-1][1].add(x_tokens, y_tokens, 0, weights_)
            size += x.nbytes
            cache = cache + [x] if cache is not None and size <= CACHE_BYTES else None
        self._cache = cache
        return FoldSums(folds, equations, tuple(alone))

    @_pass
    def transform_cache(self, inner: np.ndarray) -> None:
        """The kept inputs mapped by `inner` (the V projection: new inputs = x · inner)."""
        if self._cache is not None:
            inner = inner.astype(self._cache[0].dtype) if self._cache else inner
            self._cache = [(x.reshape(-1, x.shape[-1]) @ inner).reshape(x.shape) for x in self._cache]

    @_pass
    def finish(self, number: int, weights: dict[Slot, np.ndarray]) -> None:
        """The next pruned stream: the refitted layer's output from the cached inputs (or the
        pruned half run again where they were not cached), through the residual join."""
        half, linear = self.half(number), self.linear(number)
        end = half.segment.outputs[0]
        weight = weights[(linear.node, linear.weight_index)]
        weight = (weight.T if linear.transposed else weight).astype(np.float32)
        bias = (weights[(linear.bias_node, linear.bias_index)].reshape(-1).astype(np.float32)
                if linear.bias is not None else 0.0)
        for position, item in enumerate(self.batches):
            if not self.sequential:
                item.pruned = item.original
            elif self._cache is None:
                item.pruned = self.run_half(half, item, item.pruned, weights, [end])[end]
            else:
                x = self._cache[position]
                flat = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)  # one 2-D product
                branch = (flat @ weight + bias).astype(x.dtype).reshape(*x.shape[:-1], weight.shape[1])
                if branch.shape != item.pruned.shape and branch.size == item.pruned.size:
                    branch = branch.reshape(item.pruned.shape)  # a Gemm between flattening reshapes
                values = {half.branch: branch, half.residual: item.pruned}
                item.pruned = self.run(half.join, item, values, {}, [end])[end]
            item.target = item.branch = None
        self._cache = None

    def linear(self, number: int):
        """The layer refitted after half-block `number`: the output projection or fc2."""
        layer = self.matches.layers[number // 2]
        return layer.attention.out if number % 2 == 0 else layer.ffn.fc2


class Shards(Protocol):
    """The batches wherever they are held; each pass runs on every shard."""

    def prepare(self, parts: list[dict[str, np.ndarray]], mask_name: str | None, restartable: bool = True
                ) -> None: ...
    def restart(self) -> None: ...
    def counts(self) -> tuple[int, int]: ...
    def advance_original(self, number: int) -> None: ...
    def ffn_targets(self, number: int) -> None: ...
    def attention_targets(self, number: int, pairs_needed: PairSums = PairSums.ALL) -> list[AttentionSums]: ...
    def equations(self, number: int, weights: dict[Slot, np.ndarray]) -> list[FoldSums]: ...
    def transform_cache(self, inner: np.ndarray) -> None: ...
    def finish(self, number: int, weights: dict[Slot, np.ndarray]) -> None: ...
    def close(self) -> None: ...


class LocalShards:
    """Every batch in this process: the default, and what `--workers` must reproduce. The Shards
    interface over one Shard; only the statistics come back as one-element lists."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def __getattr__(self, name: str):  # prepare, restart, counts, advance_original, ffn_targets, …
        return getattr(self.shard, name)

    def attention_targets(self, number: int, pairs_needed: PairSums = PairSums.ALL) -> list[AttentionSums]:
        return [self.shard.attention_targets(number, pairs_needed)]

    def equations(self, number: int, weights: dict[Slot, np.ndarray]) -> list[FoldSums]:
        return [self.shard.equations(number, weights)]

    def close(self) -> None:
        pass


def merged_pairs(parts: list[AttentionSums], heads: int, d: int) -> tuple[PairStatistics, dict[str, np.ndarray]]:
    """The shards' pair statistics added in batch order, and the scale values of the first batch."""
    total = PairStatistics.empty(heads, d)
    for _, statistics in sorted((p for part in parts for p in part.pairs), key=lambda p: p[0]):
        total.merge(statistics)
    scales = sorted((s for part in parts for s in part.scales), key=lambda s: s[0])
    return total, (scales[0][1] if scales else {})


def merged_equations(parts: list[FoldSums]) -> NormalEquations:
    """Every fold as one process sums it (module docstring): the leading runs' sums placed, then
    each batch that came back alone added to its fold in batch order."""
    whole = parts[0]
    if len(parts) == 1 and whole.folds == tuple(range(FOLDS)) and not whole.batches:
        return whole.equations  # one shard holding every fold: nothing to merge
    shape_xx, shape_xy = whole.equations.xx.shape[1:], whole.equations.xy.shape[1:]
    total = NormalEquations(np.zeros((FOLDS,) + shape_xx), np.zeros((FOLDS,) + shape_xy), np.zeros(FOLDS))
    for part in parts:
        if part.folds:
            total.xx[list(part.folds)], total.xy[list(part.folds)] = part.equations.xx, part.equations.xy
            total.yy[list(part.folds)] = part.equations.yy
    for index, alone in sorted((p for part in parts for p in part.batches), key=lambda p: p[0]):
        fold = index % FOLDS  # a float64 row holding one batch's float32 products exactly: the same addition
        total.xx[fold] += alone.xx[0]
        total.xy[fold] += alone.xy[0]
        total.yy[fold] += alone.yy[0]
    return total
