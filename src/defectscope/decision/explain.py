"""Findings from an anomaly map: the verdict, the regions above a level, where and how big.

A region is a connected component (8-connectivity) of the map at or above ``level``,
in the original image's pixels. Its position on a 3 x 3 grid ("top left" ... "bottom
right") is the one AnomalyGPT's answers use; its elongation is the ratio of the axes of
its pixels' second moments (1 = round, large = a line, as a crack). Severity is
Anomaly-OV's adverb from score / threshold. Everything a station or an answer says comes
from a `Finding`, so it can never say what the map does not show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from defectscope.decision.verdict import decide

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
    elongation: float = 1.0  # major / minor axis of the region's pixels (1 = round)
    kind: str | None = None  # defect type named by the nearest prototype (`defect_types`), if asked
    kind_similarity: float | None = None

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
            elongation(labels[box] == i + 1),
        ))
    return sorted(regions, key=lambda r: -r.peak)[:limit]


def elongation(mask: np.ndarray) -> float:
    """sqrt of the ratio of the eigenvalues of the pixels' coordinate covariance (>= 1);
    each eigenvalue is at least 1/12, the variance of one pixel's own extent, so a
    one-pixel-wide line has a finite elongation."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return 1.0
    small, large = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)))
    return float(np.sqrt(max(large, 1 / 12) / max(small, 1 / 12)))


SEVERITY = ((1.25, "slightly"), (2.0, "moderately"))  # score / threshold below these; above: "highly"


def severity(score: float, threshold: float) -> str:
    """Anomaly-OV's adverb for how far a score lies above the threshold."""
    ratio = score / threshold if threshold > 0 else float("inf")
    return next((word for limit, word in SEVERITY if ratio < limit), "highly")


@dataclass
class Finding:
    """What one prediction says: verdict, score against the threshold, the regions."""

    score: float | None  # None when a frame check refused the image before scoring
    threshold: float | None
    defective: bool | None  # None without a threshold, or when the frame could not be judged
    severity: str | None  # "slightly" / "moderately" / "highly" anomalous, for defective images
    regions: list[Region]
    verdict: str = "unknown"  # `verdict.decide`: normal, defect, invalid or unknown
    reason: str | None = None  # why, for invalid (and unknown)

    def to_dict(self) -> dict:
        return {**asdict(self), "regions": [r.to_dict() for r in self.regions]}


def region_level(amap: np.ndarray, threshold: float) -> float:
    """The map level regions are cut at: the threshold, or (when the smoothed map stays
    below it although the image score is above) halfway from the map's median to its peak."""
    peak = float(amap.max())
    return threshold if peak >= threshold else 0.5 * (float(np.median(amap)) + peak)


def _finding(score: float | None, threshold: float | None, regions: Callable[[], list[Region]], invalid: str | None) -> Finding:
    """The verdict (`verdict.decide`) and severity of ``score`` at ``threshold``; ``regions``
    only for a defective one."""
    verdict = decide(score, threshold, invalid)
    if verdict.label in ("invalid", "unknown"):
        return Finding(score, threshold, None, None, [], verdict.label, verdict.reason)
    if verdict.label == "normal":
        return Finding(score, threshold, False, None, [], "normal")
    return Finding(score, threshold, True, severity(score, threshold), regions(), "defect")  # type: ignore[arg-type]


def make_finding(score: float | None, amap: np.ndarray | None, threshold: float | None, *, invalid: str | None = None, limit: int = 5) -> Finding:
    """The finding of one image's score and anomaly map (original size) at ``threshold``;
    ``invalid``: the reason a frame check gave."""
    return _finding(score, threshold, lambda: find_regions(amap, region_level(amap, threshold), limit=limit), invalid)


def stored_finding(score: float | None, threshold: float | None, regions: list[dict], *, invalid: str | None = None) -> Finding:
    """A finding rebuilt from a recorded result (the station's store), without rescoring."""
    return _finding(score, threshold, lambda: [Region(**r) for r in regions], invalid)
