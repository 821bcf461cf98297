"""`--workers N`: the reconstruction's calibration batches held by N Ray worker processes.

What is sent where (docs/SCALING.md has the whole picture):
- once per worker: the model's protobuf without its weights, its blocks and half-blocks as the
  driver found them (worker_graph.py);
- each worker its own calibration batches (whole folds up to FOLDS workers, runs of folds beyond:
  batches.owner), once; the activations they produce — the original and pruned streams, the
  refitted layers' inputs — never leave it;
- per half-block, the driver sends the weights its segments read (once, before its first pass;
  a worker drops them and the half's sessions after its last) and the half's current weights,
  and gets back sums: normal equations per fold (per batch for a split fold's later batches) and
  Q/K pair statistics per batch (batches.py explains why merging them is exact, so the pruned
  model is the one a single process writes).

The refit is sequential — block i + 1 is measured on the pruned model's stream after block i's
refit — so the workers go through the blocks in lock step, one pass at a time, and the driver
chooses and refits between passes. The parallelism is over calibration batches, not blocks.
"""
from __future__ import annotations

import logging

import numpy as np

from .batches import AttentionSums, FoldSums, Shard, Slot, Workers, owner
from ..errors import SnpError
from ..heap import release_heap
from ..ir.graph import ModelGraph
from ..match import Matches
from ..score.importance import PairSums
from .halves import attached, detached, drop_sessions, embeddings, original_weights
from .worker_graph import BlockGraph, half_reads, segment_reads, values, weightless
from ..threads import threads_for


def _ray():
    try:
        import ray
    except ImportError:
        raise SnpError("--workers and --ray-address need Ray: pip install 'onnxsnp[ray]'") from None
    return ray


class ShardWorker:
    """One worker: a Shard over a weightless graph of the model, holding the weights of the
    half-block it runs (a Ray actor, see RayShards)."""

    def __init__(self, light: bytes, held: frozenset[str], matches: Matches, halves: list, sequential: bool,
                 rank: int, count: int):
        self.g = BlockGraph(light, held)
        halves = attached(self.g, halves)
        self.shard = Shard(self.g, matches, halves, original_weights(self.g, halves), sequential, rank, count)
        self.number: int | None = None  # the half-block whose weights and sessions are held

    def hold(self, number: int | None, weights: dict[str, np.ndarray]) -> None:
        """Half-block `number`'s weights (None: the embeddings') in place of what was held."""
        self._release()
        self.g.hold(dict(weights))
        self.number = number

    def _release(self) -> None:
        if self.number is not None:
            drop_sessions(self.shard.half(self.number))
        self.g.hold({})
        self.number = None
        release_heap()

    def held(self) -> dict[str, int]:
        """The large initializers held now, name → bytes (tests, tools/bench_workers.py)."""
        return {name: value.nbytes for name, value in self.g.block.items()}

    def _threads(self, number: int):
        return threads_for(self.shard.linear(number).in_features)  # as the driver's run limits them

    def prepare(self, parts, mask_name, restartable=True):
        self.shard.prepare(parts, mask_name, restartable)
        self._release()

    def restart(self):
        self.shard.restart()

    def counts(self):
        return self.shard.counts()

    def advance_original(self, number):
        self.shard.advance_original(number)

    def ffn_targets(self, number):
        with self._threads(number):
            self.shard.ffn_targets(number)

    def attention_targets(self, number, pairs_needed=PairSums.ALL):
        with self._threads(number):
            return self.shard.attention_targets(number, pairs_needed)

    def equations(self, number, weights):
        with self._threads(number):
            return self.shard.equations(number, weights)  # only the folds and batches this worker summed

    def transform_cache(self, inner):
        self.shard.transform_cache(inner)

    def finish(self, number, weights):
        with self._threads(number):
            self.shard.finish(number, weights)
        self._release()  # the half's last pass


class RayShards:
    """The Shards interface (batches.Shards) over Ray actors, one ShardWorker each."""

    def __init__(self, g: ModelGraph, matches: Matches, halves: list, sequential: bool, workers: Workers):
        self.g, self.halves, self.count = g, halves, workers.count
        light, held = weightless(g.model)
        self.reads = [half_reads(g, h, held) for pair in halves for h in pair]  # by half-block number
        self.prefix_reads = segment_reads(g, [embeddings(g, halves)[0]], held)
        self.number: int | None = None  # the half-block whose weights the workers hold
        self._start(workers, light, held, matches, detached(halves), sequential)

    def _start(self, workers: Workers, *setup) -> None:
        ray = _ray()
        self.ray, self.started = ray, False
        if not ray.is_initialized():
            try:
                ray.init(address=workers.address, num_cpus=None if workers.address else workers.count,
                         include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = workers.address or "a local Ray instance"
                raise SnpError(f"cannot start Ray workers on {where}: {str(exc).splitlines()[0][:200]}") from None
            self.started = True
        # SPREAD: on a cluster, one worker per machine before any machine gets two
        remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(ShardWorker)
        refs = [ray.put(part) for part in setup]  # once, read by every worker
        self.actors = [remote.remote(*refs, rank, workers.count) for rank in range(workers.count)]

    def _all(self, method: str, *args) -> list:
        refs = [self.ray.put(a) if isinstance(a, dict) else a for a in args]  # weights: put once, read by all
        return self.ray.get([getattr(actor, method).remote(*refs) for actor in self.actors])

    def _each(self, method: str, per_rank: list[tuple]) -> list:
        return self.ray.get([getattr(actor, method).remote(*args) for actor, args in zip(self.actors, per_rank)])

    def _hold(self, number: int) -> None:
        """The workers given half-block `number`'s weights before its first pass (each drops
        them after the half's last, `finish`)."""
        if number != self.number:
            self._all("hold", number, values(self.g, self.reads[number]))
            self.number = number

    def prepare(self, parts: list[dict[str, np.ndarray]], mask_name: str | None, restartable: bool = True) -> None:
        self._all("hold", None, values(self.g, self.prefix_reads))  # the embeddings', for the first stream
        self.number = None
        total = len(parts)  # each worker is sent only its own batches
        self._each("prepare", [([p if owner(i, self.count, total) == rank else None for i, p in enumerate(parts)],
                                mask_name, restartable) for rank in range(self.count)])

    def restart(self) -> None:
        self._all("restart")

    def counts(self) -> tuple[int, int]:
        counts = self._all("counts")
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def advance_original(self, number: int) -> None:
        self._hold(number)
        self._all("advance_original", number)

    def ffn_targets(self, number: int) -> None:
        self._hold(number)
        self._all("ffn_targets", number)

    def attention_targets(self, number: int, pairs_needed: PairSums = PairSums.ALL) -> list[AttentionSums]:
        self._hold(number)
        return self._all("attention_targets", number, pairs_needed)

    def equations(self, number: int, weights: dict[Slot, np.ndarray]) -> list[FoldSums]:
        self._hold(number)
        return self._all("equations", number, weights)  # merged by batches.merged_equations

    def transform_cache(self, inner: np.ndarray) -> None:
        self._all("transform_cache", inner)

    def finish(self, number: int, weights: dict[Slot, np.ndarray]) -> None:
        self._hold(number)
        self._all("finish", number, weights)
        self.number = None  # dropped by the workers

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
