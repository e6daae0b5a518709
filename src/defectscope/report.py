"""Pictures for people: heatmap overlays of anomaly maps on their images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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
