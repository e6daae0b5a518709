"""Pictures for people: heatmap overlays, contact sheets and the HTML evaluation report."""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.components.charts import Axes, Series, histogram, line_chart
from defectscope.data.images import load_image
from defectscope.decision.metrics import curve, curve_points
from defectscope.decision.verdict import decide
from defectscope.evaluation.evaluate import COLUMNS, EvalResult, format_value, operating_point, worst_indices


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a blue-green-yellow-red ramp (no matplotlib)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 220, 120], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
    v = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(v).astype(int).clip(0, len(stops) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * stops[lo] + t * stops[lo + 1]).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float, vmax: float, alpha: float = 0.45) -> Image.Image:
    """Blend a heatmap over an H x W x 3 float image; map values are scaled by [vmin, vmax]
    (a fixed range across images, so colours mean the same score everywhere)."""
    scaled = (anomaly_map - vmin) / max(vmax - vmin, 1e-12)
    heat = colormap(scaled).astype(np.float64)
    base = np.clip(image, 0, 1) * 255.0
    return Image.fromarray((alpha * heat + (1 - alpha) * base).round().astype(np.uint8))


def save_overlay(path: Path, image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float, vmax: float) -> Path:
    """Write the original image and its overlay side by side as PNG."""
    left = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    right = overlay(image, anomaly_map, vmin=vmin, vmax=vmax)
    sheet = Image.new("RGB", (left.width * 2 + 4, left.height), (255, 255, 255))
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width + 4, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _triplet(result: EvalResult, i: int, vmin: float, vmax: float, threshold: float | None) -> str:
    """One image as original | overlay | mask at the resolution its metrics were computed at."""
    scored = result.scored
    amap = scored.maps[i]
    h, w = amap.shape
    image = np.asarray(Image.fromarray((load_image(scored.records[i].path) * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
    mask = scored.masks[i] if scored.masks[i] is not None else np.zeros((h, w), bool)
    cells = [
        Image.fromarray((image * 255).round().astype(np.uint8)),
        overlay(image, amap, vmin=vmin, vmax=vmax),
        Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"),
    ]
    score = float(scored.scores[i])
    verdict = "" if threshold is None else f" · {decide(score, threshold).label}"
    record = scored.records[i]
    imgs = "".join(f'<img src="{_png_data_uri(c)}" alt="{label}" title="{label}">' for c, label in zip(cells, ("original", "overlay", "mask"), strict=True))
    return (
        f'<figure class="case"><div class="cells">{imgs}</div><figcaption>{escape(record.path.name)} '
        f"({escape(record.defect)}) · score {score:.4g}{verdict}</figcaption></figure>"
    )


def _metric_table(result: EvalResult) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in ("defect", "images", *COLUMNS))
    body = "".join(
        "<tr>" + f"<td>{escape(str(r['defect']))}</td><td>{r['n_images']}</td>"
        + "".join(f"<td>{format_value(r.get(c))}</td>" for c in COLUMNS) + "</tr>"
        for r in result.rows
    )
    return f'<table id="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_report(result: EvalResult, path: str | Path, *, worst: int = 4) -> Path:
    """One self-contained HTML file: metric table, ROC and PRO curves, score histograms of
    good and defective images with the threshold, and the worst false alarms and misses as
    original | overlay | mask triplets (images inlined as PNG)."""
    scored = result.scored
    if scored is None:
        raise ValueError("html_report needs an EvalResult made with keep_scores=True.")
    labels = scored.labels.astype(bool)
    thr = None if result.threshold is None else float(result.threshold["value"])
    f1_thr = result.overall.get("f1_threshold")
    roc = [Series(*curve_points(curve(scored.scores, labels)), "#1f5fbf", "image")]
    if "pixel_roc" in result.curves:
        roc.append(Series(*result.curves["pixel_roc"], "#d9480f", "pixel"))
    charts = [line_chart(roc, Axes(0, 1, 0, 1, "false positive rate", "true positive rate"), "ROC", diagonal=True)]
    if "pro" in result.curves:
        charts.append(line_chart([Series(*result.curves["pro"], "#2b8a3e", "PRO")], Axes(0, 0.3, 0, 1, "false positive rate", "per-region overlap"), "PRO (FPR ≤ 0.3)"))
    lines = [(f1_thr, "#666", "F1-optimal on test")] if f1_thr is not None and np.isfinite(f1_thr) else []
    if thr is not None:
        lines.insert(0, (thr, "#000000", "threshold"))
    charts.append(histogram(
        [Series(scored.scores[~labels], np.empty(0), "#2b8a3e", "good"), Series(scored.scores[labels], np.empty(0), "#c92a2a", "defective")],
        "Image scores", "score", lines=lines,
    ))
    good = np.nonzero(~labels)[0]
    false_alarms, misses = worst_indices(scored, worst)
    normal_medians = [float(np.median(scored.maps[i])) for i in good] or [0.0]
    vmin = float(np.median(normal_medians))
    vmax = max(float(m.max()) for m in scored.maps)
    sections = [
        ("false-alarms", "Worst false alarms (good images with the highest scores)", false_alarms),
        ("misses", "Worst misses (defective images with the lowest scores)", misses),
    ]
    cases = "".join(
        f'<section id="{key}"><h2>{escape(title)}</h2>' + "".join(_triplet(result, int(i), vmin, vmax, thr) for i in idx) + "</section>"
        for key, title, idx in sections
    )
    if result.threshold is not None:
        threshold_text = escape(operating_point(result.threshold))
    else:
        threshold_text = "No threshold was set from the training images."
    cost = ", ".join(f"{escape(k)} {v:.2f}" for k, v in result.cost.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>defectscope: {escape(result.method)} on {escape(Path(result.dataset).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} .charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.case {{ margin: 8px 0; }} .cells {{ display: flex; gap: 3px; }} .cells img {{ height: 150px; max-width: 32%; object-fit: contain; border: 1px solid #ddd; }}
figcaption {{ font-size: 12px; }} .note {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>{escape(result.method)} on <code>{escape(result.dataset)}</code></h1>
<p class="note">Metrics at the network resolution on the part of each map that shows the image. {cost}</p>
{_metric_table(result)}
<p id="threshold">{threshold_text}</p>
<div class="charts">{"".join(charts)}</div>
{cases}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
