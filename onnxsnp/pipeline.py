"""The whole flow: load → graph → match → calibrate → score → rewrite → verify."""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from . import calibration as calib_stage
from .errors import SnpError
from .graph import ModelGraph
from .calibration import Runner
from .compensation import COMPENSATION, Collector, compensation_tensors, qk_rescales
from .allocation import CostModel, Target, parse_target, search
from .importance import CRITERIA, PrunePlan, Ratios, Scorer
from .loading import LoadedModel, load_model, weight_bytes
from .matching import Matches, NoMatch, find_blocks
from .residual import find_stream
from .report import Report, block_reports, stats_fields
from .rewriting import rewrite
from .stats import count_params, macs_from_shapes, shape_tensors, stats_from_shapes
from .verification import Fidelity, attention_error, check_structure, fidelity, latency, run_outputs


log = logging.getLogger("onnxsnp")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    external_data: bool  # the input kept its weights in external data files


def resolve_target(flops: float | str | None, params: float | str | None) -> Target | None:
    if flops is not None and params is not None:
        raise SnpError("give either --target-flops or --target-params, not both")
    if flops is not None:
        return parse_target(flops, "flops")
    return parse_target(params, "params") if params is not None else None


def resolve_ratios(ratio: float, qk: float | None = None, v: float | None = None, ffn: float | None = None,
                   heads: float = 0.0, blocks: int | str | tuple[int, ...] = 0, align: int = 1,
                   residual: float = 0.0) -> Ratios:
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise SnpError(f"--align must be a positive integer, got {align!r}")
    values = {"ratio": ratio, "qk-ratio": qk, "v-ratio": v, "ffn-ratio": ffn, "heads": heads, "residual": residual}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
            raise SnpError(f"--{name} must be a number with 0 <= value < 1, got {value!r}")
    count, indices = parse_blocks(blocks)
    return Ratios(ratio if qk is None else qk, ratio if v is None else v, ratio if ffn is None else ffn, heads,
                  count, indices, align, residual)


def parse_blocks(blocks: int | str | tuple[int, ...] | list[int]) -> tuple[int, tuple[int, ...]]:
    """`--blocks`: a count ("2"), or block indices ("3,7"; "5," for one index)."""
    try:
        if isinstance(blocks, str) and "," in blocks:
            indices = tuple(int(part) for part in blocks.split(",") if part.strip())
            if indices and min(indices) >= 0:
                return 0, indices
        elif isinstance(blocks, (tuple, list)) and all(isinstance(b, int) and b >= 0 for b in blocks):
            return 0, tuple(blocks)
        elif not isinstance(blocks, bool) and int(blocks) >= 0 and float(blocks) == int(blocks):
            return int(blocks), ()
    except (TypeError, ValueError):
        pass
    raise SnpError(f"--blocks must be a count (e.g. 2) or block indices (e.g. 3,7 or 5,), got {blocks!r}")


def prune(model_or_path: onnx.ModelProto | str | os.PathLike, ratio: float = 0.5, *, qk_ratio: float | None = None,
          v_ratio: float | None = None, ffn_ratio: float | None = None, heads: float = 0.0,
          blocks: int | str | tuple[int, ...] = 0, target_flops: float | None = None,
          target_params: float | None = None, align: int = 1, residual: float = 0.0,
          residual_criterion: str = "weights", compensate: str = "lstsq", criterion: str = "snp",
          calib: str | os.PathLike | dict[str, np.ndarray] | None = None, calib_samples: int = 64,
          seed: int = 0, batch_size: int | None = None, progress: bool = False) -> tuple[onnx.ModelProto, Report]:
    """Prune a transformer with SNP; returns the pruned model and a report. The input is not changed.

    `ratio` is the fraction of neurons removed from each group (Q/K pairs, V, FFN hidden);
    `qk_ratio`, `v_ratio`, `ffn_ratio` override it per group; `target_flops` / `target_params`
    (a fraction of the original, or an absolute count) choose the group ratios instead; `heads` removes that fraction of
    whole heads in every attention block (combinable with the neuron ratios); `blocks` removes that
    many whole transformer blocks (the ones that change the residual stream least), or the blocks
    with the given indices. `calib` is an .npz path or a dict
    of arrays keyed by input name (first axis = samples); without it synthetic inputs are used.
    """
    ratios = resolve_ratios(ratio, qk_ratio, v_ratio, ffn_ratio, heads, blocks, align, residual)
    result = prune_model(model_or_path, ratios, target=resolve_target(target_flops, target_params),
                         residual_criterion=residual_criterion, compensate=compensate,
                         criterion=criterion,
                         calib=calib, calib_samples=calib_samples, seed=seed, batch_size=batch_size, progress=progress)
    return result.model, result.report


def prune_model(model_or_path: onnx.ModelProto | str | os.PathLike | LoadedModel, ratios: Ratios, *,
                criterion: str = "snp",
                calib: str | os.PathLike | dict[str, np.ndarray] | None = None, calib_samples: int = 64,
                seed: int = 0, batch_size: int | None = None, progress: bool = False,
                target: Target | None = None, compensate: str | bool = "lstsq",
                residual_criterion: str = "weights", rescale_qk: bool = True,
                measure_latency: bool = True) -> PruneResult:
    started = time.perf_counter()
    compensate = _check_options(criterion, calib_samples, compensate, residual_criterion)
    model, external = _load(model_or_path)
    release_memory = _memory_releaser(weight_bytes(model))
    g = ModelGraph(model)
    matches = find_blocks(g)
    log.info("loaded and matched: %d attention, %d FFN, %d transformer blocks, %d skipped (%s)",
             len(matches.attention), len(matches.ffn), len(matches.layers), len(matches.skipped), _since(started))
    for skipped in matches.skipped:
        log.debug("skipped %s at %s: %s", skipped.kind, skipped.where, skipped.reason)
    if not matches.attention:
        why = "; ".join(f"{s.where}: {s.reason}" for s in matches.skipped if s.kind == "attention")[:300]
        raise SnpError("no prunable attention found" + (f" ({why})" if why else " (no Softmax over Q·Kᵀ)"))

    specs = calib_stage.input_specs(g)
    feed, source = _calibration_feed(g, specs, calib, calib_samples, seed)
    fixed = calib_stage.fixed_batch(specs)
    batch = fixed or batch_size or calib_stage.DEFAULT_BATCH
    score_feed, holdout_feed = _split(feed, fixed)
    mask = calib_stage.token_mask_input(specs)
    one_batch = {k: v[:fixed or 1] for k, v in holdout_feed.items()}

    _check_blocks(matches, ratios)
    scorer = _scorer(g, matches, ratios, criterion, residual_criterion)
    probes = {block.name: g.node(block.anchor).output[0] for block in matches.attention
              if g.node(block.anchor).op_type == "Softmax"}  # attention probabilities, for the report
    # what the input model does on the held-back samples (outputs, attention maps, shapes), from a
    # session of its own that runs small batches: tensors added as outputs cost memory per sample
    observed = _observe(model, sorted(set(probes.values())), holdout_feed, batch, fixed, g.constant)
    release_memory()
    log.info("observed the input model on %d held-back samples (%s)", _count(holdout_feed), _since(started))
    # one session over the input model serves scoring, the compensation statistics and the selection
    extra = compensation_tensors(matches, scorer.stream, g) if compensate != "none" else []
    original = Runner(model, scorer.tensors() + extra, weights=g.constant)  # shares g's decoded weights
    # fitted on one part of the scoring samples, chosen on the rest, reported on the held-back ones
    fit_feed, select_feed = _split_off(score_feed, _count(holdout_feed), fixed)
    score_outputs = _score_pass(scorer, original, score_feed, batch, progress, mask)
    release_memory()
    log.info("scored on %d calibration samples (%s)", _count(score_feed), _since(started))

    searched: list[dict] = []
    if target is None:
        plan = scorer.plan(ratios, seed)
    else:
        costs = CostModel(g, matches, macs_from_shapes(model, observed.shapes, observed.shape_samples),
                          count_params(model))

        def measure(candidate: PrunePlan) -> float:
            return fidelity(observed.outputs, run_outputs(rewrite(g, candidate), holdout_feed, batch)).output_cosine

        plan, ratios, searched = search(scorer, ratios, target, costs, measure, seed)
    kept_pieces: list[str] = []
    pruned = None  # the rewritten model, where choosing compensation already made it
    if compensate != "none":
        collector = Collector(g, plan, compensate, mask)
        _collect(collector, original, fit_feed, batch)
        select_reference = _tail(score_outputs, _count(select_feed)) or original.outputs(select_feed, batch)
        del original  # its session and arena are the largest thing held; the solves below need neither
        release_memory()
        pieces = {"layernorm": collector.norm_corrections(), "refit": collector.refits(),
                  "qk-rescale": qk_rescales(plan) if compensate == "lstsq" and rescale_qk else {}}
        del collector
        kept_pieces, pruned = _keep_what_helps(g, plan, pieces, select_reference, select_feed, batch, release_memory)
        log.info("compensation kept: %s (%s)", ", ".join(kept_pieces) or "nothing", _since(started))
    else:
        del original
        release_memory()

    if pruned is None:
        pruned = rewrite(g, plan)
        release_memory()
    check_structure(pruned)
    softmax_blocks = {keep.block.name: (probes[keep.block.name], keep.heads) for keep in plan.attention
                      if keep.block.name in probes}
    measured, attention_kl, pruned_shapes = _verify(observed, pruned, softmax_blocks, holdout_feed, batch, fixed, mask)
    release_memory()
    log.info("rewritten and verified (%s)", _since(started))
    speed = latency(model, pruned, one_batch, original_weights=g.constant) if measure_latency else (None, None)

    report = Report(criterion=criterion, compensation=compensate, compensation_kept=kept_pieces, ratios={"qk": round(ratios.qk, 4), "v": round(ratios.v, 4),
                                                 "ffn": round(ratios.ffn, 4), "heads": ratios.heads,
                                                 "residual": ratios.residual},
                    calibration=source, calibration_samples=_count(score_feed), holdout_samples=_count(holdout_feed),
                    **stats_fields(stats_from_shapes(model, observed.shapes, observed.shape_samples),
                                    stats_from_shapes(pruned, pruned_shapes, observed.shape_samples)),
                    fidelity=measured, blocks=block_reports(plan), skipped=matches.skipped,
                    removed_blocks=[layer.name for layer in plan.removed_layers],
                    residual_width=None if plan.stream is None else [plan.stream.width, len(plan.stream_keep)],
                    target=None if target is None else {"kind": target.kind, "value": target.value, "tried": searched},
                    weight_bytes_before=weight_bytes(model), weight_bytes_after=weight_bytes(pruned),
                    latency_ms_before=speed[0], latency_ms_after=speed[1],
                    attention_kl={keep.block.name: attention_kl.get(keep.block.name) for keep in plan.attention},
                    seconds=round(time.perf_counter() - started, 2))
    return PruneResult(pruned, report, external)


_PIECE_FIELDS = {"layernorm": "norm_corrections", "refit": "refits", "qk-rescale": "qk_scales"}


def _split_off(feed: dict[str, np.ndarray], size: int, fixed_batch: int | None
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The last `size` samples apart from the rest; with too few samples, both are everything."""
    total = _count(feed)
    if total < 3 * size or (fixed_batch and (total - size) % fixed_batch):
        return feed, feed
    return {k: v[:total - size] for k, v in feed.items()}, {k: v[total - size:] for k, v in feed.items()}


def _keep_what_helps(g: ModelGraph, plan: PrunePlan, pieces: dict, reference: list[np.ndarray],
                     holdout: dict[str, np.ndarray], batch: int, release_memory: Callable[[], None] = lambda: None
                     ) -> tuple[list[str], onnx.ModelProto | None]:
    """Add each compensation piece to the plan only if it raises the output cosine on samples
    it was not fitted on (one-shot refits can hurt where little was pruned). Returns the kept
    pieces and the model rewritten from the final plan (None if no trial could be run)."""
    def trial() -> tuple[float, onnx.ModelProto | None]:
        try:
            candidate = rewrite(g, plan)
            return fidelity(reference, run_outputs(candidate, holdout, batch)).output_cosine, candidate
        except SnpError:  # e.g. a piece that produced NaN: it does not help
            return -np.inf, None
        finally:
            release_memory()

    best, best_model, kept = None, None, []
    for name, value in pieces.items():
        if not value:
            continue
        if best is None:
            best, best_model = trial()
        setattr(plan, _PIECE_FIELDS[name], value)
        cosine, model = trial()
        if cosine > best:
            best, best_model, kept = cosine, model, kept + [name]
        else:
            setattr(plan, _PIECE_FIELDS[name], {})
    return kept, best_model


def _check_options(criterion: str, calib_samples: int, compensate: str | bool, residual_criterion: str) -> str:
    """Fail on bad options before any work; returns the compensation mode."""
    if criterion not in CRITERIA:
        raise SnpError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if isinstance(calib_samples, bool) or not isinstance(calib_samples, int) or calib_samples < 1:
        raise SnpError(f"--calib-samples must be a positive integer, got {calib_samples!r}")
    if isinstance(compensate, bool):
        compensate = "lstsq" if compensate else "none"
    if compensate not in COMPENSATION:
        raise SnpError(f"--compensate must be one of {', '.join(COMPENSATION)}, got {compensate!r}")
    if residual_criterion not in ("weights", "activation"):
        raise SnpError(f"--residual-criterion must be weights or activation, got {residual_criterion!r}")
    return compensate


def _load(model_or_path: onnx.ModelProto | str | os.PathLike | LoadedModel) -> tuple[onnx.ModelProto, bool]:
    """The model to work on (never the caller's own proto) and whether it used external data."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, False
    if isinstance(model_or_path, LoadedModel):  # loaded by the caller for us to annotate
        return model_or_path.model, model_or_path.external_data
    loaded = load_model(model_or_path)
    return loaded.model, loaded.external_data


def _check_blocks(matches: Matches, ratios: Ratios) -> None:
    available = len(matches.layers)
    if (ratios.blocks or ratios.block_indices) and not available:
        raise SnpError("--blocks: no whole transformer block (attention + FFN on a residual stream) was found")
    if ratios.blocks >= max(available, 1) or any(i >= available for i in ratios.block_indices):
        raise SnpError(f"--blocks: the model has {available} removable transformer blocks (0…{available - 1}); "
                       "at least one must stay")
    if len(set(ratios.block_indices)) >= available and ratios.block_indices:
        raise SnpError("--blocks: at least one transformer block must stay")


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


MAP_SAMPLES = 16  # held-back samples whose attention maps are compared (they are kept in memory)


@dataclass
class Observed:
    """The input model on the held-back samples."""

    outputs: list[np.ndarray]
    maps: dict[str, np.ndarray]  # softmax outputs of the first MAP_SAMPLES samples
    shapes: dict[str, tuple[int, ...]]  # of stats.shape_tensors, on `shape_samples` samples
    shape_samples: int


def _observe(model: onnx.ModelProto, probes: list[str], feed: dict[str, np.ndarray], batch: int,
             fixed: int | None, weights: calib_stage.Weights) -> Observed:
    maps, outputs, shapes = _probe_run(model, "input model", probes, feed, batch, fixed, weights)
    return Observed(outputs, maps, shapes, fixed or 1)


def _probe_run(model: onnx.ModelProto, role: str, probes: list[str], feed: dict[str, np.ndarray], batch: int,
               fixed: int | None, weights: calib_stage.Weights | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, tuple[int, ...]]]:
    """One session over `model`: its outputs over `feed`, the `probes` over the first MAP_SAMPLES
    samples and the shapes of stats.shape_tensors on the first sample(s). Probed samples run at the
    smallest batch the model takes (every tensor added as an output costs memory per sample)."""
    shape_names = shape_tensors(model)
    runner = Runner(model, probes + shape_names, role=role, weights=weights)
    step = fixed or 1
    parts = [({k: v[:step] for k, v in feed.items()}, step, probes + shape_names),  # also the shapes
             ({k: v[step:max(step, MAP_SAMPLES // step * step)] for k, v in feed.items()}, step, probes),
             ({k: v[max(step, MAP_SAMPLES // step * step):] for k, v in feed.items()}, batch, [])]
    per_batch, maps, shapes = [], {name: [] for name in probes}, {}
    for part, size, extra in parts:
        if not _count(part):
            continue
        names = list(dict.fromkeys(runner.output_names + extra))
        for _, values in runner.batches(part, names, size):
            per_batch.append([values[name] for name in runner.output_names])
            for name in probes if extra else ():
                maps[name].append(values[name])
            shapes = shapes or {name: values[name].shape for name in shape_names}
    return ({name: np.concatenate(chunks) for name, chunks in maps.items()}, calib_stage.join_outputs(per_batch),
            shapes)


def _verify(observed: Observed, pruned: onnx.ModelProto, softmax_blocks: dict[str, tuple[str, np.ndarray]],
            feed: dict[str, np.ndarray], batch: int, fixed: int | None, mask_name: str | None
            ) -> tuple[Fidelity, dict[str, float], dict[str, tuple[int, ...]]]:
    """Output fidelity, per-block attention-map error and run-time shapes of the pruned model on
    the held-back samples."""
    probes = sorted({tensor for tensor, _ in softmax_blocks.values()})
    maps, outputs, shapes = _probe_run(pruned, "pruned model", probes, feed, batch, fixed)
    measured = fidelity(observed.outputs, outputs)
    if not maps:
        return measured, {}, shapes
    inputs = {k: v[:len(next(iter(maps.values())))] for k, v in feed.items()}
    return measured, attention_error([(inputs, observed.maps, maps)], softmax_blocks, mask_name), shapes


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


def inspect_model(path: str | os.PathLike) -> Matches:
    return find_blocks(ModelGraph(load_model(path).model))


def _calibration_feed(g: ModelGraph, specs, calib, samples: int, seed: int) -> tuple[dict[str, np.ndarray], str]:
    if calib is None:
        return calib_stage.synthetic_inputs(g, specs, samples, seed), "synthetic"
    if isinstance(calib, dict):
        feed, source = calib_stage.validate_calibration(calib, specs, "calibration arrays"), "arrays"
    else:
        feed, source = calib_stage.load_calibration(calib, specs), str(calib)
    return {k: v[:samples] for k, v in feed.items()}, source


def _split(feed: dict[str, np.ndarray], fixed_batch: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Hold back about an eighth of the samples (whole batches for fixed-batch models) for fidelity."""
    step = fixed_batch or 1
    usable = _count(feed) - _count(feed) % step
    if usable < step:
        raise SnpError(f"the model has a fixed batch of {step}; give at least {step} calibration samples")
    if usable < 2 * step:
        part = {k: v[:usable] for k, v in feed.items()}
        return part, part
    holdout = max(step, (usable // 8) // step * step)
    return ({k: v[:usable - holdout] for k, v in feed.items()},
            {k: v[usable - holdout:usable] for k, v in feed.items()})


TRIM_ABOVE_BYTES = 32 * 2**20  # smaller models leave little to hand back; trimming costs a heap walk


def _memory_releaser(model_bytes: int) -> Callable[[], None]:
    """A call that hands freed heap back to the system between stages (for models above
    TRIM_ABOVE_BYTES). glibc keeps large freed blocks of numpy and onnxruntime buffers in its
    heap, so resident memory would otherwise only grow from stage to stage, and reusing that
    fragmented heap is slower than fresh pages; peak memory is what a deployment machine has to
    provide."""
    def release() -> None:
        gc.collect()  # onnx-graphsurgeon graphs are reference cycles: they hold sliced weights until collected
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass

    return release if model_bytes > TRIM_ABOVE_BYTES else (lambda: None)


def _since(started: float) -> str:
    """Elapsed time and the process's peak memory so far, for the -v stage log."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return f"{time.perf_counter() - started:.1f} s, peak RSS {peak:.0f} MiB"


def _count(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]
