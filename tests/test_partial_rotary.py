"""Partial rotary embeddings on small hand-built graphs (fast): the first r of each head's d dims
rotated in pairs (j, j + r/2), the rest passed through (match/partial_rotary.py). The pruned
model equals the original with the removed units zeroed, in prefill and in a decode step through
the cache; the split points r and r/2 follow the cut, the same in every head. A split point read
at run time is refused by name; a parallel block (Phi-2) is matched unit by unit and skipped as a
whole block, with the reason."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import partial_rotary_graphs as pg
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import Candidate, RotaryStyle
from onnxsnp.match.units import dims_of, unit_of_dim
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import AttentionKeep, PrunePlan, Ratios
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original


def run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


@pytest.mark.parametrize("head_dim,rotated", [(8, 4), (16, 4), (8, 6)])
def test_partial_rotary_is_one_embedding_whose_pairs_and_pass_dims_are_units(head_dim, rotated):
    g = ModelGraph(pg.partial_rotary_attention(2, head_dim, rotated))
    matches = find_blocks(g)
    (block,) = matches.attention
    assert not [s for s in matches.skipped if s.kind is Candidate.ATTENTION]
    assert [(r.style, r.rotated) for r in block.rotary] == [(RotaryStyle.HALF, rotated)] * 2
    assert [r.heads for r in block.rotary] == [pg.HEADS, 2] and block.pairs_shared
    units = unit_of_dim(block)
    half = rotated // 2
    # rotated dims j and j + r/2 share a unit; passed-through dims go in adjacent pairs after them
    assert units[:rotated].tolist() == list(range(half)) * 2
    assert units[rotated:].tolist() == [half + i // 2 for i in range(head_dim - rotated)]


def _check_against_masked_original(model, plan) -> None:
    """The pruned model against the original with the removed units zeroed: a prefill of 5 tokens,
    then a decode step through each one's own cache."""
    g = ModelGraph(model)
    (keep,) = plan.attention
    pruned, zeroed = rewrite(g, plan), masked_original(g, plan)
    want, got = run(zeroed, pg.feed(zeroed, 5)), run(pruned, pg.feed(pruned, 5))
    np.testing.assert_allclose(got["y"], want["y"], atol=1e-5)
    assert got["present_key"].shape == (1, len(keep.heads), 5, keep.qk.shape[1])
    step = {"past_key": want["present_key"], "past_value": want["present_value"]}
    want_step = run(zeroed, pg.feed(zeroed, 1, step, seed=2))
    step = {"past_key": got["present_key"], "past_value": got["present_value"]}
    np.testing.assert_allclose(run(pruned, pg.feed(pruned, 1, step, seed=2))["y"], want_step["y"], atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("heads", [0.0, 0.5])
def test_pruned_partial_rotary_equals_masked_original_in_prefill_and_decode(kv_heads, heads):
    model = pg.partial_rotary_attention(kv_heads, 8, 4)
    g = ModelGraph(model)
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in pg.feed(model, 6).items()}
    plan = make_plan(g, find_blocks(g), Ratios(0.5, 0.25, 0.0, heads=heads), "random", calib, batch=4, seed=3)
    (keep,) = plan.attention
    assert (keep.qk == keep.qk[:1]).all()  # one split point for every head
    units = unit_of_dim(keep.block)
    assert all((units[keep.qk[0]] == u).sum() == 2 for u in units[keep.qk[0]])  # whole units
    assert len(keep.heads) == (max(1, kv_heads // 2) if heads else kv_heads)
    _check_against_masked_original(model, plan)


# units 0, 1: the rotated pairs (0, 2), (1, 3); units 2, 3: the passed-through pairs (4, 5), (6, 7)
@pytest.mark.parametrize("kept_units", [(0, 2), (1, 3), (0, 1), (2, 3), (1,), (0, 1, 3)])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("runtime_half", [False, True])
def test_every_split_of_the_kept_dims_between_rotated_and_passed_through_prunes_exactly(kept_units, kv_heads,
                                                                                        runtime_half):
    """The kept rotated width r' (0 … r) and passed-through width (0 … d − r) both change: the
    split points become r' and r'/2 (or r'/2 follows from the shape at run time), the cos/sin
    tables keep the kept rotated dims' columns."""
    model = pg.partial_rotary_attention(kv_heads, 8, 4, runtime_half=runtime_half)
    (block,) = find_blocks(ModelGraph(model)).attention
    qk = dims_of(block, np.tile(np.array(kept_units), (kv_heads, 1)))
    v = np.tile(np.arange(0, 8, 2), (kv_heads, 1))
    plan = PrunePlan((AttentionKeep(block, qk, v, np.arange(kv_heads)),), ())
    _check_against_masked_original(model, plan)


def test_a_partial_rotary_split_point_read_at_run_time_is_refused_by_name():
    matches = find_blocks(ModelGraph(pg.partial_rotary_attention(2, 8, 4, literal=False)))
    assert not matches.attention
    (skipped,) = [s for s in matches.skipped if s.kind is Candidate.ATTENTION]
    assert "partial rotary embedding whose split point is not a literal" in skipped.reason
    assert "Concat" in skipped.reason  # the node that joins the rotated and the passed-through dims


def test_an_odd_count_of_passed_through_dims_is_refused():
    matches = find_blocks(ModelGraph(pg.partial_rotary_attention(2, 7, 4)))
    assert not matches.attention
    assert any("passes 3 dims through" in s.reason for s in matches.skipped)


def test_a_parallel_block_is_matched_unit_by_unit_and_skipped_whole_with_its_reason():
    matches = find_blocks(ModelGraph(pg.parallel_block()))
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (1, 1, 0)
    (skipped,) = [s for s in matches.skipped if s.kind is Candidate.BLOCK]
    assert skipped.reason.startswith("not removable as a whole block: a parallel block")
    assert matches.ffn[0].fc1.node in skipped.reason


def test_a_plan_whose_heads_keep_different_rotated_widths_is_not_written():
    """One Slice bound serves every head: a plan against the block's pairs_shared is an error, not a
    silently wrong model."""
    model = pg.partial_rotary_attention(2, 8, 4)
    g = ModelGraph(model)
    (block,) = find_blocks(g).attention
    qk = np.stack([dims_of(block, np.array([[0, 2]]))[0], dims_of(block, np.array([[2, 3]]))[0]])  # r' = 2 and 0
    plan = PrunePlan((AttentionKeep(block, qk, np.tile(np.arange(8), (2, 1)), np.arange(2)),), ())
    with pytest.raises(ValueError, match="different rotated widths"):
        rewrite(g, plan)
