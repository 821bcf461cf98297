"""`onnxsnp sweep`: one model pruned at several budgets, to pick a point from.

What every budget has in common is done once: loading and matching, the calibration split, the
original model observed on the held-back samples, the reconstruction's calibration batches (the
embeddings run) and the sensitivity survey of the global allocation. Each budget then only
allocates, reconstructs block by block at its own widths, rewrites and verifies. The result is a
table (Markdown and CSV) and a page with the trade-off curves: FLOPs, parameters, measured latency
and fidelity per budget.
"""
from __future__ import annotations

import html
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import onnx

from .score.costs import CostKind
from .errors import SnpError
from .report.html_charts import legend, lines, series_colours, trade_off
from .io.loading import LoadedModel
from .options import PruneOptions
from .pipeline import PruneResult, ReconstructionWork, _reconstruction_route, finish, prepare


@dataclass(frozen=True)
class SweepRow:
    goal: float  # the target: a fraction of the original FLOPs or parameters
    file: str
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    latency_ms_before: float | None
    latency_ms_after: float | None
    output_cosine: float | None
    centred_cosine: float | None
    top1_agreement: float | None
    seconds: float  # this budget's own work (allocation, reconstruction, rewrite, verification)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    perplexity_ratio: float | None = None  # a language model's
    next_token_agreement: float | None = None
    decode_ms_before: float | None = None  # a language model's cached decode step, one thread
    decode_ms_after: float | None = None
    kv_cache_bytes_before: int = 0  # a decoder's KV cache per token
    kv_cache_bytes_after: int = 0

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms_before or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after


@dataclass(frozen=True)
class SweepResult:
    kind: str  # "flops" or "params"
    rows: tuple[SweepRow, ...]
    shared_seconds: float  # done once for all budgets


def parse_goals(text: str) -> tuple[float, ...]:
    """`--targets 0.9,0.8,0.7`: fractions of the original, each 0 < F < 1, no repeats."""
    try:
        goals = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        goals = ()
    if not goals or any(not 0 < g < 1 for g in goals) or len(set(goals)) != len(goals):
        raise SnpError(f"--targets must be distinct fractions of the original, each 0 < F < 1, like "
                       f"0.9,0.7,0.5; got {text!r}")
    return tuple(sorted(goals, reverse=True))


def sweep(model_or_path: onnx.ModelProto | str | os.PathLike | LoadedModel, goals: tuple[float, ...],
          options_for: Callable[[float], PruneOptions], write: Callable[[float, PruneResult], str], *,
          calib=None, calib_label: str | None = None) -> SweepResult:
    """Prune at every goal in turn; `options_for(goal)` gives the options of one budget (all
    alike but the target), `write(goal, result)` stores the pruned model and returns its name."""
    started = time.perf_counter()
    first = options_for(goals[0])
    if first.target is None:
        raise SnpError("a sweep needs targets (--targets)")
    prepared = prepare(model_or_path, first, calib=calib, calib_label=calib_label)
    work = None
    try:
        if _reconstruction_route(prepared.g, prepared.matches, first) is None:
            work = ReconstructionWork(prepared, first)
            work.curves()  # the survey every allocation reads
        shared = time.perf_counter() - started
        rows = []
        for goal in goals:
            begun = time.perf_counter()
            result = finish(prepared, options_for(goal), work)
            name = write(goal, result)
            report, fidelity = result.report, result.report.fidelity
            rows.append(SweepRow(goal, name, report.flops_before, report.flops_after, report.params_before,
                                 report.params_after, report.latency_ms_before, report.latency_ms_after,
                                 fidelity.output_cosine, fidelity.centred_cosine, fidelity.top1_agreement,
                                 round(time.perf_counter() - begun, 2), report.weight_bytes_before,
                                 report.weight_bytes_after, fidelity.perplexity_ratio, fidelity.next_token_agreement,
                                 report.decode_ms_before, report.decode_ms_after, report.kv_cache_bytes_before,
                                 report.kv_cache_bytes_after))
    finally:
        if work is not None:
            work.close()
    return SweepResult(CostKind(first.target.kind).value, tuple(rows), round(shared, 2))


def markdown(result: SweepResult) -> str:
    language = any(row.perplexity_ratio is not None for row in result.rows)
    cached = any(row.decode_ms_after is not None or row.kv_cache_bytes_before for row in result.rows)
    head = (f"| target | file | FLOPs | params | size | {'prefill' if cached else 'latency'} ms | speedup | "
            + ("decode ms/token | decode speedup | KV cache/token | " if cached else "") + "output cosine | "
            + ("perplexity × | next-token agreement |" if language else "centred cosine | top-1 agreement |")
            + " seconds |")
    lines_ = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in result.rows:
        size = f"{row.weight_bytes_after / row.weight_bytes_before:.1%}" if row.weight_bytes_before else "—"
        fidelity = (f"{_num(row.perplexity_ratio, '×')} | {_num(row.next_token_agreement)}" if language
                    else f"{_num(row.centred_cosine)} | {_num(row.top1_agreement)}")
        decode = ""
        if cached:  # what generation repeats per token, and the cache it reads
            decode_speedup = (row.decode_ms_before / row.decode_ms_after
                              if row.decode_ms_before and row.decode_ms_after else None)
            kv = f"{row.kv_cache_bytes_after:,} B ({row.kv_cache_bytes_after / row.kv_cache_bytes_before:.1%})" \
                if row.kv_cache_bytes_before else "—"
            decode = f"{_num(row.decode_ms_after)} | {_num(decode_speedup, '×')} | {kv} | "
        lines_.append(f"| {row.goal:g} × {result.kind} | {row.file} | {_ratio(row.flops_after, row.flops_before)} | "
                      f"{_ratio(row.params_after, row.params_before)} | {size} | {_num(row.latency_ms_after)} | "
                      f"{_num(row.speedup, '×')} | {decode}{_num(row.output_cosine)} | {fidelity} | "
                      f"{row.seconds:.1f} |")
    return "\n".join(lines_) + "\n"


def _fidelity(rows: tuple[SweepRow, ...]) -> tuple[str, list[float]] | None:
    """The fidelity a person decides by, where measured: a language model's next-token agreement,
    else the centred output cosine (finer than a top-1 agreement that stays at 100 %), the top-1
    agreement, the output cosine; 1 for the original."""
    for name, field in (("next-token agreement", "next_token_agreement"), ("centred cosine", "centred_cosine"),
                        ("top-1 agreement", "top1_agreement"), ("output cosine", "output_cosine")):
        values = [getattr(row, field) for row in rows]
        if all(v is not None for v in values):
            return name, values
    return None


def csv(result: SweepResult) -> str:
    names = [f.name for f in fields(SweepRow)] + ["speedup"]
    rows = [",".join(names)]
    for row in result.rows:
        values = [getattr(row, name) for name in names]
        rows.append(",".join("" if v is None else str(v) for v in values))
    return "\n".join(rows) + "\n"


def page(result: SweepResult, title: str) -> str:
    """The trade-off on one self-contained page: fidelity and speed against the cost kept."""
    kept = [row.flops_after / row.flops_before for row in result.rows]
    fidelity = [("output cosine", kept, [r.output_cosine for r in result.rows]),
                ("centred cosine", kept, [r.centred_cosine for r in result.rows]),
                ("top-1 agreement", kept, [r.top1_agreement for r in result.rows])]
    fidelity = [s for s in fidelity if any(v is not None for v in s[2])]
    speed = [("speedup", kept, [r.speedup for r in result.rows])]
    colours = series_colours(len(fidelity) + 1)
    chosen = _fidelity(result.rows)
    speedups = [r.speedup for r in result.rows]
    timed = all(s is not None for s in speedups)
    x_values = speedups if timed else [r.flops_before / r.flops_after for r in result.rows]
    x_label = "measured speedup (one thread)" if timed else "FLOPs cut (original ÷ pruned)"
    charts = "" if chosen is None else trade_off(
        f"{chosen[0]} against {'speedup' if timed else 'FLOPs cut'}: the front is ringed", x_label, chosen[0],
        [(f"{r.goal:g}", x, y) for r, x, y in zip(result.rows, x_values, chosen[1])], ("original", 1.0, 1.0))
    charts += lines("fidelity", "FLOPs kept (fraction of the original)", fidelity, colours, log_y=False)
    if any(r.speedup for r in result.rows):
        charts += lines("measured speedup (one thread)", "FLOPs kept (fraction of the original)", speed,
                        colours[-1:], log_y=False)
    table = markdown(result).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table if not line.startswith("|---")]
    body = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
                                    for c in row) + "</tr>" for i, row in enumerate(cells))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}.key{margin-right:1em}.key span{display:inline-block;width:10px;"
            "height:10px;margin-right:4px}svg{margin:1em 2em 1em 0}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Shared work (loading, calibration, survey) {result.shared_seconds:.1f} s; "
            f"per budget {np.mean([r.seconds for r in result.rows]):.1f} s on average.</p>"
            f"<div>{legend([s[0] for s in fidelity], colours)}</div>{charts}<table>{body}</table></body></html>\n")


def _ratio(after: int, before: int) -> str:
    return f"{after:,} ({after / before:.1%})" if before else str(after)


def _num(value: float | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:.4g}{unit}"
