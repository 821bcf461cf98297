"""--workers: a worker receives and holds only the weights of the half-block it runs
(compensate/worker_graph.py), and the pruned model stays the one-process model bit for bit.
Without Ray (test_worker_runs.InProcessShards: the workers in this process, every argument
through pickle), so the fast tier checks it; tests/test_workers.py runs Ray workers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT
from test_worker_runs import DIGITS, InProcessShards
from onnxsnp import prune
from onnxsnp.compensate import distributed, worker_graph
from onnxsnp.compensate.distributed import Channel
from onnxsnp.compensate.halves import embeddings, plan_segments
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.ir.sizes import raw_bytes
from onnxsnp.match import find_blocks

DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"


class Recording(InProcessShards):
    """InProcessShards that also records, after every call, what each worker holds."""

    made: list[Recording] = []

    def _start(self, workers, *setup):
        Recording.made.append(self)
        self.held_after = []
        super()._start(workers, *setup)

    def _each(self, method, per_rank):
        results = super()._each(method, per_rank)
        number = per_rank[0][0] if per_rank[0] and method != "prepare" else None
        self.held_after.append((method, number, [worker.held() for worker in self.workers]))
        return results


def _arrays(value) -> int:
    """Bytes of the numpy arrays and protobuf initializer data inside `value` (what a call sends)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, bytes):
        model = onnx.load_from_string(value)
        return sum(raw_bytes(t) for t in model.graph.initializer if t.HasField("raw_data"))
    if isinstance(value, dict):
        return sum(_arrays(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_arrays(v) for v in value)
    return 0


def _half_weights(g: ModelGraph) -> list[dict[str, int]]:
    """Per half-block (attention, FFN of every layer, in order): the initializers of its linear
    layers (weights and biases) of HELD_MIN_BYTES or more, with their bytes, from the matches."""
    halves = []
    for layer in find_blocks(g).layers:
        block, ffn = layer.attention, layer.ffn
        for linears in ((block.q, block.k, block.v, block.out), (ffn.fc1, ffn.fc2)):
            names = {g.initializer_behind(t) for linear in linears for t in (linear.weight, linear.bias) if t}
            halves.append({n: raw_bytes(g.initializers[n]) for n in names
                           if n and raw_bytes(g.initializers[n]) >= worker_graph.HELD_MIN_BYTES})
    return halves


def test_a_worker_holds_only_the_half_block_it_runs(monkeypatch):
    monkeypatch.setattr(distributed, "RayShards", Recording)
    made = []
    monkeypatch.setattr(Recording, "made", made)
    spread, _ = prune(str(DIGITS), ratio=0.5, calib=str(DIGITS_CALIB), workers=2)
    shards, = made
    g = ModelGraph(onnx.load(str(DIGITS)))
    expected = _half_weights(g)
    every_block = sum(sum(h.values()) for h in expected)
    assert min(sum(h.values()) for h in expected) > 0

    # set up without the blocks' weights: the protobuf and arrays sent hold less than one half-block
    (what, setup), = [s for s in shards.sent if s[0] == "setup"]
    assert _arrays(setup) < min(sum(h.values()) for h in expected)
    light = onnx.load_from_string(setup[0])
    assert not any(t.HasField("raw_data") for t in light.graph.initializer if t.name in set().union(*expected))
    # per half-block, its weights sent once (originals with `hold`, beside the current ones of the
    # passes that refit it), and none of another half's
    holds = [(args[0], args[1]) for method, args in shards.sent if method == "hold" and args[0] is not None]
    assert [number for number, _ in holds] == list(range(len(expected)))
    for number, weights in holds:
        assert {n: w.nbytes for n, w in weights.items()} == expected[number], number
    assert sum(_arrays(w) for _, w in holds) == every_block
    # a worker holds its half's weights while it runs it, and nothing between halves
    passes = 0
    for method, number, held in shards.held_after:
        if method in ("prepare", "finish"):  # the embeddings' or the half's last pass: all dropped
            assert held == [{}] * 2, method
        elif method in ("hold", "attention_targets", "ffn_targets", "equations", "transform_cache"):
            current = number if method != "transform_cache" else current
            if current is None:  # the embeddings' weights, for the first stream: none of a block's
                assert held[0] and held[0] == held[1] and not set(held[0]) & set().union(*expected)
            else:
                assert held == [expected[current]] * 2, (method, current)
            passes += method != "hold"
    assert passes >= 2 * len(expected)

    alone, _ = prune(str(DIGITS), ratio=0.5, calib=str(DIGITS_CALIB))
    wa = {t.name: numpy_helper.to_array(t) for t in alone.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in spread.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_weight_asked_for_outside_the_half_held_is_an_error():
    model = onnx.load(str(DIGITS))
    light, held = worker_graph.weightless(model)
    g = worker_graph.BlockGraph(light, held)
    name = next(iter(sorted(held)))
    with pytest.raises(Exception, match=f"asked for {name}, a weight not sent"):
        g.constant(name)
    value = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    g.hold({name: value})
    assert g.constant(name) is value and g.held_bytes() == value.nbytes
    g.hold({})
    with pytest.raises(Exception, match="not sent"):
        g.constant(name)


@pytest.mark.slow  # a torch export and two prunes of a tiny Llama, ~20 s
def test_a_decoder_on_in_process_workers_is_the_one_process_model(monkeypatch, tmp_path):
    """Rotary tables, grouped-query attention, RMS norms and a dynamo export's constants: each
    read on a worker from the half-block held."""
    pytest.importorskip("torch")
    from decoder_export import export_dynamo, tiny_llama
    from decoders import calibration

    path = export_dynamo(tiny_llama(), tmp_path / "llama.onnx")
    calib = calibration(100)
    alone, _ = prune(str(path), ratio=0.5, calib=calib)
    monkeypatch.setattr(distributed, "RayShards", InProcessShards)
    spread, _ = prune(str(path), ratio=0.5, calib=calib, workers=3)
    wa = {t.name: numpy_helper.to_array(t) for t in alone.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in spread.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def _traffic_run(monkeypatch, **budget) -> Recording:
    monkeypatch.setattr(distributed, "RayShards", Recording)
    made = []
    monkeypatch.setattr(Recording, "made", made)
    prune(str(DIGITS), calib=str(DIGITS_CALIB), workers=2, **budget)
    shards, = made
    return shards


def _original_reads(g: ModelGraph) -> tuple[int, list[int]]:
    """Bytes of the large initializers the embeddings' segment reads, and each half-block's."""
    halves = plan_segments(g, find_blocks(g))
    _, held = worker_graph.weightless(g.model)
    size = lambda names: sum(raw_bytes(g.initializers[n]) for n in names)  # noqa: E731
    return (size(worker_graph.segment_reads(g, [embeddings(g, halves)[0]], held)),
            [size(worker_graph.half_reads(g, h, held)) for pair in halves for h in pair])


def test_the_traffic_counts_what_the_workers_were_sent(monkeypatch):
    shards = _traffic_run(monkeypatch, ratio=0.5)
    traffic = shards.traffic
    prefix, halves = _original_reads(ModelGraph(onnx.load(str(DIGITS))))
    # the original weights: the embeddings' once, then each half-block's once, nothing else
    assert traffic.puts[Channel.HALF_WEIGHTS] == 1 + len(halves)
    assert traffic.sent[Channel.HALF_WEIGHTS] == prefix + sum(halves)
    # the passes' current weights: as many puts and bytes as the calls that carried them
    passes = [args for method, args in shards.sent if method in ("equations", "finish", "transform_cache")]
    assert traffic.puts[Channel.CURRENT_WEIGHTS] == len(passes) >= 2 * len(halves)
    assert traffic.sent[Channel.CURRENT_WEIGHTS] == sum(_arrays(args) for args in passes) > 0
    (batches, *_), = [args for method, args in shards.sent if method == "prepare"]  # rank 0's (recorded)
    assert traffic.puts[Channel.BATCHES] == 2 and traffic.sent[Channel.BATCHES] > _arrays(batches) > 0
    setup, = [s for method, s in shards.sent if method == "setup"]
    assert traffic.sent[Channel.SETUP] >= len(setup[0])  # the protobuf, beside the pickled blocks and halves
    assert traffic.summary()["half_weights"] == {"bytes": traffic.sent[Channel.HALF_WEIGHTS],
                                                 "puts": 1 + len(halves),
                                                 "seconds": round(traffic.seconds[Channel.HALF_WEIGHTS], 3)}


def test_a_flops_search_sends_the_workers_what_a_ratio_run_does(monkeypatch):
    """--target-flops: the survey and the search run in the driver, then one reconstruction: each
    half-block's original weights go out once, as with --ratio (a sweep's budgets, one run each,
    send them once per budget)."""
    ratio = _traffic_run(monkeypatch, ratio=0.5).traffic
    search = _traffic_run(monkeypatch, target_flops=0.8).traffic
    for channel in (Channel.SETUP, Channel.BATCHES, Channel.HALF_WEIGHTS):
        assert (search.sent[channel], search.puts[channel]) == (ratio.sent[channel], ratio.puts[channel]), channel
    assert search.puts[Channel.CURRENT_WEIGHTS] == ratio.puts[Channel.CURRENT_WEIGHTS]


@pytest.mark.slow  # a sweep of two budgets, ~10 s
def test_a_sweep_sends_each_half_block_once_per_budget(monkeypatch, tmp_path):
    """What a search re-sends: a sweep's budgets share the batches (sent once) and run one
    reconstruction each, which sends every half-block's original weights again."""
    from onnxsnp import sweep

    one = _traffic_run(monkeypatch, target_flops=0.8).traffic
    made = []
    monkeypatch.setattr(Recording, "made", made)
    sweep(str(DIGITS), [0.8, 0.6], tmp_path, calib=str(DIGITS_CALIB), workers=2)
    swept = made[0].traffic
    prefix, halves = _original_reads(ModelGraph(onnx.load(str(DIGITS))))
    assert swept.puts[Channel.HALF_WEIGHTS] == 1 + 2 * len(halves) and one.puts[Channel.HALF_WEIGHTS] == 1 + len(halves)
    assert swept.sent[Channel.HALF_WEIGHTS] == prefix + 2 * sum(halves)
    assert (swept.sent[Channel.BATCHES], swept.puts[Channel.BATCHES]) == (one.sent[Channel.BATCHES],
                                                                           one.puts[Channel.BATCHES])
