"""How much each block loses per unit removed: the measured curves a global allocation reads.

One pass of the original model over (a subset of) the calibration samples, half-block by
half-block as in the reconstruction, gives for every block the loss left after its refit as a
function of what it keeps — all in one unit, the squared error added to the residual stream
relative to the stream's energy there (post-norm blocks: that block's pre-norm sum, which the
norm divides by; pre-norm blocks: the last block's output, which the final norm divides by,
because an error added to a pre-norm stream stays in it):

- Q/K pairs per head: the scores' singular values give the error of keeping k projected
  directions exactly in score units; one measured run at half width converts them into the
  refitted sublayer's output error;
- V neurons per head: the refit's loss after projecting every head onto k directions;
- heads: the refit's loss after removing heads greedily (structured OBS on groups);
- FFN neurons: the refit's loss along the OBS removal path;
- the whole block: the energy of what it adds to the stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .criteria import input_weights
from .importance import PairStatistics, query_key, query_key_tensors
from ..compensate.least_squares import DEFAULT_RIDGE, NormalEquations, Obs, solve
from ..plan import AttentionKeep, selection_map
from ..match.blocks import Placement
from ..match.units import unit_of_dim
from ..compensate.projection import cholesky, project_pairs, project_values
from ..compensate.batches import Batch, Shard, branch_rms, norm_weights, split_batches, tokens as _tokens
from ..compensate.reconstruction import QK_RIDGE, Reconstructor
from .downstream import TRIAL_KEPT, Downstream, Trial, trial_refit
from .softmax_metric import choose_pairs, removal_curve, softmax_scale, sums_from

CURVE_STEPS = 16  # points measured along each curve (between them the loss is interpolated)


@dataclass(frozen=True)
class Curve:
    """Relative loss by units kept: `loss[i]` when `kept[i]` remain (kept ascending, last = all)."""

    kept: np.ndarray
    loss: np.ndarray

    def at(self, kept: float) -> float:
        return float(np.interp(kept, self.kept, self.loss))


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    qk: Curve  # by Q/K pairs kept per head
    v: Curve  # by V neurons kept per head
    heads: Curve  # by heads kept
    ffn: Curve  # by FFN neurons kept
    block: float  # removing the whole block


def survey_shard(reconstructor: Reconstructor, feed: dict[str, np.ndarray], batch: int, mask_name: str | None,
                 samples: int) -> Shard:
    """The whole calibration batches that hold the first `samples` samples of `feed`, in this process."""
    parts, count = [], 0
    for part in split_batches(feed, batch):
        if count >= samples:
            break
        parts.append(part)
        count += next(iter(part.values())).shape[0]
    shard = Shard(reconstructor.g, reconstructor.matches, reconstructor.halves, reconstructor.original)
    shard.prepare(parts, mask_name)
    return shard


def survey(reconstructor: Reconstructor, shard: Shard) -> list[LayerSensitivity]:
    """The curves of every transformer block, on the batches of `shard` (survey_shard); a
    decoder's in the unit of its last stream (downstream.py)."""
    chosen = shard.batches
    layers = reconstructor.matches.layers
    # measured on Gemma 3's sandwich-normed decoder (1.30x -> 1.20x at equal FLOPs); on SmolLM2's
    # pre-norm one it cost 2 points of agreement and 1.6x the survey's time: there it is not used
    sandwiched = any(half.branch_gain is not None for halves in reconstructor.halves for half in halves)
    decoder = all(layer.attention.causal for layer in layers)
    reach = Downstream(shard) if decoder and sandwiched else None
    results, energies = [], []
    for index, (layer, (attention, ffn)) in enumerate(zip(layers, reconstructor.halves)):
        start = [item.original for item in chosen]
        attention_part = _attention(reconstructor, shard, layer, attention)
        middle = [item.original for item in chosen]
        ffn_part = _ffn(reconstructor, shard, layer, ffn)
        block = sum(_energy(_tokens(item.original - before, item.samples, item.mask), _weights(layer, item))
                    for item, before in zip(chosen, middle))
        # the attention half's own change is part of the block's too
        block += attention_part[-1]
        energies.append((attention_part[-2], ffn_part[1]))
        results.append((index, layer, attention_part, ffn_part, block, start, middle))
    final = energies[-1][1]
    curves = []
    for (index, layer, (qk, v, heads, v_trial, energy_attention, _), (ffn_curve, energy_ffn, ffn_trial), block,
         start, middle) in results:
        # a decoder's errors are weighed per token as its next RMSNorm divides them (norm_weights), so
        # each half's own weighted stream energy is the scale, as for post-norm blocks
        own = layer.norm is Placement.POST or layer.attention.causal
        scale_attention = 1.0 / max(energy_attention if own else final, 1e-30)
        scale_ffn = 1.0 / max(energy_ffn if own else final, 1e-30)
        if reach is not None:  # then to the last stream's error, by one measured cut per half
            scale_attention *= reach.factor(reconstructor, 2 * index, start, v_trial,
                                            v.at(v_trial.width) * scale_attention if v_trial else 0.0)
            scale_ffn *= reach.factor(reconstructor, 2 * index + 1, middle, ffn_trial,
                                      ffn_curve.at(ffn_trial.width) * scale_ffn if ffn_trial else 0.0)
        curves.append(LayerSensitivity(layer.name, _scaled(qk, scale_attention), _scaled(v, scale_attention),
                                       _scaled(heads, scale_attention), _scaled(ffn_curve, scale_ffn),
                                       block * scale_ffn))
    return curves


def _scaled(curve: Curve, factor: float) -> Curve:
    return Curve(curve.kept, curve.loss * factor)


def _attention(r: Reconstructor, shard: Shard, layer, half):
    block = layer.attention
    batches = shard.batches
    d, heads = block.head_dim, block.heads
    # a decoder's Q/K curve reads only the softmax's sums (_decoder_attention): SNP's scores, a
    # per-sample eigendecomposition, would be computed for nothing; and the sums, from about
    # SUMS_TOKENS tokens, as the reconstruction's
    pairs = PairStatistics.empty(heads, d, causal_scale=softmax_scale(block) if block.causal else None,
                                 units=unit_of_dim(block), softmax_only=block.causal, softcap=block.softcap)
    equations = NormalEquations.empty(block.out.in_features, block.out.out_features)
    branches: list[np.ndarray] = []
    energy = [0.0]
    starts = [item.original for item in batches]

    def collect(item: Batch, values: dict[str, np.ndarray]) -> None:
        if not block.causal or sums_from(item.index, len(batches), item.samples * item.original.shape[1]):
            q, k = query_key(r.g, block, values, item.samples)
            pairs.add(q, k, item.mask)
        branch = values[half.branch]
        weights, to_branch = _branch_weights(half, item, branch, _weights(layer, item))
        equations.add(_tokens(values[block.out.input], item.samples, item.mask),
                      _tokens(branch, item.samples, item.mask), item.index, weights)
        energy[0] += _energy(_tokens(item.target, item.samples, item.mask), _weights(layer, item)) * to_branch
        branches.append(branch)

    shard.targets(half, query_key_tensors(block) + [block.out.input], collect)
    prior = input_weights(r.g, block.out)
    if block.causal or block.group_size > 1:
        return _decoder_attention(r, shard, layer, half, pairs, equations, prior, starts, branches) + \
            (energy[0], _half_change(batches, starts, layer))
    every = np.arange(heads)

    # Q/K: exact score error of k projected directions, converted by one measured run at half width
    score_error = np.zeros(d + 1)
    for h in range(heads):
        roots = [cholesky(g).T for g in (pairs.gram_q[h], pairs.gram_k[h])]
        sigma2 = np.linalg.svd(roots[0] @ roots[1].T, compute_uv=False) ** 2
        score_error += np.r_[np.cumsum(sigma2[::-1])[::-1], 0.0]
    half_width = max(1, d // 2)
    q_map, k_map = project_pairs(pairs, half_width)
    trial = AttentionKeep(block, np.tile(np.arange(half_width), (heads, 1)), np.tile(np.arange(d), (heads, 1)),
                          every, q_map, k_map)
    saved = dict(r.weights.values)
    r.weights.apply_attention(trial)
    measured = NormalEquations.empty(block.out.in_features, block.out.out_features)
    for item, start, branch in zip(batches, starts, branches):
        values = shard.run_half(half, item, start, r.weights.values, [block.out.input])
        measured.add(_tokens(values[block.out.input], item.samples, item.mask),
                     _tokens(branch, item.samples, item.mask), item.index)
    r.weights.values = saved
    refit_loss = solve(measured, np.arange(block.out.in_features), prior, DEFAULT_RIDGE).loss
    factor = refit_loss / max(score_error[half_width], 1e-30)
    qk = Curve(np.arange(d + 1, dtype=float), score_error * factor)

    # V: the refit's loss after projecting each head onto k directions
    points = _points(d)
    v_loss = []
    for kept in points:
        if kept == d:
            v_loss.append(0.0)
            continue
        rows, _, transform, projected = project_values(block, equations, prior, every, kept)
        v_loss.append(solve(equations.transformed(transform), (rows + np.arange(heads)[:, None] * d).reshape(-1),
                            projected[(rows + np.arange(heads)[:, None] * d).reshape(-1)], DEFAULT_RIDGE).loss)
    v = Curve(points.astype(float), np.maximum(np.array(v_loss) - 0.0, 0.0))

    # heads: group OBS
    obs = Obs(equations, prior, DEFAULT_RIDGE)
    alive, head_loss = list(range(heads)), [0.0]
    while len(alive) > 1:
        costs = obs.costs([np.arange(h * d, (h + 1) * d) for h in alive])
        best = int(np.argmin(costs))
        obs.remove(np.arange(alive[best] * d, (alive[best] + 1) * d))
        alive.pop(best)
        head_loss.append(obs.removed_loss)
    head_curve = Curve(np.arange(1, heads + 1, dtype=float), np.array(head_loss[::-1]))
    return qk, v, head_curve, None, energy[0], _half_change(batches, starts)


def _decoder_attention(r: Reconstructor, shard: Shard, layer, half, pairs: PairStatistics,
                       equations: NormalEquations, prior: np.ndarray, starts, branches
                       ) -> tuple[Curve, Curve, Curve, Trial | None]:
    """Q/K, V and head curves of causal attention, in the units the reconstruction removes: Q/K
    pairs (whole rotary pairs) along the softmax metric's removal path, V neurons and heads as
    key/value groups (a V neuron or a head takes its output-projection rows in every query head
    of its group)."""
    block = layer.attention
    d, groups, r_size = block.head_dim, block.groups, block.group_size
    every = np.arange(groups)
    # Q/K: the softmax's score error along the removal path, converted to the refit's output error
    # by one measured run at about half width
    score_error = removal_curve(block, pairs.softmax, QK_RIDGE)
    choice = choose_pairs(block, pairs.softmax, max(1, d // 2), QK_RIDGE)
    kept = choice.qk.shape[1]
    trial = AttentionKeep(block, choice.qk, np.tile(np.arange(d), (groups, 1)), every,
                          selection_map(choice.qk, d, choice.factors))
    saved = dict(r.weights.values)
    r.weights.apply_attention(trial)
    measured = NormalEquations.empty(block.out.in_features, block.out.out_features)
    for item, start, branch in zip(shard.batches, starts, branches):
        values = shard.run_half(half, item, start, r.weights.values, [block.out.input])
        measured.add(_tokens(values[block.out.input], item.samples, item.mask),
                     _tokens(branch, item.samples, item.mask), item.index, _weights(layer, item))
    r.weights.values = saved
    refit_loss = solve(measured, np.arange(block.out.in_features), prior, DEFAULT_RIDGE).loss
    qk = Curve(np.arange(d + 1, dtype=float), score_error * refit_loss / max(score_error[kept], 1e-30))

    def rows(group: int, neurons) -> np.ndarray:  # output-projection rows of a group's V neurons
        return ((group * r_size + np.arange(r_size))[:, None] * d + np.asarray(neurons)[None, :]).reshape(-1)

    # V: one neuron fewer in every group a round, each group's cheapest by its rows' single costs
    obs = Obs(equations, prior, DEFAULT_RIDGE)
    v_loss = {d: 0.0}
    trial_width = max(1, int(round(TRIAL_KEPT * d)))
    trial = None
    for width in range(d - 1, 0, -1):
        single = obs.single_costs()
        gone = []
        for g in every:
            alive = [n for n in range(d) if obs.alive[rows(g, [n])[0]]]
            costs = [single[rows(g, [n])].sum() for n in alive]
            gone.append(rows(g, [alive[int(np.argmin(costs))]]))
        obs.remove(np.concatenate(gone))
        v_loss[width] = obs.removed_loss
        if width == trial_width:  # the measured cut (downstream.py): these rows, refitted
            kept_rows = np.flatnonzero(obs.alive)
            trial = Trial(block.out, kept_rows, trial_refit(equations, block.out, kept_rows, prior), float(width))
    v = Curve(np.arange(1, d + 1, dtype=float), np.array([v_loss[w] for w in range(1, d + 1)]))

    # heads: whole key/value groups, structured OBS
    obs = Obs(equations, prior, DEFAULT_RIDGE)
    alive, head_loss = list(every), [0.0]
    while len(alive) > 1:
        best = int(np.argmin(obs.costs([rows(g, np.arange(d)) for g in alive])))
        obs.remove(rows(alive.pop(best), np.arange(d)))
        head_loss.append(obs.removed_loss)
    heads = Curve(np.arange(1, groups + 1, dtype=float), np.array(head_loss[::-1]))
    return qk, v, heads, trial


def _ffn(r: Reconstructor, shard: Shard, layer, half):
    block = layer.ffn
    equations = NormalEquations.empty(block.fc2.in_features, block.fc2.out_features)
    energy = [0.0]

    def collect(item: Batch, values: dict[str, np.ndarray]) -> None:
        weights, to_branch = _branch_weights(half, item, values[half.branch], _weights(layer, item))
        equations.add(_tokens(values[block.fc2.input], item.samples, item.mask),
                      _tokens(values[half.branch], item.samples, item.mask), item.index, weights)
        energy[0] += _energy(_tokens(item.target, item.samples, item.mask), _weights(layer, item)) * to_branch

    shard.targets(half, [block.fc2.input], collect)
    prior = input_weights(r.g, block.fc2)
    obs = Obs(equations, prior, DEFAULT_RIDGE)
    hidden = block.hidden
    kept, losses = [hidden], [0.0]
    step = max(1, hidden // (2 * CURVE_STEPS))
    trial = None
    while obs.alive.sum() > step:
        obs.remove(np.argsort(obs.single_costs(), kind="stable")[:step])
        kept.append(int(obs.alive.sum()))
        losses.append(obs.removed_loss)
        if trial is None and kept[-1] <= TRIAL_KEPT * hidden:  # the measured cut (downstream.py)
            rows = np.flatnonzero(obs.alive)
            trial = Trial(block.fc2, rows, trial_refit(equations, block.fc2, rows, prior), float(kept[-1]))
    return Curve(np.array(kept[::-1], dtype=float), np.array(losses[::-1])), energy[0], trial


def _points(width: int) -> np.ndarray:
    """Kept counts where a curve is measured: every count for narrow groups, CURVE_STEPS otherwise."""
    if width <= CURVE_STEPS:
        return np.arange(1, width + 1)
    return np.unique(np.linspace(1, width, CURVE_STEPS).round().astype(int))


def _half_change(batches: list[Batch], starts: list[np.ndarray], layer=None) -> float:
    """Σ‖stream after − stream before‖² of a half-block (on the tokens that count; a decoder's weighed)."""
    return sum(_energy(_tokens(item.original - start, item.samples, item.mask),
                       None if layer is None else _weights(layer, item)) for item, start in zip(batches, starts))


def _weights(layer, item: Batch) -> np.ndarray | None:
    """A decoder's tokens weighed as the reconstruction's refits weigh them (batches.norm_weights, on
    the original stream after the half); None (all 1) elsewhere."""
    if not layer.attention.causal:
        return None
    return norm_weights(_tokens(item.original if item.target is None else item.target, item.samples, item.mask))


def _branch_weights(half, item: Batch, branch: np.ndarray, weights: np.ndarray | None
                    ) -> tuple[np.ndarray | None, float]:
    """Token weights for a half's branch fit, and the factor from the stream's energy to the fit's
    units: 1 where the branch is added as it is; where a norm comes first (x + γ·b/rms(b)), an
    error e in b reaches the stream as about γ·e/rms(b), so tokens weigh 1/rms(b)² more and the
    stream's energy is divided by mean(γ²)."""
    if half.branch_gain is None:
        return weights, 1.0
    gamma, eps = half.branch_gain
    inverse = 1.0 / np.square(_tokens(branch_rms(branch.astype(np.float32), eps), item.samples, item.mask)[:, 0]
                              .astype(np.float64))
    return (inverse if weights is None else weights * inverse), 1.0 / float(np.mean(np.square(gamma)))


def _energy(rows: np.ndarray, weights: np.ndarray | None) -> float:
    squares = np.square(rows, dtype=np.float64).sum(axis=-1)
    return float(squares.sum() if weights is None else squares @ weights)
