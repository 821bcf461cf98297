"""The one-pass flow: score every block on the input model's activations, choose the plan,
then compensate from statistics of the same model (refits of the layers after each pruned group,
the Q/K rescale, LayerNorm corrections after residual pruning), keeping each piece only where it
raises fidelity on samples it was not fitted on.

Used where the block-by-block reconstruction cannot run (no transformer blocks to cut the model
into, residual-stream pruning, `--compensate bias` or `none`), for `--target-*` budgets met by
the allocation search over uniform ratios, and by tests that want a plan without compensation.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..data import calibration as calib_stage
from ..score.allocation import search
from ..score.costs import CostModel
from ..data.calibration import Runner
from .compensation import Collector, compensation_tensors, qk_rescaled
from ..errors import SnpError
from ..ir.graph import ModelGraph
from ..score.importance import Scorer
from ..match import Matches, NoMatch
from ..plan import PrunePlan, Ratios
from ..match.residual import find_stream
from ..rewrite.rewriting import rewrite
from ..ir.stats import count_params, macs_from_shapes
from ..verify.verification import fidelity, run_outputs

if TYPE_CHECKING:  # the stage's inputs, typing only
    from ..options import PruneOptions
    from ..data.prepared import Prepared

log = logging.getLogger("onnxsnp")


@dataclass(frozen=True)
class OnePass:
    plan: PrunePlan
    model: onnx.ModelProto | None  # the rewritten plan, where choosing compensation already made it
    kept_pieces: tuple[str, ...]
    ratios: Ratios  # as chosen for a target
    searched: tuple[dict, ...]  # the allocations a target tried


def one_pass(p: Prepared, options: PruneOptions, costs: CostModel | None = None) -> OnePass:
    """The one-pass flow on what `pipeline.prepare` made; `costs`: the cost model a target is met
    with (pipeline builds it: a latency one profiles)."""
    g, matches, ratios, target, observed = p.g, p.matches, options.ratios, options.target, p.observed
    compensate, release_memory = options.compensation.value, p.release_memory
    score_feed, holdout_feed, batch, fixed, mask = p.fit_feed, p.holdout_feed, p.batch, p.fixed, p.mask
    scorer = _scorer(g, matches, ratios, options.criterion, options.residual_criterion.value)
    # one session over the input model serves scoring, the compensation statistics and the selection
    extra = compensation_tensors(matches, scorer.stream, g) if compensate != "none" else []
    original = Runner(g.model, scorer.tensors() + extra, weights=g.constant)  # shares g's decoded weights
    # fitted on one part of the scoring samples, chosen on the rest, reported on the held-back ones
    fit_feed, select_feed = _split_off(score_feed, _count(holdout_feed), fixed)
    score_outputs = _score_pass(scorer, original, score_feed, batch, options.progress, mask)
    release_memory()
    searched: list[dict] = []
    if target is None:
        plan = scorer.plan(ratios, options.seed)
    else:
        costs = costs or CostModel(g, matches, macs_from_shapes(g.model, observed.shapes, observed.shape_samples),
                                   count_params(g.model))

        def measure(candidate: PrunePlan) -> float:
            return fidelity(observed.outputs, run_outputs(rewrite(g, candidate), holdout_feed, batch)).output_cosine

        plan, ratios, searched = search(scorer, ratios, target, costs, measure, options.seed)
    kept_pieces: list[str] = []
    pruned = None
    if compensate != "none":
        collector = Collector(g, plan, compensate, mask)
        _collect(collector, original, fit_feed, batch)
        select_reference = _tail(score_outputs, _count(select_feed)) or original.outputs(select_feed, batch)
        del original  # its session and arena are the largest thing held; the solves below need neither
        release_memory()
        corrections, refits = collector.norm_corrections(), collector.refits()
        pieces = {"layernorm": (lambda p: replace(p, norm_corrections=corrections)) if corrections else None,
                  "refit": (lambda p: replace(p, refits=refits)) if refits else None,
                  "qk-rescale": ((lambda p: qk_rescaled(p, scorer.pairs))
                                 if compensate == "lstsq" and options.rescale_qk and scorer.pairs_measured()
                                 else None)}
        del collector
        kept_pieces, pruned, plan = _keep_what_helps(g, plan, pieces, select_reference, select_feed, batch,
                                                     release_memory)
        log.info("compensation kept: %s", ", ".join(kept_pieces) or "nothing")
    else:
        del original
        release_memory()
    return OnePass(plan, pruned, tuple(kept_pieces), ratios, tuple(searched))


def _split_off(feed: dict[str, np.ndarray], size: int, fixed_batch: int | None
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The last `size` samples apart from the rest; with too few samples, both are everything."""
    total = _count(feed)
    if total < 3 * size or (fixed_batch and (total - size) % fixed_batch):
        return feed, feed
    return {k: v[:total - size] for k, v in feed.items()}, {k: v[total - size:] for k, v in feed.items()}


def _keep_what_helps(g: ModelGraph, plan: PrunePlan, pieces: dict[str, Callable[[PrunePlan], PrunePlan] | None],
                     reference: list[np.ndarray], holdout: dict[str, np.ndarray], batch: int,
                     release_memory: Callable[[], None] = lambda: None
                     ) -> tuple[list[str], onnx.ModelProto | None, PrunePlan]:
    """Add each compensation piece to the plan only if it raises the output cosine on samples
    it was not fitted on (one-shot refits can hurt where little was pruned). Returns the kept
    pieces, the model rewritten from the final plan (None if no trial could be run) and that plan."""
    def trial(candidate: PrunePlan) -> tuple[float, onnx.ModelProto | None]:
        try:
            model = rewrite(g, candidate)
            return fidelity(reference, run_outputs(model, holdout, batch)).output_cosine, model
        except SnpError:  # e.g. a piece that produced NaN: it does not help
            return -np.inf, None
        finally:
            release_memory()

    best, best_model, kept = None, None, []
    for name, apply in pieces.items():
        if apply is None:
            continue
        if best is None:
            best, best_model = trial(plan)
        candidate = apply(plan)
        cosine, model = trial(candidate)
        if cosine > best:
            best, best_model, kept, plan = cosine, model, kept + [name], candidate
    return kept, best_model, plan


def _scorer(g: ModelGraph, matches: Matches, ratios: Ratios, criterion: str, residual_criterion: str) -> Scorer:
    stream = None
    if ratios.residual > 0:
        try:
            stream = find_stream(g, matches)
        except NoMatch as why:
            raise SnpError(f"--residual: the residual stream cannot be pruned: {why}") from None
    return Scorer(g, matches, criterion, score_layers=ratios.blocks > 0, stream=stream,
                  residual_criterion=residual_criterion)


def _score_pass(scorer: Scorer, runner: Runner, feed: dict[str, np.ndarray], batch: int, progress: bool,
                mask_name: str | None) -> list[list[np.ndarray]]:
    """Feed every calibration batch to the scorer; returns the model's outputs per batch (which
    the pass computes anyway), or nothing where the criterion needs no activations."""
    wanted = scorer.tensors()
    outputs: list[list[np.ndarray]] = []
    if not wanted:
        return outputs
    by_sample = True
    for inputs, acts in runner.batches(feed, list(dict.fromkeys(wanted + runner.output_names)), batch, progress):
        scorer.update(acts, _count(inputs), inputs.get(mask_name) if mask_name else None)
        chunk = [np.array(acts[name]) for name in runner.output_names]  # copies: see Runner.batches
        # outputs not laid out by sample cannot be split by sample later: then none are kept
        by_sample = by_sample and all(not o.ndim or o.shape[0] == _count(inputs) for o in chunk)
        outputs.append(chunk)
    return outputs if by_sample else []


def _collect(collector: Collector, runner: Runner, feed: dict[str, np.ndarray], batch: int) -> None:
    """The compensation statistics pass (a function of its own, so that no batch of captured
    tensors outlives it)."""
    if collector.tensors():
        for inputs, acts in runner.batches(feed, collector.tensors(), batch):
            collector.update(inputs, acts)


def _tail(per_batch: list[list[np.ndarray]], size: int) -> list[np.ndarray] | None:
    """The last `size` samples of per-batch outputs, or None where there are none."""
    if not per_batch:
        return None
    return [o[len(o) - size:] if o.ndim else o for o in calib_stage.join_outputs(per_batch)]


def score(g: ModelGraph, matches: Matches, ratios: Ratios, criterion: str, feed: dict[str, np.ndarray],
          batch: int, progress: bool = False, residual_criterion: str = "weights") -> Scorer:
    """Score every matched block over one calibration pass."""
    scorer = _scorer(g, matches, ratios, criterion, residual_criterion)
    if scorer.tensors():
        runner = Runner(g.model, scorer.tensors())
        _score_pass(scorer, runner, feed, batch, progress, calib_stage.token_mask_input(calib_stage.input_specs(g)))
    return scorer


def make_plan(g: ModelGraph, matches: Matches, ratios: Ratios, criterion: str, feed: dict[str, np.ndarray],
              batch: int, seed: int = 0, progress: bool = False) -> PrunePlan:
    """Score every matched block over one calibration pass and decide what to keep."""
    return score(g, matches, ratios, criterion, feed, batch, progress).plan(ratios, seed)


def _count(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]
