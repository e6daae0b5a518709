"""Defects teach too: a station's reviews become labelled training data for a new model.

An inspector's "defect confirmed" keeps the image as a labelled defect, and an outline
drawn on the review page (boxes or polygons in the image's pixels) becomes its mask,
``<store>/outlines/<result id>.png``. `retrain` fits a new model from the normal training
images (the folder the model was fitted on, recorded in its file, or one given), the
images reviewed as good parts, and the reviewed defects: with the model's own method when
it learns from defects, else SuperSimpleNet on the model's backbone and input size. The
threshold is a stated false-alarm rate on normal images only (`pipeline.fit`): the
reviewed defects never enter it. The station runs this in the background and serves the
result as a new version; `defectscope retrain STORE -o NEW` does the same offline.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from defectscope import pipeline
from defectscope.data.datasets import Record, training_records
from defectscope.data.images import image_size
from defectscope.decision.thresholds import DEFAULT_FALSE_ALARM_RATE
from defectscope.detectors.base import Detector, Progress, make_detector, method_class
from defectscope.errors import ConfigError, DataError
from defectscope.modelfiles.artifacts import read_manifest
from defectscope.serve.store import Result, SQLiteStore, outline_name

TRAINED_ON = "trained_on"  # the model file's record of the normal images it was fitted on
BASE_OPTIONS = ("backbone", "stages", "weights", "sigma")  # what a retrained SuperSimpleNet keeps of another method


def outline_path(store: SQLiteStore, result_id: str) -> Path:
    return store.root / outline_name(result_id)


def save_outline(store: SQLiteStore, result: Result, shapes: dict[str, list[Any]]) -> Path:
    """Rasterise ``{"boxes": [[x0, y0, x1, y1], ...], "polygons": [[[x, y], ...], ...]}`` (the
    image's pixels) into the result's mask, written atomically; an empty outline removes it."""
    image = store.root / result.image_file
    if result.purged is not None or not image.is_file():
        raise DataError(f"Result {result.id}'s image was deleted by the store's retention rule; it cannot be outlined.")
    h, w = image_size(image)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    try:
        for x0, y0, x1, y1 in shapes.get("boxes", []):
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=255)
        for polygon in shapes.get("polygons", []):
            if len(polygon) < 3:
                raise DataError(f"A polygon needs at least 3 points, got {len(polygon)}.")
            draw.polygon([(float(x), float(y)) for x, y in polygon], fill=255)
    except (TypeError, ValueError) as exc:
        raise DataError(f"An outline is boxes [x0, y0, x1, y1] and polygons [[x, y], ...] in pixels ({exc}).") from exc
    path = outline_path(store, result.id)
    if not np.asarray(mask).any():
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        mask.save(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def reviewed_records(store: SQLiteStore) -> tuple[list[Record], list[Record]]:
    """(images reviewed as good parts, reviewed defects with their outlines where drawn),
    for the images the store still keeps."""
    normal, defects = [], []
    for r in store.reviewed():
        image = store.root / r.image_file
        if r.purged is not None or not image.is_file():
            continue
        if r.review == "normal":
            normal.append(Record(image))
        else:
            outline = outline_path(store, r.id)
            defects.append(Record(image, 1, "reviewed", outline if outline.is_file() else None))
    return normal, defects


def retrain_detector(manifest: dict[str, Any], options: dict[str, Any] | None = None) -> Detector:
    """The detector to retrain a model (its file's manifest) as: its method and options when
    it learns from defects, else SuperSimpleNet on its backbone and input size; ``options``
    on top."""
    method, config = manifest["method"], manifest["config"]
    if not method_class(method).learns_from_defects:
        kept = {k: config[k] for k in BASE_OPTIONS if k in config}
        size = config.get("preprocess", {}).get("size")
        config, method = {**kept, **({"preprocess": {"size": size}} if size else {})}, "supersimplenet"
    return make_detector(method, **{**config, **(options or {})})


def retrain(
    store: SQLiteStore, model: Path, *, normals: str | Path | None = None, options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[Detector, dict[str, Any], dict[str, Any]]:
    """Fit a new model from the normal images, the reviewed good parts and the reviewed
    defects (module docstring). Returns the fitted detector, what its file records (its
    threshold and the rest of `pipeline.Fitted.extra`, the normal images' folder for the
    next retraining, its parent's hash) and a summary of what it learned from."""
    manifest = read_manifest(model)
    recorded = manifest.get("extra", {}).get(TRAINED_ON)
    source = normals or recorded
    if source is None:
        raise ConfigError(
            f"{model.name} does not record the normal images it was fitted on; give them (retrain --normals DIR, "
            "or serve --retrain-normals DIR)."
        )
    if not Path(source).is_dir():
        raise DataError(f"The normal images {source} are not there any more; give the folder (--normals DIR).")
    good, defects = reviewed_records(store)
    if not defects:
        raise ConfigError("No reviewed defects to learn from yet; confirm defects on the review page first.")
    detector = retrain_detector(manifest, options)
    threshold = manifest.get("extra", {}).get("threshold") or {}
    rate = threshold.get("false_alarm_rate") or DEFAULT_FALSE_ALARM_RATE
    normal = training_records(source) + good
    fitted = pipeline.fit(detector, normal, false_alarm_rate=rate, defects=defects, progress=progress)
    summary = {
        "method": detector.name, "normal_images": len(normal), "reviewed_good": len(good),
        "reviewed_defects": len(defects), "outlined": sum(r.mask_path is not None for r in defects),
    }
    extra = {**fitted.extra(), TRAINED_ON: str(source), "parent": manifest["sha256"][:12]}
    return fitted.detector, extra, summary
