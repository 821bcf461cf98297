"""`--workers N`: the reconstruction's calibration batches held by N Ray worker processes.

What is sent where (docs/SCALING.md has the whole picture):
- the model with its weights once per worker, through Ray's object store;
- each worker its own calibration batches (whole folds up to FOLDS workers, runs of folds beyond:
  batches.owner), once; the activations they produce — the original and pruned streams, the
  refitted layers' inputs — never leave it;
- per half-block, the driver sends the half's current weights and gets back sums: normal
  equations per fold (per batch for a split fold's later batches) and Q/K pair statistics per
  batch (batches.py explains why merging them is exact, so the pruned model is the one a single
  process writes).

The refit is sequential — block i + 1 is measured on the pruned model's stream after block i's
refit — so the workers go through the blocks in lock step, one pass at a time, and the driver
chooses and refits between passes. The parallelism is over calibration batches, not blocks.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from ..data.calibration import without_initializers
from .batches import AttentionSums, FoldSums, Shard, Slot, Workers, owner
from ..errors import SnpError
from ..ir import external
from ..ir.sizes import raw_bytes
from ..score.importance import PairSums
from .halves import original_weights, plan_segments
from ..threads import threads_for


def _ray():
    try:
        import ray
    except ImportError:
        raise SnpError("--workers and --ray-address need Ray: pip install 'onnxsnp[ray]'") from None
    return ray


PORTABLE_MIN_BYTES = 2**20  # initializers at least this big travel as arrays, not inside the protobuf


def portable(model: onnx.ModelProto) -> tuple[bytes, dict[str, np.ndarray]]:
    """`model` as a protobuf without its large weights, and those weights as arrays: no 2 GB
    protobuf limit, and Ray's object store shares the arrays between the workers of a machine."""
    light = without_initializers(model)
    weights = {}
    for tensor in model.graph.initializer:
        if raw_bytes(tensor) >= PORTABLE_MIN_BYTES:
            weights[tensor.name] = external.to_array(tensor)
            stub = light.graph.initializer.add()  # keeps the initializers' order
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
        else:
            light.graph.initializer.add().CopyFrom(external.inline(tensor))
    return light.SerializeToString(), weights


def restored(light: bytes, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.load_from_string(light)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(weights[tensor.name]), tensor.name))
    return model


class ShardWorker:
    """One worker: a Shard over the model as the driver reads it (a Ray actor, see RayShards)."""

    def __init__(self, light: bytes, weights: dict[str, np.ndarray], sequential: bool, rank: int, count: int):
        from ..ir.graph import ModelGraph
        from ..match import find_blocks

        g = ModelGraph(restored(light, weights))
        matches = find_blocks(g)  # deterministic: the driver's blocks, in the driver's order
        halves = plan_segments(g, matches)
        self.shard = Shard(g, matches, halves, original_weights(g, halves), sequential, rank, count)
        # the matching decoded every weight, a second copy beside the protobuf's: dropped, each is
        # decoded again when a half's session is built (DeiT-S: 176 MB → 92 MB a worker at the start)
        g.forget_constants()

    def _threads(self, number: int):
        return threads_for(self.shard.linear(number).in_features)  # as the driver's run limits them

    def prepare(self, parts, mask_name, restartable=True):
        self.shard.prepare(parts, mask_name, restartable)

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


class RayShards:
    """The Shards interface (batches.Shards) over Ray actors, one ShardWorker each."""

    def __init__(self, model: onnx.ModelProto, sequential: bool, workers: Workers):
        ray = _ray()
        self.ray, self.count, self.started = ray, workers.count, False
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
        light, weights = portable(model)
        light_ref, weights_ref = ray.put(light), ray.put(weights)  # one copy per machine, in the object store
        self.actors = [remote.remote(light_ref, weights_ref, sequential, rank, workers.count)
                       for rank in range(workers.count)]

    def _all(self, method: str, *args) -> list:
        refs = [self.ray.put(a) if isinstance(a, dict) else a for a in args]  # weights: put once, read by all
        return self.ray.get([getattr(actor, method).remote(*refs) for actor in self.actors])

    def prepare(self, parts: list[dict[str, np.ndarray]], mask_name: str | None, restartable: bool = True) -> None:
        # each worker is sent only its own batches
        total = len(parts)
        self.ray.get([actor.prepare.remote([p if owner(i, self.count, total) == rank else None
                                            for i, p in enumerate(parts)], mask_name, restartable)
                      for rank, actor in enumerate(self.actors)])

    def restart(self) -> None:
        self._all("restart")

    def counts(self) -> tuple[int, int]:
        counts = self._all("counts")
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def advance_original(self, number: int) -> None:
        self._all("advance_original", number)

    def ffn_targets(self, number: int) -> None:
        self._all("ffn_targets", number)

    def attention_targets(self, number: int, pairs_needed: PairSums = PairSums.ALL) -> list[AttentionSums]:
        return self._all("attention_targets", number, pairs_needed)

    def equations(self, number: int, weights: dict[Slot, np.ndarray]) -> list[FoldSums]:
        return self._all("equations", number, weights)  # merged by batches.merged_equations

    def transform_cache(self, inner: np.ndarray) -> None:
        self._all("transform_cache", inner)

    def finish(self, number: int, weights: dict[Slot, np.ndarray]) -> None:
        self._all("finish", number, weights)

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
