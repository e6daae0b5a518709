"""Frame checks before scoring, and "not the trained part" after: the verdict ``invalid``.

A line runs unattended, so a frame the model cannot judge must never read as a good
part. Two kinds of check, each with a name and a reason a person understands:

- **Frame checks** on the decoded image, before the detector sees it: non-finite pixels,
  a uniform (blank) frame, a black or saturated frame, exposure, contrast or sharpness
  far outside the training images', a size or aspect ratio far outside theirs. The
  limits are learned at fit time from the training images (`Gate.learn`: their range,
  widened, the more so the fewer they are) and recorded in the model file; the fixed
  ones (non-finite, uniform, a side under 16 px) hold for every model, also for files
  fitted before frame checks existed (`Gate.fixed`).
- **Not the trained part**, on the anomaly map: a defect is local, so most of a defective
  part's patches still look like the training images; an image of another product has
  most of its patches unlike them. The check compares the map's median with the
  training images' own map medians, each scored by a model that did not see it (the
  scores the threshold comes from): above ``NOT_PART_RATIO`` times their median (and
  above their largest), the image is ``invalid: not the trained part``.

Limits are deliberately wide: a check exists to catch a camera or a product that is
plainly wrong, not to second-guess the detector (`benchmarks/invalid_frames.py` measures
both sides: own test images called invalid, other products and camera faults caught).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from defectscope.data.datasets import Sample
from defectscope.data.images import crop_content
from defectscope.errors import DataError, ModelFileError

log = logging.getLogger("defectscope")
GATE_VERSION = 1
GREY_LEVEL = 1 / 255
UNIFORM_FIXED = 0.995  # share of pixels within 2 grey levels of the median: a blank frame for any model
MIN_SIDE_FIXED = 16  # pixels: smaller images are never judged
NOT_PART_RATIO = 1.5  # map median over the training images' typical map median
MARGIN_SHARE = 0.2  # shares of pixels: widen by max(0.2, the training range) on each side
SMALL_SET = 10  # margins grow by (1 + SMALL_SET / n): a few training images underestimate the spread
EXPOSURE_FACTOR = 4.0  # mean grey below a quarter of the darkest training image's (or as far towards white)
MARGIN_FACTOR = {"contrast": 4.0, "sharpness": 3.0, "height": 2.0, "width": 2.0, "aspect": 1.5}


def frame_stats(sample: Sample) -> dict[str, float]:
    """Cheap statistics of the frame as the network sees it (content only, grey levels)."""
    grey = crop_content(sample.image, sample.geometry).mean(0)
    h, w = sample.geometry.original
    size = {"height": float(h), "width": float(w), "aspect": w / h}
    bad = int((~torch.isfinite(grey)).sum())
    if bad:
        return {"nonfinite": bad / grey.numel(), **size}
    med = grey.median()
    std = float(grey.std()) if grey.numel() > 1 else 0.0
    edges = 0.0
    if min(grey.shape) > 1:
        edges = float((grey[:, 1:] - grey[:, :-1]).abs().mean() + (grey[1:] - grey[:-1]).abs().mean())
    return {
        "nonfinite": 0.0,
        "uniform": float(((grey - med).abs() <= 2 * GREY_LEVEL).float().mean()),
        "dark": float((grey <= 2 * GREY_LEVEL).float().mean()),
        "bright": float((grey >= 1 - 2 * GREY_LEVEL).float().mean()),
        "brightness": float(grey.mean()),
        "contrast": std,
        "sharpness": edges / max(std, 1e-3),
        **size,
    }


def _share(value: float) -> str:
    return f"{100 * value:.1f}%"


@dataclass(frozen=True)
class Check:
    """One named check: its statistic, and how to say what is wrong with a value."""

    name: str
    stat: str
    explain: str  # format string with {value} and {limits}


UNIFORM = Check("uniform", "uniform", "frame is uniform: {value} of pixels within 2 grey levels; camera covered, off or unlit?")
CHECKS = (
    Check("black", "dark", "frame is black: {value} of pixels at black (training images: up to {hi}); lens cap, light off or camera covered?"),
    Check("saturated", "bright", "frame is saturated: {value} of pixels at full white (training images: up to {hi}); overexposed or a light in the lens?"),
    Check("exposure", "brightness", "exposure far outside the training images': mean grey {value} (training: {lo} to {hi}); check the light and the exposure time"),
    Check("contrast", "contrast", "contrast far outside the training images': {value} (training: {lo} to {hi}); fog, glare, or a different part?"),
    Check("sharpness", "sharpness", "edge strength far outside the training images': {value} (training: {lo} to {hi}); out of focus, motion blur or sensor noise?"),
    Check("height", "height", "image is {value} px high; the model was trained on images {lo} to {hi} px high: a crop or another camera?"),
    Check("width", "width", "image is {value} px wide; the model was trained on images {lo} to {hi} px wide: a crop or another camera?"),
    Check("aspect", "aspect", "aspect ratio (width / height) {value} is far from the training images' {lo} to {hi}: a crop or another camera?"),
)
SHARE_STATS = ("dark", "bright")


def _fmt(stat: str, value: float) -> str:
    if stat in ("uniform", "dark", "bright"):
        return _share(value)
    if stat in ("height", "width"):
        return f"{value:.0f}"
    return f"{value:.3g}"


def _widen(stat: str, values: np.ndarray) -> tuple[float, float]:
    """The accepted range of a statistic from its training values (see module docstring):
    shares widen by a margin, the rest by a factor, both larger for few training images."""
    lo, hi = float(values.min()), float(values.max())
    grow = 1 + SMALL_SET / len(values)
    if stat in SHARE_STATS:
        margin = grow * max(MARGIN_SHARE, hi - lo)
        return lo - margin, hi + margin
    if stat == "brightness":
        factor = EXPOSURE_FACTOR**grow
        return lo / factor, 1 - (1 - hi) / factor
    factor = MARGIN_FACTOR[stat] ** grow
    return lo / factor, hi * factor


@dataclass
class Gate:
    """The limits a model judges frames by (learned at fit time, or only the fixed ones)."""

    limits: dict[str, tuple[float, float]] = field(default_factory=dict)
    not_part: float | None = None  # map-median limit ("not the trained part"); None: not checked
    n_images: int = 0
    learned: bool = False

    @classmethod
    def fixed(cls) -> Gate:
        """Only the checks that need no training images (zero-shot models, old model files)."""
        return cls()

    @classmethod
    def learn(cls, stats: Sequence[dict[str, float]]) -> Gate:
        """Frame limits from the training images' `frame_stats` (see `refuse_training_frame`)."""
        if not stats:
            return cls.fixed()
        limits = {}
        for check in CHECKS:
            values = np.array([s[check.stat] for s in stats], dtype=np.float64)
            limits[check.stat] = _widen(check.stat, values)
        return cls(limits, None, len(stats), True)

    def with_map_medians(self, medians: np.ndarray | None) -> Gate:
        """This gate with the "not the trained part" limit from unseen training images' map medians."""
        if medians is None or len(medians) < 2:
            return self
        medians = np.asarray(medians, dtype=np.float64)
        typical = float(np.median(medians))
        if not np.all(np.isfinite(medians)) or typical <= 0:
            log.warning("The training images' map medians are not positive numbers; the 'not the trained part' check is off.")
            return self
        return Gate(self.limits, max(NOT_PART_RATIO * typical, float(medians.max())), self.n_images, self.learned)

    def check_frame(self, sample: Sample) -> str | None:
        """The reason this frame cannot be judged, or None when it may be scored."""
        return self.check_stats(frame_stats(sample))

    def check_stats(self, stats: dict[str, float]) -> str | None:
        """`check_frame` on a frame's `frame_stats` already computed."""
        h, w = int(stats["height"]), int(stats["width"])
        if stats["nonfinite"]:
            return f"frame has non-finite pixels (NaN or infinity in {_share(stats['nonfinite'])} of it); a failing sensor or converter?"
        if min(h, w) < MIN_SIDE_FIXED:
            return f"image is {w}x{h} px, too small to judge (a part needs at least {MIN_SIDE_FIXED} px a side)"
        if stats["uniform"] >= UNIFORM_FIXED:
            return UNIFORM.explain.format(value=_share(stats["uniform"]))
        if not self.learned:
            return None
        for check in CHECKS:
            lo, hi = self.limits[check.stat]
            value = stats[check.stat]
            if not lo <= value <= hi:
                return check.explain.format(
                    value=_fmt(check.stat, value), lo=_fmt(check.stat, max(lo, 0.0)), hi=_fmt(check.stat, min(hi, 1.0) if check.stat in (*SHARE_STATS, "brightness") else hi)
                )
        return None

    def check_map(self, amap: torch.Tensor) -> str | None:
        """The reason the scored frame is not the trained part, or None."""
        if self.not_part is None:
            return None
        median = float(amap.median())
        if median > self.not_part:
            return (
                f"not the trained part: most of the image is unlike the training images (median map value {median:.4g}, "
                f"limit {self.not_part:.4g}); another product, or the part out of place?"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": GATE_VERSION,
            "limits": {k: list(v) for k, v in self.limits.items()},
            "not_part": self.not_part,
            "n_images": self.n_images,
        }

    @classmethod
    def from_extra(cls, extra: dict[str, Any], source: str) -> Gate:
        """The gate a model file (or exported graph) records; the fixed checks, with a warning,
        for a file written before frame checks existed or a zero-shot model."""
        raw = extra.get("gate")
        if raw is None:
            if extra.get("threshold") is not None:
                log.warning(
                    "%s records no frame limits (fitted before frame checks existed): only the fixed checks apply "
                    "(non-finite, blank, tiny frames). Refit it to check exposure, size and 'not the trained part'.", source
                )
            return cls.fixed()
        try:
            if raw["version"] != GATE_VERSION:
                raise ValueError(f"frame-check format {raw['version']}")
            limits = {k: (float(v[0]), float(v[1])) for k, v in raw["limits"].items()}
            not_part = None if raw["not_part"] is None else float(raw["not_part"])
            missing = {c.stat for c in CHECKS} - limits.keys() if limits else set()
            if missing or (not_part is not None and not math.isfinite(not_part)):
                raise ValueError(f"missing or bad limits {sorted(missing)}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source} has damaged frame limits ({exc}); refit the model.") from exc
        return cls(limits, not_part, int(raw.get("n_images", 0)), bool(limits))


def refuse_training_frame(sample: Sample) -> dict[str, float]:
    """A training image's `frame_stats`, or a `DataError` naming it when no model should learn
    from it (non-finite pixels, a blank frame, a side under 16 px)."""
    stats = frame_stats(sample)
    reason = Gate.fixed().check_stats(stats)
    if reason is not None:
        raise DataError(f"Training image {sample.path}: {reason}. Remove it from the training images.")
    return stats


def learn_frames(samples: Iterable[Sample]) -> Gate:
    """The frame limits of a set of training samples (every one checked first)."""
    return Gate.learn([refuse_training_frame(s) for s in samples])
