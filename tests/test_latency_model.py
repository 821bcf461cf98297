"""The latency model: measured node times scaled by what a plan keeps, and budgets spent in time.

Predictions are checked against the node times they are built from (measured here, or set by
hand), never against a stopwatch: machines are noisy; tools/bench_speed.py --latency-target
measures the speedups."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

import graphs
from conftest import ROOT
from onnxsnp import SnpError
from onnxsnp.score.allocation import Target, _full_plan as _full, allocate, unit_costs
from onnxsnp.data.calibration import Runner
from onnxsnp.score.costs import CostKind, CostModel
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.options import make_options
from onnxsnp.plan import AttentionKeep, FfnKeep, PrunePlan
from onnxsnp.score import profiling
from onnxsnp.score.profiling import NodeTimes, profile_nodes
from onnxsnp.ir.stats import count_params, macs_from_shapes, shape_tensors
from test_allocation import _curves

DIGITS = ROOT / "models" / "digits_vit.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"
NODE_MS, DISPATCH_MS, OVERHEAD_MS = 0.25, 0.01, 0.5  # the hand-set times
SPEEDUP = 1.3  # reachable by neurons alone when every node takes the same time (most are layout ops)


def _setup(model: onnx.ModelProto, feed: dict[str, np.ndarray]):
    g = ModelGraph(model)
    names = shape_tensors(g.model)
    (_, values), = list(Runner(g.model, names).batches(feed, names, 1))
    return g, find_blocks(g), macs_from_shapes(g.model, {n: values[n].shape for n in names}, 1)


@pytest.fixture(scope="module")
def digits():
    return _setup(onnx.load(str(DIGITS)), {"pixel_values": np.load(DIGITS_CALIB)["pixel_values"][:1]})


def _hand_timed(g: ModelGraph, matches, macs) -> CostModel:
    """Every node takes NODE_MS (DISPATCH_MS of it fixed), plus OVERHEAD_MS per run."""
    times = NodeTimes({name: NODE_MS for name in g.nodes}, OVERHEAD_MS, 1, 1, DISPATCH_MS)
    return CostModel(g, matches, macs, count_params(g.model), times)


def test_profiled_times_predict_the_unpruned_model(digits):
    g, matches, macs = digits
    times = profile_nodes(g, {"pixel_values": np.load(DIGITS_CALIB)["pixel_values"][:1]}, macs, runs=3)
    assert times.node_ms and set(times.node_ms) <= set(g.nodes)
    assert any(g.node(n).op_type == "Softmax" for n in times.node_ms)  # unfused ops are traced by name
    costs = CostModel(g, matches, macs, count_params(g.model), times)
    assert costs.cost(_full(matches), CostKind.LATENCY) == pytest.approx(times.total_ms, rel=1e-9)
    assert costs.original("latency") == times.total_ms


def test_a_removed_block_costs_nothing(digits):
    g, matches, macs = digits
    costs = _hand_timed(g, matches, macs)
    layer = matches.layers[1]
    inside = costs.layer_nodes[layer]
    assert any(g.node(n).op_type == "Softmax" for n in inside) and any(g.node(n).op_type == "Add" for n in inside)
    full = _full(matches)
    saved = costs.latency(full) - costs.latency(replace(full, removed_layers=(layer,)))
    assert saved == pytest.approx(NODE_MS * len(inside))


def test_unpruned_work_scales_with_what_is_kept(digits):
    """Softmax by kept heads, the FFN activation by kept neurons; the norms and residual Adds,
    which no neuron cut reaches, keep their time."""
    g, matches, macs = digits
    costs = _hand_timed(g, matches, macs)
    block, ffn = matches.attention[0], matches.ffn[0]
    full = _full(matches)
    heads = np.arange(block.heads // 2)
    attention = (AttentionKeep(block, np.tile(np.arange(block.head_dim), (len(heads), 1)),
                               np.tile(np.arange(block.head_dim), (len(heads), 1)), heads),) + full.attention[1:]
    hidden = ffn.hidden // 4
    plan = replace(full, attention=attention, ffn=(FfnKeep(ffn, np.arange(hidden)),) + full.ffn[1:])
    scale = costs._work_scales(plan) | costs._product_scales(plan)
    softmax = next(n for n in costs.layer_nodes[matches.layers[0]] if g.node(n).op_type == "Softmax")
    assert scale[softmax] == pytest.approx(len(heads) / block.heads)
    activation = [n for n, f in scale.items() if n in costs._work_nodes()["ffn"][ffn.name]]
    assert activation and all(scale[n] == pytest.approx(hidden / ffn.hidden) for n in activation)
    norms = [n.name for n in g.model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(n not in scale for n in norms)
    expected = OVERHEAD_MS + sum(DISPATCH_MS + (NODE_MS - DISPATCH_MS) * scale.get(n, 1.0) if scale.get(n, 1.0) > 0
                                 else 0.0 for n in g.nodes)
    assert costs.latency(plan) == pytest.approx(expected)
    assert costs.latency(plan) < costs.latency(full)


def test_attention_roles_on_a_hand_built_graph():
    """Q·Kᵀ's scale and Softmax follow the kept heads; the ops on q/k before it the kept Q/K width,
    the ops on v and after attn·V the kept V width."""
    model = graphs.softmax_attention()
    x = np.random.default_rng(0).standard_normal((1, graphs.TOKENS, graphs.WIDTH)).astype(np.float32)
    g, matches, macs = _setup(model, {"x": x})
    block, = matches.attention
    roles = CostModel(g, matches, macs, 0)._work_nodes()["attention"][block.name]
    by_op = {}
    for name, role in roles.items():
        by_op.setdefault(g.node(name).op_type, set()).add(role.value)
    assert by_op["Softmax"] == {"scores"} and by_op["Mul"] == {"scores"}
    assert by_op["Transpose"] == {"qk", "v"}  # q and kᵀ split into heads; v split and merged back
    assert by_op["Reshape"] == {"qk", "v"}


def test_unit_costs_predict_latency_with_heads_and_blocks(digits):
    """Units × widths (+ what a head and a block cost beyond them) equals the latency model's cost."""
    g, matches, macs = digits
    costs = _hand_timed(g, matches, macs)
    units = unit_costs(costs, matches, CostKind.LATENCY)
    assert all(u.head > 0 and u.rest > 0 for u in units)  # Softmax per head; norms and Adds per block
    full = _full(matches)
    keeps, predicted = [], costs.latency(full)
    for block, unit in zip(matches.attention, units):
        heads, qk, v = block.heads - 1, block.head_dim // 2, block.head_dim // 4
        keeps.append(AttentionKeep(block, np.tile(np.arange(qk), (heads, 1)), np.tile(np.arange(v), (heads, 1)),
                                   np.arange(heads)))
        predicted -= (block.heads * block.head_dim * (unit.qk + unit.v) + block.heads * unit.head
                      - heads * (qk * unit.qk + v * unit.v + unit.head))
    plan = replace(full, attention=tuple(keeps))
    assert costs.latency(plan) == pytest.approx(predicted, rel=1e-6)


@pytest.mark.parametrize("blocks", [0, 1])
def test_allocation_meets_a_speedup_goal(digits, blocks):
    g, matches, macs = digits
    costs = _hand_timed(g, matches, macs)
    target = Target(CostKind.LATENCY, SPEEDUP, speedup=True)
    total = costs.original(target.kind)
    widths, _ = allocate(_curves(matches, [1.0, 5.0, 1.0, 5.0]), matches, unit_costs(costs, matches, target.kind),
                         total, target.absolute(total), max_blocks=blocks)
    plan = PrunePlan(tuple(AttentionKeep(b, np.tile(np.arange(w.qk), (w.heads, 1)),
                                         np.tile(np.arange(w.v), (w.heads, 1)), np.arange(w.heads))
                           for b in matches.attention for w in [widths.attention[b.name]]),
                     tuple(FfnKeep(b, np.arange(widths.ffn[b.name])) for b in matches.ffn),
                     removed_layers=tuple(matches.layers[i] for i in widths.removed_layers))
    predicted = costs.latency(plan)
    assert predicted <= total / SPEEDUP * (1 + 1e-9)
    assert predicted > total / SPEEDUP * 0.9  # the allocation stops once the goal is met


@pytest.mark.parametrize("options,message", [
    (dict(target_speedup=1), "--target-speedup must be a factor above 1"),
    (dict(target_speedup="fast"), "--target-speedup must be"),
    (dict(target_latency=0), "--target-latency must be milliseconds"),
    (dict(target_latency=float("nan")), "--target-latency must be"),
    (dict(target_flops=0.5, target_speedup=2), "give one budget, not --target-flops and --target-speedup"),
    (dict(target_speedup=2, target_latency=3), "give one budget"),
])
def test_latency_options_are_checked(options, message):
    with pytest.raises(SnpError, match=message):
        make_options(**options)


def test_latency_targets_resolve():
    speedup = make_options(target_speedup="2").target
    assert speedup.kind is CostKind.LATENCY and speedup.absolute(10.0) == 5.0 and speedup.flag == "--target-speedup"
    latency = make_options(target_latency=0.25).target
    assert latency.absolute(10.0) == 0.25 and latency.flag == "--target-latency"


def _event(cat: str, name: str, ts: int, dur: int) -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"op_name": "MatMul"} if cat == "Node" else {}}


def test_a_nodes_time_is_its_median_over_the_runs():
    """A run preempted inside one node (its time 100x) moves that node's mean, not its median; a
    node missing from a run counts 0 there; warm-up runs before the last `runs` are left out."""
    times_us = {"a": [10, 10, 1000, 10, 10], "b": [20, 20, 20, 20, 20]}
    events = [_event("Session", "model_run", 0, 5_000), _event("Node", "a_kernel_time", 10, 99_999)]  # warm-up
    for run in range(5):
        start = 10_000 * (run + 1)
        events.append(_event("Session", "model_run", start, 5_000))
        events += [_event("Node", f"{name}_kernel_time", start + 1 + i, times[run])
                   for i, (name, times) in enumerate(times_us.items()) if not (name == "b" and run == 0)]
    got = profiling._node_times(events, runs=5)
    assert got == {"a": pytest.approx(np.median(times_us["a"]) / 1000), "b": pytest.approx(20 / 1000)}


def test_a_fast_model_is_profiled_for_longer():
    """At least the runs asked for; a fast model's runs go on until PROFILE_SECONDS, at most
    MAX_PROFILE_RUNS; a slow one stops at the runs asked for."""
    import time

    assert profiling._timed_runs(lambda: None, 3) == profiling.MAX_PROFILE_RUNS
    slow = profiling.PROFILE_SECONDS * 0.75
    assert profiling._timed_runs(lambda: time.sleep(slow), 2) == 2
