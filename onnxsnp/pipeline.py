"""The whole flow: load → graph → match → calibrate → score/allocate → compensate → rewrite → verify → report."""
from __future__ import annotations

import gc
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .data import calibration as calib_stage
from .errors import SnpError
from .ir import external
from .ir.graph import ModelGraph
from .score.allocation import allocate, part_losses, unit_costs, widths_plan
from .score.costs import CostKind, CostModel
from .score.importance import Scorer
from .io.loading import LoadedModel, load_model, weight_bytes
from .rewrite.decoding import expose_stream_sums
from .io.genai import one_head_size
from .data.activation_ranges import activation_view
from .ir.dynamic import dynamic_view
from .ir.nbits import float_view
from .ir.qoperator import qdq_view
from .ir.qoperator_fuse import fused
from .ir.quant_form import unsupported
from .match import Matches, NoMatch, find_blocks
from .match.blocks import Candidate, QkNormCut
from .match.qk_norm import released
from .verify.observation import Observed, observe, verify_pruned
from .compensate.onepass import make_plan, one_pass, score  # noqa: F401 (make_plan, score: the API's plan without compensation)
from .options import (SYNTHETIC_SAMPLES, Compensation, PruneOptions, make_options, resolve_ratios,  # noqa: F401
                      resolve_target)
from .plan import PrunePlan, Ratios, kept_count
from .data.prepared import Prepared
from .compensate.compensated import Compensated
from .score.profiling import profile_nodes
from .progress import Steps, reporting, stage
from .compensate.batches import Shards
from .compensate.least_squares import FOLDS, RECONSTRUCTION_BATCH
from .heap import fix_mmap_threshold, release_heap
from .compensate.halves import plan_segments
from .plan import AttentionWidth, Propagation, Widths
from .compensate.reconstruction import Reconstructor
from .report.assemble import Timing, build_report, timed_pair
from .report.report import Report, allocation_layer
from .rewrite.rewriting import rewrite
from .score.sensitivity import survey, survey_shard
from .score.timed import Clock, timed_widths
from .ir.stats import count_params, macs_from_shapes
from .verify.verification import check_structure

log = logging.getLogger("onnxsnp")

HOLDOUT_MAX = 64  # held-back samples for the report's fidelity: an eighth of the data, at most this many
SURVEY_SAMPLES = 256  # calibration samples the sensitivity curves of a --target-* allocation are measured on


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    report: Report
    external_data: bool  # the input kept its weights in external data files


def prune_model(model_or_path: onnx.ModelProto | str | os.PathLike | LoadedModel, options: PruneOptions, *,
                calib: str | os.PathLike | dict[str, np.ndarray] | None = None, calib_label: str | None = None
                ) -> PruneResult:
    """`calib_label`: how the report names calibration arrays made from raw data."""
    with reporting(options.progress):
        return finish(prepare(model_or_path, options, calib=calib, calib_label=calib_label), options)


def prepare(model_or_path: onnx.ModelProto | str | os.PathLike | LoadedModel, options: PruneOptions, *,
            calib: str | os.PathLike | dict[str, np.ndarray] | None = None, calib_label: str | None = None
            ) -> Prepared:
    started = time.perf_counter()
    with stage("loading the model"):
        model, external = _load(model_or_path)
    release_memory = _memory_releaser(weight_bytes(model))
    with stage("matching attention and FFN blocks"):
        view = float_view(model)  # MatMulNBits weights read as float MatMuls, quantized again at the end (nbits.py)
        read = view.model if view is not None else model
        qoperator = qdq_view(read)  # QLinear ops read as static QDQ (qoperator.py); SnpError naming one it cannot
        read = qoperator.model if qoperator is not None else read
        dynamic = dynamic_view(read)  # quantize_dynamic's layers read as DequantizeLinear → MatMul (dynamic.py)
        rounded = activation_view(read) if dynamic is None else None  # static QDQ: float activations
        read = dynamic.model if dynamic is not None else rounded.model if rounded is not None else read
        g = ModelGraph(expose_stream_sums(read))
        matches = released(find_blocks(g), options.qk_norm_cut)  # Q/K within QK-normed heads, where asked
    log.info("loaded and matched: %d attention, %d FFN, %d transformer blocks, %d skipped (%s)",
             len(matches.attention), len(matches.ffn), len(matches.layers), len(matches.skipped), _since(started))
    for skipped in matches.skipped:
        log.debug("skipped %s at %s: %s", skipped.kind.value, skipped.where, skipped.reason)
    if not matches.attention and unsupported(model) is not None:
        raise SnpError(f"no prunable attention found ({unsupported(model)})")
    if not matches.attention:
        why = "; ".join(f"{s.where}: {s.reason}" for s in matches.skipped if s.kind is Candidate.ATTENTION)[:300]
        raise SnpError("no prunable attention found" + (f" ({why})" if why else " (no Softmax over Q·Kᵀ)"))
    _check_blocks(matches, options.ratios)

    specs = calib_stage.input_specs(g)
    feed, source = _calibration_feed(g, specs, calib, options.calib_samples, options.seed)
    fixed = calib_stage.fixed_batch(specs)
    batch = fixed or options.batch_size or calib_stage.DEFAULT_BATCH
    fit_feed, holdout_feed = _split(feed, fixed)
    probes = {block.name: g.node(block.anchor).output[0] for block in matches.attention
              if g.node(block.anchor).op_type == "Softmax"}  # attention probabilities, for the report
    # the matching decoded every weight (a second copy beside the protobuf's): dropped until the
    # reconstruction asks for them again, so that the input model's session below, which reads
    # its weights from a file of its own (weight_file.py), does not sit beside them
    g.forget_constants()
    release_memory()
    with stage(f"running the input model on {_count(holdout_feed)} held-back samples"):
        # a QOperator model through its exact QDQ reading: the attention probabilities and the
        # tensors the costs are counted on are float tensors there
        observed = observe(qoperator.model if qoperator is not None else model, sorted(set(probes.values())),
                           holdout_feed, batch, fixed)
    for seen in (dynamic, rounded):  # a --target-* budget counts the view's MatMuls
        if seen is not None:
            observed.shapes.update(seen.view_shapes(observed.shapes))
    release_memory()
    log.info("observed the input model on %d held-back samples (%s)", _count(holdout_feed), _since(started))
    return Prepared(model, external, g, matches, calib_label or source, fit_feed, holdout_feed, batch, fixed,
                    calib_stage.token_mask_input(specs), probes, observed, release_memory, started, view, dynamic,
                    rounded, qoperator)


def finish(prepared: Prepared, options: PruneOptions, work: ReconstructionWork | None = None) -> PruneResult:
    """Prune `prepared` as `options` say (`work`: a reconstruction already started on the same
    calibration batches, reused from an earlier budget)."""
    p = prepared
    one_batch = {k: v[:p.fixed or 1] for k, v in p.holdout_feed.items()}
    with stage("profiling the input model"):
        costs = None if options.target is None else _cost_model(p.g, p.matches, p.observed, options.target.kind,
                                                                 one_batch)
    compensated = _compensate(p, options, work, costs, one_batch)
    # the weights decoded for the reconstruction: the rewrite decodes again the ones it slices,
    # one at a time, and keeps none (only their slices go into the pruned model)
    p.g.forget_constants()
    p.release_memory()
    # a lazily loaded float model's pruned weights go to a file as the rewrite makes them: the
    # pruned model is held without them while its sessions read them from there, and made whole
    # at the end, once those sessions are gone (external.py)
    spill = external.Spill() if _spillable(p, compensated) else None
    try:
        with stage("rewriting the graph"), p.g.decoding_once():
            pruned = _rewritten(p, compensated, spill)
        # the original's decoded weights are not read again before the timing (which decodes what
        # it runs): freed, the verification's session for the pruned model takes their place
        p.g.forget_constants()
        p.release_memory()
        with stage(f"verifying the pruned model on {_count(p.holdout_feed)} held-back samples"):
            verified = verify_pruned(p.observed, pruned, compensated.plan, p.probes, p.holdout_feed, p.batch,
                                     p.fixed, p.mask, quantized_probabilities=p.qoperator is not None)
        p.release_memory()
        log.info("rewritten and verified (%s)", _since(p.started))
        with stage("timing the original and the pruned model"):
            timing = timed_pair(p.model, pruned, one_batch, p.g.constant) if options.measure_latency else Timing()
        report = build_report(p, options, costs, compensated, pruned, verified, timing)
        p.release_memory()
        with stage("reading the pruned weights back"):
            external.materialize(pruned)
    finally:
        if spill is not None:
            spill.close()
    return PruneResult(pruned, report, p.external)


def _spillable(p: Prepared, compensated: Compensated) -> bool:
    """Whether the rewrite's weights go to a file (finish): for the reconstruction's rewrite of a
    lazily loaded float model (a quantized form put back reads the weights from the protobuf)."""
    return compensated.pruned is None and all(view is None for view in (p.view, p.dynamic, p.rounded, p.qoperator)) \
        and external.has_lazy(p.g.model)


def _compensate(p: Prepared, options: PruneOptions, work: ReconstructionWork | None, costs: CostModel | None,
                one_batch: dict[str, np.ndarray]) -> Compensated:
    """Block-by-block reconstruction where the model allows it, else the one-pass route."""
    g, matches, ratios = p.g, p.matches, options.ratios
    route = _reconstruction_route(g, matches, options)
    if route is not None and options.qk_norm_cut is QkNormCut.CALIBRATED and any(b.qk_norm for b in matches.attention):
        raise SnpError(f"--qk-norm-cut calibrated needs the block-by-block reconstruction, not used here: {route}")
    if route is not None:
        log.info("one-pass compensation: %s", route)
        chosen = one_pass(p, options, costs)
        return Compensated(chosen.plan, chosen.model, tuple(chosen.kept_pieces), chosen.ratios, tuple(chosen.searched))
    own = work is None  # made here: freed before the rewrite (its batches hold every calibration activation)
    work = work or ReconstructionWork(p, options, restartable=False)  # one run: no copy of the first stream
    reconstructor, shards = work.reconstructor, work.restart()
    allocation = None
    if options.target is None:
        widths = uniform_widths(matches, ratios, _removed_layers(g, matches, ratios, p.fit_feed, p.batch, p.mask))
    else:
        widths, allocation = _allocate(matches, work, costs, options, one_batch)
        ratios = _mean_ratios(matches, widths, ratios)
        log.info("allocated by measured sensitivity on %d samples (%s)", allocation["samples"], _since(p.started))
    if options.one_head_size:  # onnxruntime-genai's KV buffers (genai.py)
        widths = one_head_size(widths)
    try:
        reconstruction = reconstructor.run(shards, widths, _progress(2 * len(matches.layers), options.progress))
    finally:
        if own:
            work.close()
    log.info("reconstructed block by block on %d samples, %d tokens (%s)", reconstruction.samples,
             reconstruction.tokens, _since(p.started))
    plan = PrunePlan(reconstruction.attention, reconstruction.ffn, reconstruction.scale_values,
                     tuple(matches.layers[i] for i in widths.removed_layers), refits=reconstruction.refits)
    return Compensated(plan, None, ("reconstruction",), ratios, (), reconstruction, allocation)


def _rewritten(p: Prepared, compensated: Compensated, spill: external.Spill | None = None) -> onnx.ModelProto:
    """The plan applied to the graph, then the input's quantized form put back."""
    plan, pruned = compensated.plan, compensated.pruned
    if pruned is None:
        pruned = rewrite(p.g, plan, spill)
        p.release_memory()
    pruned = _in_input_form(p, pruned, {node: refit.gram for node, refit in plan.refits.items()
                                        if refit.gram is not None})
    check_structure(pruned)
    return pruned


def _in_input_form(p: Prepared, pruned: onnx.ModelProto, grams: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A rewrite of the float view in the input's quantized form again (as written, and as timed:
    a float candidate timed against an int4 or int8 original measures the quantization, not the cut)."""
    if p.dynamic is not None:
        pruned = p.dynamic.requantize(pruned)
    if p.rounded is not None:  # a static QDQ model's activation pairs back, calibrated again (activation_ranges.py)
        # on the fitted samples only: the held-back ones judge the result; the rewrite's model is
        # read by nothing else, so edited in place
        pruned = p.rounded.restore(p.qoperator.model if p.qoperator is not None else p.model, pruned, p.fit_feed,
                                   p.batch, in_place=True)
    if p.qoperator is not None:  # each QLinear op made again from its pattern (qoperator_fuse.py)
        pruned = fused(p.qoperator, pruned)
    if p.view is not None:
        pruned = p.view.requantize(pruned, grams)
    return pruned


def _quantized_weights(p: Prepared) -> bool:
    """Whether refitted weights are quantized again after the rewrite: their refits then keep
    their inputs' Gram, for rounding with error feedback (feedback.py)."""
    return any(view is not None for view in (p.view, p.dynamic, p.rounded, p.qoperator)) or \
        any(node.op_type == "DequantizeLinear" for node in p.model.graph.node)


def reconstruction_batch(samples: int) -> int:
    """Samples per segment run: RECONSTRUCTION_BATCH, or fewer where that would leave fewer than
    FOLDS batches — the refits' ridge is chosen by cross-validation over folds of whole batches, and
    with fewer it was not chosen at all (64 windows of SmolLM2 made 2 batches: every refit took the
    default ridge)."""
    return max(1, min(RECONSTRUCTION_BATCH, samples // FOLDS))


class ReconstructionWork:
    """The block-by-block reconstruction's calibration batches (the first block's input, computed
    once, held here or by --workers) and the sensitivity survey of a --target-* allocation
    (measured once, in this process), for any number of runs at different widths."""

    def __init__(self, prepared: Prepared, options: PruneOptions, restartable: bool = True):
        p = prepared
        self.prepared = p
        self.reconstructor = Reconstructor(p.g, p.matches, options.criterion, options.selection, options.propagation,
                                           rescale_qk=options.rescale_qk, seed=options.seed,
                                           reduction=options.reduction, keep_grams=_quantized_weights(p))
        self.batch = p.fixed or reconstruction_batch(_count(p.fit_feed))
        self.shards = self.reconstructor.prepare(p.fit_feed, self.batch, p.mask, options.workers, restartable)
        self._curves = None
        self.runs = 0

    def restart(self) -> Shards:
        """The batches at the first block again, and the reconstructor without an earlier run's state."""
        if self.runs:
            self.reconstructor.restart()
            self.shards.restart()
        self.runs += 1
        return self.shards

    def curves(self) -> list:
        if self._curves is None:
            p = self.prepared
            self._curves = survey(self.reconstructor, survey_shard(self.reconstructor, p.fit_feed, self.batch, p.mask,
                                                                   SURVEY_SAMPLES))
        return self._curves

    def close(self) -> None:
        """Stop the workers, if any (their batches go with them)."""
        self.shards.close()


def _cost_model(g: ModelGraph, matches: Matches, observed: Observed, kind: CostKind,
                one_batch: dict[str, np.ndarray]) -> CostModel:
    """The cost model a --target-* budget is spent with; a latency budget profiles the original
    model once on one sample (profiling.py)."""
    macs = macs_from_shapes(g.model, observed.shapes, observed.shape_samples)
    times = profile_nodes(g, one_batch, macs, weights=g.constant) if kind is CostKind.LATENCY else None
    if times is not None:
        log.info("profiled the input model: %.2f ms per run, %.2f ms of it outside the nodes traced (%d runs)",
                 times.total_ms, times.overhead_ms, times.runs)
    return CostModel(g, matches, macs, count_params(g.model), times)


def _allocate(matches: Matches, work: ReconstructionWork, costs: CostModel, options: PruneOptions,
              one_batch: dict[str, np.ndarray]) -> tuple[Widths, dict]:
    """Widths meeting the target with the least measured loss (sensitivity.py, allocation.py); a
    latency budget's widths are timed and corrected before the reconstruction (timed.py)."""
    target, ratios = options.target, options.ratios
    total = costs.original(target.kind)
    with stage("measuring how much each block loses at each width"):
        curves = work.curves()
    units = unit_costs(costs, matches, target.kind)
    # a latency budget's loss bound: no attention or block move that loses more per FLOP than the FFNs
    flops = unit_costs(costs, matches, CostKind.FLOPS) if target.kind is CostKind.LATENCY else None

    def allocate_for(goal: float, fixed: Widths | None = None) -> tuple[Widths, list[float]]:
        widths, predicted = allocate(curves, matches, units, total, goal, ratios.align, ratios.heads, ratios.blocks,
                                     options.one_head_size, flops, fixed)
        # the widths the folder will hold, so that a timed candidate is the model that is written
        # (one op's kernel reads the widest head; a narrower V left in a candidate broke its rotary check)
        return (one_head_size(widths) if options.one_head_size else widths), predicted

    def predicted_losses(w: Widths) -> list[float]:
        return [sum(parts.values()) for parts in part_losses(curves, matches, w)]

    goal = target.absolute(total)
    widths, predicted = allocate_for(goal)
    timing = None
    if target.kind is CostKind.LATENCY:
        p = work.prepared
        with stage("timing the allocated widths against the original"):
            timing = timed_widths(goal, lambda before: target.absolute(before), lambda g, f: allocate_for(g, f)[0],
                                  lambda w: costs.cost(widths_plan(matches, w), target.kind),
                                  lambda w: _in_input_form(p, rewrite(p.g, widths_plan(matches, w)), {}),
                                  Clock(p.model, one_batch, p.g.constant, options.timed_step), total,
                                  lambda w: sum(predicted_losses(w)))
        if timing.widths != widths:
            widths, predicted = timing.widths, predicted_losses(timing.widths)
        log.info("timed the allocation %d time(s): %s", len(timing.trials), timing.stopped)
    report = {"kind": target.kind.value, "goal": goal, "original": total,
              "samples": min(SURVEY_SAMPLES, _count(work.prepared.fit_feed)),
              "layers": [allocation_layer(*parts) for parts in zip(matches.layers, curves, predicted,
                                                                   part_losses(curves, matches, widths))]}
    if timing is not None:
        report["timed"] = {"trials": [t.as_dict() for t in timing.trials], "chosen": timing.chosen,
                           "stopped": timing.stopped, "step": timing.step.value, "clock": timing.base.value}
    return widths, report


def _mean_ratios(matches: Matches, widths: Widths, ratios: Ratios) -> Ratios:
    """The average fraction removed per group (the report's one-line summary of an allocation)."""
    def removed(kept: list[int], whole: list[int]) -> float:
        return round(1 - sum(kept) / max(sum(whole), 1), 4)

    attention = [widths.attention[b.name] for b in matches.attention]
    return replace(ratios, qk=removed([w.qk for w in attention], [b.head_dim for b in matches.attention]),
                   v=removed([w.v for w in attention], [b.head_dim for b in matches.attention]),
                   ffn=removed([widths.ffn[b.name] for b in matches.ffn], [b.hidden for b in matches.ffn]),
                   # widths count heads as key/value groups (each with its query heads)
                   heads=removed([w.heads for w in attention], [b.groups for b in matches.attention]))


def _reconstruction_route(g: ModelGraph, matches: Matches, options: PruneOptions) -> str | None:
    """None where the block-by-block reconstruction runs, else why the one-pass flow does."""
    if options.compensation is not Compensation.LSTSQ:
        return f"--compensate {options.compensation.value}"
    if options.propagation is Propagation.OFF:
        return "--reconstruct off"
    if options.ratios.residual > 0:
        return "--residual"
    try:
        plan_segments(g, matches)
    except NoMatch as why:
        return f"the model cannot be cut into transformer blocks ({why})"
    return None


def uniform_widths(matches: Matches, ratios: Ratios, removed: tuple[int, ...] = ()) -> Widths:
    """The same fractions kept in every block: `ratios` as widths."""
    attention = {}
    for block in matches.attention:
        heads = block.groups  # with grouped-query attention: key/value heads, each with its query heads
        if ratios.heads > 0 and block.heads_fixed is None:
            heads = kept_count(block.groups, ratios.heads)
        qk = block.head_dim if block.qk_whole else kept_count(block.head_dim, ratios.qk, ratios.align)
        attention[block.name] = AttentionWidth(heads, qk, kept_count(block.head_dim, ratios.v, ratios.align))
    ffn = {block.name: kept_count(block.hidden, ratios.ffn, ratios.align) for block in matches.ffn}
    return Widths(attention, ffn, removed)


def _removed_layers(g: ModelGraph, matches: Matches, ratios: Ratios, feed: dict[str, np.ndarray], batch: int,
                    mask: str | None) -> tuple[int, ...]:
    """Indices of the whole blocks `--blocks` removes: those given, or the ones whose output
    differs least from their input on calibration data (one pass capturing the block ends)."""
    if ratios.block_indices:
        return tuple(sorted(set(ratios.block_indices)))
    if not ratios.blocks:
        return ()
    scorer = Scorer(g, matches, "l2", score_layers=True)
    chosen = score_layers(scorer, g, feed, batch, mask).removed_layers(ratios)
    return tuple(sorted(matches.layers.index(layer) for layer in chosen))


def score_layers(scorer: Scorer, g: ModelGraph, feed: dict[str, np.ndarray], batch: int, mask: str | None) -> Scorer:
    from .data.calibration import Runner

    runner = Runner(g.model, scorer.tensors(), weights=g.constant)
    for inputs, acts in runner.batches(feed, scorer.tensors(), batch):
        scorer.update(acts, _count(inputs), inputs.get(mask) if mask else None)
    return scorer


def _progress(total: int, show: bool) -> Callable[[str], None]:
    """A progress callback for the reconstruction: one step per half-block, with an ETA."""
    if not show:
        return lambda _: None
    return Steps("reconstructing block by block", total, "half-blocks").step


def _calibration_feed(g: ModelGraph, specs, calib, samples: int | None, seed: int
                      ) -> tuple[dict[str, np.ndarray], str]:
    if calib is None:
        return calib_stage.synthetic_inputs(g, specs, samples or SYNTHETIC_SAMPLES, seed), "synthetic"
    if isinstance(calib, dict):
        feed, source = calib_stage.validate_calibration(calib, specs, "calibration arrays"), "arrays"
    else:
        feed, source = calib_stage.load_calibration(calib, specs), str(calib)
    return ({k: v[:samples] for k, v in feed.items()} if samples else feed), source


def _split(feed: dict[str, np.ndarray], fixed_batch: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Hold back an eighth of the samples, at most HOLDOUT_MAX (whole batches for fixed-batch
    models), for the report's fidelity; everything else is fitted on."""
    step = fixed_batch or 1
    usable = _count(feed) - _count(feed) % step
    if usable < step:
        raise SnpError(f"the model has a fixed batch of {step}; give at least {step} calibration samples")
    if usable < 2 * step:
        part = {k: v[:usable] for k, v in feed.items()}
        return part, part
    holdout = max(step, min(usable // 8, max(HOLDOUT_MAX, step)) // step * step)
    return ({k: v[:usable - holdout] for k, v in feed.items()},
            {k: v[usable - holdout:usable] for k, v in feed.items()})


def _load(model_or_path: onnx.ModelProto | str | os.PathLike | LoadedModel) -> tuple[onnx.ModelProto, bool]:
    """The model to work on (never the caller's own proto) and whether it used external data."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, False
    if isinstance(model_or_path, LoadedModel):  # loaded by the caller for us to annotate
        return model_or_path.model, model_or_path.external_data
    loaded = load_model(model_or_path, lazy=True)  # the weights read from their file where asked (external.py)
    return loaded.model, loaded.external_data


def _check_blocks(matches: Matches, ratios: Ratios) -> None:
    available = len(matches.layers)
    if (ratios.blocks or ratios.block_indices) and not available:
        raise SnpError("--blocks: no whole transformer block (attention + FFN on a residual stream) was found"
                       + (f" ({matches.first_block_reason})" if matches.first_block_reason else ""))
    if ratios.blocks >= max(available, 1) or any(i >= available for i in ratios.block_indices):
        raise SnpError(f"--blocks: the model has {available} removable transformer blocks (0…{available - 1}); "
                       "at least one must stay")
    if len(set(ratios.block_indices)) >= available and ratios.block_indices:
        raise SnpError("--blocks: at least one transformer block must stay")


TRIM_ABOVE_BYTES = 32 * 2**20  # smaller models leave little to hand back; trimming costs a heap walk


def _memory_releaser(model_bytes: int) -> Callable[[], None]:
    """A call that hands freed heap back to the system between stages (for models above
    TRIM_ABOVE_BYTES). glibc keeps large freed blocks of numpy and onnxruntime buffers in its
    heap, so resident memory would otherwise only grow from stage to stage, and reusing that
    fragmented heap is slower than fresh pages; peak memory is what a deployment machine has to
    provide."""
    def release() -> None:
        gc.collect()  # onnx-graphsurgeon graphs are reference cycles: they hold sliced weights until collected
        release_heap()

    if model_bytes <= TRIM_ABOVE_BYTES:
        return lambda: None
    fix_mmap_threshold()  # and large blocks given back as they are freed, within a stage too (heap.py)
    return release


def _since(started: float) -> str:
    """Elapsed time and the process's peak memory so far, for the -v stage log."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return f"{time.perf_counter() - started:.1f} s, peak RSS {peak:.0f} MiB"


def _count(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]
