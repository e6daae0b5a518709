"""Small inline SVG charts (line plots and histograms) for self-contained HTML reports,
loss-curve PNGs for training runs, and contact sheets of image grids.

No plotting library: a report must open anywhere, offline, as one file, and these chart
types are all it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 380, 280
MARGIN = {"left": 48, "right": 12, "top": 44, "bottom": 40}


@dataclass(frozen=True)
class Series:
    """One line (or one histogram's bars) with its colour and legend label."""

    x: np.ndarray
    y: np.ndarray
    colour: str
    label: str


@dataclass(frozen=True)
class Axes:
    """Data ranges and labels of a chart; maps data coordinates to SVG pixels."""

    x0: float
    x1: float
    y0: float
    y1: float
    xlabel: str
    ylabel: str

    def px(self, x: np.ndarray | float) -> np.ndarray:
        span = max(self.x1 - self.x0, 1e-12)
        return MARGIN["left"] + (np.asarray(x, dtype=float) - self.x0) / span * (WIDTH - MARGIN["left"] - MARGIN["right"])

    def py(self, y: np.ndarray | float) -> np.ndarray:
        span = max(self.y1 - self.y0, 1e-12)
        return HEIGHT - MARGIN["bottom"] - (np.asarray(y, dtype=float) - self.y0) / span * (HEIGHT - MARGIN["top"] - MARGIN["bottom"])


def _frame(ax: Axes, title: str) -> list[str]:
    """Title, axes box, ticks at 0/25/50/75/100 % of each range, axis labels."""
    left, bottom = MARGIN["left"], HEIGHT - MARGIN["bottom"]
    parts = [
        f'<text x="{WIDTH / 2}" y="15" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
        (
            f'<rect x="{left}" y="{MARGIN["top"]}" width="{WIDTH - left - MARGIN["right"]}" '
            f'height="{bottom - MARGIN["top"]}" fill="none" stroke="#888"/>'
        ),
    ]
    for f in np.linspace(0, 1, 5):
        xv, yv = ax.x0 + f * (ax.x1 - ax.x0), ax.y0 + f * (ax.y1 - ax.y0)
        parts.append(f'<text x="{ax.px(xv):.1f}" y="{bottom + 14}" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 4}" y="{ax.py(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(ax.xlabel)}</text>')
    parts.append(
        f'<text transform="translate(12 {HEIGHT / 2}) rotate(-90)" text-anchor="middle">{escape(ax.ylabel)}</text>'
    )
    return parts


def _legend(series: list[Series], extra: list[tuple[str, str]] = ()) -> list[str]:
    """One row of colour keys between the title and the plot, so it never hides data."""
    out, x = [], MARGIN["left"]
    for colour, label in [(s.colour, s.label) for s in series] + list(extra):
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 13}" y="33">{escape(label)}</text>')
        x += 22 + 6 * len(label)
    return out


def _svg(parts: list[str], name: str) -> str:
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{escape(name)}" width="{WIDTH}" '
        f'height="{HEIGHT}" font-family="sans-serif" font-size="10">\n{body}\n</svg>'
    )


def line_chart(series: list[Series], ax: Axes, title: str, *, diagonal: bool = False) -> str:
    """Lines over an axes box; ``diagonal`` draws the chance line of a ROC plot."""
    parts = _frame(ax, title)
    if diagonal:
        parts.append(
            f'<line x1="{ax.px(ax.x0):.1f}" y1="{ax.py(ax.y0):.1f}" x2="{ax.px(ax.x1):.1f}" y2="{ax.py(ax.y1):.1f}" '
            'stroke="#bbb" stroke-dasharray="4 3"/>'
        )
    for s in series:
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(ax.px(s.x), ax.py(s.y), strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{s.colour}" stroke-width="1.8"/>')
    return _svg(parts + _legend(series), title)


def histogram(
    groups: list[Series], title: str, xlabel: str, *, bins: int = 30, lines: list[tuple[float, str, str]] = ()
) -> str:
    """Overlaid histograms of ``groups``' x values (y unused), shared bins, with vertical
    marker lines ``(value, colour, label)`` such as the decision threshold."""
    values = np.concatenate([g.x for g in groups if g.x.size] + [np.array([v for v, _, _ in lines])])
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(g.x, edges)[0] for g in groups]
    ax = Axes(lo, hi, 0, max(1, max(int(c.max(initial=0)) for c in counts)), xlabel, "images")
    parts = _frame(ax, title)
    width = ax.px(edges[1]) - ax.px(edges[0])
    for g, c in zip(groups, counts, strict=True):
        for left, n in zip(edges[:-1], c, strict=True):
            if n:
                top = ax.py(n)
                parts.append(
                    f'<rect x="{ax.px(left):.1f}" y="{top:.1f}" width="{width:.1f}" height="{ax.py(0) - top:.1f}" '
                    f'fill="{g.colour}" fill-opacity="0.55"/>'
                )
    for value, colour, _ in lines:
        x = ax.px(value)
        parts.append(
            f'<line class="marker" x1="{x:.1f}" y1="{MARGIN["top"]}" x2="{x:.1f}" y2="{ax.py(0):.1f}" '
            f'stroke="{colour}" stroke-width="2" stroke-dasharray="5 3"/>'
        )
    return _svg(parts + _legend(groups, [(c, label) for _, c, label in lines]), title)


def loss_curve_png(losses: list[float], path: str | Path, title: str) -> Path:
    """A training loss curve as a PNG (per-step loss, light; its 20-step moving mean, dark),
    drawn with Pillow: training writes it next to its output file."""
    from PIL import Image, ImageDraw

    y = np.asarray(losses, dtype=float)
    x = np.arange(1, len(y) + 1, dtype=float)
    lo, hi = (float(y.min()), float(y.max())) if len(y) else (0.0, 1.0)
    ax = Axes(1.0, float(max(len(y), 2)), lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo) + 1e-9, "step", "loss")
    scale = 2
    img = Image.new("RGB", (WIDTH * scale, HEIGHT * scale), "white")
    draw = ImageDraw.Draw(img)
    left, right = MARGIN["left"] * scale, (WIDTH - MARGIN["right"]) * scale
    top, bottom = MARGIN["top"] * scale, (HEIGHT - MARGIN["bottom"]) * scale
    draw.rectangle([left, top, right, bottom], outline="#888888")
    window = min(20, max(len(y), 1))
    mean = np.convolve(y, np.ones(window) / window, mode="valid") if len(y) else y
    for values, offset, colour in ((y, 0, "#9ecae1"), (mean, window - 1, "#08519c")):
        if len(values) > 1:
            points = list(zip((ax.px(x[offset:]) * scale).tolist(), (ax.py(values) * scale).tolist(), strict=True))
            draw.line(points, fill=colour, width=2)
    draw.text((left, 8 * scale), title, fill="black")
    draw.text((left, bottom + 8 * scale), f"step 1 .. {len(y)}", fill="black")
    draw.text((4, top), f"{hi:.3g}", fill="black")
    draw.text((4, bottom - 12), f"{lo:.3g}", fill="black")
    path = Path(path)
    img.save(path)
    return path


def _thumb(arr: np.ndarray, cell: int) -> Image.Image:
    img = Image.fromarray(arr if arr.dtype == np.uint8 else (arr.astype(np.uint8) * 255)).convert("RGB")
    img.thumbnail((cell, cell))
    return img


def contact_sheet(rows: list[list[np.ndarray]], path: Path, *, cell: int = 160, labels: list[str] | None = None) -> Path:
    """A grid of images (uint8 arrays or bool masks), one list per row, saved as PNG."""
    cols = max(len(r) for r in rows)
    pad, label_h = 4, 14 if labels else 0
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, len(rows) * (cell + pad + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = pad + r * (cell + pad + label_h)
        if labels:
            draw.text((pad, y), labels[r], fill=(0, 0, 0))
        for c, arr in enumerate(row):
            sheet.paste(_thumb(arr, cell), (pad + c * (cell + pad), y + label_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
