"""The user's jobs end to end: fit from a folder (with a threshold), and scoring images.

Fitting uses every normal image and sets the decision threshold at a stated false-alarm
rate from the normal scores of *all* training images, each scored by a model that did not
see it (`Detector.fit_scored`: leave-one-image-out for memory banks, cross-fitting for the
rest). The old rule, holding out a seeded fraction, is ``holdout > 0``. With a validation
set that has defective images the threshold is F1-optimal instead; a validation set that
is the test split (or the training images) is refused unless forced.

Before any of that, every training image is decoded once and checked (`gate.learn_frames`):
an unreadable, blank or non-finite training image stops the fit, naming the file, and the
frame limits the model will judge new images by are learned from the rest. The "not the
trained part" limit comes from the same unseen-image map medians as the threshold.
Scoring is `scoring.score_samples`, the one way every path scores images (batch runs into
a folder are `defectscope.engines.local`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.datasets import Record, defect_records, iter_samples, load_dataset, load_folder, training_records
from defectscope.data.images import IMAGE_SUFFIXES
from defectscope.data.tiles import training_samples
from defectscope.decision.gate import Gate, learn_frames
from defectscope.decision.scoring import Judge
from defectscope.decision.thresholds import DEFAULT_FALSE_ALARM_RATE, Threshold, choose, from_normal
from defectscope.detectors.base import Detector, Progress
from defectscope.errors import ConfigError, DataError
from defectscope.evaluation.evaluate import score_records

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
    """A fitted detector with its threshold, the map range used to colour heatmaps, and
    the frame limits it judges new images by."""

    detector: Detector
    threshold: Threshold | None
    map_range: tuple[float, float] | None
    gate: Gate = field(default_factory=Gate.fixed)

    def extra(self) -> dict[str, Any]:
        return {
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "map_range": self.map_range,
            "gate": self.gate.to_dict(),
        }

    def judge(self) -> Judge:
        """How this model decides: its threshold and frame limits (as a saved file would)."""
        return Judge(None if self.threshold is None else self.threshold.value, self.gate)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (the same image under another name is the same image)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_validation(validation: list[Record], train: list[Record], test_of: str | Path | None, *, force: bool) -> None:
    """Refuse (unless ``force``) a validation set that shares images with the training
    images or with the test split of ``test_of``: a threshold tuned there makes every
    number later measured on that split optimistic."""
    val = {file_digest(r.path): r.path for r in validation}
    against = [("training images", train)]
    if test_of is not None and (Path(test_of) / "test").is_dir():
        against.append((f"test split of {test_of}", load_dataset(test_of, require_masks=False, validate=False).test))
    for what, records in against:
        shared = [val[d] for d in {file_digest(r.path) for r in records} & val.keys()]
        if not shared:
            continue
        message = (
            f"{len(shared)} of {len(val)} validation images are also the {what} (e.g. {shared[0]}): a threshold "
            "chosen on them flatters every result measured there. Use a separate validation folder"
        )
        if not force:
            raise ConfigError(message + ", or pass --force to use it anyway.")
        log.warning("%s; used anyway (--force).", message)


def fit(
    detector: Detector,
    data: str | Path | list[Record] | None,
    *,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    holdout: float = 0.0,
    validation: str | Path | None = None,
    test_of: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
    defects: str | Path | list[Record] | None = None,
    progress: Progress | None = None,
) -> Fitted:
    """Fit on the normal images of ``data`` (a folder or its records) and derive a threshold
    (see module docstring). ``test_of``: the dataset whose test split a validation set must
    not be (default: ``data`` when it is a folder). ``defects``: labelled defective images
    (a folder, see `defect_records`, or records) for a method that learns from them; they
    train the model and never enter the threshold, which stays a false-alarm rate on
    normal images."""
    if defects is not None:
        detector.use_defects(defects if isinstance(defects, list) else defect_records(defects))
    if data is None:
        detector.fit(None, progress=progress)
        return Fitted(detector, None, None)
    records = data if isinstance(data, list) else training_records(data)
    if validation is not None and test_of is None and not isinstance(data, list):
        test_of = data
    frames = learn_frames(iter_samples(records, detector.preprocess))
    return _fit_threshold(detector, records, frames, false_alarm_rate, holdout, validation, test_of, force, seed, progress)


def _fit_threshold(
    detector: Detector, records: list[Record], frames: Gate, false_alarm_rate: float, holdout: float,
    validation: str | Path | None, test_of: str | Path | None, force: bool, seed: int, progress: Progress | None,
) -> Fitted:
    """`fit` once the training images are checked: the detector, its threshold and map range."""
    if validation is not None:
        val = load_dataset(validation).test
        check_validation(val, records, test_of, force=force)
        detector.fit(training_samples(records, detector.preprocess), progress=progress)
        return _from_scored(detector, val, false_alarm_rate, "validation", frames, progress)
    if holdout > 0:
        fit_recs, held = split_holdout(records, holdout, seed)
        detector.fit(training_samples(fit_recs, detector.preprocess), progress=progress)
        if held:
            return _from_scored(detector, held, false_alarm_rate, "held-out", frames, progress)
        normal = None
    else:
        normal = detector.fit_scored(records, seed=seed, progress=progress)
    if normal is None:
        log.warning("Too few normal images (%d) to score any unseen: no decision threshold is set.", len(records))
        return Fitted(detector, None, None, frames)
    threshold = from_normal(normal.scores, false_alarm_rate=false_alarm_rate, source=normal.how)
    return Fitted(detector, threshold, map_range(normal.map_low, normal.map_high, threshold), frames.with_map_medians(normal.medians))


def map_range(low: float, high: float, threshold: Threshold) -> tuple[float, float]:
    """The heatmap colour range: from the normal images' typical (median of medians) map value
    to their largest, at least the threshold (one rule for every way a threshold is set)."""
    return float(low), float(max(threshold.value, high))


def _from_scored(detector: Detector, records: list[Record], rate: float, source: str, frames: Gate, progress: Progress | None) -> Fitted:
    """Threshold, map range and "not the part" limit from scoring ``records`` (held-out
    normal or validation images)."""
    scored = score_records(detector, records, progress=progress)
    threshold = choose(scored.scores, scored.labels, false_alarm_rate=rate, source=source)
    normal = [m for m, y in zip(scored.maps, scored.labels, strict=True) if y == 0]
    medians = np.array([np.median(m) for m in normal])
    high = max(float(m.max()) for m in normal)
    return Fitted(detector, threshold, map_range(float(np.median(medians)), high, threshold), frames.with_map_medians(medians))


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A distinct file-name stem per image: its own stem, prefixed by parent folders on clashes."""
    depth = 0
    while True:
        names = {p: "__".join([*p.parent.parts[len(p.parent.parts) - depth :], p.stem]) if depth else p.stem for p in paths}
        if len(set(names.values())) == len(paths) or depth > 8:
            return names
        depth += 1


def expand_images(inputs: list[Path]) -> tuple[list[Path], int]:
    """Image paths from a mix of files and folders (folders are searched recursively), and
    how many files in those folders were left out for their suffix (not an image suffix)."""
    paths: list[Path] = []
    ignored = 0
    for p in inputs:
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            found = sorted(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES)
            ignored += len(files) - len(found)
            paths.extend(found or [r.path for r in load_folder(p)])  # load_folder explains an empty folder
        else:
            paths.append(p)
    if not paths:
        raise DataError("No images given to score.")
    for p in paths:
        if not p.is_file():
            raise DataError(f"Image not found: {p}. Check the path.")
    return paths, ignored

