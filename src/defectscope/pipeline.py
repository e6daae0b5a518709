"""The user's jobs end to end: fit from a folder (with a threshold), predict into a folder.

Fitting holds out a seeded fraction of the normal images, scores them with the fitted
model and sets the decision threshold from those normal scores (F1-optimal instead when a
validation set with defective images is given). Predicting writes scores (CSV + JSON)
and heatmap overlays, and never overwrites an existing output file.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.datasets import Record, iter_samples, load_dataset, load_folder, training_records
from defectscope.data.images import IMAGE_SUFFIXES, load_image, to_original
from defectscope.detectors.base import Detector, Progress
from defectscope.errors import DataError
from defectscope.evaluate import score_records
from defectscope.report import save_overlay
from defectscope.thresholds import Threshold, choose

log = logging.getLogger("defectscope")
MIN_HOLDOUT = 10  # below this many training images, none are held out for the threshold


def split_holdout(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded split into (fit, held-out) records; nothing is held out from tiny sets."""
    if fraction <= 0 or len(records) < MIN_HOLDOUT:
        return records, []
    n_out = max(2, round(fraction * len(records)))
    perm = np.random.default_rng(seed).permutation(len(records))
    held = set(perm[:n_out].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


@dataclass
class Fitted:
    """A fitted detector with its threshold and the map range used to colour heatmaps."""

    detector: Detector
    threshold: Threshold | None
    map_range: tuple[float, float] | None

    def extra(self) -> dict[str, Any]:
        return {
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "map_range": self.map_range,
        }


def fit(
    detector: Detector,
    data: str | Path | list[Record] | None,
    *,
    holdout: float = 0.1,
    validation: str | Path | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> Fitted:
    """Fit on the normal images of ``data`` (a folder or its records) and derive a threshold
    (see module docstring)."""
    if data is None:
        detector.fit(None, progress=progress)
        return Fitted(detector, None, None)
    records = data if isinstance(data, list) else training_records(data)
    fit_recs, held = split_holdout(records, 0.0 if validation else holdout, seed)
    detector.fit(iter_samples(fit_recs, detector.preprocess), progress=progress)
    val = load_dataset(validation).test if validation else held
    if not val:
        log.warning("Too few normal images (%d) to hold some out: no decision threshold is set.", len(records))
        return Fitted(detector, None, None)
    scored = score_records(detector, val, progress=progress)
    threshold = choose(scored.scores, scored.labels)
    normal_maps = np.concatenate([m.ravel() for m, y in zip(scored.maps, scored.labels, strict=True) if y == 0])
    map_range = (float(np.median(normal_maps)), float(max(threshold.value, normal_maps.max())))
    return Fitted(detector, threshold, map_range)


def predict_to_folder(
    detector: Detector,
    paths: list[Path],
    out: Path,
    *,
    threshold: float | None = None,
    map_range: tuple[float, float] | None = None,
    overlays: bool = True,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Score images, write ``scores.csv``, ``scores.json`` and ``<stem>_heatmap.png`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    targets = [out / "scores.csv", out / "scores.json"]
    if overlays:
        targets += [out / f"{names[p]}_heatmap.png" for p in paths]
    clash = [t for t in targets if t.exists()]
    if clash:
        raise DataError(f"{clash[0]} already exists ({len(clash)} output files would be overwritten); use an empty --out folder.")
    rows: list[dict[str, Any]] = []
    results = []
    samples = iter_samples([Record(p) for p in paths], detector.preprocess)
    for group, pred in detector.predict_samples(samples, batch_size=1):
        for sample, score, amap in zip(group, pred.scores.tolist(), pred.maps, strict=True):
            row = {"path": sample.path, "score": score}
            if threshold is not None:
                row["defective"] = bool(score >= threshold)
            rows.append(row)
            results.append((Path(sample.path), to_original(amap, sample.geometry).numpy().astype(np.float16)))
        if progress:
            progress("predict", len(rows), len(paths))
    if overlays:
        lo, hi = map_range or (min(float(m.min()) for _, m in results), max(float(m.max()) for _, m in results))
        for path, amap in results:
            save_overlay(out / f"{names[path]}_heatmap.png", load_image(path), amap.astype(np.float32), vmin=lo, vmax=hi)
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "scores.json").write_text(json.dumps({"threshold": threshold, "images": rows}, indent=2))
    return rows


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A distinct file-name stem per image: its own stem, prefixed by parent folders on clashes."""
    depth = 0
    while True:
        names = {p: "__".join([*p.parent.parts[len(p.parent.parts) - depth :], p.stem]) if depth else p.stem for p in paths}
        if len(set(names.values())) == len(paths) or depth > 8:
            return names
        depth += 1


def expand_images(inputs: list[Path]) -> list[Path]:
    """Image paths from a mix of files and folders (folders are searched recursively)."""
    paths: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            paths.extend(found or [r.path for r in load_folder(p)])  # load_folder explains an empty folder
        else:
            paths.append(p)
    if not paths:
        raise DataError("No images given to score.")
    for p in paths:
        if not p.is_file():
            raise DataError(f"Image not found: {p}. Check the path.")
    return paths

