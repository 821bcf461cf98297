"""Block-by-block reconstruction: prune each transformer block in order and refit it so that the
pruned model's residual stream follows the original's (K-prune, ICLR 2024, arXiv 2308.03449).

For every block, two half-blocks — attention, then FFN — each run as their own onnxruntime
segment on cached stream values (see segments.py):

1. the original half on the original stream gives the target: the original pre-norm sum
   (sublayer output + residual input) at the half's residual join;
2. the pruned model's own stream goes through the half with the weights pruned so far; its
   Q/K pairs are chosen by SNP's attention-score criterion on the pruned model's q and k, and
   rescaled to reproduce the original scores;
3. the layer after the pruned group (output projection, fc2) is refitted, whole matrix, ridge
   pulled towards the original weights, so that sublayer output + pruned residual input matches
   the original sum: target = original sum − pruned residual input, which also cancels the
   drift of the blocks before. Which V neurons, heads and FFN neurons go is chosen by what the
   refit can do without (structured OBS, least_squares.Obs) or by the criterion's scores;
4. the pruned half runs once more with its final weights, giving the next pruned stream.

`Propagation.ONE_SHOT` feeds the original stream instead of the pruned one (the targets are then
the original sublayer outputs), for comparison. Every statistic is a sum over tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import SnpError
from ..ir.graph import ModelGraph
from ..match import units
from .halves import all_slots, arenas, original_weights, plan_segments
from ..score.criteria import criterion as criterion_named, input_weights
from ..score.importance import PairStatistics, PairSums
from .batches import (LocalShards, Shard, Shards, Slot, Workers, check_workers, merged_equations, merged_pairs,
                      split_batches)
from .least_squares import (DEFAULT_RIDGE, NormalEquations, Obs, activation_norms, choose_ridge, loss, solve,
                            solve_without_bias)
from .masking import Weights
from ..match import Layer, Matches
from ..plan import (AttentionKeep, AttentionWidth, FfnKeep, Propagation, Reduction, Refit, Selection, Widths,
                   selection_map)
from .projection import project_pairs, project_values
from .qk_norm import calibrated_norm
from ..score.softmax_metric import choose_pairs
from ..threads import small_linear_algebra, threads_for

log = logging.getLogger("onnxsnp")

QK_RIDGE = 1e-2  # for the Q/K rescale, relative to the mean diagonal of its system


@dataclass(frozen=True)
class HalfReport:
    """What one half-block's refit achieved, relative to the energy of its target."""

    name: str
    tokens: int
    ridge: float
    error_before: float  # ‖pruned − target‖² / ‖target‖² with the weights as sliced
    error_after: float  # with the refit


@dataclass(frozen=True)
class Reconstruction:
    attention: tuple[AttentionKeep, ...]
    ffn: tuple[FfnKeep, ...]
    refits: dict[str, Refit]
    scale_values: dict[str, np.ndarray]
    halves: tuple[HalfReport, ...]
    samples: int
    tokens: int


class Reconstructor:
    """Runs the reconstruction over calibration batches (see the module docstring)."""

    def __init__(self, g: ModelGraph, matches: Matches, criterion: str = "snp",
                 selection: Selection = Selection.OBS, propagation: Propagation = Propagation.SEQUENTIAL,
                 ridge: float | None = None, rescale_qk: bool = True, seed: int = 0,
                 reduction: Reduction = Reduction.PROJECT, keep_grams: bool = False):
        self.reduction = reduction
        self.keep_grams = keep_grams  # a refit's input Gram goes with it (for quantized weights)
        self.g, self.matches = g, matches
        self.criterion, self.selection, self.propagation = criterion_named(criterion), selection, propagation
        self.ridge, self.rescale_qk = ridge, rescale_qk
        self._ridge_starts: dict[int, float] = {}  # input width → the last ridge chosen (_ridge_for)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.halves = plan_segments(g, matches)
        self.original = original_weights(g, self.halves)
        self.weights = Weights(g, all_slots(self.halves))
        self.keeps_attention: list[AttentionKeep] = []
        self.keeps_ffn: list[FfnKeep] = []
        self.refits: dict[str, Refit] = {}
        self.scale_values: dict[str, np.ndarray] = {}
        self.reports: list[HalfReport] = []
        # the slots no half after half-block n reads: their changed weights are dropped after it
        # (the plan keeps the cuts and refits; the passes need only the current half's weights)
        last = {slot: number for number, half in enumerate(h for pair in self.halves for h in pair)
                for slot in half.segment.slots}
        self._done = [[slot for slot, at in last.items() if at == number] for number in range(2 * len(self.halves))]

    def restart(self) -> None:
        """Forget a run (kept widths, refits, edited weights), so that another can start from the
        batches' first stream as `prepare` left it (Shards.restart)."""
        self.weights = Weights(self.g, self.weights.slots)
        self.rng = np.random.default_rng(self.seed)
        self.keeps_attention, self.keeps_ffn, self.reports = [], [], []
        self.refits, self.scale_values = {}, {}

    # --- the whole job -------------------------------------------------------------------------
    def prepare(self, feed: dict[str, np.ndarray], batch: int, mask_name: str | None,
                workers: Workers | None = None, restartable: bool = True) -> Shards:
        """The calibration batches, with the first block's input, held in this process or, with
        `workers`, spread over them (distributed.py); `restartable`: for more than one run."""
        parts = split_batches(feed, batch)
        sequential = self.propagation is Propagation.SEQUENTIAL
        if workers is None or workers.count <= 1 and workers.address is None:
            shards: Shards = LocalShards(Shard(self.g, self.matches, self.halves, self.original, sequential))
        else:
            from .distributed import RayShards

            check_workers(workers.count, len(parts), batch)  # before Ray starts
            shards = RayShards(self.g, self.matches, self.halves, sequential, workers)
        try:
            with self.g.decoding_once():  # the embeddings' weights decoded for the prefix's run, not kept
                shards.prepare(parts, mask_name, restartable)
        except BaseException:
            shards.close()
            raise
        return shards

    def run(self, shards: Shards, widths: Widths, progress: Callable[[str], None] = lambda _: None
            ) -> Reconstruction:
        """Prune and refit block by block to `widths` (the batches' streams move on as it goes)."""
        self.widths = widths
        removed = set(widths.removed_layers)
        for index, layer in enumerate(self.matches.layers):
            progress(layer.name)
            with arenas(self.halves[index]):  # a layer's sessions keep their arenas to its end, no longer
                if index in removed:  # the pruned model skips the block; the blocks after make up for it
                    shards.advance_original(2 * index)
                    shards.advance_original(2 * index + 1)
                else:
                    with threads_for(layer.attention.out.in_features):
                        self._attention_half(layer, 2 * index, shards)
                    self.weights.forget(self._done[2 * index])
                    progress(layer.name)
                    with threads_for(layer.ffn.fc2.in_features):
                        self._ffn_half(layer, 2 * index + 1, shards)
                    self.weights.forget(self._done[2 * index + 1])
        samples, tokens = shards.counts()
        return Reconstruction(tuple(self.keeps_attention), tuple(self.keeps_ffn), dict(self.refits),
                              dict(self.scale_values), tuple(self.reports), samples, tokens)

    def _weights_for(self, number: int, linear) -> dict[Slot, np.ndarray]:
        """The current weights a half-block's passes read (what a worker is sent)."""
        half = self.halves[number // 2][number % 2]
        wanted = dict.fromkeys(list(half.segment.slots) + [(linear.node, linear.weight_index)]
                               + ([(linear.bias_node, linear.bias_index)] if linear.bias is not None else []))
        return {slot: self.weights.values[slot] for slot in wanted if slot in self.weights.values}

    # --- attention ---------------------------------------------------------------------------------
    def _attention_half(self, layer: Layer, number: int, shards: Shards) -> None:
        block = layer.attention
        width = self.widths.attention[block.name]
        cut = units.rounded(block, width.qk) < block.head_dim
        needed = PairSums.NONE if not cut else PairSums.SOFTMAX if self._by_softmax(block) else PairSums.ALL
        pairs, scale_values = merged_pairs(shards.attention_targets(number, needed), block.heads, block.head_dim)
        self.scale_values.update(scale_values)
        d, every = block.head_dim, np.arange(block.groups)
        qk, q_map, k_map = self._reduce_pairs(block, pairs, width.qk)
        norm_scales = calibrated_norm(block, pairs, qk)
        if block.equal_widths:  # one head size for Q/K and V (an attention op's)
            width = AttentionWidth(width.heads, qk.shape[1], qk.shape[1])
        self.weights.apply_attention(AttentionKeep(block, qk, np.tile(np.arange(d), (block.groups, 1)), every,
                                                   q_map, k_map, norm_scales=norm_scales))  # V and the output projection come next
        equations = self._equations(number, shards, block.out)
        prior = input_weights(self.g, block.out)
        projecting = self.reduction is Reduction.PROJECT and width.v < d and block.group_size == 1
        heads, v = self._choose_values(block, equations, prior, width, projecting)
        v_map = None
        if projecting:
            v, v_map, transform, prior = project_values(block, equations, prior, heads, width.v)
            equations = equations.transformed(transform)
            shards.transform_cache(transform[:-1, :-1])
        keep = AttentionKeep(block, qk[heads], v, heads, None if q_map is None else q_map[heads],
                             None if k_map is None else k_map[heads], v_map, norm_scales)
        refit = self._refit(f"{layer.name} (attention)", equations, keep.out_rows(), prior, block.out)
        self.weights.apply_attention(keep, refit)
        self.keeps_attention.append(keep)
        self.refits[block.out.node] = self._as_stored(refit, block.out)
        shards.finish(number, self._weights_for(number, block.out))

    @small_linear_algebra
    def _reduce_pairs(self, block, pairs: PairStatistics, kept: int
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Kept Q/K positions per head (heads, kept) and the q and k maps (see plan.AttentionKeep):
        projected directions, SNP's choice with its rescale, or a plain choice."""
        d = block.head_dim
        if units.rounded(block, kept) == d:  # nothing cut (a QK-norm keeps whole heads): no statistics were gathered
            return np.tile(np.arange(d), (block.groups, 1)), None, None
        if self._projects_pairs(block):
            q_map, k_map = project_pairs(pairs, kept)
            return np.tile(np.arange(kept), (block.heads, 1)), q_map, k_map
        if self._by_softmax(block):
            choice = self._pair_choice(block, pairs.softmax, kept)
            self.reports.append(HalfReport(f"{block.name} (scores)", pairs.softmax.queries, QK_RIDGE,
                                           choice.error_sliced, choice.error_rescaled))
            log.debug("%s: softmax score error %.4f as sliced, %.4f rescaled", block.name, choice.error_sliced,
                      choice.error_rescaled)
            return choice.qk, (selection_map(choice.qk, d, choice.factors) if self.rescale_qk else None), None
        qk = self._choose_pairs(block, pairs, kept)
        if self.rescale_qk and pairs.count:
            every = np.arange(block.groups)
            factors = pairs.rescales(AttentionKeep(block, qk, qk, every), QK_RIDGE)
            return qk, selection_map(qk, d, factors), None
        return qk, None, None

    def _pair_choice(self, block, sums, kept: int):
        """Kept Q/K pairs and their rescale by the softmax's score error (a seam: a diagnosis
        fixes the choice and fits only the rescale, tools/oracle_split.py)."""
        return choose_pairs(block, sums, kept, QK_RIDGE)

    def _projects_pairs(self, block) -> bool:
        return (self.reduction is Reduction.PROJECT and self.criterion.selects_by_refit and not block.rotary
                and block.group_size == 1  # a rotation of q/k directions would break a rotary embedding
                and block.qk_norm is None)  # and a per-head QK-norm's γ takes a rescale, not a rotation

    def _by_softmax(self, block) -> bool:
        """Whether the softmax's sums alone choose and rescale the Q/K pairs (_reduce_pairs)."""
        return (block.causal and self.criterion.pairs_by_softmax and self.selection is Selection.OBS
                and not self._projects_pairs(block))

    def _choose_pairs(self, block, pairs: PairStatistics, kept: int) -> np.ndarray:
        """Kept Q/K pairs per head, (heads, kept), ascending."""
        scores = self.criterion.pair_scores(self.g, block, pairs, self.rng)
        return units.keep_qk(block, scores, kept)  # per key/value group, rotary pairs whole

    @small_linear_algebra
    def _choose_values(self, block, equations: NormalEquations, prior: np.ndarray, width: AttentionWidth,
                       projecting: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Kept heads (ascending) and kept V neurons per kept head, (kept heads, width.v) (with
        `projecting`, the heads only: the projection replaces the neurons); with grouped-query
        attention a head is a key/value head, and a V neuron feeds the output projection once per
        query head of its group (those rows go together)."""
        if self.selection is Selection.OBS and self.criterion.selects_by_refit:
            if projecting and width.heads == block.groups:
                return np.arange(block.groups), np.tile(np.arange(width.v), (block.groups, 1))
            obs = Obs(equations, prior, self.ridge or DEFAULT_RIDGE)
            return units.obs_values(block, obs, width.heads, block.head_dim if projecting else width.v)
        scores = self.criterion.value_scores(self.g, block, lambda: activation_norms(equations), self.rng)
        heads = np.arange(block.groups)
        if width.heads < block.groups:
            heads = np.sort(np.argsort(-scores.sum(axis=1), kind="stable")[:width.heads])
        v = np.sort(np.argsort(-scores[heads], axis=1, kind="stable")[:, :width.v], axis=1)
        return heads, v

    # --- FFN ---------------------------------------------------------------------------------------
    def _ffn_half(self, layer: Layer, number: int, shards: Shards) -> None:
        block = layer.ffn
        kept = self.widths.ffn[block.name]
        shards.ffn_targets(number)
        equations = self._equations(number, shards, block.fc2)
        prior = input_weights(self.g, block.fc2)
        hidden = self._choose_hidden(block, equations, prior, kept)
        refit = self._refit(f"{layer.name} (ffn)", equations, hidden, prior, block.fc2)
        keep = FfnKeep(block, hidden)
        self.weights.apply_ffn(keep, refit)
        self.keeps_ffn.append(keep)
        self.refits[block.fc2.node] = self._as_stored(refit, block.fc2)
        shards.finish(number, self._weights_for(number, block.fc2))

    def _choose_hidden(self, block, equations: NormalEquations, prior: np.ndarray, kept: int) -> np.ndarray:
        """Kept FFN neurons (ascending): by what the refit can do without (OBS) or by scores."""
        if self.selection is Selection.OBS and self.criterion.selects_by_refit:
            obs = Obs(equations, prior, self.ridge or DEFAULT_RIDGE)
            step = max(1, -(-(block.hidden - kept) // 32))  # at most 32 removal rounds
            while obs.alive.sum() > kept:
                count = min(step, int(obs.alive.sum()) - kept)
                obs.remove(np.argsort(obs.single_costs(), kind="stable")[:count])
            return np.flatnonzero(obs.alive)
        scores = self.criterion.ffn_scores(self.g, block, lambda: activation_norms(equations), self.rng)
        return np.sort(np.argsort(-scores, kind="stable")[:kept])

    # --- refits ------------------------------------------------------------------------------------
    def _equations(self, number: int, shards: Shards, linear) -> NormalEquations:
        equations = merged_equations(shards.equations(number, self._weights_for(number, linear)))
        if not (np.isfinite(equations.xx).all() and np.isfinite(equations.xy).all()):
            raise SnpError(f"the inputs of {linear.node} or the residual stream are not finite (inf or NaN) on the "
                           "calibration data: the model overflows there and cannot be refitted")
        return equations

    def _as_stored(self, refit: Refit, linear) -> Refit:
        """A final refit in its weight's and bias's own dtypes: what every reader makes of it
        (masking.Weights.set_inputs, Editor.set_weights cast to exactly these), held at the
        stored width instead of float64 (SmolLM2-135M: 209 MB of refits at 8 bytes). Cast
        straight from float64, as those readers did: float64 → float32 → float16 would round twice."""
        weight = self.weights.values[(linear.node, linear.weight_index)]  # written just now: no decoding
        bias = refit.bias
        if bias is not None and linear.bias is not None:
            bias = bias.astype(self.weights.values[(linear.bias_node, linear.bias_index)].dtype)
        return Refit(refit.weight.astype(weight.dtype), bias, refit.gram)

    def _ridge_for(self, equations: NormalEquations, keep: np.ndarray, prior: np.ndarray) -> float:
        if self.ridge is not None:
            return self.ridge
        # the walk over the ridge grid starts at the last choice for inputs of this width (a
        # decoder's o_proj, its fc2): layer after layer they choose alike, and the walk then
        # evaluates 2-3 λs of 5; on a curve falling then rising (60 of 60 on SmolLM2) the choice
        # does not depend on the start (choose_ridge)
        ridge = choose_ridge(equations, keep, prior[keep], start=self._ridge_starts.get(equations.inputs))
        self._ridge_starts[equations.inputs] = ridge
        return ridge

    def _refit(self, name: str, equations: NormalEquations, keep: np.ndarray, prior: np.ndarray, linear) -> Refit:
        ridge = self._ridge_for(equations, keep, prior)
        xx, xy, yy = equations.total()
        bias = self.g.constant(linear.bias).astype(np.float64).reshape(-1) if linear.bias is not None else None
        sliced = loss(xx, xy, yy, keep, prior[keep], bias if bias is not None else np.zeros(xy.shape[1]))
        if linear.bias is None:  # no bias to put the fitted intercept into: refit without one (the
            # solve with an intercept is not made at all: it was a third of a decoder's refit time)
            refit = Refit(solve_without_bias(equations, keep, prior[keep], ridge), None)
            after = loss(xx, xy, yy, keep, refit.weight, np.zeros(xy.shape[1]))
        else:
            fit = solve(equations, keep, prior[keep], ridge)
            refit, after = Refit(fit.weight, fit.bias), fit.loss
        energy = max(yy, 1e-30)
        self.reports.append(HalfReport(name, int(equations.count), ridge, sliced / energy, after / energy))
        if self.keep_grams:
            refit = Refit(refit.weight, refit.bias, xx[np.ix_(keep, keep)].astype(np.float32))
        return refit

