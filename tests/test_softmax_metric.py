"""The softmax's score error (onnxsnp.score.softmax_metric): its quadratic equals the attention
distributions' variance computed query by query, a row shift costs nothing, and the pairs chosen
are the ones whose removal costs least."""
from __future__ import annotations

from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest

from onnxsnp.match.blocks import Rotary, RotaryStyle
from onnxsnp.score import softmax_metric
from onnxsnp.score.softmax_metric import SoftmaxSums, _solve, add_sums, choose_pairs, removal_curve

SAMPLES, HEADS, TOKENS, D, SCALE = 2, 3, 7, 4, 0.5


def brute_force(q_hat, k_hat, q, k, mask, alpha, scale, softcap=None):
    """Σ over queries of Var_{j~P_i}(ŝ_ij − s_ij), P_i the causal softmax of the original scores
    (soft-capped first: cap·tanh(s/cap))."""
    total = 0.0
    for stack in range(len(q)):
        sample = stack // HEADS
        for i in range(q.shape[1]):
            if not mask[sample, i]:
                continue
            keys = [j for j in range(i + 1) if mask[sample, j]]
            scores = scale * q[stack, i] @ k[stack, keys].T
            seen = scores if softcap is None else softcap * np.tanh(scores / softcap)
            probs = np.exp(seen - seen.max())
            probs /= probs.sum()
            error = scale * (q_hat[stack, i] * alpha) @ k_hat[stack, keys].T - scores
            total += probs @ error ** 2 - (probs @ error) ** 2
    return total


def stacks(seed: int = 0):
    rng = np.random.default_rng(seed)
    q_hat, k_hat = rng.standard_normal((2, SAMPLES * HEADS, TOKENS, D))
    q = q_hat + 0.1 * rng.standard_normal(q_hat.shape)
    k = k_hat + 0.1 * rng.standard_normal(k_hat.shape)
    mask = np.ones((SAMPLES, TOKENS))
    mask[1, TOKENS - 2:] = 0  # padding at the end of the second sample
    return q_hat, k_hat, q, k, mask


def cost(sums: SoftmaxSums, alpha: np.ndarray) -> float:
    return float(sum(alpha @ f @ alpha - 2 * alpha @ c for f, c in zip(sums.fisher, sums.cross)) + sums.energy.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("softcap", [None, 1.0])
def test_quadratic_is_the_variance_of_the_score_error_under_each_querys_softmax(seed, softcap):
    """With a soft cap (Gemma 2) the distributions are those of the capped scores (a cap of 1
    changes them: the scores here reach several units)."""
    q_hat, k_hat, q, k, mask = stacks(seed)
    sums = SoftmaxSums.empty(HEADS, D, softcap=softcap)
    add_sums(sums, q_hat, k_hat, q, k, mask, SCALE)
    assert sums.queries == int(mask.sum())
    for alpha in (np.ones(D), np.zeros(D), np.random.default_rng(seed + 7).standard_normal(D)):
        want = brute_force(q_hat, k_hat, q, k, mask, alpha, SCALE, softcap)
        assert cost(sums, alpha) == pytest.approx(want, rel=1e-4)
        if softcap is not None and alpha.any():  # the cap is read: uncapped distributions weigh otherwise
            assert cost(sums, alpha) != pytest.approx(brute_force(q_hat, k_hat, q, k, mask, alpha, SCALE), rel=1e-3)


def test_a_score_term_equal_for_every_key_costs_nothing():
    """The softmax is blind to a shift of a query's whole row: a pair whose key does not vary
    across tokens costs nothing to remove, however large it is (Frobenius would call it the largest)."""
    q_hat, k_hat, q, k, mask = stacks()
    q_hat[..., 0] *= 100.0
    k_hat[..., 0] = 3.0
    sums = SoftmaxSums.empty(HEADS, D)
    add_sums(sums, q_hat, k_hat, q_hat, k_hat, mask, SCALE)
    assert np.abs(sums.fisher[:, 0, :]).max() < 1e-6 * np.abs(sums.fisher).max()
    np.testing.assert_allclose(sums.cross[:, 0], 0.0, atol=1e-6 * np.abs(sums.cross).max())


def reference_sums(q_hat, k_hat, q, k, mask, scale, heads):
    """F, c and the energy of the module docstring in float64, query by query, uncentred
    products summed exactly as written: Σ_j P_ij x_ij x_ijᵀ − (Σ_j P_ij x_ij)(Σ_j P_ij x_ij)ᵀ."""
    d = q.shape[-1]
    fisher, cross, energy = np.zeros((heads, d, d)), np.zeros((heads, d)), np.zeros(heads)
    for stack in range(len(q)):
        sample, head = divmod(stack, heads)
        for i in range(q.shape[1]):
            if not mask[sample, i]:
                continue
            keys = [j for j in range(i + 1) if mask[sample, j]]
            scores = scale * q[stack, i] @ k[stack, keys].T
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            terms = scale * q_hat[stack, i] * k_hat[stack, keys]  # (keys, d): each pair's score term
            mean_term, mean_score = probs @ terms, probs @ scores
            fisher[head] += (terms * probs[:, None]).T @ terms - np.outer(mean_term, mean_term)
            cross[head] += probs @ (terms * scores[:, None]) - mean_term * mean_score
            energy[head] += probs @ scores ** 2 - mean_score ** 2
    return fisher, cross, energy


def _sink_inputs(seed: int, heads: int, samples: int, tokens: int, d: int):
    """Queries and keys (and their unrotated forms) with a sink pair: dim 0 a large, nearly
    constant score term on every key; the second sample's last 6 tokens padded."""
    rng = np.random.default_rng(seed)
    q_hat, k_hat = rng.standard_normal((2, samples * heads, tokens, d))
    q_hat[..., 0], k_hat[..., 0] = 40.0, 40.0 + 0.01 * rng.standard_normal((samples * heads, tokens))
    q, k = q_hat + 0.1 * rng.standard_normal(q_hat.shape), k_hat + 0.1 * rng.standard_normal(k_hat.shape)
    mask = np.ones((samples, tokens))
    mask[1, tokens - 6:] = 0
    return q_hat, k_hat, q, k, mask


@pytest.mark.parametrize("query_block", [7, 32])
def test_sums_keep_float64_precision_beside_a_sink(monkeypatch, query_block):
    """float32 products, centred first: a sink pair (a large, nearly constant score term on every
    key) would otherwise cancel and leave float32 noise above the other pairs' terms. Many tokens,
    padding, and query blocks that do and do not divide the tokens."""
    monkeypatch.setattr(softmax_metric, "QUERY_BLOCK", query_block)
    heads, samples, tokens, d = 2, 2, 45, 8
    q_hat, k_hat, q, k, mask = _sink_inputs(5, heads, samples, tokens, d)
    sums = SoftmaxSums.empty(heads, d)
    add_sums(sums, q_hat, k_hat, q, k, mask, SCALE)
    fisher, cross, energy = reference_sums(q_hat, k_hat, q, k, mask, SCALE, heads)
    # relative to each head's largest F entry of the other pairs: the sink's own terms are small
    # once centred, and an error as large as the sink's raw scale (1600·scale) would swamp them
    for head in range(heads):
        rest = np.abs(fisher[head, 1:, 1:]).max()
        np.testing.assert_allclose(sums.fisher[head], fisher[head], atol=1e-4 * rest)
        np.testing.assert_allclose(sums.cross[head], cross[head], atol=1e-4 * rest)
    np.testing.assert_allclose(sums.energy, energy, rtol=1e-4)


def block(rotary: bool, groups: int = 1):
    rotaries = (Rotary(RotaryStyle.HALF, "", "", "", ()),) if rotary else ()
    return SimpleNamespace(head_dim=D, heads=groups, groups=groups, group_size=1, rotary=rotaries,
                           width_multiple=1, pairs_shared=None, qk_whole=None)


@pytest.mark.parametrize("rotary", [False, True])
def test_the_pairs_chosen_are_the_cheapest_to_remove_after_the_rescale(rotary):
    q_hat, k_hat, q, k, mask = stacks(3)
    sums = SoftmaxSums.empty(1, D)
    add_sums(sums, q_hat[::HEADS], k_hat[::HEADS], q[::HEADS], k[::HEADS], mask, SCALE)
    attention = block(rotary)
    units = [[0, 2], [1, 3]] if rotary else [[u] for u in range(D)]
    kept = 2 if rotary else D - 1  # one unit removed: greedy is then exhaustive
    choice = choose_pairs(attention, sums, kept, ridge=1e-2)
    # every way to remove one unit, each with its own best rescale (one factor per unit)
    best = None
    for gone in range(len(units)):
        keep = sorted(d for u, dims in enumerate(units) if u != gone for d in dims)
        to_units = np.array([[float(d in dims) for dims in units] for d in range(D)])
        unit_fisher, unit_cross = to_units.T @ sums.fisher[0] @ to_units, sums.cross[0] @ to_units
        alive = np.array([u for u in range(len(units)) if u != gone])
        penalty = 1e-2 * float(np.mean(np.diag(unit_fisher)))
        value = _solve(unit_fisher, unit_cross, alive, penalty)[1]
        if best is None or value < best[0]:
            best = (value, keep)
    np.testing.assert_array_equal(choice.qk[0], best[1])
    assert choice.error_rescaled <= choice.error_sliced + 1e-12
    # the factors are the rescale: the reported error is the quadratic at them
    alpha = np.zeros(D)
    alpha[choice.qk[0]] = choice.factors[0]
    assert choice.error_rescaled == pytest.approx(cost(sums, alpha) / sums.energy.sum(), rel=1e-6)
    if rotary:  # one factor per rotary pair: both of its dims scaled alike
        assert choice.factors[0][0] == pytest.approx(choice.factors[0][1])


def test_pairs_removed_jointly_account_for_each_other():
    """Two pairs that cancel each other's error are worth keeping together or removing together."""
    q_hat, k_hat, q, k, mask = stacks(4)
    sums = SoftmaxSums.empty(1, D)
    add_sums(sums, q_hat[::HEADS], k_hat[::HEADS], q[::HEADS], k[::HEADS], mask, SCALE)
    choice = choose_pairs(block(False), sums, D - 2, ridge=0.0)
    removed = tuple(sorted(set(range(D)) - set(choice.qk[0])))
    costs = {pair: _solve(sums.fisher[0], sums.cross[0], np.array(sorted(set(range(D)) - set(pair))), 0.0)[1]
             for pair in combinations(range(D), 2)}
    # greedy OBS need not find the best pair, but it is never worse than removing the two best singles
    singles = sorted(range(D), key=lambda u: _solve(sums.fisher[0], sums.cross[0],
                                                    np.array(sorted(set(range(D)) - {u})), 0.0)[1])
    assert costs[removed] <= costs[tuple(sorted(singles[:2]))] + 1e-9


@pytest.mark.parametrize("rotary", [False, True])
def test_the_removal_curve_is_the_error_left_along_the_chosen_pairs(rotary):
    """What the allocation reads: at every whole-unit width, the error choose_pairs leaves there
    (beyond what the full width leaves), 0 at full width, growing as pairs go."""
    q_hat, k_hat, q, k, mask = stacks(5)
    sums = SoftmaxSums.empty(1, D)
    add_sums(sums, q_hat[::HEADS], k_hat[::HEADS], q[::HEADS], k[::HEADS], mask, SCALE)
    attention = block(rotary)
    curve = removal_curve(attention, sums, ridge=1e-2)
    assert curve.shape == (D + 1,) and curve[D] == 0.0
    assert np.all(np.diff(curve) <= 1e-12)  # fewer pairs never leave less error
    full = choose_pairs(attention, sums, D, ridge=1e-2).error_rescaled
    for kept in range(2 if rotary else 1, D, 2 if rotary else 1):
        assert curve[kept] == pytest.approx(choose_pairs(attention, sums, kept, ridge=1e-2).error_rescaled - full,
                                            abs=1e-9)


@pytest.mark.parametrize("style", [RotaryStyle.HALF, RotaryStyle.INTERLEAVED])
def test_sums_over_rotary_units_are_the_dim_sums_summed_per_pair(style):
    """Sums kept over units (a rotary pair's two dims summed before the products) equal the
    float64 reference over dims summed into units afterwards, and choose the same pairs with the
    same rescale as the sums over dims."""
    heads, samples, tokens, d = 2, 2, 45, 8
    q_hat, k_hat, q, k, mask = _sink_inputs(11, heads, samples, tokens, d)
    of = np.arange(d) // 2 if style is RotaryStyle.INTERLEAVED else np.arange(d) % (d // 2)
    to_units = (of[:, None] == np.arange(d // 2)[None, :]).astype(float)
    by_units, by_dims = SoftmaxSums.empty(heads, d, of), SoftmaxSums.empty(heads, d)
    add_sums(by_units, q_hat, k_hat, q, k, mask, SCALE)
    add_sums(by_dims, q_hat, k_hat, q, k, mask, SCALE)
    fisher, cross, energy = reference_sums(q_hat, k_hat, q, k, mask, SCALE, heads)
    for head in range(heads):
        want = to_units.T @ fisher[head] @ to_units
        rest = np.abs(want[1:, 1:]).max()
        np.testing.assert_allclose(by_units.fisher[head], want, atol=1e-4 * rest)
        np.testing.assert_allclose(by_units.cross[head], cross[head] @ to_units, atol=1e-4 * rest)
    np.testing.assert_allclose(by_units.energy, energy, rtol=1e-4)
    assert by_units.queries == by_dims.queries == int(mask.sum())
    rotary = SimpleNamespace(head_dim=d, heads=heads, groups=heads, group_size=1,
                             rotary=(Rotary(style, "", "", "", ()),), width_multiple=1, pairs_shared=None,
                             qk_whole=None)
    for kept in (2, 4, 6):
        a, b = choose_pairs(rotary, by_units, kept, 1e-2), choose_pairs(rotary, by_dims, kept, 1e-2)
        np.testing.assert_array_equal(a.qk, b.qk)
        np.testing.assert_allclose(a.factors, b.factors, rtol=1e-4)


def test_pair_statistics_keep_the_softmax_sums_over_units_through_a_merge():
    """The reconstruction's statistics (PairStatistics with the block's units) sum per batch into an
    empty total: the total's softmax sums are over units too, and equal to one batch's sums added."""
    from onnxsnp.score.importance import PairStatistics

    heads, samples, tokens, d = 2, 2, 12, 8
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, samples, tokens, heads * d)).astype(np.float32)
    of = np.arange(d) % (d // 2)
    total = PairStatistics.empty(heads, d)
    for _ in range(2):
        batch = PairStatistics.empty(heads, d, causal_scale=SCALE, units=of)
        batch.add(q, k)
        total.merge(batch)
    assert total.softmax.fisher.shape == (heads, d // 2, d // 2)
    np.testing.assert_array_equal(total.softmax.units, of)
    np.testing.assert_allclose(total.softmax.fisher, 2 * batch.softmax.fisher)
    assert total.softmax.queries == 2 * samples * tokens


def test_softmax_only_statistics_gather_the_same_softmax_sums_and_no_scores():
    """Where the softmax's sums choose the pairs (PairSums.SOFTMAX), SNP's scores are not computed:
    the softmax's sums are those of the full statistics, the scores stay zero and say so."""
    from onnxsnp.score.importance import PairStatistics

    heads, samples, tokens, d = 2, 2, 12, 8
    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((2, samples, tokens, heads * d)).astype(np.float32)
    q_hat, k_hat = q + 0.1 * rng.standard_normal(q.shape), k + 0.1 * rng.standard_normal(k.shape)
    full = PairStatistics.empty(heads, d, causal_scale=SCALE)
    only = PairStatistics.empty(heads, d, causal_scale=SCALE, softmax_only=True)
    for statistics in (full, only):
        statistics.add(q_hat, k_hat, None, q, k)
    np.testing.assert_array_equal(only.softmax.fisher, full.softmax.fisher)
    np.testing.assert_array_equal(only.softmax.cross, full.softmax.cross)
    assert only.count == full.count == samples
    assert np.abs(full.scores).sum() > 0 and not only.scores.any()
    total = PairStatistics.empty(heads, d)
    total.merge(only)
    assert total.softmax_only


@pytest.mark.parametrize("batch_tokens", [1_000, 4_096, 20_000])
@pytest.mark.parametrize("batches", [1, 3, 4, 7, 9, 40])
def test_the_sums_read_whole_batches_spread_evenly_up_to_about_sums_tokens(batches, batch_tokens):
    from onnxsnp.score.softmax_metric import SUMS_TOKENS, sums_from

    picked = [i for i in range(batches) if sums_from(i, batches, batch_tokens)]
    if batches * batch_tokens <= SUMS_TOKENS:
        assert picked == list(range(batches))
        return
    assert picked[0] == 0 and len(picked) == min(batches, -(-SUMS_TOKENS // batch_tokens))
    assert SUMS_TOKENS <= len(picked) * batch_tokens < SUMS_TOKENS + batch_tokens or len(picked) == batches
    gaps = np.diff(picked + [batches])
    assert gaps.max() - gaps.min() <= 1  # spread evenly over the calibration set


def test_a_small_last_batch_or_small_batches_do_not_cut_the_sums_short():
    """Batches smaller than a full reconstruction batch (few calibration samples) are all read
    while they hold fewer than SUMS_TOKENS tokens in all; each batch decides by its own size."""
    from onnxsnp.score.softmax_metric import SUMS_TOKENS, sums_from

    small = SUMS_TOKENS // 8  # 5 batches of an eighth: 5/8 of SUMS_TOKENS
    assert all(sums_from(i, 5, small) for i in range(5))
    full = SUMS_TOKENS // 2  # 7 batches of a half: two are enough, and a tiny last one joins them
    assert [i for i in range(7) if sums_from(i, 7, full)] == [0, 3]
    assert sums_from(6, 7, 1)
