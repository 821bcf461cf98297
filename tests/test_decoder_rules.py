"""Decoder attention on small hand-built graphs (fast): grouped-query attention, rotary embeddings
(rotate_half and interleaved), KV caches. The pruned model must equal the original with the
removed units zeroed — in prefill and in a decode step through the cache."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

import decoder_graphs as dg
import graphs
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import AttentionForm, Candidate, Part, RotaryStyle
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.match.units import unit_of_dim
from onnxsnp.plan import AttentionWidth, Widths
from onnxsnp.score.allocation import widths_plan
from oracle import masked_original

# "half-split": rotate_half's Slices made one Split, as onnxruntime's session optimizer saves it
VARIANTS = [(2, "half"), (1, "half"), (4, "half"), (2, "interleaved"), (2, None), (2, "half-split"), (4, "half-split"),
            (2, "half-split-equal"), (2, "ort-op"), (4, "ort-op")]


def run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


@pytest.mark.parametrize("kv_heads,rotary", VARIANTS)
def test_decoder_attention_is_found(kv_heads, rotary):
    g = ModelGraph(dg.decoder_attention(kv_heads, rotary))
    (block,) = find_blocks(g).attention
    assert (block.heads, block.groups, block.head_dim) == (dg.HEADS, kv_heads, dg.HEAD_DIM)
    assert [c.part for c in block.kv_caches] == [Part.KEY, Part.VALUE]
    assert {c.present for c in block.kv_caches} == {"present_key", "present_value"}
    style = RotaryStyle.HALF if rotary == "ort-op" else RotaryStyle(rotary.split("-")[0]) if rotary else None
    assert [r.style for r in block.rotary] == ([style] * 2 if rotary else [])
    assert [r.shared for r in block.rotary] == [rotary == "ort-op"] * len(block.rotary)  # its caches: every head alike
    assert [r.heads for r in block.rotary] == ([dg.HEADS, kv_heads] if rotary else [])


@pytest.mark.parametrize("kv_heads,rotary", VARIANTS)
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_pruned_decoder_equals_masked_original_in_prefill_and_decode(kv_heads, rotary, heads):
    g = ModelGraph(dg.decoder_attention(kv_heads, rotary))
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.feed(g.model, 6, style=rotary).items()}
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0, heads=heads), "random", calib, batch=4, seed=3)
    (keep,) = plan.attention
    if rotary is not None:  # both dims of every rotary pair kept or removed together
        units = unit_of_dim(keep.block)
        for row in keep.qk:
            assert all((units[row] == u).sum() == 2 for u in units[row])
        assert (keep.qk == keep.qk[:1]).all() or rotary != "ort-op"  # the op's caches: the same pairs in every head
    assert len(keep.heads) == (max(1, kv_heads // 2) if heads else kv_heads)
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    want, got = run(zeroed, dg.feed(zeroed, 5, style=rotary)), run(pruned, dg.feed(pruned, 5, style=rotary))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_key"].shape == (1, len(keep.heads), 5, keep.qk.shape[1])
    assert got["present_value"].shape == (1, len(keep.heads), 5, keep.v.shape[1])
    # one decode step, each model reading its own cache
    step = lambda model, out: dg.feed(model, 1, {"past_key": out["present_key"], "past_value": out["present_value"]},  # noqa: E731
                                      style=rotary, seed=2)
    np.testing.assert_allclose(run(pruned, step(pruned, got))["y"], run(zeroed, step(zeroed, want))["y"], atol=1e-5)
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert declared["past_key"][1::2] == [len(keep.heads), keep.qk.shape[1]]


def test_a_rotate_half_split_unevenly_is_refused_naming_the_split():
    """A Split into unequal parts is no rotate_half: the attention is skipped with the sizes."""
    g = ModelGraph(dg.decoder_attention(2, "half-split-uneven"))
    matches = find_blocks(g)
    assert not matches.attention
    (split,) = [n.name for n in g.model.graph.node if n.op_type == "Split"][:1]
    assert any(f"{split} splits q/k into [1, {dg.HEAD_DIM - 1}]" in s.reason for s in matches.skipped), matches.skipped


def test_a_partial_rotary_op_and_cached_attention_ops_are_refused_naming_the_node():
    """What no rule reads yet: a com.microsoft.RotaryEmbedding that rotates part of each head and a
    MultiHeadAttention with past key/value inputs. Each attention is skipped in one line."""
    g = ModelGraph(dg.decoder_attention(2, "ort-op-partial"))
    rotary = next(n.name for n in g.model.graph.node if n.op_type == "RotaryEmbedding")
    matches = find_blocks(g)
    assert not matches.attention
    assert [s.reason for s in matches.skipped if s.kind is Candidate.ATTENTION] == \
        [f"{rotary} rotates {dg.HEAD_DIM // 2} dims of each head (partial rotary embeddings are not supported)"]
    model = graphs.ort_multi_head_attention()
    mha = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    mha.input.extend(["", "", "past_key", "past_value"])
    matches = find_blocks(ModelGraph(model))
    assert [(s.where, s.reason) for s in matches.skipped if s.kind is Candidate.ATTENTION] == \
        [(mha.name, "MultiHeadAttention with past state or present outputs")]


def test_ratio_zero_leaves_a_decoder_identical():
    g = ModelGraph(dg.decoder_attention())
    plan = make_plan(g, find_blocks(g), Ratios(0.0, 0.0, 0.0), "random", dg.feed(g.model, 6), batch=1)
    feed = dg.feed(g.model, 5)
    for name, value in run(g.model, feed).items():
        np.testing.assert_array_equal(run(rewrite(g, plan), feed)[name], value)


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_group_query_attention_op(separate, heads):
    """onnxruntime's GroupQueryAttention: one head size for Q/K and V, a multiple of 16, the same
    rotary pairs in every head (its cos/sin caches are shared); prefill and decode equal the zeroed original."""
    g = ModelGraph(dg.group_query_attention(separate))
    (block,) = find_blocks(g).attention
    assert (block.form, block.heads, block.groups, block.head_dim) == (AttentionForm.ORT_GQA, dg.HEADS, 2, dg.GQA_DIM)
    assert block.equal_widths and block.pairs_shared and block.width_multiple == 16
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.gqa_feed(g.model, 6).items()}
    calib["seqlens_k"] = np.repeat(calib["seqlens_k"], 4)
    plan = make_plan(g, find_blocks(g), Ratios(0.6, 0.2, 0.0, heads=heads), "random", calib, batch=1, seed=3)
    (keep,) = plan.attention
    assert keep.qk.shape[1] == keep.v.shape[1] == 16  # 13 of 32 kept, rounded up to a multiple of 16; V alike
    assert (keep.qk == keep.qk[:1]).all()  # the same pairs in every head
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    want, got = run(zeroed, dg.gqa_feed(zeroed, 5)), run(pruned, dg.gqa_feed(pruned, 5))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    step = lambda model, out: dg.gqa_feed(model, 1, {"past_key": out["present_key"],  # noqa: E731
                                                     "past_value": out["present_value"]}, seed=2)
    np.testing.assert_allclose(run(pruned, step(pruned, got))["y"], run(zeroed, step(zeroed, want))["y"], atol=1e-5)
    attributes = {a.name: a.i for n in pruned.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute}
    assert (attributes["num_heads"], attributes["kv_num_heads"]) == (2 * len(keep.heads), len(keep.heads))


def test_a_ring_buffer_cache_is_fed_its_capacity_of_unread_zero_slots():
    """onnxruntime-genai's sliding-window layers (Gemma 3) keep a ring buffer of `local_window_size`
    slots that GroupQueryAttention refuses to see smaller, even at prefill: the calibration feed
    gives it that many zeros, which the attention mask leaves unread (the prefill equals the same
    window over a cache that grows from empty)."""
    from onnxsnp.data.calibration import input_specs
    from onnxsnp.data.kv_cache import empty_cache

    ring, growing = dg.group_query_attention(window=4, ring=True), dg.group_query_attention(window=4)
    specs = {spec.name: spec for spec in input_specs(ModelGraph(ring))}
    assert specs["past_key"].capacity == specs["past_value"].capacity == 4
    assert all(spec.capacity == 0 for spec in input_specs(ModelGraph(growing)))
    feed = dg.gqa_feed(ring, 6)
    with pytest.raises(Exception, match="capacity"):
        run(ring, feed)
    feed.update({name: empty_cache(specs[name], 1) for name in ("past_key", "past_value")})
    assert feed["past_key"].shape == (1, 2, 4, dg.GQA_DIM) and not feed["past_key"].any()
    np.testing.assert_allclose(run(ring, feed)["y"], run(growing, dg.gqa_feed(growing, 6))["y"], atol=1e-5)


@pytest.mark.parametrize("separate", [False, True])
def test_a_shape_only_plan_keeps_whole_rotary_pairs(separate):
    """The plan a timed candidate and the cost model are built from (widths only, no scores) keeps
    whole rotary pairs: under rotate_half a head's first dims are not pairs, and a GroupQueryAttention
    fed the first half's columns only refused to run (its caches wider than its kept pairs)."""
    g = ModelGraph(dg.group_query_attention(separate))
    matches = find_blocks(g)
    (block,) = matches.attention
    kept = dg.GQA_DIM // 2
    widths = Widths({block.name: AttentionWidth(block.groups, kept, kept)},
                    {b.name: b.hidden for b in matches.ffn})
    (keep,) = widths_plan(matches, widths).attention
    units = unit_of_dim(block)[keep.qk]
    assert keep.qk.shape == (block.groups, kept)
    assert all(Counter(row.tolist()) == {u: 2 for u in set(row.tolist())} for row in units)  # both dims of each pair
    pruned = rewrite(g, widths_plan(matches, widths))
    out = run(pruned, dg.gqa_feed(pruned, 5))
    assert out["y"].shape == (1, 5, dg.HEADS * dg.GQA_DIM)


@pytest.mark.parametrize("qk_norm", ["head", "all"])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_qk_norm_keeps_each_head_whole_and_prunes_exactly(qk_norm, heads):
    """An RMSNorm over each head's q/k lets whole key/value groups go but no dim within a head; one
    over all heads (OLMo 2) lets neither go. V and the output projection are cut either way."""
    g = ModelGraph(dg.decoder_attention(2, "half", qk_norm=qk_norm))
    (block,) = find_blocks(g).attention
    assert len(block.qk_norms) == 2 and block.qk_whole
    assert (block.heads_fixed is None) == (qk_norm == "head")
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.feed(g.model, 6).items()}
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.5, 0.0, heads=heads), "random", calib, batch=4, seed=3)
    (keep,) = plan.attention
    assert keep.qk.shape[1] == dg.HEAD_DIM and keep.v.shape[1] == dg.HEAD_DIM // 2
    assert len(keep.heads) == (1 if heads and qk_norm == "head" else 2)
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    want, got = run(zeroed, dg.feed(zeroed, 5)), run(pruned, dg.feed(pruned, 5))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_key"].shape == (1, len(keep.heads), 5, dg.HEAD_DIM)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_per_head_rotary_tables_cost_one_gather_transpose_and_split_per_layer(kv_heads):
    """Heads that keep different rotary pairs read cos/sin tables with their own heads axis. Every
    node runs on each decode step (issue 28), so a layer's tables — cos and sin, q's and k's
    unless their heads match — come from one Gather of whole rows (along the heads axis of cos
    and sin side by side with their dims moved there: a Concat, a Squeeze and a Transpose made
    once for all layers), one Transpose that moves the dims axis alone to the end and one Split;
    never a Gather along the last axis, which onnxruntime copies element by element
    (docs/DECODER_SPEED.md). The result equals the masked original, in prefill and decode."""
    g = ModelGraph(dg.decoder_attention(kv_heads, "half"))
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.feed(g.model, 6).items()}
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0), "random", calib, batch=4, seed=1)  # its heads keep different pairs
    (keep,) = plan.attention
    assert len({tuple(row) for row in keep.qk}) > 1  # the case in question: the heads keep different pairs
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    added = Counter(n.op_type for n in pruned.graph.node) - Counter(n.op_type for n in g.model.graph.node)
    assert added == Counter({"Concat": 1, "Squeeze": 1, "Transpose": 2, "Gather": 1, "Split": 1})
    (split,) = [n for n in pruned.graph.node if n.op_type == "Split"]
    assert len(split.output) == (2 if kv_heads == dg.HEADS else 4)  # cos and sin; q and k apart unless their heads match
    (gather,) = [n for n in pruned.graph.node if n.op_type == "Gather"]
    assert [a.i for a in gather.attribute if a.name == "axis"] == [1]  # (1, heads, N, d)
    readers = {i: n for n in pruned.graph.node for i in n.input}
    assert list(readers[gather.output[0]].attribute[0].ints) == [0, 1, 3, 2]
    want, got = run(zeroed, dg.feed(zeroed, 5)), run(pruned, dg.feed(pruned, 5))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    step = lambda model, out: dg.feed(model, 1, {"past_key": out["present_key"], "past_value": out["present_value"]},  # noqa: E731
                                      seed=2)
    np.testing.assert_allclose(run(pruned, step(pruned, got))["y"], run(zeroed, step(zeroed, want))["y"], atol=1e-5)
