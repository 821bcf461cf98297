"""Block-by-block reconstruction: segments, the pruned stream, projections and what they keep."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import ROOT, feed_for, run
from onnxsnp import prune
from onnxsnp.data.calibration import Runner
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.score.importance import PairStatistics
from onnxsnp.match import find_blocks
from onnxsnp.compensate.halves import arenas, plan_segments, runners
from onnxsnp.plan import AttentionWidth, PrunePlan, Propagation, Widths
from onnxsnp.compensate.projection import project_pairs
from onnxsnp.compensate.reconstruction import Reconstructor
from onnxsnp.rewrite.rewriting import rewrite

DIGITS = ROOT / "models" / "digits_vit.onnx"
DIGITS_CALIB = ROOT / "models" / "digits_vit_calib.npz"
SEGMENTED = [("vit", "manual", True, "legacy"), ("vit", "sdpa", True, "dynamo"), ("bert", "eager", True, "legacy"),
             ("bert", "eager", True, "ort-optimizer")]


@pytest.mark.parametrize("form", SEGMENTED, ids=["-".join(map(str, f)) for f in SEGMENTED])
def test_segments_chained_give_the_model_stream(exported, form):
    """Embeddings, then every half-block on its own: the last block's output as the model computes it."""
    g = ModelGraph(onnx.load(str(exported(*form))))
    matches = find_blocks(g)
    reconstructor = Reconstructor(g, matches)
    feed = feed_for(exported(*form), batch=3)
    shards = reconstructor.prepare(feed, 3, "attention_mask" if "attention_mask" in feed else None)
    for number in range(2 * len(reconstructor.halves)):
        shards.advance_original(number)
    last = matches.layers[-1].output
    (_, values), = list(Runner(g.model, [last]).batches(feed, [last], 3))
    np.testing.assert_allclose(shards.shard.batches[0].original, values[last], atol=1e-4)


@pytest.mark.parametrize("form", SEGMENTED, ids=["-".join(map(str, f)) for f in SEGMENTED])
def test_the_refits_sums_read_the_layers_inputs_without_running_the_layer(exported, form):
    """The equations pass runs each half only up to the refitted layer's inputs (onnxruntime runs a
    session's every node whatever is asked for): that part holds neither the layer nor the join,
    and gives the whole half's value of those inputs, bit for bit."""
    g = ModelGraph(onnx.load(str(exported(*form))))
    matches = find_blocks(g)
    reconstructor = Reconstructor(g, matches)
    feed = feed_for(exported(*form), batch=3)
    shards = reconstructor.prepare(feed, 3, "attention_mask" if "attention_mask" in feed else None)
    shard, item = shards.shard, shards.shard.batches[0]
    for number in range(2 * len(reconstructor.halves)):
        half, linear = shard.half(number), shard.linear(number)
        part = half.layer_inputs.segment
        assert linear.node in half.segment.nodes and linear.node not in part.nodes
        assert not set(half.join.segment.nodes) & set(part.nodes)
        assert part.outputs == (linear.input,)
        whole = shard.run_half(half, item, item.original, shard.original, [linear.input])[linear.input]
        alone = shard.run(half.layer_inputs, item, {half.residual: item.original}, shard.original, [linear.input])
        np.testing.assert_array_equal(alone[linear.input], whole)
        shards.advance_original(number)


@pytest.mark.slow  # reconstructs the shipped model: seconds
def test_reconstructed_stream_is_the_rewritten_models():
    """The pruned stream the reconstruction carries from block to block (refitted layers applied
    from cached inputs through the residual join) equals the rewritten model's."""
    g = ModelGraph(onnx.load(str(DIGITS)))
    matches = find_blocks(g)
    feed = dict(np.load(DIGITS_CALIB))
    feed = {k: v[:40] for k, v in feed.items()}
    widths = Widths({b.name: AttentionWidth(3, 6, 10) for b in matches.attention},
                    {b.name: 100 for b in matches.ffn})
    reconstructor = Reconstructor(g, matches)
    shards = reconstructor.prepare(feed, 20, None)
    result = reconstructor.run(shards, widths)
    plan = PrunePlan(result.attention, result.ffn, result.scale_values, refits=result.refits)
    last = matches.layers[-1].output
    (_, values), = list(Runner(rewrite(g, plan), [last]).batches(feed, [last], 40))
    carried = np.concatenate([b.pruned for b in shards.shard.batches])
    np.testing.assert_allclose(carried, values[last], atol=1e-4, rtol=1e-4)
    assert [k.heads.size for k in result.attention] == [3] * len(matches.attention)
    assert all(h.error_after <= h.error_before + 1e-9 for h in result.halves)  # a refit never fits worse


@pytest.mark.slow  # reconstructs the shipped model: seconds
def test_a_single_run_keeps_no_copy_of_the_first_stream():
    """A one-run reconstruction (the default prune) gives up the first block's input once it has
    moved on; a restartable one (onnxsnp sweep) keeps it and gives the same model again."""
    g = ModelGraph(onnx.load(str(DIGITS)))
    matches = find_blocks(g)
    feed = {k: v[:40] for k, v in dict(np.load(DIGITS_CALIB)).items()}
    widths = Widths({b.name: AttentionWidth(3, 6, 10) for b in matches.attention},
                    {b.name: 100 for b in matches.ffn})
    once = Reconstructor(g, matches)
    single = once.prepare(feed, 20, None, restartable=False)
    first = [b.original for b in single.shard.batches]
    result = once.run(single, widths)
    held = {id(a) for b in single.shard.batches for a in (b.original, b.pruned, b.target) if a is not None}
    assert not held & {id(a) for a in first}
    with pytest.raises(RuntimeError):
        single.restart()
    again = Reconstructor(g, matches)
    shards = again.prepare(feed, 20, None)
    again.run(shards, widths)
    again.restart()
    shards.restart()
    repeated = again.run(shards, widths)
    for a, b in zip(result.refits.values(), repeated.refits.values()):
        np.testing.assert_array_equal(a.weight, b.weight)


def test_norm_weights_routed_through_identity_nodes_still_cut_into_blocks(tmp_path, torch):
    """A freshly initialised BERT (every LayerNorm weight 1, every bias 0) exported by the legacy
    exporter shares those initializers through Identity nodes; the residual join is still an Add
    and a LayerNorm, so the model is reconstructed block by block, not by the one-pass fallback."""
    from exports import export
    from torch_models import HFEncoder, tiny_bert

    path = tmp_path / "fresh_bert.onnx"
    ids = torch.randint(0, 100, (2, 8))
    export(HFEncoder(tiny_bert("eager", layers=2, seed=0)), (ids, torch.ones_like(ids)), path,
           ["input_ids", "attention_mask"], ["last_hidden_state"], None, "legacy")
    g = ModelGraph(onnx.load(str(path)))
    matches = find_blocks(g)
    joins = [half.join.segment for pair in plan_segments(g, matches) for half in pair]
    assert any(g.node(n).op_type == "Identity" for join in joins for n in join.nodes)  # the form under test
    _, report = prune(str(path), ratio=0.5, calib=feed_for(path, batch=16))
    assert report.compensation_kept == ["reconstruction"]


def test_a_layers_sessions_keep_their_arena_for_one_pass(exported, monkeypatch):
    """The reconstruction's segment sessions are built with onnxruntime's memory arena (no fresh
    mappings per run) and dropped, arena and all, at the end of every pass (none alive when the
    pass gives its heap back), each built once all the same (a runner serves one pass of its
    layer); none is left after the run, and a runner outside a run builds without it."""
    from onnxsnp.compensate import batches, segments

    built, passes = [], []
    light_session, build, release_heap = segments.light_session, segments.SegmentRunner._build, batches.release_heap

    def recording(*args, **kwargs):
        built.append(kwargs.get("arena", False))
        return light_session(*args, **kwargs)

    def counted(runner, values):
        builds[id(runner)] = builds.get(id(runner), 0) + 1
        return build(runner, values)

    def released():
        passes.append([r for pair in reconstructor.halves for h in pair for r in runners(h)
                       if r.arena and r.session is not None])
        release_heap()

    builds: dict[int, int] = {}
    monkeypatch.setattr(segments, "light_session", recording)
    monkeypatch.setattr(segments.SegmentRunner, "_build", counted)
    monkeypatch.setattr(batches, "release_heap", released)
    path = exported("bert", "eager", True)
    g = ModelGraph(onnx.load(str(path)))
    matches = find_blocks(g)
    reconstructor = Reconstructor(g, matches)
    shards = reconstructor.prepare(feed_for(path, batch=8), 4, "attention_mask")
    before = len(built)  # the embeddings' session, outside the run
    widths = Widths({b.name: AttentionWidth(b.heads, b.head_dim // 2, b.head_dim // 2) for b in matches.attention},
                    {b.name: b.fc1.out_features // 2 for b in matches.ffn})
    reconstructor.run(shards, widths)
    assert built[:before] == [False] * before
    assert len(built) > before and all(built[before:])
    assert len(passes) > 2 * len(matches.layers) and passes == [[]] * len(passes)
    assert set(builds.values()) == {1}
    every = [r for pair in reconstructor.halves for h in pair for r in runners(h)]
    assert all(r.session is None and not r.arena for r in every)


def test_a_layers_arenas_go_with_it_even_on_an_error():
    """`arenas`: the sessions built inside keep their arena; leaving, by an exception too, drops
    every session of the pair and builds none with an arena afterwards."""
    g = ModelGraph(onnx.load(str(DIGITS)))
    reconstructor = Reconstructor(g, find_blocks(g))
    shards = reconstructor.prepare(dict(np.load(DIGITS_CALIB)), 4, None)
    shard, item = shards.shard, shards.shard.batches[0]
    pair = reconstructor.halves[0]
    with pytest.raises(RuntimeError, match="stop"):
        with arenas(pair):
            assert all(r.arena for half in pair for r in runners(half))
            shard.run_half(pair[0], item, item.original, shard.original, [pair[0].segment.outputs[0]])
            assert pair[0].runner.session is not None
            raise RuntimeError("stop")
    assert all(r.session is None and not r.arena for half in pair for r in runners(half))


def test_nothing_removed_is_nothing_changed(exported):
    path = exported("bert", "eager", True)
    pruned, report = prune(str(path), ratio=0.0, calib=feed_for(path, batch=16))
    feed = feed_for(path, batch=2, seq=5)
    for want, got in zip(run(onnx.load(str(path)), feed), run(pruned, feed)):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert report.compensation_kept == ["reconstruction"]


@pytest.mark.slow  # reconstructs the shipped model: seconds
@pytest.mark.parametrize("reconstruct", ["sequential", "one-shot"])
def test_reconstruction_keeps_more_than_slicing(reconstruct):
    cosines = {mode: prune(str(DIGITS), ratio=0.5, calib=str(DIGITS_CALIB), compensate=mode,
                           reconstruct=reconstruct)[1].fidelity.output_cosine for mode in ("none", "lstsq")}
    assert cosines["lstsq"] > cosines["none"]


def test_projected_pairs_approximate_scores_better_than_any_choice_of_pairs():
    """Keeping k projected directions of a head is the best rank-k approximation of its scores
    (in the metric of the pooled Grams): no choice of k original pairs, rescaled or not, does better."""
    rng = np.random.default_rng(0)
    d, k, tokens = 6, 2, 40
    mixing = rng.standard_normal((d, d)) * np.array([3, 2, 1.5, 1, 0.5, 0.2])
    q = rng.standard_normal((1, tokens, d)) @ mixing
    key = rng.standard_normal((1, tokens, d)) @ mixing
    pairs = PairStatistics.empty(1, d)
    pairs.add(q, key)
    q_map, k_map = project_pairs(pairs, k)
    scores = q[0] @ key[0].T
    projected = np.linalg.norm((q[0] @ q_map[0]) @ (key[0] @ k_map[0]).T - scores)
    from itertools import combinations

    for chosen in combinations(range(d), k):
        columns = list(chosen)
        partial = q[0][:, columns] @ key[0][:, columns].T
        best_scale = np.sum(partial * scores) / max(np.sum(partial * partial), 1e-30)  # even rescaled
        assert projected <= np.linalg.norm(best_scale * partial - scores) + 1e-9


def test_models_that_cannot_be_cut_into_blocks_say_why(exported):
    """The one-pass flow takes over, with a reason (here: residual pruning; no blocks found raises)."""
    g = ModelGraph(onnx.load(str(exported("vit", "manual", True))))
    assert len(plan_segments(g, find_blocks(g))) == 2
    _, report = prune(str(exported("vit", "manual", True)), ratio=0.3, residual=0.25, calib_samples=16)
    assert report.reconstruction is None and report.residual_width is not None


@pytest.mark.slow  # reconstructs the shipped model: seconds
def test_one_shot_fits_on_the_original_stream():
    """One-shot: every block sees the original model's stream; its refits differ from sequential ones."""
    g = ModelGraph(onnx.load(str(DIGITS)))
    matches = find_blocks(g)
    feed = {k: v[:32] for k, v in np.load(DIGITS_CALIB).items()}
    widths = Widths({b.name: AttentionWidth(4, 8, 8) for b in matches.attention}, {b.name: 128 for b in matches.ffn})
    refits = []
    for propagation in (Propagation.ONE_SHOT, Propagation.SEQUENTIAL):
        reconstructor = Reconstructor(g, matches, propagation=propagation)
        shards = reconstructor.prepare(feed, 16, None)
        result = reconstructor.run(shards, widths)
        if propagation is Propagation.ONE_SHOT:
            assert all(np.array_equal(b.pruned, b.original) for b in shards.shard.batches)
        refits.append(result.refits[matches.ffn[-1].fc2.node].weight)
    assert not np.allclose(refits[0], refits[1])


@pytest.mark.slow  # reconstructs the shipped model: seconds
def test_a_model_that_overflows_on_its_calibration_data_is_refused_not_looped_on(tmp_path):
    """An FFN whose activations are inf on the calibration data (a weight row at 3e38): one line,
    exit 2, no output (the OBS removal loop once spun forever on the NaN costs)."""
    import subprocess
    import sys

    from onnx import numpy_helper

    model = onnx.load(str(DIGITS))
    g = ModelGraph(model)
    fc1 = find_blocks(g).ffn[-1].fc1
    name = g.node(fc1.node).input[fc1.weight_index]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    weight = numpy_helper.to_array(tensor).copy()
    weight[0, :] = 3e38
    tensor.CopyFrom(numpy_helper.from_array(weight, name))
    source, out = tmp_path / "overflow.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    done = subprocess.run([sys.executable, "-m", "onnxsnp", str(source), str(out), "--calib", str(DIGITS_CALIB), "-q"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not finite" in lines[0], done.stderr
    assert not out.exists()


def test_obs_removal_ends_when_costs_are_not_finite():
    from onnxsnp.compensate.least_squares import NormalEquations, Obs

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    equations = NormalEquations.empty(6, 3)
    equations.add(x, x[:, :3], 0)
    obs = Obs(equations, np.zeros((6, 3)))
    obs.weight[2:] = np.nan  # what non-finite statistics leave behind
    removals = 0
    while obs.alive.sum() > 2:
        obs.remove(np.argsort(obs.single_costs(), kind="stable")[:1])
        removals += 1
        assert removals <= 4, "a removal picked a row already removed"
    assert obs.alive.sum() == 2


@pytest.mark.parametrize("drift", [0.0, 0.05])
def test_a_sandwich_normed_branch_is_refitted_towards_what_the_sum_misses(drift):
    """x + γ·b/rms(b) (Gemma 3, OLMo 2): the refit's target in b's space, put back through the norm
    and added to the pruned stream, gives the original sum — exactly with no drift, to first order
    with some (the norm is linearised at the original branch); a channel with a tiny γ keeps b."""
    from onnxsnp.compensate.token_targets import branch_rms, sandwich_target

    rng = np.random.default_rng(0)
    tokens, width, eps = 64, 16, 1e-6
    gamma = rng.uniform(0.5, 2.0, width).astype(np.float32)
    gamma[3] = 1e-4
    branch = rng.standard_normal((1, tokens, width)).astype(np.float32)
    original = rng.standard_normal((1, tokens, width)).astype(np.float32) * 5
    target = gamma * branch / branch_rms(branch, eps) + original
    pruned = original + drift * rng.standard_normal(original.shape).astype(np.float32)
    mapped, weights = sandwich_target(target - pruned, branch, gamma, eps, 1, None, None)
    assert weights.shape == (tokens,) and weights.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(mapped[..., 3], branch[..., 3])
    back = gamma * mapped / branch_rms(mapped, eps) + pruned
    usable = np.arange(width) != 3
    before = np.abs(pruned + gamma * branch / branch_rms(branch, eps) - target)[..., usable].mean()
    after = np.abs(back - target)[..., usable].mean()
    assert after <= 1e-5 if drift == 0 else after < 0.5 * before  # the norm's own rms moves with the correction


def test_a_sandwich_normed_target_stays_on_the_branchs_sphere():
    """x + γ·b/rms(b): the norm undoes any change of b's size, so a target far from b (a large drift
    mapped back through the linearised norm) is met on the sphere ‖u‖ = ‖b‖, nearest in the
    stream's metric γ² — what the stream gains from the branch put back through the norm. The
    linearised target itself, put through the norm, lands farther from the sum."""
    from onnxsnp.compensate.token_targets import branch_rms, on_sphere, sandwich_target

    rng = np.random.default_rng(1)
    tokens, width, eps, drift = 32, 24, 1e-6, 1.0
    gamma = rng.uniform(0.2, 5.0, width).astype(np.float32)
    branch = rng.standard_normal((1, tokens, width)).astype(np.float32)
    original = rng.standard_normal((1, tokens, width)).astype(np.float32) * 5
    target = gamma * branch / branch_rms(branch, eps) + original
    pruned = original + drift * rng.standard_normal(original.shape).astype(np.float32)
    mapped, _ = sandwich_target(target - pruned, branch, gamma, eps, 1, None, None)
    np.testing.assert_allclose(branch_rms(mapped, 0.0), branch_rms(branch, 0.0), rtol=1e-5)

    def stream_error(u):  # ‖pruned + γ·u/rms(u) − target‖² per token
        return np.square(pruned + gamma * u / branch_rms(u, eps) - target).sum(-1)

    linearised = branch + (target - pruned - gamma * branch / branch_rms(branch, eps)) * branch_rms(branch, eps) / gamma
    assert stream_error(mapped).sum() < stream_error(linearised).sum()
    # nearest on the sphere in the γ² metric: no nearby point of the sphere is nearer
    wanted = linearised[0, :1].astype(np.float64)
    best = on_sphere(wanted, branch[0, :1], gamma)
    radius = np.linalg.norm(branch[0, :1])
    for _ in range(200):
        other = best + 0.05 * rng.standard_normal(best.shape)
        other *= radius / np.linalg.norm(other)
        assert np.sum(np.square(gamma * (other - wanted))) >= np.sum(np.square(gamma * (best - wanted))) - 1e-6


def test_the_ridge_walk_starts_at_the_last_choice_for_inputs_of_the_same_width(monkeypatch):
    """Each refit's ridge walk starts where the last refit of inputs as wide chose (an o_proj after
    the previous layer's o_proj, an fc2 after its fc2); the first of a width starts nowhere."""
    from onnxsnp.compensate import reconstruction
    from onnxsnp.compensate.least_squares import RIDGE_GRID, NormalEquations

    g = ModelGraph(onnx.load(str(DIGITS)))
    reconstructor = Reconstructor(g, find_blocks(g))
    starts, answers = [], iter(RIDGE_GRID)

    def choose(equations, keep, prior, start=None):
        starts.append((equations.inputs, start))
        return next(answers)

    monkeypatch.setattr(reconstruction, "choose_ridge", choose)
    chosen = [reconstructor._ridge_for(NormalEquations.empty(width, 2), np.arange(width), np.zeros((width, 2)))
              for width in (4, 6, 4, 4, 6)]
    assert chosen == list(RIDGE_GRID)
    assert starts == [(4, None), (6, None), (4, chosen[0]), (4, chosen[2]), (6, chosen[1])]
    fixed = Reconstructor(g, find_blocks(g), ridge=0.5)
    assert fixed._ridge_for(NormalEquations.empty(4, 2), np.arange(4), np.zeros((4, 2))) == 0.5
    assert len(starts) == 5  # a fixed ridge chooses nothing
