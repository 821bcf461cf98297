"""What a prune did, as a table for people and as JSON for pipelines."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np

from ..data.timing import TimeBase
from ..verify.attention_maps import AttentionSample
from ..plan import PrunePlan
from ..match import Layer, Skipped
from ..score.costs import CostModel, CutPart
from ..ir.stats import ModelStats
from ..verify.verification import Fidelity


class BlockKind(str, Enum):
    ATTENTION = "attention"
    FFN = "ffn"


@dataclass
class BlockReport:
    name: str
    kind: BlockKind
    form: str
    heads: int | None = None  # before pruning
    heads_after: int | None = None
    qk_dim_before: int | None = None
    qk_dim_after: int | None = None
    v_dim_before: int | None = None
    v_dim_after: int | None = None
    ffn_dim_before: int | None = None
    ffn_dim_after: int | None = None


PART_NAMES = {CutPart.BLOCKS: "whole blocks", CutPart.HEADS: "whole heads", CutPart.QK: "Q/K pairs",
              CutPart.V: "V/O neurons", CutPart.FFN: "FFN neurons", CutPart.RESIDUAL: "residual channels"}
ATTENTION_PARTS = (CutPart.HEADS, CutPart.QK, CutPart.V)


@dataclass
class CutShare:
    """One part's share of the FLOPs cut, from the cost model the allocation spends (costs.py)."""

    part: CutPart
    flops_removed: int
    share: float  # of the cut the cost model counts for the plan (the parts sum to it)
    # a --target-* allocation: the loss it predicted for this part from the measured sensitivity
    # curves, summed over blocks, and that loss per GFLOP removed
    loss: float | None = None
    loss_per_gflop: float | None = None


def cut_shares(costs: CostModel, plan: PrunePlan, allocation: dict | None = None) -> list[CutShare]:
    """The parts that removed FLOPs, with their shares of the cut and, where a measured
    allocation ran, their loss per FLOP."""
    removed = costs.removed_by_part(plan)
    total = sum(removed.values())
    losses = {part: 0.0 for part in CutPart}
    for layer in (allocation or {}).get("layers", []):
        for part, loss in layer.get("loss_by_part", {}).items():
            losses[CutPart(part)] += loss
    measured = bool(allocation and allocation.get("layers"))
    rows = []
    for part, flops in removed.items():
        if round(flops) <= 0:
            continue
        loss = round(losses[part], 6) if measured else None
        rows.append(CutShare(part, int(round(flops)), round(flops / total, 4), loss,
                             None if loss is None else float(f"{losses[part] / (flops / 1e9):.4g}")))
    return rows


@dataclass
class Report:
    criterion: str
    compensation: str  # "lstsq", "bias" or "none"
    compensation_kept: list[str]  # the pieces that improved held-back fidelity and were applied
    ratios: dict[str, float]
    calibration: str  # "synthetic" or where the samples came from
    calibration_samples: int
    holdout_samples: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    fidelity: Fidelity
    blocks: list[BlockReport]
    skipped: list[Skipped] = field(default_factory=list)
    removed_blocks: list[str] = field(default_factory=list)  # whole transformer blocks dropped
    target: dict | None = None  # --target-*: the goal and the allocations tried
    residual_width: list[int] | None = None  # [before, after] when residual channels were removed
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    latency_ms_before: float | None = None  # onnxruntime, one thread, one sample, interleaved
    latency_ms_after: float | None = None
    decode_ms_before: float | None = None  # a language model's cached decode step (one token), same conditions
    decode_ms_after: float | None = None
    attention_kl: dict[str, float | None] = field(default_factory=dict)  # per attention block, held-back samples
    attention_maps: list[AttentionSample] = field(default_factory=list)  # the heads that changed most, one sample
    reconstruction: dict | None = None  # the block-by-block refit: settings, samples, tokens, error per half-block
    allocation: dict | None = None  # --target-* with reconstruction: the goal and the measured loss per block
    seconds: float = 0.0
    requantized: dict[str, float] | None = None  # MatMulNBits weights quantized again: node → relative weight error
    # refitted MatMulNBits weights quantized with error feedback: node → relative error of X·W
    requantized_feedback: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)  # constraints the model's form put on the widths
    kv_cache_bytes_before: int = 0  # a decoder's KV cache per token (keys and values of every layer); 0: none
    kv_cache_bytes_after: int = 0
    prefill_tokens: int | None = None  # a language model with a KV cache: latency_ms_* time a prefill of these
    cut: list[CutShare] = field(default_factory=list)  # how the FLOPs cut was shared between the parts
    latency_clock: str | None = None  # what latency_ms_* and decode_ms_* count (data/timing.py's TimeBase)

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    def as_dict(self) -> dict:
        data = asdict(self)
        data["fidelity"] = self.fidelity.as_dict()
        data["flops_before"], data["flops_after"] = self.flops_before, self.flops_after
        for when in ("before", "after"):  # what a language model's users compare: tokens a second
            prefill, decode = getattr(self, f"latency_ms_{when}"), getattr(self, f"decode_ms_{when}")
            if self.prefill_tokens and prefill:
                data[f"prefill_tokens_per_s_{when}"] = round(1000 * self.prefill_tokens / prefill, 2)
            if decode:
                data[f"decode_tokens_per_s_{when}"] = round(1000 / decode, 2)
        return data

    def compensation_summary(self) -> str:
        if self.reconstruction is not None:
            r = self.reconstruction
            return (f"{self.compensation} (block by block, {r['propagation']}, {r['reduction']} Q/K and V, "
                    f"{r['selection']} selection; {r['samples']} samples, {r['tokens']} tokens)")
        applied = ", ".join(self.compensation_kept) or "nothing helped"
        return f"{self.compensation} ({applied})" if self.compensation != "none" else "none"

    def speed_rows(self) -> list[tuple[str, str, str, str]]:
        """(what, before, after, change) of the timings, one thread: a run of one sample; for a
        language model with a KV cache that run is a prefill, shown with its tokens a second
        beside the cached decode step's; `, CPU time` where they count the calling thread's CPU time."""
        rows = []
        clock = ", CPU time" if self.latency_clock == TimeBase.THREAD_CPU.value else ""
        for label, tokens, before, after in (("latency", None, self.latency_ms_before, self.latency_ms_after),
                                             ("decode step", 1, self.decode_ms_before, self.decode_ms_after)):
            if before is None or after is None:
                continue
            if tokens is None and self.prefill_tokens:
                label, tokens = f"prefill, {self.prefill_tokens} tokens", self.prefill_tokens
            rate = (lambda ms: f" ({1000 * tokens / ms:,.0f} tokens/s)") if tokens else (lambda ms: "")
            rows.append((f"{label}, 1 thread{clock}", f"{before:.2f} ms{rate(before)}", f"{after:.2f} ms{rate(after)}",
                         f"{before / max(after, 1e-9):.2f}x faster"))
        return rows

    def cut_summary(self) -> str:
        """One line: each part's FLOPs removed and share of the cut."""
        return ", ".join(f"{PART_NAMES[c.part]} {_num(c.flops_removed)} ({c.share:.1%})" for c in self.cut)

    def cut_lines(self) -> list[str]:
        """The FLOPs cut by part; with a measured allocation, each part's loss per GFLOP, and
        whether attention was cut at a higher loss per FLOP than the FFNs."""
        if not self.cut:
            return []
        total = sum(c.flops_removed for c in self.cut)
        if self.cut[0].loss is None:
            return [f"FLOPs cut by part (cost model, {_num(total)} in all): {self.cut_summary()}"]
        rows = [("FLOPs cut by part", "removed", "share", "loss", "loss/GFLOP")]
        rows += [(PART_NAMES[c.part], _num(c.flops_removed), f"{c.share:.1%}", f"{c.loss:.4g}", f"{c.loss_per_gflop:.4g}")
                 for c in self.cut]
        width = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, width)))
                 for r in rows]
        lines.append(f"  (cost model, {_num(total)} FLOPs in all; loss: the allocation's prediction from "
                     f"the sensitivity curves measured on {self.allocation['samples']} samples)")
        attention = [c for c in self.cut if c.part in ATTENTION_PARTS]
        ffn = next((c for c in self.cut if c.part is CutPart.FFN), None)
        if attention and ffn and ffn.loss_per_gflop:
            per_gflop = sum(c.loss for c in attention) / (sum(c.flops_removed for c in attention) / 1e9)
            lines.append(f"  attention was cut at {per_gflop / ffn.loss_per_gflop:.2f}x the FFNs' loss per FLOP")
        return [""] + lines

    def table(self) -> str:
        attention = [b for b in self.blocks if b.kind is BlockKind.ATTENTION]
        ffn = [b for b in self.blocks if b.kind is BlockKind.FFN]
        lines = [f"blocks found: {len(attention)} attention, {len(ffn)} FFN"
                 + (f"; {len(self.skipped)} skipped (run `onnxsnp inspect` for why)" if self.skipped else "")]
        if self.residual_width:
            lines.append(f"  residual stream width {self.residual_width[0]}->{self.residual_width[1]}")
        if self.removed_blocks:
            lines.append(f"  removed whole blocks: {', '.join(self.removed_blocks)}")
        for b in attention:
            heads = f"{b.heads}" if b.heads == b.heads_after else f"{b.heads}->{b.heads_after}"
            lines.append(f"  {b.name:<40} {b.form:<10} heads {heads}  q/k {b.qk_dim_before}->{b.qk_dim_after}"
                         f"  v {b.v_dim_before}->{b.v_dim_after}")
        for b in ffn:
            lines.append(f"  {b.name:<40} {'ffn':<10} hidden {b.ffn_dim_before}->{b.ffn_dim_after}")
        f = self.fidelity
        rows = [("", "before", "after", "change"),
                ("params", _num(self.params_before), _num(self.params_after), _pct(self.params_before, self.params_after)),
                ("FLOPs/sample", _num(self.flops_before), _num(self.flops_after), _pct(self.flops_before, self.flops_after)),
                ("weights", _size(self.weight_bytes_before), _size(self.weight_bytes_after),
                 _pct(self.weight_bytes_before, self.weight_bytes_after))]
        if self.kv_cache_bytes_before:
            rows.append(("KV cache/token", _size(self.kv_cache_bytes_before), _size(self.kv_cache_bytes_after),
                         _pct(self.kv_cache_bytes_before, self.kv_cache_bytes_after)))
        rows += self.speed_rows()
        width = [max(len(r[i]) for r in rows) for i in range(4)]
        lines.append("")
        lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, width)))
                  for r in rows]
        lines += self.cut_lines()
        top1 = f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
        held = (f"{f.samples} synthetic held-back samples (no --calib: this cannot judge the model on real data)"
                if self.calibration == "synthetic" else f"{f.samples} held-back samples")
        if f.perplexity_ratio is not None:  # a language model: what its users read
            lines.append(f"fidelity on {held} ({f.tokens:,} next-token positions): perplexity "
                         f"{f.perplexity_before:.2f} -> {f.perplexity_after:.2f} ({f.perplexity_ratio:.2f}x), "
                         f"next-token agreement {f.next_token_agreement:.1%} (logits cosine {f.output_cosine:.4f})")
        else:
            lines.append(f"fidelity on {held}: output cosine {f.output_cosine:.4f}, centred cosine "
                         f"{f.centred_cosine:.4f}, relative error {f.relative_error:.4f}{top1}, "
                         f"max abs diff {f.max_abs_diff:.3g}")
        lines.append(f"criterion {self.criterion}, compensation {self.compensation_summary()}, "
                     f"calibration: {self.calibration} "
                     f"({self.calibration_samples} samples fitted, {self.holdout_samples} held back)")
        if self.requantized:
            errors = list(self.requantized.values())
            lines.append(f"requantized {len(errors)} MatMulNBits weights with their bits and block size: relative "
                         f"weight error mean {np.mean(errors):.4f}, max {max(errors):.4f}")
        if self.requantized_feedback:
            errors = list(self.requantized_feedback.values())
            lines.append(f"requantized {len(errors)} refitted MatMulNBits weights with error feedback on their "
                         f"calibration inputs (GPTQ): relative output error mean {np.mean(errors):.4f}, "
                         f"max {max(errors):.4f}")
        lines += [f"note: {note}" for note in self.notes]
        if self.target:
            lines += latency_lines(self.target, (self.allocation or {}).get("timed"))
        if self.target and self.allocation:
            r = self.ratios
            lines.append(f"target {target_name(self.target)}: widths allocated block by block by "
                         f"measured sensitivity ({self.allocation['samples']} samples); on average removed q/k "
                         f"{r['qk']:.3f}, v {r['v']:.3f}, ffn {r['ffn']:.3f}, heads {r['heads']:.3f}")
        elif self.target:
            r = self.ratios
            lines.append(f"target {target_name(self.target)}: chose ratios q/k {r['qk']:.3f}, "
                         f"v {r['v']:.3f}, ffn {r['ffn']:.3f} (best measured cosine of "
                         f"{sum('cosine' in t for t in self.target['tried'])} allocations)")
        return "\n".join(lines)


SPEEDUP_TOLERANCE = 0.05  # a measured speedup this far below a --target-speedup goal is called a miss


def target_name(target: dict) -> str:
    return f"{target.get('flag', '--target-' + target['kind'])} {target['value']:g}"


def latency_lines(target: dict, timed: dict | None = None) -> list[str]:
    """A latency budget: the speedup the latency model predicted beside the one measured, and the
    timed allocations that corrected it (timed.py)."""
    if "predicted_speedup" not in target:
        return []
    line = (f"latency model: predicted {target['predicted_ms_before']:.2f} -> {target['predicted_ms_after']:.2f} ms, "
            f"{target['predicted_speedup']:.2f}x faster")
    lines = [line]
    if timed:
        checks = ", ".join(f"{t['measured_speedup']:.2f}x" for t in timed["trials"])
        step = " per decode step" if timed.get("step") == "decode" else ""
        step += f" ({timed['clock']})" if timed.get("clock") else ""
        lines.append(f"timed before the reconstruction: {checks} measured{step} (kept #{timed['chosen'] + 1}; "
                     f"{timed['stopped']})")
    measured = target.get("measured_speedup")
    if measured is None:
        lines[0] += " (not measured: -q without --report)"
        return lines
    goal = target["predicted_ms_before"] / target["goal_ms"]
    step = " per decode step" if target.get("measured_step") == "decode" else ""
    lines[0] += f"; measured {measured:.2f}x{step} (goal {goal:.2f}x)"
    if abs(measured / goal - 1) > SPEEDUP_TOLERANCE:
        lines[0] += f": the measured speedup is {abs(measured / goal - 1):.1%} {'below' if measured < goal else 'above'} the goal"
        if not timed:
            lines[0] += " (this route does not time its allocation; aim by measured/predicted)"
    return lines


def block_reports(plan: PrunePlan) -> list[BlockReport]:
    rows = []
    for keep in plan.attention:
        b = keep.block
        rows.append(BlockReport(b.name, BlockKind.ATTENTION, b.form.value, b.heads, len(keep.query_heads()), b.head_dim,
                                int(keep.qk.shape[1]), b.head_dim, int(keep.v.shape[1])))
    for keep in plan.ffn:
        b = keep.block
        rows.append(BlockReport(b.name, BlockKind.FFN, b.activation, ffn_dim_before=b.hidden, ffn_dim_after=len(keep.hidden)))
    return rows


CURVE_FRACTIONS = (0.125, 0.25, 0.5, 0.75)  # kept shares at which the report samples sensitivity curves


def sensitivity_points(layer: Layer, curves) -> dict:
    """A few points of one transformer block's sensitivity curves (sensitivity.LayerSensitivity):
    the loss of each group at CURVE_FRACTIONS of its width kept, interpolated as the allocation
    reads them (None below the fewest units measured, e.g. under one head), with the names of
    its two blocks."""
    block, ffn = layer.attention, layer.ffn
    widths = {"qk": block.head_dim, "v": block.head_dim, "heads": block.heads, "ffn": ffn.hidden}

    def point(curve, kept: float) -> float | None:
        return float(f"{curve.at(kept):.3g}") if kept >= curve.kept[0] else None

    return {"attention_block": block.name, "ffn_block": ffn.name,
            "curves": {"kept": list(CURVE_FRACTIONS),
                       **{group: [point(getattr(curves, group), share * width) for share in CURVE_FRACTIONS]
                          for group, width in widths.items()}}}


def allocation_layer(layer: Layer, curves, predicted: float, by_part: dict) -> dict:
    """One transformer block's line of the allocation report: its predicted loss, by part, and
    its curves at half width and at CURVE_FRACTIONS."""
    return {"name": layer.name, "predicted_loss": round(predicted, 6), "block_loss": round(curves.block, 6),
            "qk_loss_half": round(curves.qk.at(layer.attention.head_dim / 2), 6),
            "v_loss_half": round(curves.v.at(layer.attention.head_dim / 2), 6),
            "ffn_loss_half": round(curves.ffn.at(layer.ffn.hidden / 2), 6),
            "loss_by_part": {part.value: round(x, 6) for part, x in by_part.items()},
            **sensitivity_points(layer, curves)}


def stats_fields(before: ModelStats, after: ModelStats) -> dict[str, int]:
    return {"params_before": before.params, "params_after": after.params,
            "macs_before": before.macs, "macs_after": after.macs}


def _num(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def _pct(before: int, after: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"
