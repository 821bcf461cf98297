"""The report of a prune, put together from what each stage handed on (pipeline.finish)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from ..data.timing import TimeBase, prompt_tokens, time_base
from ..io.genai import NOTE as GENAI_NOTE
from ..io.loading import weight_bytes
from ..ir.stats import count_params, macs_from_shapes, stats_from_shapes
from ..plan import PrunePlan, TimedStep
from ..rewrite.decoding import kv_cache_bytes
from ..score.costs import CostKind, CostModel
from ..verify.verification import decode_latency, latency
from .report import Report, block_reports, cut_shares, stats_fields

if TYPE_CHECKING:  # the stages' boundary types, typing only
    from ..compensate.reconstruction import Reconstruction
    from ..options import PruneOptions
    from ..compensate.compensated import Compensated
    from ..data.prepared import Prepared
    from ..score.allocation import Target
    from ..verify.observation import Verified


@dataclass(frozen=True)
class Timing:
    """One intra-op thread, original and pruned interleaved: a run of one sample, and a language
    model's cached decode step (None where not measured), in `base`'s milliseconds."""

    run_ms: tuple[float, float] | tuple[None, None] = (None, None)
    decode_ms: tuple[float, float] | None = None
    prefill_tokens: int | None = None  # a language model with a KV cache: the run is a prefill of these
    base: TimeBase | None = None  # what the milliseconds count (None: nothing timed)


def timed_pair(original: onnx.ModelProto, pruned: onnx.ModelProto, one_batch, weights) -> Timing:
    return Timing(latency(original, pruned, one_batch, original_weights=weights),
                  decode_latency(original, pruned, one_batch, original_weights=weights), prompt_tokens(one_batch),
                  time_base(1))


def build_report(p: Prepared, options: PruneOptions, costs: CostModel | None, compensated: Compensated,
                 pruned: onnx.ModelProto, verified: Verified, timing: Timing) -> Report:
    plan, ratios, observed = compensated.plan, compensated.ratios, p.observed
    speed, decode = timing.run_ms, timing.decode_ms
    step = TimedStep.DECODE if decode and options.timed_step is TimedStep.DECODE else TimedStep.PREFILL
    # a QOperator model was observed through its QDQ reading (the same products and weights)
    observed_model = p.qoperator.model if p.qoperator is not None else p.model
    # the cut split by part is counted by the cost model a --target-* allocation spends (its
    # FLOPs whatever its kind), or one made for the split
    costs = costs or CostModel(p.g, p.matches, macs_from_shapes(p.g.model, observed.shapes, observed.shape_samples),
                               count_params(p.g.model))
    return Report(
        criterion=options.criterion, compensation=options.compensation.value,
        compensation_kept=list(compensated.kept_pieces),
        ratios={"qk": round(ratios.qk, 4), "v": round(ratios.v, 4), "ffn": round(ratios.ffn, 4),
                "heads": ratios.heads, "residual": ratios.residual},
        calibration=p.source, calibration_samples=_count(p.fit_feed), holdout_samples=_count(p.holdout_feed),
        **stats_fields(stats_from_shapes(observed_model, observed.shapes, observed.shape_samples),
                       stats_from_shapes(pruned, verified.shapes, observed.shape_samples)),
        fidelity=verified.fidelity, blocks=block_reports(plan), skipped=p.matches.skipped,
        removed_blocks=[layer.name for layer in plan.removed_layers],
        residual_width=None if plan.stream is None else [plan.stream.width, len(plan.stream_keep)],
        target=None if options.target is None else target_report(
            options.target, costs, plan, decode if step is TimedStep.DECODE else speed, compensated.searched, step),
        weight_bytes_before=weight_bytes(p.model), weight_bytes_after=weight_bytes(pruned),
        latency_ms_before=speed[0], latency_ms_after=speed[1],
        decode_ms_before=decode and decode[0], decode_ms_after=decode and decode[1],
        prefill_tokens=timing.prefill_tokens, latency_clock=timing.base and timing.base.value,
        attention_kl={keep.block.name: verified.attention_kl.get(keep.block.name) for keep in plan.attention},
        attention_maps=verified.maps,
        reconstruction=reconstruction_report(compensated.reconstruction, options),
        allocation=compensated.allocation, seconds=round(time.perf_counter() - p.started, 2),
        requantized={k: round(v, 6) for k, v in p.view.errors.items()} if p.view is not None else None,
        requantized_feedback={k: round(v, 6) for k, v in p.view.feedback.items()} if p.view is not None else None,
        notes=[GENAI_NOTE] if options.one_head_size else [],
        cut=cut_shares(costs, plan, compensated.allocation),
        kv_cache_bytes_before=kv_cache_bytes(p.g, [(b, b.groups, b.head_dim, b.head_dim)
                                                   for b in p.matches.attention]),
        kv_cache_bytes_after=kv_cache_bytes(p.g, [(k.block, len(k.heads), k.qk.shape[1], k.v.shape[1])
                                                  for k in plan.attention]))


def target_report(target: Target, costs: CostModel, plan: PrunePlan, speed: tuple, searched,
                  step: TimedStep) -> dict:
    """The goal, what was tried, and for a latency budget the predicted and measured speedups
    (`speed`: the medians of what `step` times)."""
    report = {"kind": target.kind.value, "flag": target.flag, "value": target.value, "tried": list(searched)}
    if target.kind is CostKind.LATENCY:
        before, after = costs.original(target.kind), costs.cost(plan, target.kind)
        report |= {"goal_ms": round(target.absolute(before), 4), "predicted_ms_before": round(before, 4),
                   "predicted_ms_after": round(after, 4), "predicted_speedup": round(before / max(after, 1e-12), 4),
                   "profile_runs": costs.times.runs, "threads": costs.times.threads}
        if speed[0] is not None:
            report["measured_speedup"] = round(speed[0] / max(speed[1], 1e-12), 4)
            report["measured_step"] = step.value
    return report


def reconstruction_report(reconstruction: Reconstruction | None, options: PruneOptions) -> dict | None:
    if reconstruction is None:
        return None
    return {"propagation": options.propagation.value, "selection": options.selection.value,
            "reduction": options.reduction.value, "samples": reconstruction.samples,
            "tokens": reconstruction.tokens,
            "halves": [{"name": h.name, "ridge": h.ridge, "error_sliced": round(h.error_before, 6),
                        "error_refitted": round(h.error_after, 6)} for h in reconstruction.halves]}


def _count(feed) -> int:
    return next(iter(feed.values())).shape[0]
