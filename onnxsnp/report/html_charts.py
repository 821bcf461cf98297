"""The report page's pictures, inline and without a plotting library: grouped bar charts and
line charts as SVG, heatmaps as PNG data URIs (a few lines of zlib: no image library needed)."""
from __future__ import annotations

import base64
import html
import math
import struct
import zlib

import numpy as np

# viridis at five stops: dark for small values, so that the few large attention weights stand out
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
PALETTE = np.stack([np.interp(np.linspace(0, len(_STOPS) - 1, 256), np.arange(len(_STOPS)), _STOPS[:, c])
                    for c in range(3)], axis=1).round().astype(np.uint8)


def series_colours(count: int) -> list[str]:
    """`count` distinguishable colours along the palette (its light end left out: white page)."""
    picks = np.linspace(0, 200, max(count, 1)).round().astype(int)
    return ["#%02x%02x%02x" % tuple(int(c) for c in PALETTE[i]) for i in picks[:count]]


def bars(title: str, groups: list[tuple[str, dict[str, float]]], colours: dict[str, str], top: float | None,
         label_width: int = 260, width: int = 360) -> str:
    """A grouped horizontal bar chart: one row of bars per name, one bar per series."""
    height, bar = 18, 14
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
    return _svg(title, label_width + width + 120, y + 10, "".join(rows))


def lines(title: str, x_label: str, series: list[tuple[str, list[float], list[float]]], colours: list[str],
          log_y: bool = True) -> str:
    """A line chart, its y axis logarithmic (`log_y`) or linear: (name, xs, ys) per line; values
    that are None (or, on a logarithmic axis, not above zero) are left out."""
    left, top, width, height = 50, 28, 170, 130
    kept = [(name, [(x, y) for x, y in zip(xs, ys) if y is not None and (y > 0 or not log_y)]) for name, xs, ys in series]
    values = [y for _, points in kept for _, y in points]
    if not values:
        return _svg(title, left + width + 20, top + 40, f'<text x="0" y="{top + 16}" font-size="11">'
                    'no value measured' + (' above zero' if log_y else '') + '</text>')
    if log_y:
        low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        high = max(high, low + 1)
        axis, ticks = math.log10, [(10.0 ** p, f"1e{p}") for p in range(low, high + 1)]
    else:
        low, high = min(values), max(values)
        low, high = (low - 0.05, high + 0.05) if high - low < 1e-9 else (low, high)
        axis, ticks = (lambda v: v), linear_ticks(low, high)
    y_low, y_high = axis(ticks[0][0]) if log_y else low, axis(ticks[-1][0]) if log_y else high
    xs_all = [x for _, points in kept for x, _ in points]
    x_low, x_high = min(xs_all + [0.0]), max(xs_all + [1.0])

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * width,
                top + height - (axis(y) - y_low) / (y_high - y_low) * height)

    parts = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>']
    for value, label in ticks:
        _, y = at(x_low, value)
        parts.append(f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y + 3:.1f}" font-size="9" text-anchor="end">{label}</text>')
    for tick in np.linspace(x_low, x_high, 5):
        x, _ = at(tick, ticks[0][0])
        parts.append(f'<text x="{x:.1f}" y="{top + height + 12}" font-size="9" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{top + height + 26}" font-size="10" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    for (name, points), colour in zip(kept, colours):
        if not points:
            continue
        drawn = " ".join("%.1f,%.1f" % at(x, y) for x, y in points)
        parts.append(f'<polyline class="line" points="{drawn}" fill="none" stroke="{colour}" stroke-width="2">'
                     f'<title>{html.escape(name)}</title></polyline>'
                     + "".join('<circle cx="%.1f" cy="%.1f" r="2" fill="%s"/>' % (*at(x, y), colour)
                               for x, y in points))
    return _svg(title, left + width + 20, top + height + 34, "".join(parts))


def linear_ticks(low: float, high: float, count: int = 5) -> list[tuple[float, str]]:
    """`count` evenly spaced ticks from `low` to `high`, labelled with as many decimals as tell
    them apart (0.999 and 1 are not both "1")."""
    values = np.linspace(low, high, count)
    step = (high - low) / max(count - 1, 1)
    if step <= 0:
        return [(float(v), f"{v:.3f}") for v in values]
    power = math.floor(math.log10(step))
    decimals = max(0, -power + (1 if step / 10.0 ** power < 2 else 0))  # 0.12 apart: two decimals
    return [(float(v), f"{v:.{decimals}f}") for v in values]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (higher is better on both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(ox >= x and oy >= y and (ox, oy) != (x, y) for ox, oy in points)]


def trade_off(title: str, x_label: str, y_label: str, points: list[tuple[str, float, float]],
              reference: tuple[str, float, float] | None = None) -> str:
    """A scatter of labelled points (label, x, y), higher better on both axes; the points on the
    Pareto front joined and ringed (class "pareto"), `reference` (the original) drawn apart."""
    left, top, width, height = 64, 30, 460, 300
    every = points + ([reference] if reference else [])
    xs, ys = [p[1] for p in every], [p[2] for p in every]
    x_pad, y_pad = max((max(xs) - min(xs)) * 0.08, 0.02), max((max(ys) - min(ys)) * 0.08, 0.001)
    x_low, x_high, y_low, y_high = min(xs) - x_pad, max(xs) + x_pad, min(ys) - y_pad, max(ys) + y_pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * width, top + height - (y - y_low) / (y_high - y_low) * height)

    parts = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>']
    for value, label in linear_ticks(y_low, y_high, 6):
        y = at(x_low, value)[1]
        parts.append(f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    for value, label in linear_ticks(x_low, x_high, 6):
        x = at(value, y_low)[0]
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + height}" stroke="#eee"/>'
                     f'<text x="{x:.1f}" y="{top + height + 15}" font-size="11" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{top + height + 32}" font-size="12" text-anchor="middle">'
                 f'{html.escape(x_label)}</text><text transform="translate(14,{top + height / 2}) rotate(-90)" '
                 f'font-size="12" text-anchor="middle">{html.escape(y_label)}</text>')
    front = sorted(pareto([(x, y) for _, x, y in points]), key=lambda i: points[i][1])
    if len(front) > 1:
        drawn = " ".join("%.1f,%.1f" % at(points[i][1], points[i][2]) for i in front)
        parts.append(f'<polyline points="{drawn}" fill="none" stroke="#1f77b4" stroke-width="1.5" '
                     'stroke-dasharray="4 3"/>')
    for i, (label, x, y) in enumerate(points):
        cx, cy = at(x, y)
        ring = (f'<circle class="pareto" cx="{cx:.1f}" cy="{cy:.1f}" r="8" fill="none" stroke="#1f77b4" '
                'stroke-width="2"/>') if i in front else ""
        parts.append(f'{ring}<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="#ff7f0e">'
                     f'<title>{html.escape(label)}: {x:.3g}, {y:.4g}</title></circle>'
                     f'<text x="{cx + 10:.1f}" y="{cy - 8:.1f}" font-size="11">{html.escape(label)}</text>')
    if reference:
        label, x, y = reference
        cx, cy = at(x, y)
        parts.append(f'<rect class="original" x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" '
                     f'fill="#2ca02c"><title>{html.escape(label)}</title></rect>'
                     f'<text x="{cx + 10:.1f}" y="{cy + 4:.1f}" font-size="11">{html.escape(label)}</text>')
    return _svg(title, left + width + 90, top + height + 42, "".join(parts))


def tint(colour: str, share: float = 0.45) -> str:
    """`colour` (#rrggbb) mixed with white, keeping `share` of it."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#%02x%02x%02x" % tuple(round(255 - share * (255 - c)) for c in rgb)


def legend(names: list[str], colours: list[str]) -> str:
    return "".join(f'<span class="key"><span style="background:{c}"></span>{html.escape(n)}</span>'
                   for n, c in zip(names, colours))


def heatmap(codes: np.ndarray, pixels: int, label: str, css_class: str = "map") -> str:
    """8-bit codes (rows, columns) as an <img>, `pixels` on its longer side, cells kept square."""
    rows, columns = codes.shape
    cell = max(1, pixels // max(rows, columns))
    label = html.escape(label)
    return (f'<img class="{css_class}" alt="{label}" title="{label}" width="{columns * cell}" height="{rows * cell}" '
            f'src="{png_data_uri(PALETTE[codes])}">')


def png_data_uri(rgb: np.ndarray) -> str:
    """An (h, w, 3) uint8 image as a PNG data URI."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def colour_bar() -> str:
    """The palette from code 0 to 255, 256 pixels wide."""
    return heatmap(np.tile(np.arange(256, dtype=np.uint8), (10, 1)), 256, "colour scale", "scale")


def _svg(title: str, width: float, height: float, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}"><text x="0" y="16" font-size="13" font-weight="bold">'
            f'{html.escape(title)}</text>{body}</svg>')
