"""The report as a self-contained HTML page: the before/after table, and per-block charts of the
kept widths and of the attention-map error, drawn as inline SVG (no plotting library needed)."""
from __future__ import annotations

import html

from .report import Report

_COLOURS = {"q/k": "#1f77b4", "v": "#ff7f0e", "heads": "#2ca02c", "ffn": "#d62728"}


def render(report: Report, title: str = "onnxsnp report") -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{before}</td><td>{after}</td></tr>"
                   for name, before, after in _summary(report))
    f = report.fidelity
    fidelity = (f"output cosine {f.output_cosine:.4f}" + (f", top-1 agreement {f.top1_agreement:.1%}"
                                                            if f.top1_agreement is not None else "")
                + f", max abs diff {f.max_abs_diff:.3g} on {f.samples} held-back samples")
    kl = {name: value for name, value in report.attention_kl.items() if value is not None}
    kl_chart = _bars("Attention-map error per block (KL, original ‖ pruned)", [(n, {"KL": v}) for n, v in kl.items()],
                     {"KL": "#9467bd"}, None) if kl else "<p>No attention-map error measured (fused attention ops).</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>criterion {html.escape(report.criterion)}, compensation {html.escape(report.compensation)}
({html.escape(", ".join(report.compensation_kept) or "nothing applied")}),
calibration {html.escape(report.calibration)} ({report.calibration_samples} samples)</p>
<table><tr><th></th><th>before</th><th>after</th></tr>{rows}</table>
<p>Fidelity: {html.escape(fidelity)}</p>
<h2>Kept widths per block</h2>
{_bars("Kept fraction of each group, per block", _widths(report), _COLOURS, 1.0)}
<h2>Attention maps</h2>
{kl_chart}
</body></html>
"""


def _summary(report: Report) -> list[tuple[str, str, str]]:
    rows = [("parameters", f"{report.params_before:,}", f"{report.params_after:,}"),
            ("FLOPs per sample", f"{report.flops_before:,}", f"{report.flops_after:,}"),
            ("weights (bytes)", f"{report.weight_bytes_before:,}", f"{report.weight_bytes_after:,}")]
    if report.latency_ms_before is not None:
        rows.append(("latency, 1 thread (ms)", f"{report.latency_ms_before:.2f}", f"{report.latency_ms_after:.2f}"))
    return rows


def _widths(report: Report) -> list[tuple[str, dict[str, float]]]:
    bars = []
    for block in report.blocks:
        if block.kind == "attention":
            bars.append((block.name, {"q/k": block.qk_dim_after / block.qk_dim_before,
                                      "v": block.v_dim_after / block.v_dim_before,
                                      "heads": block.heads_after / block.heads}))
        else:
            bars.append((block.name, {"ffn": block.ffn_dim_after / block.ffn_dim_before}))
    return bars


def _bars(title: str, groups: list[tuple[str, dict[str, float]]], colours: dict[str, str], top: float | None) -> str:
    """A grouped horizontal bar chart as SVG: one row per block, one bar per series."""
    height, bar, label_width, width = 18, 14, 260, 360
    scale = top or max([v for _, series in groups for v in series.values()] + [1e-12])
    rows, y = [], 30
    for name, series in groups:
        rows.append(f'<text x="0" y="{y + bar - 3}" font-size="11">{html.escape(name[-40:])}</text>')
        for key, value in series.items():
            length = max(0.0, value / scale) * width
            rows.append(f'<rect class="bar" x="{label_width}" y="{y}" width="{length:.1f}" height="{bar}" '
                        f'fill="{colours[key]}"><title>{html.escape(key)}: {value:.3g}</title></rect>')
            rows.append(f'<text x="{label_width + length + 4:.1f}" y="{y + bar - 3}" font-size="10">'
                        f'{html.escape(key)} {value:.3g}</text>')
            y += height
        y += 6
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + width + 120}" height="{y + 10}" '
            f'role="img" aria-label="{html.escape(title)}"><text x="0" y="16" font-size="13" font-weight="bold">'
            f'{html.escape(title)}</text>{"".join(rows)}</svg>')
