"""More workers than folds: a fold split into contiguous runs over workers, the later batches of
a fold sent back one by one and added by the driver in batch order (batches.py). Here without
Ray — the ShardWorkers in this process — so the fast tier checks the arithmetic on the shipped
ViT; tests/test_workers.py runs the same on Ray workers."""
from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT
from onnxsnp import SnpError, prune
from onnxsnp.compensate import distributed
from onnxsnp.compensate.batches import FoldSums, merged_equations, owner
from onnxsnp.compensate.least_squares import FOLDS, NormalEquations

DIGITS = ROOT / "models" / "digits_vit.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"


def more_batches() -> dict[str, np.ndarray]:
    """The shipped calibration samples and their mirror images: 256 samples, 224 fitted after
    the held-back eighth, 7 reconstruction batches of 32 (pipeline.reconstruction_batch)."""
    pixels = np.load(DIGITS_CALIB)["pixel_values"]
    return {"pixel_values": np.concatenate([pixels, pixels[..., ::-1]]).copy()}


class InProcessShards(distributed.RayShards):
    """RayShards with its ShardWorkers in this process, called one after the other; every
    argument goes through pickle, as to a Ray actor, and each call's is recorded in `sent`."""

    def _start(self, workers, *setup):
        self.sent = [("setup", setup)]
        self.workers = [distributed.ShardWorker(*pickle.loads(pickle.dumps(setup)), rank, workers.count)
                        for rank in range(workers.count)]

    def _put(self, value):
        return value  # what a worker reads: the value itself (each call pickles it below)

    def _all(self, method, *args):
        return self._each(method, [args] * len(self.workers))

    def _each(self, method, per_rank):
        self.sent.append((method, per_rank[0]))
        return [getattr(worker, method)(*pickle.loads(pickle.dumps(args))) for worker, args in zip(self.workers, per_rank)]

    def close(self):
        self.workers = []


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_runs_are_contiguous_in_fold_major_order_and_every_worker_holds_some():
    for total in range(1, 40):
        order = sorted(range(total), key=lambda i: (i % FOLDS, i // FOLDS))
        for count in range(1, total + 1):
            ranks = [owner(i, count, total) for i in order]
            assert set(ranks) == set(range(count))
            if count > FOLDS:
                assert ranks == sorted(ranks)  # contiguous runs, so a fold's leading run starts at its first batch
                sizes = np.bincount(ranks)
                assert sizes.max() - sizes.min() <= 1
            else:
                assert all(owner(i, count, total) == owner(i % FOLDS, count, total) for i in range(total))


def test_split_folds_merge_to_the_one_process_sums():
    """Batches of very different scales, so that regrouping the float sums would change bits."""
    rng = np.random.default_rng(0)
    total, n, m = 24, 6, 3
    batches = [(rng.standard_normal((5, n)) * 10.0 ** rng.integers(-8, 9), rng.standard_normal((5, m)))
               for _ in range(total)]
    one = NormalEquations.empty(n, m, FOLDS)
    for index, (x, y) in enumerate(batches):
        one.add(x, y, index)
    regrouped_differ = False
    for count in range(FOLDS + 1, total + 1):
        parts = []
        for rank in range(count):
            held = [i for i in range(total) if owner(i, count, total) == rank]
            leads = [i for i in held if owner(i % FOLDS, count, total) == rank]
            folds = tuple(sorted({i % FOLDS for i in leads}))
            equations = NormalEquations.empty(n, m, len(folds))
            alone = []
            for i in held:
                if i in leads:
                    equations.add(*batches[i], folds.index(i % FOLDS))
                else:
                    alone.append((i, NormalEquations.empty(n, m, 1)))
                    alone[-1][1].add(*batches[i], 0)
            parts.append(FoldSums(folds, equations, tuple(alone)))
        merged = merged_equations(parts[::-1])  # the order the parts arrive in does not matter
        for name in ("xx", "xy", "yy"):
            assert np.array_equal(getattr(merged, name), getattr(one, name)), (count, name)
        assert any(p.batches for p in parts)
        # what the merge does not do: add a later run's partial sum, regrouping the additions
        regrouped = NormalEquations.empty(n, m, FOLDS)
        for rank in range(count):
            run = NormalEquations.empty(n, m, FOLDS)
            for i in range(total):
                if owner(i, count, total) == rank:
                    run.add(*batches[i], i)
            regrouped = regrouped.merge(run)
        regrouped_differ |= not np.array_equal(regrouped.xx, one.xx)
    assert regrouped_differ  # so the exact merge above is not exact by luck of the data


@pytest.mark.slow  # two prunes, ~5 s (10 s at a load of 10)
def test_more_workers_than_folds_write_the_one_process_model(monkeypatch):
    """5 workers over 7 batches: worker 0 leads fold 0 with two batches, worker 2 sends batch 5
    alone and leads fold 2 — both kinds of sums from one worker."""
    count = 5
    feed = more_batches()
    alone, report = prune(str(DIGITS), ratio=0.5, calib=feed)
    monkeypatch.setattr(distributed, "RayShards", InProcessShards)
    spread, spread_report = prune(str(DIGITS), ratio=0.5, calib=feed, workers=count)
    wa, wb = _weights(alone), _weights(spread)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert spread_report.reconstruction["samples"] == report.reconstruction["samples"]


def test_more_workers_than_batches_are_refused_before_ray_starts(monkeypatch):
    def no_ray(*_):
        raise AssertionError("Ray started")

    monkeypatch.setattr(distributed, "RayShards", no_ray)
    with pytest.raises(SnpError, match=r"^--workers 8: the reconstruction has 7 calibration batches of up to 32 "
                                       r"samples.*at most 7 workers"):
        prune(str(DIGITS), ratio=0.5, calib=more_batches(), workers=8)
