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

import json
import logging
import pickle
import time
from dataclasses import dataclass, field
from enum import Enum

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

log = logging.getLogger(__name__)


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


class Channel(Enum):
    """What the driver sends the workers (Traffic)."""

    SETUP = "setup"  # once: the weightless protobuf, the blocks, the half-blocks (pickled)
    BATCHES = "batches"  # once: each worker its own calibration batches
    HALF_WEIGHTS = "half_weights"  # per half-block: the original weights its segments read
    CURRENT_WEIGHTS = "current_weights"  # per pass: the half's edited weights (and a projection's transform)


def payload_bytes(value) -> int:
    """Bytes of the numpy arrays in `value` (dicts, lists and tuples of them; None counts 0)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


@dataclass
class Traffic:
    """What the driver put into Ray's object store for the workers, by channel: bytes, puts and
    the seconds they took (each put is read by every worker: one copy per machine), and the
    round trips of the half-blocks' `hold` calls (put, delivery and the workers' swap of the
    half held). Logged at close (-v), read by tools/bench_workers.py."""

    workers: int
    sent: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    puts: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    seconds: dict[Channel, float] = field(default_factory=lambda: dict.fromkeys(Channel, 0.0))
    hold_seconds: float = 0.0  # round trips of the half-blocks' hold calls, put included

    def add(self, channel: Channel, size: int, seconds: float) -> None:
        self.sent[channel] += size
        self.puts[channel] += 1
        self.seconds[channel] += seconds

    def summary(self) -> dict:
        return {"workers": self.workers, "hold_seconds": round(self.hold_seconds, 3),
                **{c.value: {"bytes": self.sent[c], "puts": self.puts[c], "seconds": round(self.seconds[c], 3)}
                   for c in Channel}}


TRAFFIC_LOG = "worker traffic: "  # the log line's prefix, followed by Traffic.summary() as JSON


class RayShards:
    """The Shards interface (batches.Shards) over Ray actors, one ShardWorker each."""

    def __init__(self, g: ModelGraph, matches: Matches, halves: list, sequential: bool, workers: Workers):
        self.g, self.halves, self.count = g, halves, workers.count
        light, held = weightless(g.model)
        self.reads = [half_reads(g, h, held) for pair in halves for h in pair]  # by half-block number
        self.prefix_reads = segment_reads(g, [embeddings(g, halves)[0]], held)
        self.number: int | None = None  # the half-block whose weights the workers hold
        self.traffic = Traffic(workers.count)
        setup = (light, held, matches, detached(halves), sequential)
        self.traffic.add(Channel.SETUP, sum(len(pickle.dumps(part)) for part in setup), 0.0)
        self._start(workers, *setup)

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

    def _put(self, value):
        return self.ray.put(value)

    def _share(self, channel: Channel, value):
        """`value` put once into the object store, read by every worker (counted in `traffic`)."""
        started = time.perf_counter()
        ref = self._put(value)
        self.traffic.add(channel, payload_bytes(value), time.perf_counter() - started)
        return ref

    def _all(self, method: str, *args) -> list:
        return self.ray.get([getattr(actor, method).remote(*args) for actor in self.actors])

    def _each(self, method: str, per_rank: list[tuple]) -> list:
        return self.ray.get([getattr(actor, method).remote(*args) for actor, args in zip(self.actors, per_rank)])

    def _hold(self, number: int) -> None:
        """The workers given half-block `number`'s weights before its first pass (each drops
        them after the half's last, `finish`)."""
        if number != self.number:
            started = time.perf_counter()
            self._all("hold", number, self._share(Channel.HALF_WEIGHTS, values(self.g, self.reads[number])))
            self.traffic.hold_seconds += time.perf_counter() - started
            self.number = number

    def prepare(self, parts: list[dict[str, np.ndarray]], mask_name: str | None, restartable: bool = True) -> None:
        # the embeddings', for the first stream
        self._all("hold", None, self._share(Channel.HALF_WEIGHTS, values(self.g, self.prefix_reads)))
        self.number = None
        total = len(parts)  # each worker is sent only its own batches
        own = [[p if owner(i, self.count, total) == rank else None for i, p in enumerate(parts)]
               for rank in range(self.count)]
        self._each("prepare", [(self._share(Channel.BATCHES, batches), mask_name, restartable)
                               for batches in own])

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
        # merged by batches.merged_equations
        return self._all("equations", number, self._share(Channel.CURRENT_WEIGHTS, weights))

    def transform_cache(self, inner: np.ndarray) -> None:
        self._all("transform_cache", self._share(Channel.CURRENT_WEIGHTS, inner))

    def finish(self, number: int, weights: dict[Slot, np.ndarray]) -> None:
        self._hold(number)
        self._all("finish", number, self._share(Channel.CURRENT_WEIGHTS, weights))
        self.number = None  # dropped by the workers

    def close(self) -> None:
        if getattr(self, "actors", []):
            log.info("%s%s", TRAFFIC_LOG, json.dumps(self.traffic.summary()))
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
