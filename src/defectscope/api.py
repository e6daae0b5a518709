"""The Python face of defectscope: `fit`, `load`, `Model.predict` -> `Result`, `evaluate`.

For the people who wire a detector into a line (a camera callback, a PLC bridge, a
notebook)::

    import defectscope as ds
    model = ds.fit("data/", method="patchcore")      # folder, MVTec layout, or a list of paths
    model.save("line3.dscope"); model = ds.load("line3.dscope")   # also .onnx / .xml
    r = model.predict("part.png")                     # path, PIL image, or numpy array
    r.score, r.threshold, r.verdict, r.anomaly_map, r.regions, r.overlay()

The same code paths as the CLI, never a second way to score: `pipeline.fit` (frame
limits, the threshold from the training images), `scoring.score_samples` (frame checks,
the verdict rule), the model file's recorded threshold, map range and tiling, and
`engines.local.predict_folder` for folders. Errors are the CLI's `DefectscopeError`s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope import pipeline
from defectscope.data.datasets import Record, Sample, load_sample, training_records
from defectscope.data.images import image_array, load_image
from defectscope.decision.answers import Answer, answer
from defectscope.decision.explain import Finding, make_finding
from defectscope.decision.scoring import Judge, score_samples
from defectscope.decision.thresholds import DEFAULT_FALSE_ALARM_RATE, Threshold
from defectscope.detectors import make_detector
from defectscope.detectors.base import Detector, Progress
from defectscope.engines.local import RunSummary, predict_folder
from defectscope.errors import ConfigError, DataError
from defectscope.evaluation.evaluate import EvalResult
from defectscope.evaluation.evaluate import evaluate as evaluate_method
from defectscope.evaluation.report import html_report, overlay
from defectscope.evaluation.tune import (
    DEFAULT_BACKBONES,
    DEFAULT_SIZES,
    DEFAULT_WEIGHTS,
    Tried,
    TuneResult,
    default_grid,
)
from defectscope.evaluation.tune import tune as run_tune
from defectscope.modelfiles.artifacts import Recorded, load_detector, read_manifest, save_detector
from defectscope.modelfiles.runtimes import ExportedModel, is_exported

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class Result:
    """What the model says about one image.

    ``verdict``: "defect", "normal", "invalid" (a frame the model cannot judge; ``reason``
    says why, and there is no score) or "unknown" (the model has no threshold).
    ``anomaly_map``: float32 at the image's own size (None for an invalid frame).
    ``regions``: connected areas above the threshold, largest first (bounding box in
    pixels, area share, 3 x 3 grid position)."""

    score: float | None
    threshold: float | None
    verdict: str
    reason: str | None
    anomaly_map: np.ndarray | None
    regions: list[dict[str, Any]]
    source: str
    finding: Finding = field(repr=False)
    map_range: tuple[float, float] | None = field(default=None, repr=False)
    given: ImageLike | None = field(default=None, repr=False)  # what was passed to predict

    @property
    def image(self) -> np.ndarray:
        """The image as float32 H x W x 3 in [0, 1] (decoded again for a path)."""
        return load_image(self.given) if isinstance(self.given, str | Path) else image_array(self.given, self.source)

    def __repr__(self) -> str:
        score = "no score" if self.score is None else f"score={self.score:.4g}"
        why = f", reason={self.reason!r}" if self.reason else ""
        return f"Result({self.verdict}, {score}, threshold={_short(self.threshold)}, regions={len(self.regions)}{why}, source={self.source!r})"

    @property
    def is_defective(self) -> bool | None:
        """True / False, or None when the image could not be judged or there is no threshold."""
        return {"defect": True, "normal": False}.get(self.verdict)

    def overlay(self) -> Image.Image:
        """The image with the heatmap blended over it, coloured on the model's map range
        (as `predict` writes it); an invalid frame comes back as it is."""
        if self.anomaly_map is None:
            return Image.fromarray(np.rint(np.nan_to_num(self.image) * 255).astype(np.uint8))
        lo, hi = self.map_range or (float(self.anomaly_map.min()), float(self.anomaly_map.max()))
        return overlay(self.image, self.anomaly_map, vmin=lo, vmax=hi)

    def answer(self, question: str = "Is there an anomaly in this image?") -> Answer:
        """An answer in words from this result's finding (rule-based, as `defectscope ask`)."""
        return answer(self.finding, question)


def _short(value: float | None) -> str:
    return "None" if value is None else f"{value:.4g}"


class Model(Recorded):
    """A fitted model (or an exported graph) with its threshold, frame limits and map
    range, as the model file records them."""

    def __init__(self, detector: Detector, extra: dict[str, Any], model_id: str, path: Path | None = None) -> None:
        self.detector, self.extra, self.model_id, self.path = detector, extra, model_id, path
        self.judge = Judge.of(extra, str(path or model_id))

    def __repr__(self) -> str:
        where = f", file={str(self.path)!r}, sha256={self.model_id[:12]}" if self.path else ", not saved"
        return f"Model({self.detector.name}, threshold={_short(self.threshold)}{where})"

    def with_threshold(self, value: float) -> Model:
        """The same model deciding at another threshold (the file is not changed)."""
        chosen = Threshold(value, "set by hand in Python", 0, 0, "api").to_dict()
        return Model(self.detector, {**self.extra, "threshold": chosen}, self.model_id, self.path)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model file (atomic; an existing file is refused unless ``overwrite``)."""
        if isinstance(self.detector, ExportedModel):
            raise ConfigError(f"{self.path} is an exported graph; save the .dscope file it came from.")
        self.path = save_detector(self.detector, path, extra=self.extra, overwrite=overwrite)
        self.model_id = read_manifest(self.path)["sha256"]
        return self.path

    def predict(self, image: ImageLike) -> Result:
        """Score one image: a file path, a PIL image, or a numpy array (H x W grey or
        H x W x 3 RGB; uint8, uint16, or float in [0, 1])."""
        return self.predict_many([image])[0]

    def predict_many(self, images: list[ImageLike], *, batch_size: int = 8) -> list[Result]:
        """Score several images as batches; one Result per image, in order."""
        samples = [self._sample(img, i) for i, img in enumerate(images)]
        out = []
        judged_all = score_samples(self.detector, iter(samples), judge=self.judge, batch_size=batch_size)
        for given, judged in zip(images, judged_all, strict=True):
            amap = judged.original_map()
            finding = make_finding(judged.score, amap, self.threshold, invalid=judged.verdict.invalid_reason)
            out.append(Result(
                judged.score, self.threshold, judged.verdict.label, judged.verdict.invalid_reason, amap,
                [r.to_dict() for r in finding.regions], judged.path, finding, self.map_range, given,
            ))
        return out

    def predict_folder(self, inputs: str | Path | list[str | Path], out: str | Path, **options: Any) -> RunSummary:
        """Score image files and folders into ``out`` with the streaming engine `predict`
        uses (scores.csv / .jsonl / .json, heatmaps, errors.csv, resumable with
        ``resume=True``); returns the run's summary."""
        paths, ignored = pipeline.expand_images([Path(p) for p in ([inputs] if isinstance(inputs, str | Path) else inputs)])
        summary = predict_folder(self.detector, paths, Path(out), judge=self.judge, model_id=self.model_id, map_range=self.map_range, **options)
        summary.ignored = ignored
        return summary

    def _sample(self, image: ImageLike, index: int) -> Sample:
        if isinstance(image, str | Path):
            return load_sample(Record(Path(image)), self.detector.preprocess)
        arr = image_array(image, f"image {index}")
        tensor, geometry = self.detector.preprocess.image(arr)
        return Sample(tensor, geometry, f"<{type(image).__name__} {index}>")


def fit(
    data: str | Path | list[str | Path],
    *,
    method: str = "patchcore",
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    defects: str | Path | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> Model:
    """Fit ``method`` on normal images: a folder of good parts, an MVTec-layout dataset
    (its train/good), or a list of image paths; ``options`` are the method's (e.g.
    ``backbone=``, ``coreset_ratio=``, ``tile=``...). The threshold is set from the
    training images alone at ``false_alarm_rate``, as `defectscope fit` does.
    ``defects``: a folder of labelled defective images (outlines as ``<name>_mask.png``
    beside them) for a method that learns from them (``supersimplenet``)."""
    detector = make_detector(method, **options)
    if isinstance(data, list):
        records = [Record(Path(p)) for p in data]
        if not records:
            raise DataError("fit got an empty list of images; give at least one normal image.")
    else:
        records = training_records(data)
    fitted = pipeline.fit(
        detector, records if detector.needs_training_images else None, false_alarm_rate=false_alarm_rate, defects=defects, progress=progress
    )
    return Model(fitted.detector, fitted.extra(), f"unsaved {method}")


def tune(
    data: str | Path,
    *,
    budget_s: float = 600.0,
    backbones: tuple[str, ...] = DEFAULT_BACKBONES,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    weights: tuple[float, ...] = DEFAULT_WEIGHTS,
    tiles: bool = True,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    seed: int = 0,
    progress: Progress | None = None,
    on_candidate: Callable[[Tried, Detector], None] | None = None,
) -> tuple[Model, TuneResult]:
    """Choose PatchCore's backbone, size, tiles and whole-image branch on a split of the
    normal images of ``data`` with synthetic defects (never its test split), fit the
    choice on all of them as `fit` does, and record the validation table in the model
    (``extra["tune"]``); see `defectscope.evaluation.tune`."""
    grid = default_grid(backbones, sizes, weights, tiles)
    fitted, result = run_tune(
        training_records(data), grid=grid, budget_s=budget_s, false_alarm_rate=false_alarm_rate, seed=seed, progress=progress,
        on_candidate=on_candidate,
    )
    return Model(fitted.detector, {**fitted.extra(), "tune": result.to_dict()}, "unsaved patchcore (tuned)"), result


def load(path: str | Path, *, runtime: str | None = None) -> Model:
    """A model file (.dscope) or an exported graph (.onnx, or .xml for OpenVINO).

    ``runtime``: for a model file, where its backbone runs (auto, openvino, onnxruntime or
    torch; default the process's, see `defectscope.backbones.runtime`); for an .onnx file,
    onnxruntime (default) or openvino."""
    path = Path(path)
    if is_exported(path):
        exported = ExportedModel(path, None if runtime == "auto" else runtime)
        return Model(exported, exported.extra, exported.meta["source_sha256"], path)
    manifest = read_manifest(path)
    detector = load_detector(path)
    detector.use_runtime(runtime)
    return Model(detector, manifest.get("extra", {}), manifest["sha256"], path)


def evaluate(
    data: str | Path,
    *,
    method: str = "patchcore",
    model: Model | None = None,
    false_alarm_rate: float | None = DEFAULT_FALSE_ALARM_RATE,
    report: str | Path | None = None,
    keep_scores: bool = False,
    **options: Any,
) -> EvalResult:
    """Fit ``method`` on an MVTec-layout dataset's train/good (the threshold at
    ``false_alarm_rate`` from those images alone), or take a fitted ``model`` as it is,
    score the test split and return the metric table (`.to_markdown()`, `.to_dataframe()`,
    `.overall`, `.threshold`: the realized false-alarm rate and recall at the threshold).
    ``report``: also write the HTML report there; ``keep_scores`` (implied by a report):
    keep per-image scores for `.worst()`."""
    keep = keep_scores or report is not None
    if model is not None:
        if options:
            raise ConfigError("A fitted model brings its own options; leave them out (or pass method= and options to fit anew).")
        recorded = model.extra.get("threshold")
        threshold = Threshold(**recorded) if recorded and model.threshold is not None else None
        result = evaluate_method(model.detector, data, fitted=True, threshold=threshold, keep_scores=keep)
    else:
        result = evaluate_method(method, data, config=options or None, false_alarm_rate=false_alarm_rate, keep_scores=keep)
    if report is not None:
        html_report(result, report)
    return result


__all__ = ["Model", "Result", "evaluate", "fit", "load"]
