"""The report as a self-contained HTML page: the before/after table and fidelity, the kept width
of every group per block, the sensitivity the allocation measured, the block-by-block refit, and
the attention maps of the original and the pruned model side by side (inline SVG and PNG)."""
from __future__ import annotations

import html

from .html_charts import bars, colour_bar, heatmap, legend, lines, series_colours, tint
from .report import BlockKind, Report, latency_lines, target_name

_COLOURS = {"q/k": "#1f77b4", "v": "#ff7f0e", "heads": "#2ca02c", "ffn": "#d62728"}
_REFIT_COLOURS = {"sliced": "#7f7f7f", "refitted": "#17becf"}
_CURVES = {"qk": "Q/K pairs per head", "v": "V neurons per head", "heads": "heads", "ffn": "FFN neurons"}
MAP_PIXELS = 176  # the longer side of each drawn attention map

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:68em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .7em;text-align:right}td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:1em}.maps{display:flex;flex-wrap:wrap;gap:1.5em}
figure{margin:0}figcaption{font-size:12px;max-width:30em}.pair{display:flex;gap:.5em}.pair div{font-size:11px}
img.map{image-rendering:pixelated;display:block;border:1px solid #ccc}img.scale{display:block}
.key{font-size:12px;margin-right:1em}.key span{display:inline-block;width:1em;height:.6em;margin-right:.3em}
.note{color:#555}table.widths td{min-width:7em}"""


def render(report: Report, title: str = "onnxsnp report") -> str:
    sections = [_overview(report), _widths(report), _sensitivity(report), _reconstruction(report),
                _attention(report)]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{"".join(sections)}
</body></html>
"""


def _overview(report: Report) -> str:
    rows = [("parameters", f"{report.params_before:,}", f"{report.params_after:,}"),
            ("FLOPs per sample", f"{report.flops_before:,}", f"{report.flops_after:,}"),
            ("weights (bytes)", f"{report.weight_bytes_before:,}", f"{report.weight_bytes_after:,}")]
    if report.kv_cache_bytes_before:
        rows.append(("KV cache per token (bytes)", f"{report.kv_cache_bytes_before:,}",
                     f"{report.kv_cache_bytes_after:,}"))
    rows += [(what, before, after) for what, before, after, _ in report.speed_rows()]
    f = report.fidelity
    measures = [f"output cosine {f.output_cosine:.4f}", f"centred cosine {f.centred_cosine:.4f}",
                f"relative error {f.relative_error:.4f}"]
    if f.perplexity_ratio is not None:
        measures[:0] = [f"perplexity {f.perplexity_before:.2f} → {f.perplexity_after:.2f} ({f.perplexity_ratio:.2f}×) "
                        f"over {f.tokens:,} positions", f"next-token agreement {f.next_token_agreement:.1%}"]
    if f.top1_agreement is not None:
        measures.append(f"top-1 agreement {f.top1_agreement:.1%}")
    measures.append(f"max abs diff {f.max_abs_diff:.3g}")
    synthetic = (' <span class="note">(synthetic data: this cannot judge the model on real data)</span>'
                 if report.calibration == "synthetic" else "")
    target = ""
    if report.target:
        timed = (report.allocation or {}).get("timed")
        parts = [f"target {target_name(report.target)}"] + latency_lines(report.target, timed)
        target = "; " + html.escape("; ".join(parts))
    return f"""<p>criterion {html.escape(report.criterion)}, compensation {html.escape(report.compensation_summary())};
calibration {html.escape(report.calibration)} ({report.calibration_samples} samples fitted,
{report.holdout_samples} held back){target}</p>
{_table(["", "before", "after"], rows)}
{f"<p>FLOPs cut by part (cost model): {html.escape(report.cut_summary())}.</p>" if report.cut else ""}
<p>Fidelity on {f.samples} held-back samples{synthetic}: {html.escape(", ".join(measures))}.
<span class="note">Centred cosine compares the outputs after removing the original's mean over samples
(plain cosine stays near 1 when outputs share a large common part); relative error is
‖pruned − original‖ / ‖original‖ per sample.</span></p>
"""


def _widths(report: Report) -> str:
    rows = []
    for b in report.blocks:
        if b.kind is BlockKind.ATTENTION:
            rows.append((b.name, _kept(b.heads_after, b.heads, "heads"), _kept(b.qk_dim_after, b.qk_dim_before, "q/k"),
                         _kept(b.v_dim_after, b.v_dim_before, "v"), "<td></td>"))
        else:
            rows.append((b.name, *["<td></td>"] * 3, _kept(b.ffn_dim_after, b.ffn_dim_before, "ffn")))
    header = "".join(f"<th>{h}</th>" for h in ("block", "heads", "Q/K pairs per head", "V neurons per head",
                                                 "FFN neurons"))
    body = "".join(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>" for name, *cells in rows)
    removed = (f"<p>Whole transformer blocks removed: {html.escape(', '.join(report.removed_blocks))}.</p>"
               if report.removed_blocks else "")
    residual = (f"<p>Residual stream width {report.residual_width[0]} → {report.residual_width[1]}.</p>"
                if report.residual_width else "")
    return f"""<h2>Kept widths per block</h2>
<p class="note">kept / original, the bar the kept share: heads per attention block, Q/K pairs and V neurons in each
kept head, FFN hidden neurons.</p>
<table class="widths"><tr>{header}</tr>{body}</table>{removed}{residual}
"""


def _kept(after: int, before: int, group: str) -> str:
    share = after / max(before, 1)
    return _bar_cell(f"{after} / {before}", share, _COLOURS[group], f"{group}: {share:.0%} kept", group)


def _bar_cell(text: str, share: float, colour: str, title: str, group: str) -> str:
    """A table cell with `text` over a bar `share` (0…1) of its width in a tint of `colour`."""
    percent = 100 * min(max(share, 0.0), 1.0)
    return (f'<td class="bar {group.replace("/", "")}" title="{html.escape(title)}" style="background:linear-gradient('
            f'to right,{tint(colour)} {percent:.1f}%,transparent {percent:.1f}%)">{html.escape(text)}</td>')


def _sensitivity(report: Report) -> str:
    allocation = report.allocation
    if not allocation or not allocation.get("layers"):
        return """<h2>Sensitivity per layer</h2>
<p class="note">Not measured: the widths were set by ratios, the same in every block. A --target-flops or
--target-params run with the block-by-block reconstruction measures each block's sensitivity and allocates the
widths across blocks by it.</p>
"""
    layers = allocation["layers"]
    rows = [(layer["name"], _g(layer["predicted_loss"]), _g(layer["block_loss"]), _g(layer["qk_loss_half"]),
             _g(layer["v_loss_half"]), _g(layer["ffn_loss_half"])) for layer in layers]
    share = allocation["goal"] / allocation["original"] if allocation.get("original") else None
    goal = f"{allocation['goal']:,.0f}" + (f" ({share:.0%} of the original)" if share else "")
    charts = ""
    curved = [layer for layer in layers if "curves" in layer]
    if curved:
        colours = series_colours(len(curved))
        charts = '<div class="charts">' + "".join(
            lines(f"Loss by {label} kept", "kept share", [(layer["name"], layer["curves"]["kept"],
                                                            layer["curves"][group]) for layer in curved], colours)
            for group, label in _CURVES.items()) + f"</div><p>{legend([l['name'] for l in curved], colours)}</p>"
    return f"""<h2>Sensitivity per layer</h2>
<p>Widths allocated across blocks to meet {html.escape(str(allocation["kind"]))} ≤ {goal}, least predicted loss
first, from curves measured on {allocation["samples"]} calibration samples.
<span class="note">Loss: squared error the block adds to the residual stream after its refit, relative to the
stream's energy there.</span></p>
{_table(["layer", "predicted loss (chosen widths)", "removing the block", "Q/K at half width",
         "V at half width", "FFN at half width"], rows)}
{charts}
"""


def _reconstruction(report: Report) -> str:
    r = report.reconstruction
    if not r:
        return f"""<h2>Reconstruction</h2>
<p class="note">No block-by-block refit ran (compensation {html.escape(report.compensation_summary())}).</p>
"""
    halves = r.get("halves", [])
    largest = max([h["error_sliced"] for h in halves] + [h["error_refitted"] for h in halves] + [1e-30])
    rows = "".join(_refit_row(h, largest) for h in halves)
    header = "".join(f"<th>{h}</th>" for h in ("half-block", "ridge", "error sliced", "error refitted", "reduced"))
    return f"""<h2>Reconstruction</h2>
<p>Each half-block refitted on {r["samples"]} samples ({r["tokens"]:,} tokens): {html.escape(r["propagation"])}
propagation, {html.escape(r["reduction"])} Q/K and V, {html.escape(r["selection"])} selection.
<span class="note">Error: squared error of the half-block's output relative to its energy, with the kept weights
only (sliced) and after the output projection / fc2 were refitted; bars on one scale.</span></p>
<table class="widths"><tr>{header}</tr>{rows}</table>
"""


def _refit_row(half: dict, largest: float) -> str:
    cells = "".join(_bar_cell(_g(half[key]), half[key] / largest, _REFIT_COLOURS[label], f"{label}: {half[key]:.3g}",
                              label) for label, key in (("sliced", "error_sliced"), ("refitted", "error_refitted")))
    reduced = f"{half['error_sliced'] / half['error_refitted']:.1f}×" if half["error_refitted"] > 0 else "—"
    return f"<tr><td>{html.escape(half['name'])}</td><td>{half['ridge']:g}</td>{cells}<td>{reduced}</td></tr>"


def _attention(report: Report) -> str:
    kl = {name: value for name, value in report.attention_kl.items() if value is not None}
    fused = [name for name, value in report.attention_kl.items() if value is None]
    parts = ["<h2>Attention maps</h2>"]
    if kl:
        parts.append(bars("Attention-map error per block (KL, original ‖ pruned)", list((n, {"KL": v})
                                                                                         for n, v in kl.items()),
                          {"KL": "#9467bd"}, None))
    if fused:
        every = "" if kl else "every block: "
        parts.append(f"<p>No attention maps for {every}{html.escape(', '.join(fused))}: the attention is a fused op "
                     "(no Softmax tensor to read).</p>")
    if report.attention_maps:
        first = report.attention_maps[0]
        parts.append(f"<p>The {len(report.attention_maps)} heads whose attention changed most on held-back sample "
                     f"{first.sample} (rows: queries, columns: keys; colour: square root of the probability over "
                     f"the larger of the pair's maxima) {colour_bar()}</p>")
        parts.append('<div class="maps">' + "".join(_map_pair(s) for s in report.attention_maps) + "</div>")
    return "\n".join(parts) + "\n"


def _map_pair(sample) -> str:
    downsampled = ("" if tuple(sample.shape) == tuple(sample.tokens)
                   else f", drawn as {sample.shape[0]}×{sample.shape[1]}")
    caption = (f"{sample.block}, head {sample.head}: KL {sample.kl:.3g} "
               f"({sample.tokens[0]}×{sample.tokens[1]} tokens{downsampled}, max {sample.scale:.3g})")
    images = "".join(f"<div>{heatmap(sample.codes(which), MAP_PIXELS, f'{which}: {caption}')}{which}</div>"
                     for which in ("original", "pruned"))
    return f'<figure><div class="pair">{images}</div><figcaption>{html.escape(caption)}</figcaption></figure>'


def _table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _g(value: float) -> str:
    return f"{value:.3g}"
