"""Choosing without peeking: PatchCore's backbone, resolution, tiles and whole-image branch
chosen on the normal training images alone (`defectscope tune DATA`).

1. The normal images are split (seeded): ``VALIDATION_SHARE`` held out, the rest to fit on.
2. The validation set: the held-out normal images, and synthetic defects made from them
   (`synthesis`), as many of each kind as there are held-out images up to ``per_kind``:
   local kinds (cutpaste, scar, scratch, perlin noise) and whole-image kinds (rotate,
   rescale, colour, remove), half and half, since a line can meet either.
3. Every candidate is fitted on the fit split and scores the validation set; candidates
   that differ only in the whole-image branch's weight share one fit (the weight changes
   only how the branch's term is added). The criterion is the mean of image AUROC and TPR
   at FPR 5% (the operating point; 1% cannot be resolved on a few dozen held-out normal
   images). Candidates run cheapest first; once ``budget_s`` is spent no new fit starts
   (the first always runs), and the table says which were not tried.
4. The best candidate is fitted on *all* normal images with the threshold as `fit` sets
   it; the table and the choice are recorded in the model file (``extra["tune"]``).

No test image is read at any step.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope import pipeline
from defectscope.data.datasets import Record
from defectscope.data.images import image_size, load_image_uint8
from defectscope.data.tiles import training_samples
from defectscope.decision.metrics import auroc, tpr_at_fpr
from defectscope.decision.thresholds import DEFAULT_FALSE_ALARM_RATE
from defectscope.detectors.base import Detector, Progress, make_detector, method_class, training_options
from defectscope.errors import ConfigError, DataError
from defectscope.evaluation.evaluate import score_records
from defectscope.synthesis import GLOBAL_KINDS, synthesize

log = logging.getLogger("defectscope")
VALIDATION_SHARE = 0.3
LOCAL_KINDS = ("cutpaste", "scar", "scratch", "noise")
MIN_IMAGES = 8  # fewer normal images cannot be split into a fit and a validation part
DEFAULT_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
DEFAULT_SIZES = (256, 384)
DEFAULT_WEIGHTS = (0.0, 0.25, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: a backbone at a size, whole images or tiles, and the
    whole-image branch's weights (several weights share one fit)."""

    backbone: str
    size: int
    tiles: bool = False
    weights: tuple[float, ...] = (0.0,)

    def options(self, weight: float, tile_scale: float) -> dict[str, Any]:
        """PatchCore options for this candidate at one branch ``weight``."""
        pre: dict[str, Any] = {"size": self.size}
        if self.tiles:
            pre = {"tile": self.size, "scale": tile_scale}
        return {"backbone": self.backbone, "preprocess": pre, "whole_image": weight}

    def label(self, weight: float) -> str:
        where = "tiles" if self.tiles else "whole image"
        branch = f", whole-image branch w={weight:g}" if weight else ""
        return f"{self.backbone} {self.size}px {where}{branch}"


@dataclass
class Tried:
    """One row of the validation table."""

    label: str
    options: dict[str, Any]
    auroc: float | None = None
    tpr_at_fpr5: float | None = None
    criterion: float | None = None
    fit_s: float | None = None
    note: str = ""


@dataclass
class TuneResult:
    """The table, the chosen row and what the validation set held."""

    rows: list[Tried]
    choice: Tried
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "choice": self.choice.label, "options": self.choice.options, "validation": self.validation}

    def to_markdown(self) -> str:
        lines = ["| candidate | image AUROC | TPR@FPR5% | criterion | fit s | |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            cells = [f"{v:.3f}" if v is not None else "-" for v in (r.auroc, r.tpr_at_fpr5, r.criterion)]
            fit = "-" if r.fit_s is None else f"{r.fit_s:.1f}"
            mark = "**chosen**" if r is self.choice else r.note
            lines.append(f"| {r.label} | {' | '.join(cells)} | {fit} | {mark} |")
        return "\n".join(lines)


def default_grid(
    backbones: Sequence[str] = DEFAULT_BACKBONES, sizes: Sequence[int] = DEFAULT_SIZES,
    weights: Sequence[float] = DEFAULT_WEIGHTS, tiles: bool = True,
) -> list[Candidate]:
    """Whole-image candidates (every backbone and size, each with the branch's weights),
    then tiles at the smallest size with the first backbone, cheapest first."""
    if not (backbones and sizes and weights):
        raise ConfigError("tune needs at least one backbone, one size and one whole-image weight to try.")
    grid = [Candidate(b, s, False, tuple(weights)) for s in sorted(sizes) for b in backbones]
    if tiles:
        grid.append(Candidate(backbones[0], min(sizes), True, (0.0,)))
    return grid


def validation_set(held: Sequence[Record], out: Path, per_kind: int, seed: int) -> list[Record]:
    """The held-out normal records and synthetic defects made from them (module docstring)."""
    rng = np.random.default_rng(seed)
    records = list(held)
    n = min(per_kind, len(held))
    for kind in (*LOCAL_KINDS, *GLOBAL_KINDS):
        (out / kind).mkdir(parents=True)
        for j, base in enumerate(rng.permutation(len(held))[:n].tolist()):
            image, mask = synthesize(load_image_uint8(held[base].path), kind, rng)
            path = out / kind / f"{j:04d}.png"
            Image.fromarray(image).save(path)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / kind / f"{j:04d}_mask.png")
            records.append(Record(path, 1, kind, out / kind / f"{j:04d}_mask.png"))
    return records


def tile_scale(records: Sequence[Record], size: int) -> float:
    """The scale at which the median training image's long side is twice ``size`` (tiles
    then see the part at twice the whole-image candidate's resolution)."""
    long_sides = [max(image_size(r.path)) for r in records[:64]]
    return round(2 * size / float(np.median(long_sides)), 4)


def run_candidates(
    fit_records: Sequence[Record], validation: Sequence[Record], grid: Sequence[Candidate], *,
    budget_s: float, scale: float, progress: Progress | None = None,
) -> Iterator[tuple[Tried, Detector | None]]:
    """Fit each candidate on ``fit_records`` and score ``validation``; yields every row (one
    per branch weight) with its fitted detector (None when not tried). The budget counts
    this function's own fitting and scoring, not what the caller does between rows."""
    labels = np.array([r.label for r in validation])
    spent = 0.0
    for i, cand in enumerate(grid):
        options = [cand.options(w, scale) for w in cand.weights]
        if i > 0 and spent > budget_s:  # the first (cheapest) always runs
            for w, o in zip(cand.weights, options, strict=True):
                yield Tried(cand.label(w), o, note="not tried: over the time budget"), None
            continue
        t0 = time.perf_counter()
        fit_options = training_options("patchcore", len(fit_records), cand.options(max(cand.weights), scale))
        fitted = make_detector("patchcore", **fit_options)
        fitted.fit(training_samples(list(fit_records), fitted.preprocess))
        fit_s = time.perf_counter() - t0
        spent += fit_s
        for w, o in zip(cand.weights, options, strict=True):
            t0 = time.perf_counter()
            det = fitted if w == max(cand.weights) else method_class("patchcore").from_state(fitted.config() | {"whole_image": w}, fitted.state())
            scores = score_records(det, list(validation)).scores
            a, t = auroc(scores, labels), tpr_at_fpr(scores, labels, 0.05)
            spent += time.perf_counter() - t0
            yield Tried(cand.label(w), o, a, t, (a + t) / 2, fit_s), det
        if progress:
            progress("tune", i + 1, len(grid))


def tune(
    records: Sequence[Record], *, grid: Sequence[Candidate] | None = None, budget_s: float = 600.0,
    per_kind: int = 30, seed: int = 0, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    progress: Progress | None = None, on_candidate: Callable[[Tried, Detector], None] | None = None,
) -> tuple[pipeline.Fitted, TuneResult]:
    """Choose on a split of ``records`` (normal images only), then fit the choice on all of
    them with its threshold (module docstring). ``on_candidate`` sees every tried row with
    its fitted detector (a benchmark scores a test split there, after the choice is blind)."""
    if len(records) < MIN_IMAGES:
        raise DataError(f"tune needs at least {MIN_IMAGES} normal images to hold some out for validation; got {len(records)}. Use `fit`.")
    grid = list(grid or default_grid())
    for cand in grid:  # a bad option fails now, not after minutes of other candidates
        for w in cand.weights:
            make_detector("patchcore", **cand.options(w, 1.0))
    fit_records, held = pipeline.split_holdout(list(records), VALIDATION_SHARE, seed)
    scale = tile_scale(records, min(c.size for c in grid))
    with tempfile.TemporaryDirectory(prefix="defectscope-tune-") as tmp:
        validation = validation_set(held, Path(tmp), per_kind, seed)
        rows = []
        for row, det in run_candidates(fit_records, validation, grid, budget_s=budget_s, scale=scale, progress=progress):
            rows.append(row)
            if on_candidate is not None and det is not None:
                on_candidate(row, det)
    tried = [r for r in rows if r.criterion is not None]
    choice = max(tried, key=lambda r: r.criterion)  # on a tie the first, i.e. the cheaper
    kinds = {k: sum(r.defect == k for r in validation) for k in (*LOCAL_KINDS, *GLOBAL_KINDS)}
    result = TuneResult(rows, choice, {"fit_images": len(fit_records), "normal_images": len(held), "defects": kinds, "seed": seed})
    log.info("tune chose %s (criterion %.3f)", choice.label, choice.criterion)
    detector = make_detector("patchcore", **training_options("patchcore", len(records), choice.options))
    fitted = pipeline.fit(detector, list(records), false_alarm_rate=false_alarm_rate, seed=seed, progress=progress)
    return fitted, result
