"""Refits and OBS from sums over tokens: equal to direct solves on the data."""
from __future__ import annotations

import numpy as np
import pytest

from onnxsnp.compensate import least_squares
from onnxsnp.compensate.least_squares import (FOLDS, RIDGE_GRID, NormalEquations, Obs, choose_ridge,
                                   cross_validated_losses, loss, lower_inverse, solve, spd_inverse,
                                   unimodal_argmin)

INPUTS, OUTPUTS, TOKENS = 12, 5, 400


def problem(seed: int = 0, noise: float = 0.1):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((INPUTS, INPUTS)) / np.sqrt(INPUTS)
    x = rng.standard_normal((TOKENS, INPUTS)) @ mixing + rng.standard_normal(INPUTS)  # correlated, not centred
    weight = rng.standard_normal((INPUTS, OUTPUTS))
    bias = rng.standard_normal(OUTPUTS)
    y = x @ weight + bias + noise * rng.standard_normal((TOKENS, OUTPUTS))
    equations = NormalEquations.empty(INPUTS, OUTPUTS)
    for fold, rows in enumerate(np.array_split(np.arange(TOKENS), 8)):  # 8 batches over FOLDS folds
        equations.add(x[rows], y[rows], fold)
    return x, y, weight, equations


def direct(x, y, keep, prior, penalty):
    """Ridge towards `prior` with a free intercept, by an augmented lstsq on the data."""
    design = np.hstack([x[:, keep], np.ones((len(x), 1))])
    rows = np.sqrt(penalty) * np.hstack([np.eye(len(keep)), np.zeros((len(keep), 1))])
    solution = np.linalg.lstsq(np.vstack([design, rows]), np.vstack([y, np.sqrt(penalty) * prior]), rcond=None)[0]
    return solution[:-1], solution[-1]


def test_sums_merge_and_count():
    x, y, _, equations = problem()
    assert equations.count == TOKENS
    half = NormalEquations.empty(INPUTS, OUTPUTS)
    half.add(x, y, 0)
    merged = half.merge(NormalEquations.empty(INPUTS, OUTPUTS))
    np.testing.assert_allclose(merged.total()[0], equations.total()[0], rtol=1e-5)


def test_token_weights_count_as_repeated_tokens():
    """A token of integer weight w adds what w copies of it add."""
    x, y, _, _ = problem()
    repeats = np.random.default_rng(3).integers(1, 4, len(x))
    weighted, repeated = NormalEquations.empty(INPUTS, OUTPUTS), NormalEquations.empty(INPUTS, OUTPUTS)
    weighted.add(x, y, 0, repeats.astype(np.float64))
    repeated.add(np.repeat(x, repeats, axis=0), np.repeat(y, repeats, axis=0), 0)
    for got, want in zip(weighted.total(), repeated.total()):  # float32 products: round-off of the largest sums
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert weighted.count == repeats.sum()


def test_solve_equals_direct_ridge_with_free_bias():
    x, y, weight, equations = problem()
    keep = np.array([0, 2, 3, 7, 9, 11])
    fit = solve(equations, keep, weight[keep], ridge=0.1)
    xc = x[:, keep] - x[:, keep].mean(axis=0)
    penalty = 0.1 * np.mean(np.diag(xc.T @ xc))
    want_w, want_b = direct(x, y, keep, weight[keep], penalty)
    np.testing.assert_allclose(fit.weight, want_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fit.bias, want_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fit.loss, np.sum((x[:, keep] @ fit.weight + fit.bias - y) ** 2), rtol=1e-4)


def test_loss_from_sums_matches_data():
    x, y, weight, equations = problem()
    keep = np.arange(INPUTS)
    xx, xy, yy = equations.total()
    np.testing.assert_allclose(loss(xx, xy, yy, keep, weight, np.zeros(OUTPUTS)),
                               np.sum((x @ weight - y) ** 2), rtol=1e-4)


def test_ridge_choice_prefers_little_ridge_on_clean_data_and_more_on_few_tokens():
    _, _, weight, clean = problem(noise=0.01)
    keep = np.arange(INPUTS)
    far = weight + np.random.default_rng(5).standard_normal(weight.shape)  # a prior the data contradicts
    assert choose_ridge(clean, keep, far) <= 1e-2
    rng = np.random.default_rng(3)
    few = NormalEquations.empty(INPUTS, OUTPUTS)
    for fold in range(FOLDS):  # 4 tokens a fold, 12 unknowns per output: a free fit overfits
        x = rng.standard_normal((4, INPUTS))
        few.add(x, x @ weight + 3 * rng.standard_normal((4, OUTPUTS)), fold)
    assert choose_ridge(few, keep, weight) >= 1e-1  # the prior is right, the few tokens are noisy


@pytest.mark.parametrize("seed", [0, 2])
def test_cross_validated_losses_are_those_of_a_solve_per_fold_and_ridge(seed):
    """One eigendecomposition per fold for every λ gives each fold's held-out loss of the refit
    that `solve` makes without that fold."""
    _, _, weight, equations = problem(seed)
    keep = np.array([0, 2, 3, 5, 7, 8, 11])
    prior = weight[keep] + 0.3
    want = [sum(loss(equations.xx[f], equations.xy[f], float(equations.yy[f]), keep,
                     *((fit := solve(equations, keep, prior, ridge, leave_out=f)).weight, fit.bias))
                for f in range(FOLDS)) for ridge in RIDGE_GRID]
    np.testing.assert_allclose(cross_validated_losses(equations, keep, prior), want, rtol=1e-9)
    assert choose_ridge(equations, keep, prior) == RIDGE_GRID[int(np.argmin(want))]


def test_cross_validated_losses_on_a_fold_pool_equal_one_fold_at_a_time(monkeypatch):
    """The folds run side by side on threads; the losses are those of one fold after the other,
    bit for bit (each fold on one BLAS thread either way, the sums added in fold order)."""
    _, _, weight, equations = problem(seed=4)
    keep = np.array([1, 2, 4, 6, 9, 10, 11])
    prior = weight[keep] - 0.2
    monkeypatch.setattr(least_squares, "_fold_workers", lambda: 1)
    one_at_a_time = cross_validated_losses(equations, keep, prior)
    monkeypatch.setattr(least_squares, "_fold_workers", lambda: FOLDS)
    np.testing.assert_array_equal(cross_validated_losses(equations, keep, prior), one_at_a_time)


class Counted:
    """`unimodal_argmin`'s `evaluate` over fixed values, recording which indices it was asked for."""

    def __init__(self, values):
        self.values, self.asked = np.asarray(values, dtype=float), []

    def __call__(self, indices):
        self.asked += list(indices)
        return self.values[indices]


def valley(size: int, least: int, rng) -> np.ndarray:
    """Distinct values falling strictly to index `least`, then rising strictly."""
    steps = rng.uniform(0.1, 2.0, size)
    return np.array([steps[min(i, least):max(i, least)].sum() for i in range(size)]) + rng.uniform(-5, 5)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_the_walk_finds_a_valleys_least_from_any_start_evaluating_each_value_once(size):
    """On a curve falling then rising, wherever its least and the start: np.argmin's index, each
    value evaluated at most once, and only the start's neighbours and the path down to the least's
    far neighbour."""
    rng = np.random.default_rng(size)
    for least in range(size):
        for start in range(size):
            values = Counted(valley(size, least, rng))
            assert unimodal_argmin(values, size, start) == least == int(np.argmin(values.values))
            assert len(values.asked) == len(set(values.asked))
            low, high = max(0, min(start, least) - 1), min(size - 1, max(start, least) + 1)
            assert sorted(values.asked) == list(range(low, high + 1))


@pytest.mark.parametrize("values, start", [
    ([0.0, 5.0, 9.0, 1.0, 3.0], 2),  # the start above both neighbours: a peak
    ([4.0, 3.0, 3.0, 1.0, 2.0], 2),  # a tie among the values seen
    ([4.0, np.inf, 3.0, 1.0, 2.0], 2),  # a singular fold's loss
    ([4.0, 3.0, 2.0, np.inf, 0.5], 2),
    ([np.inf, np.inf, np.inf, np.inf, np.inf], 2),
])
def test_the_walk_evaluates_the_whole_grid_where_the_values_seen_are_not_one_valley(values, start):
    counted = Counted(values)
    assert unimodal_argmin(counted, len(values), start) == int(np.argmin(values))
    assert sorted(counted.asked) == list(range(len(values)))


def test_the_walk_returns_the_local_least_where_a_second_dip_lies_beyond_the_values_seen():
    """The limit the docstring states: a dip the walk never looks at is not found."""
    values = [1.0, 5.0, 3.0, 2.0, 4.0]
    counted = Counted(values)
    assert unimodal_argmin(counted, len(values), 2) == 3
    assert 0 not in counted.asked


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_ridges_losses_do_not_depend_on_the_others_evaluated_with_it(seed):
    """What makes the walk's choice the whole grid's: each λ's cross-validated loss is the same
    number, bit for bit, whichever λs are evaluated in the same call."""
    _, _, weight, equations = problem(seed, noise=0.5)
    keep = np.array([0, 1, 3, 4, 6, 8, 10, 11])
    prior = weight[keep] * 0.8
    whole = cross_validated_losses(equations, keep, prior)
    for indices in ([2], [1, 2, 3], [0, 4], [3, 1]):
        np.testing.assert_array_equal(
            cross_validated_losses(equations, keep, prior, tuple(RIDGE_GRID[i] for i in indices)), whole[indices])
    for start in (None, *RIDGE_GRID, 0.5):  # any start: the previous choice, none, a λ off the grid
        assert choose_ridge(equations, keep, prior, start=start) == RIDGE_GRID[int(np.argmin(whole))]


def test_the_ridge_choice_starting_at_its_answer_evaluates_only_its_neighbours(monkeypatch):
    """A start at the chosen λ (the previous layer's choice, when layers agree) costs the solves
    of that λ and its neighbours on the grid, nothing more."""
    _, _, weight, equations = problem(0, noise=0.5)
    keep = np.arange(INPUTS)
    whole = cross_validated_losses(equations, keep, weight)
    chosen = int(np.argmin(whole))
    asked = []
    original = least_squares.cross_validated_losses

    def counting(equations, keep, prior, grid=RIDGE_GRID):
        asked.extend(grid)
        return original(equations, keep, prior, grid)

    monkeypatch.setattr(least_squares, "cross_validated_losses", counting)
    assert choose_ridge(equations, keep, weight, start=RIDGE_GRID[chosen]) == RIDGE_GRID[chosen]
    assert sorted(asked) == list(RIDGE_GRID[max(0, chosen - 1):chosen + 2])


@pytest.mark.parametrize("unit", [1, 3])
def test_obs_removal_equals_refit_of_the_rest(unit):
    x, y, weight, equations = problem(seed=1)
    obs = Obs(equations, weight, ridge=1e-9)
    start = solve(equations, np.arange(INPUTS), weight, ridge=1e-9)
    removed = []
    for _ in range(2):
        units = [np.arange(i, i + unit) for i in range(0, INPUTS, unit) if i not in removed]
        costs = obs.costs(units)
        best = units[int(np.argmin(costs))]
        added = obs.remove(best)
        assert added == pytest.approx(costs.min(), rel=1e-6)
        removed.append(int(best[0]))
    keep = np.flatnonzero(obs.alive)
    refit = solve(equations, keep, weight[keep], ridge=1e-9)
    np.testing.assert_allclose(obs.weight[keep], refit.weight, rtol=1e-5, atol=1e-8)
    assert refit.loss - start.loss == pytest.approx(obs.removed_loss, rel=1e-4)


def test_obs_removes_the_redundant_input_first():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((TOKENS, INPUTS))
    x[:, 5] = x[:, 2] + 1e-3 * rng.standard_normal(TOKENS)  # input 5 repeats input 2
    weight = rng.standard_normal((INPUTS, OUTPUTS))
    equations = NormalEquations.empty(INPUTS, OUTPUTS)
    equations.add(x, x @ weight, 0)
    costs = Obs(equations, weight, ridge=1e-6).single_costs()
    assert set(np.argsort(costs)[:2]) == {2, 5}


@pytest.mark.parametrize("width", [1, 7, least_squares._TRIANGLE_BLOCK + 1, 3 * least_squares._TRIANGLE_BLOCK + 5])
def test_the_cholesky_inverse_is_the_inverse_of_a_positive_definite_matrix(width):
    """Widths on both sides of the block size, odd halves included; a Gram of correlated data
    (condition ~1e4) with a small ridge, as OBS's Hessians are."""
    rng = np.random.default_rng(width)
    x = rng.standard_normal((3 * width + 10, width)) @ (np.eye(width) + rng.standard_normal((width, width)) / 4)
    matrix = x.T @ x + 1e-3 * np.trace(x.T @ x) / width * np.eye(width)
    inverse = spd_inverse(matrix)
    scale = np.abs(np.linalg.inv(matrix)).max()
    np.testing.assert_allclose(inverse, np.linalg.inv(matrix), rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(inverse @ matrix, np.eye(width), rtol=0, atol=1e-9)
    lower = np.linalg.cholesky(matrix)
    assert not np.triu(lower_inverse(lower), 1).any()  # exactly triangular: nothing above the diagonal


def test_the_cholesky_inverse_refuses_a_matrix_that_is_not_positive_definite():
    with pytest.raises(np.linalg.LinAlgError):
        spd_inverse(np.diag([4.0, 4.0, -1.0]))


def test_obs_falls_back_to_the_lu_inverse_where_the_hessian_is_not_positive_definite():
    """A centred Gram with a negative direction larger than the ridge (sums no data can give,
    as rounding in a near-singular Gram can): the Cholesky factor fails, the LU inverse is used."""
    inputs = 3
    equations = NormalEquations.empty(inputs, 2, folds=1)
    equations.xx[0, :inputs, :inputs] = np.diag([4.0, 4.0, -1.0])  # uncentred: mean 0 (column sums 0)
    equations.xx[0, inputs, inputs] = 10.0  # tokens
    equations.xy[0, :inputs] = np.arange(6.0).reshape(3, 2)
    prior = np.ones((inputs, 2))
    obs = Obs(equations, prior, ridge=0.01)
    hessian = np.diag([4.0, 4.0, -1.0]) + 0.01 * 7 / 3 * np.eye(inputs)
    np.testing.assert_allclose(obs._first, np.linalg.inv(hessian), rtol=1e-12)
    np.testing.assert_allclose(obs.weight, np.linalg.solve(hessian, equations.xy[0, :inputs] + 0.01 * 7 / 3 * prior),
                               rtol=1e-12)


def test_obs_takes_its_inverse_from_the_cholesky_factor():
    x, y, weight, equations = problem(seed=2)
    obs = Obs(equations, weight, ridge=1e-3)
    xx, xy, _ = equations.total()
    count = xx[-1, -1]
    mean = xx[:-1, -1] / count
    gram = xx[:-1, :-1] - count * np.outer(mean, mean)
    hessian = gram + 1e-3 * np.mean(np.diag(gram)) * np.eye(INPUTS)
    np.testing.assert_allclose(obs._first, np.linalg.inv(hessian), rtol=1e-10)


def test_costs_of_units_in_one_batch_are_the_costs_unit_by_unit():
    """Units of mixed sizes after a removal (the lazy factors in play), against each unit's own
    block of the inverse solved alone."""
    x, y, weight, equations = problem(seed=3)
    obs = Obs(equations, weight, ridge=1e-3)
    obs.remove(np.array([4, 7]))
    units = [np.array([0, 1, 2]), np.array([3]), np.array([5, 6, 8]), np.array([9, 10]), np.array([11])]
    one_by_one = [float(np.sum(obs.weight[rows] * np.linalg.solve(obs._inverse_columns(rows, rows), obs.weight[rows])))
                  for rows in units]
    np.testing.assert_allclose(obs.costs(units), one_by_one, rtol=1e-12)
    # a single row's cost is the same block formula (its 1×1 block: the kept diagonal)
    assert obs.costs([np.array([3])])[0] == pytest.approx(one_by_one[1], rel=1e-12)
    with pytest.raises(np.linalg.LinAlgError):  # a unit holding a removed row: singular, as unit by unit
        obs.costs([np.array([4, 5]), np.array([0, 1])])


def test_reconstruction_batches_leave_every_fold_some_samples():
    """The refits' ridge is cross-validated over FOLDS folds of whole batches: any calibration set
    of at least FOLDS samples is cut into at least FOLDS batches (64 windows of a decoder made two
    batches of 32 before, and every refit took the default ridge), and no batch is larger than
    RECONSTRUCTION_BATCH."""
    from onnxsnp.compensate.batches import owner, split_batches
    from onnxsnp.pipeline import RECONSTRUCTION_BATCH, reconstruction_batch

    for samples in range(1, 8 * RECONSTRUCTION_BATCH):
        batch = reconstruction_batch(samples)
        assert 1 <= batch <= RECONSTRUCTION_BATCH
        batches = split_batches({"x": np.zeros((samples, 2))}, batch)
        if samples >= FOLDS:
            assert {owner(index, FOLDS, len(batches)) for index in range(len(batches))} == set(range(FOLDS))
    assert reconstruction_batch(8 * RECONSTRUCTION_BATCH) == RECONSTRUCTION_BATCH
