"""Findings from an anomaly map: the regions above a level, where they are and how big.

A region is a connected component (8-connectivity) of the map at or above ``level``,
in the original image's pixels. Its position on a 3 x 3 grid ("top left" ... "bottom
right") is the one AnomalyGPT's answers use. Everything a station or an answer says
about *where* comes from these, so it can never say what the map does not show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")


@dataclass(frozen=True)
class Region:
    """One connected area above the level: bounding box (x, y, width, height) in pixels."""

    x: int
    y: int
    width: int
    height: int
    area: int  # pixels
    area_share: float  # of the image
    peak: float  # the map's maximum inside the region
    position: str  # 3 x 3 grid cell of the region's peak, e.g. "bottom left"

    def to_dict(self) -> dict:
        return asdict(self)


def grid_position(y: float, x: float, h: int, w: int) -> str:
    """The 3 x 3 grid cell of a point: "top left", "middle centre", ..."""
    row, col = ROWS[min(2, int(3 * y / h))], COLS[min(2, int(3 * x / w))]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def find_regions(amap: np.ndarray, level: float, *, min_area: int = 4, limit: int = 20) -> list[Region]:
    """Regions of ``amap`` (H x W) at or above ``level``, largest peak first (at most ``limit``)."""
    amap = np.asarray(amap, dtype=np.float32)
    h, w = amap.shape
    labels, n = ndimage.label(amap >= level, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(amap), labels, index)
    peaks = ndimage.maximum(amap, labels, index)
    peak_at = ndimage.maximum_position(amap, labels, index)
    regions = []
    for i, box in enumerate(ndimage.find_objects(labels)):
        if box is None or areas[i] < min_area:
            continue
        ys, xs = box
        py, px = peak_at[i]
        regions.append(Region(
            int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start),
            int(areas[i]), float(areas[i] / (h * w)), float(peaks[i]), grid_position(py, px, h, w),
        ))
    return sorted(regions, key=lambda r: -r.peak)[:limit]
