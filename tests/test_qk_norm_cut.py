"""Q/K dims cut within the heads of a per-head QK-norm (compensate/qk_norm.py), on the hand-built
decoder attention of decoder_graphs (4 query heads of 4 dims, RMSNorm on each head's q and k,
rotate_half rotary, KV cache): the rewritten model computes the attention with each head's norm
over its kept dims and γ carrying the Q/K rescale and the per-head factor (checked against numpy
on the fixture's own weights), the zeroed-weights form computes the same, a decode step through
the narrower cache equals an uncached run, and the calibrated factor is the mean ratio of the
kept dims' mean square to the full one."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import decoder_graphs as dg
from onnxsnp.compensate.masking import plan_weights, with_weights
from onnxsnp.compensate.qk_norm import calibrated_norm
from onnxsnp.errors import SnpError
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import QkNormCut
from onnxsnp.match.qk_norm import released
from onnxsnp.pipeline import make_plan
from onnxsnp.plan import AttentionKeep, PrunePlan, Ratios, selection_map
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.score.criteria import input_weights
from onnxsnp.score.importance import PairStatistics

D = dg.HEAD_DIM


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return copy


def released_block(kv_heads: int, cut: QkNormCut = QkNormCut.SLICED):
    g = ModelGraph(dg.decoder_attention(kv_heads, "half", qk_norm="head"))
    matches = released(find_blocks(g), cut)
    (block,) = matches.attention
    return g, matches, block


def test_the_per_head_norm_is_released_only_when_asked_and_never_over_all_heads():
    g = ModelGraph(dg.decoder_attention(2, "half", qk_norm="head"))
    (block,) = find_blocks(g).attention
    assert block.qk_whole and block.qk_norm is not None and block.qk_norm.cut is QkNormCut.OFF
    assert released(find_blocks(g), QkNormCut.OFF).attention[0].qk_whole
    (cut,) = released(find_blocks(g), QkNormCut.CALIBRATED).attention
    assert cut.qk_whole is None and cut.qk_norm.cut is QkNormCut.CALIBRATED
    assert cut.qk_norm.heads_axes == (-3, -3)  # (B, H, T, d): the fixture transposes before its norms
    everything = ModelGraph(dg.decoder_attention(2, "half", qk_norm="all"))
    (whole,) = released(find_blocks(everything), QkNormCut.SLICED).attention
    assert whole.qk_norm is None and whole.qk_whole and whole.heads_fixed  # OLMo 2's norm spans all heads


def _expected(g: ModelGraph, block, keep: AttentionKeep, feed: dict[str, np.ndarray]) -> np.ndarray:
    """y of the pruned attention in numpy, from the original's projections on `feed`: each kept
    head's norm over its kept dims, γ times the pair's rescale and the head's factor, the rotary
    of the kept pairs, the original softmax scale, V and the output projection as they were."""
    names = [block.q.output, block.k.output, block.v.output]
    q, k, v = (run(with_outputs(g.model, names), feed, names)[n][0].astype(np.float64) for n in names)
    tokens = q.shape[0]
    gamma = [g.constant(g.node(n).input[i]).astype(np.float64) for n, i in block.qk_norm.gains]
    eps = [float(g.constant(g.node(n).input[i])) for n, i in block.qk_norm.epsilons]
    cos, sin = feed["cos"][0, 0].astype(np.float64), feed["sin"][0, 0].astype(np.float64)
    r = block.group_size
    heads_out = []
    for head in range(block.heads):
        group = head // r
        dims = keep.qk[group]
        factor = np.diag(keep.q_map[group][dims])

        def normed(x, part, scale):
            x = x[:, dims]
            weight = gamma[part][dims] * (factor if part == 0 else 1.0) * scale
            return weight * x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps[part])

        def rotated(x):
            half = len(dims) // 2  # the kept pairs (j, j + d/2), ascending: rotate_half again
            turned = np.concatenate([-x[:, half:], x[:, :half]], axis=-1)
            return x * cos[:, dims] + turned * sin[:, dims]

        qh = rotated(normed(q[:, head * D:(head + 1) * D], 0, keep.norm_scales[0][head]))
        kh = rotated(normed(k[:, group * D:(group + 1) * D], 1, keep.norm_scales[1][group]))
        scores = qh @ kh.T * D ** -0.5
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        heads_out.append(probs @ v[:, group * D:(group + 1) * D])
    merged = np.stack(heads_out, axis=1).reshape(tokens, -1)
    out = input_weights(g, block.out)
    return merged @ out + g.constant(block.out.bias).astype(np.float64)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_the_rewrite_normalises_each_head_over_its_kept_dims_with_gamma_carrying_the_rescale(kv_heads):
    g, _, block = released_block(kv_heads)
    rng = np.random.default_rng(7)
    # every group keeps one rotary pair of two: (0, 2) or (1, 3), alternating
    qk = np.array([[0, 2] if group % 2 else [1, 3] for group in range(kv_heads)])
    pair = rng.uniform(0.5, 1.5, (kv_heads, 1))
    keep = AttentionKeep(block, qk, np.tile(np.arange(D), (kv_heads, 1)), np.arange(kv_heads),
                         q_map=selection_map(qk, D, np.repeat(pair, 2, axis=1)),
                         norm_scales=(rng.uniform(0.8, 1.2, block.heads), rng.uniform(0.8, 1.2, kv_heads)))
    plan = PrunePlan((keep,), ())
    pruned = rewrite(g, plan)
    feed = dg.feed(g.model, 6)
    got = run(pruned, dg.feed(pruned, 6))
    np.testing.assert_allclose(got["y"][0], _expected(g, block, keep, feed), atol=2e-5)
    assert got["present_key"].shape == (1, kv_heads, 6, 2)
    zeroed = with_weights(g.model, plan_weights(g, plan))  # γ·√(d'/d), ε·d'/d at full width: the same
    np.testing.assert_allclose(run(zeroed, feed)["y"], got["y"], atol=2e-5)
    # a decode step through the pruned cache equals the same positions run at once
    first = run(pruned, dg.feed(pruned, 5))
    past = {"past_key": first["present_key"], "past_value": first["present_value"]}
    stepped = run(pruned, {**dg.feed(pruned, 1, past, seed=2)})
    whole = dg.feed(pruned, 6)
    whole["x"] = np.concatenate([dg.feed(pruned, 5)["x"], dg.feed(pruned, 1, past, seed=2)["x"]], axis=1)
    np.testing.assert_allclose(stepped["y"][0, -1], run(pruned, whole)["y"][0, -1], atol=2e-5)


def test_the_calibrated_factor_is_the_mean_ratio_of_the_kept_mean_square_to_the_full_one():
    _, _, block = released_block(1, QkNormCut.CALIBRATED)
    # one sample, 2 tokens; q: 4 heads, k: 1 head; token 2 is padding
    q_head = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0]])
    q = np.concatenate([q_head * (h + 1) for h in range(block.heads)], axis=-1)[None]  # scale-free ratios
    k = np.array([[[2.0, 0.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]]])
    pairs = PairStatistics.empty(block.heads, D)
    pairs.add_norm_energy(q, k, D, np.array([[1, 1]]))
    qk = np.array([[1, 3]])
    scale_q, scale_k = calibrated_norm(block, pairs, qk)
    # token 1: ms_full 7.5, ms_kept (4+16)/2 = 10 → 4/3; token 2: ms_full 0.5, ms_kept 1 → 2; mean 5/3
    np.testing.assert_allclose(scale_q, np.sqrt(5 / 3) * np.ones(block.heads))
    # k token 1: ms_full 2, ms_kept 0 → 0; token 2: 1 → mean 1/2
    np.testing.assert_allclose(scale_k, [np.sqrt(0.5)])
    masked = PairStatistics.empty(block.heads, D)
    masked.add_norm_energy(q, k, D, np.array([[1, 0]]))  # the padded token counts for nothing
    np.testing.assert_allclose(calibrated_norm(block, masked, qk)[0], np.sqrt(4 / 3) * np.ones(block.heads))
    assert calibrated_norm(block, pairs, np.array([[0, 1, 2, 3]])) is None  # nothing cut: γ as it is


def test_a_one_pass_plan_cuts_within_the_heads_and_matches_its_zeroed_form():
    g, matches, _ = released_block(2)
    calib = {k: np.repeat(v, 4, axis=0) if k == "x" else v for k, v in dg.feed(g.model, 6).items()}
    plan = make_plan(g, matches, Ratios(0.5, 0.5, 0.0), "snp", calib, batch=1, seed=3)
    (keep,) = plan.attention
    assert keep.qk.shape == (2, 2) and keep.v.shape == (2, 2)
    pruned, zeroed = rewrite(g, plan), with_weights(g.model, plan_weights(g, plan))
    np.testing.assert_allclose(run(pruned, dg.feed(pruned, 5))["y"], run(zeroed, dg.feed(zeroed, 5))["y"], atol=2e-5)


def test_calibrated_without_the_reconstruction_is_refused():
    from onnxsnp import prune

    model = dg.decoder_attention(2, "half", qk_norm="head")
    with pytest.raises(SnpError, match="block-by-block reconstruction"):
        prune(model, ratio=0.5, qk_norm_cut="calibrated", measure_latency=False)
