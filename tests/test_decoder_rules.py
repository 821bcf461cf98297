"""Decoder attention on small hand-built graphs (fast): grouped-query attention, rotary embeddings
(rotate_half and interleaved), KV caches. The pruned model must equal the original with the
removed units zeroed — in prefill and in a decode step through the cache."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import decoder_graphs as dg
import graphs
from onnxsnp.cli import main
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import AttentionForm, Candidate, Part, RotaryStyle
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.match.units import unit_of_dim
from onnxsnp.plan import AttentionWidth, Widths
from onnxsnp.score.allocation import widths_plan
from onnxsnp.score.importance import query_key, rotary_tables
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


def _pruned_beside_zeroed(g: ModelGraph, heads: float, style: str | None = "half"):
    """A random plan of `g` (half the Q/K pairs, a quarter of V, `heads`): its one attention's keep,
    the pruned model, the original with the removed units zeroed, and their outputs on 5 tokens."""
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.feed(g.model, 6, style=style).items()}
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0, heads=heads), "random", calib, batch=4, seed=3)
    (keep,) = plan.attention
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    return keep, pruned, zeroed, run(pruned, dg.feed(pruned, 5, style=style)), run(zeroed, dg.feed(zeroed, 5, style=style))


def _decode_step_agrees(pruned, zeroed, got: dict, want: dict, style: str | None = "half") -> None:
    """One decode step, each model reading its own cache: the same output."""
    step = lambda model, out: dg.feed(model, 1, {"past_key": out["present_key"], "past_value": out["present_value"]},  # noqa: E731
                                      style=style, seed=2)
    np.testing.assert_allclose(run(pruned, step(pruned, got))["y"], run(zeroed, step(zeroed, want))["y"], atol=1e-5)


@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_an_fp16_decoder_with_float32_inputs_and_outputs_keeps_its_cast_cache(heads):
    """onnxruntime's convert_float_to_float16(keep_io_types=True) casts the past keys and values
    on their way in and the present ones on their way out: the cache is still the graph's input
    and output, and takes the kept widths there."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    g = ModelGraph(convert_float_to_float16(dg.decoder_attention(2, "half"), keep_io_types=True))
    (block,) = find_blocks(g).attention
    assert {(c.past, c.present) for c in block.kv_caches} == {("past_key", "present_key"),
                                                              ("past_value", "present_value")}
    assert all(g.producer_of(c.present).op_type == "Cast" for c in block.kv_caches)  # the form under test
    keep, pruned, zeroed, got, want = _pruned_beside_zeroed(g, heads)
    # fp16 inside: a sum over fewer (removed, not zeroed) terms may round the other way
    np.testing.assert_allclose(got["y"], want["y"], atol=8 * np.finfo(np.float16).eps * np.abs(want["y"]).max())
    assert got["present_key"].dtype == np.float32
    assert got["present_key"].shape == (1, len(keep.heads), 5, keep.qk.shape[1])
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert declared["past_value"][1::2] == [len(keep.heads), keep.v.shape[1]]


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_a_qkv_projection_taken_apart_by_slices_is_pruned_exactly(kv_heads, heads):
    """Phi-3's qkv_proj: q | k | v of H·d | G·d | G·d features, three Slices; the bounds between
    the parts follow the cut, v's end (past the last feature) stays."""
    g = ModelGraph(dg.decoder_attention(kv_heads, "half", fused=True))
    (block,) = find_blocks(g).attention
    assert block.form is AttentionForm.FUSED_SPLIT and block.q.node == block.k.node == block.v.node
    assert block.column_offsets == (0, dg.WIDTH, dg.WIDTH + kv_heads * dg.HEAD_DIM) and block.groups == kv_heads
    keep, pruned, zeroed, got, want = _pruned_beside_zeroed(g, heads)
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_value"].shape == (1, len(keep.heads), 5, keep.v.shape[1])
    _decode_step_agrees(pruned, zeroed, got, want)


@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_a_sliding_window_cache_sliced_along_the_sequence_is_the_graphs_cache(heads):
    """Mistral by torch's dynamo exporter: the past sliced to its last window − 1 positions before
    the join, the present after it; pruned = masked original in prefill and through the cache."""
    window = 3
    g = ModelGraph(dg.decoder_attention(2, "half", window=window))
    (block,) = find_blocks(g).attention
    assert {(c.past, c.present) for c in block.kv_caches} == {("past_key", "present_key"),
                                                              ("past_value", "present_value")}
    keep, pruned, zeroed, got, want = _pruned_beside_zeroed(g, heads)
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_key"].shape == (1, len(keep.heads), window - 1, keep.qk.shape[1])
    _decode_step_agrees(pruned, zeroed, got, want)


def test_a_cache_sliced_along_its_head_dims_is_no_cache():
    found = find_blocks(ModelGraph(dg.decoder_attention(2, "half", window=3, window_axis=3)))
    assert found.attention == () and any("Concat" in s.reason for s in found.skipped), found.skipped


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_an_interleaved_rotary_flattened_with_literal_heads_follows_the_cut(kv_heads, heads):
    """Cohere's export flattens the interleaved pairs with Reshape(…, (B, H, N, d)) holding H and d
    as literals: both take the kept widths (q's heads, k's key/value heads)."""
    g = ModelGraph(dg.decoder_attention(kv_heads, "interleaved", literal_heads=True))
    (block,) = find_blocks(g).attention
    assert [r.style for r in block.rotary] == [RotaryStyle.INTERLEAVED] * 2
    keep, pruned, zeroed, got, want = _pruned_beside_zeroed(g, heads, "interleaved")
    assert len(keep.heads) == (kv_heads // 2 if heads else kv_heads)
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_key"].shape == (1, len(keep.heads), 5, keep.qk.shape[1])


def test_a_rotary_whose_rotate_half_reads_a_second_cast_is_matched_and_pruned_exactly():
    """ModernBERT's legacy export casts q (and k) to float for x·cos and casts that again for
    rotate_half: the two casts are one rotary embedding's input."""
    g = ModelGraph(dg.decoder_attention(2, "half", recast=True))
    (block,) = find_blocks(g).attention
    assert [r.style for r in block.rotary] == [RotaryStyle.HALF] * 2
    keep, _, _, got, want = _pruned_beside_zeroed(g, 0.0)
    assert keep.qk.shape[1] < dg.HEAD_DIM
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)


@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_soft_capped_scores_are_read_and_pruned_exactly(heads):
    """Gemma 2 soft-caps the scores, cap·tanh(s/cap), between the scale and the softmax: the cap is
    the block's (the softmax metric reads it), its constants are no scale of the scores."""
    g = ModelGraph(dg.decoder_attention(2, "half", softcap=(50.0, 50.0)))
    (block,) = find_blocks(g).attention
    assert block.softcap == 50.0 and len(block.constant_scales) == 1
    _, _, _, got, want = _pruned_beside_zeroed(g, heads)
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)


def test_a_tanh_that_is_no_soft_cap_stops_the_scores():
    found = find_blocks(ModelGraph(dg.decoder_attention(2, "half", softcap=(30.0, 50.0))))
    assert found.attention == () and any("no Q·Kᵀ MatMul" in s.reason for s in found.skipped), found.skipped


@pytest.mark.parametrize("kv_heads,interleaved", [(2, False), (4, False), (2, True)])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_the_rotary_op_keeps_the_same_pairs_in_every_head_and_prunes_exactly(kv_heads, interleaved, heads):
    """ONNX's RotaryEmbedding (torch's dynamo exporter at opset 23) reads caches of one column per
    pair for all heads: every head keeps the same whole pairs, each layer's caches are gathered to
    them, the op's num_heads follows the kept heads; pruned = masked original, prefill and decode."""
    g = ModelGraph(dg.rotary_op_attention(kv_heads, interleaved))
    (block,) = find_blocks(g).attention
    assert [(r.per_token, r.heads, r.style) for r in block.rotary] == \
        [(True, h, RotaryStyle.INTERLEAVED if interleaved else RotaryStyle.HALF) for h in (dg.HEADS, kv_heads)]
    assert block.rotary[0].node in block.pairs_shared
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.rotary_op_feed(g.model, 6).items()}
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0, heads=heads), "random", calib, batch=4, seed=1)
    (keep,) = plan.attention
    units = unit_of_dim(block)
    assert keep.qk.shape[1] == dg.HEAD_DIM // 2 and (keep.qk == keep.qk[:1]).all()  # one pair, the same in all heads
    assert all((units[keep.qk[0]] == u).sum() == 2 for u in units[keep.qk[0]])
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    onnx.checker.check_model(pruned)
    rotaries = [n for n in pruned.graph.node if n.op_type == "RotaryEmbedding"]
    assert [a.i for n in rotaries for a in n.attribute if a.name == "num_heads"] == \
        [len(keep.query_heads()), len(keep.heads)]
    assert Counter(n.op_type for n in pruned.graph.node)["Gather"] == 2  # cos and sin, once for q and k alike
    want, got = run(zeroed, dg.rotary_op_feed(zeroed, 5)), run(pruned, dg.rotary_op_feed(pruned, 5))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_key"].shape == (1, len(keep.heads), 5, keep.qk.shape[1])
    assert got["present_value"].shape == (1, len(keep.heads), 5, keep.v.shape[1])
    step = lambda model, out: dg.rotary_op_feed(model, 1, {"past_key": out["present_key"],  # noqa: E731
                                                           "past_value": out["present_value"]}, seed=2)
    np.testing.assert_allclose(run(pruned, step(pruned, got))["y"], run(zeroed, step(zeroed, want))["y"], atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_q_and_k_rotated_from_the_projections_input_equal_the_rotary_ops_outputs(interleaved):
    """Reconstruction recomputes q and k from a pruned model's projection input with the captured
    (…, N, d/2) caches (importance.rotate): that must be what the op itself gives."""
    model = dg.rotary_op_attention(2, interleaved)
    g = ModelGraph(model)
    (block,) = find_blocks(g).attention
    wanted = ["x", *block.qk_tensors, *rotary_tables(g, block)]
    assert set(rotary_tables(g, block)) == {"cos", "sin"}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in block.qk_tensors)
    fed = dg.rotary_op_feed(model, 7)
    acts = {**fed, **run(model, fed)}
    acts = {t: acts[t] for t in wanted}
    captured, recomputed = query_key(g, block, acts, 1), query_key(g, block, acts, 1, from_inputs=True)
    for a, b in zip(captured, recomputed):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_inspect_says_that_every_head_keeps_the_same_pairs_under_the_rotary_op(tmp_path, capsys):
    path = tmp_path / "rotary_op.onnx"
    onnx.save(dg.rotary_op_attention(), str(path))
    assert main(["inspect", str(path)]) == 0
    assert "every head keeps the same Q/K pairs: RotaryEmbedding RotaryEmbedding_" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    (block,) = json.loads(capsys.readouterr().out)["attention"]
    assert "one column per pair for every head" in block["pairs_shared"] and block["kv_heads"] == 2


def test_a_rotary_op_indexing_its_own_caches_is_skipped_with_the_reason():
    g = ModelGraph(dg.rotary_op_attention(position_ids=True))
    assert not find_blocks(g).attention
    (skipped,) = find_blocks(g).skipped
    assert "RotaryEmbedding_" in skipped.reason and "reads position_ids position_ids" in skipped.reason
