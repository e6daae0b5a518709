"""The station: one loaded model (with versions), micro-batched scoring, corrections.

Scoring goes through `scoring.score_samples` (frame checks, verdicts), the same path as `defectscope predict`.
Requests that arrive together are scored as one batch by a worker thread
(`MicroBatcher`). A correction ("good part") adds the image to the model's normal data
with `Detector.add_normals`, writes a *new* model file next to the current one and
switches to it; requests in flight finish on the version they started with, and the
store records which version scored every image.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope.artifacts import load_detector, read_manifest, save_detector
from defectscope.data.datasets import Record, iter_samples
from defectscope.data.images import FORMATS, check_pixels, decode_problem, load_image
from defectscope.data.tiles import training_samples
from defectscope.detectors.base import Detector
from defectscope.errors import ConfigError, DataError
from defectscope.explain import make_finding
from defectscope.report import overlay
from defectscope.scoring import Judge, Judged, score_samples
from defectscope.serve.store import Result, SQLiteStore, new_id
from defectscope.thresholds import Threshold, f1_optimal

log = logging.getLogger("defectscope")
MAX_UPLOAD_BYTES = 32 * 2**20
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


class UploadError(DataError):
    """An upload that cannot be scored (not an image, truncated, empty, too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ModelVersion:
    """A loaded model file: its detector, threshold and heatmap range."""

    version: str  # first 12 hex digits of the model file's content hash
    path: Path
    detector: Detector
    manifest: dict[str, Any]
    judge: Judge

    @classmethod
    def load(cls, path: str | Path) -> ModelVersion:
        path = Path(path)
        detector = load_detector(path)
        manifest = read_manifest(path)
        return cls(manifest["sha256"][:12], path, detector, manifest, Judge.of(manifest.get("extra", {}), str(path)))

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.get("extra", {})

    @property
    def threshold(self) -> float | None:
        return self.judge.threshold

    @property
    def map_range(self) -> tuple[float, float] | None:
        r = self.extra.get("map_range")
        return None if r is None else (float(r[0]), float(r[1]))

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "version": self.version,
            "path": str(self.path),
            "method": m["method"],
            "options": m["config"],
            "threshold": self.extra.get("threshold"),
            "map_range": self.map_range,
            "sha256": m["sha256"],
            "weights_hash": m.get("info", {}).get("weights_hash"),
            "defectscope_version": m.get("defectscope_version"),
            "info": m.get("info", {}),
            "parent": self.extra.get("parent"),
        }


def next_version_path(path: Path) -> Path:
    """``model.dscope`` -> ``model.v2.dscope`` (or the next free number); never an existing file."""
    stem = path.name.removesuffix(".dscope")
    base = stem.rsplit(".v", 1)[0] if stem.rsplit(".v", 1)[-1].isdigit() else stem
    n = 2
    while (candidate := path.with_name(f"{base}.v{n}.dscope")).exists():
        n += 1
    return candidate


def check_upload(data: bytes, name: str) -> str:
    """The file suffix for an upload, after checking it is a complete, not too large image."""
    if not data:
        raise UploadError(f"{name}: the upload is empty (0 bytes); send the image file's content.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"{name}: {len(data) / 2**20:.1f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB upload limit.", 413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            try:
                check_pixels(img.size, name)
            except DataError as exc:
                raise UploadError(str(exc), 413) from None
            img.load()
    except UploadError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for a damaged upload; each is the upload's fault
        raise UploadError(f"{name}: not a readable image: {decode_problem(exc)}. Send a {FORMATS} file.") from exc
    if fmt not in SUFFIXES:
        raise UploadError(f"{name}: image format {fmt} is not accepted; send a {FORMATS} file.")
    return SUFFIXES[fmt]


@dataclass
class Job:
    """One image waiting to be scored: already stored under ``path`` with id ``id``."""

    id: str
    path: Path
    source: str
    seen_key: str | None = None


class MicroBatcher:
    """Collects jobs for up to ``window_s`` (or ``max_batch`` jobs) and scores them together."""

    def __init__(self, score: Any, *, max_batch: int = 8, window_s: float = 0.01) -> None:
        self._score, self.max_batch, self.window_s = score, max_batch, window_s
        self._queue: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="defectscope-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        fut: Future = Future()
        self._queue.put((job, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            deadline = time.perf_counter() + self.window_s
            while len(items) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                items.append(item)
            try:
                results = self._score([job for job, _ in items])
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
                for _, fut in items:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(items, results, strict=True):
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


class Station:
    """The serving state: store, current model version, batcher, and the update lock."""

    def __init__(self, model: str | Path, store: SQLiteStore, *, max_batch: int = 8, window_s: float = 0.01) -> None:
        self.store = store
        self.current = ModelVersion.load(model)
        self.store.add_version(self.current.version, str(self.current.path), "loaded")
        self._versions: dict[str, ModelVersion] = {self.current.version: self.current}
        self._update = threading.Lock()
        self.batcher = MicroBatcher(self._score_jobs, max_batch=max_batch, window_s=window_s)

    def close(self) -> None:
        self.batcher.close()

    def store_uploads(self, uploads: list[tuple[bytes, str]]) -> list[Job]:
        """Check every upload, then keep each in the store under a new id (names are only
        recorded): one bad file refuses the request before anything is written."""
        suffixes = [check_upload(data, name) for data, name in uploads]
        jobs = []
        for (data, name), suffix in zip(uploads, suffixes, strict=True):
            rid = new_id()
            path = self.store.root / "images" / f"{rid}{suffix}"
            path.write_bytes(data)
            jobs.append(Job(rid, path, f"upload:{name[:200]}"))
        return jobs

    def _score_jobs(self, jobs: list[Job]) -> list[Result | Exception]:
        """Score stored images with the current version (as one batch) and record them."""
        model = self.current
        t0 = time.perf_counter()
        samples = iter_samples([Record(j.path) for j in jobs], model.detector.preprocess)
        out: list[Result | Exception] = []
        try:
            scored = {j.path: j for j in score_samples(model.detector, samples, judge=model.judge, batch_size=self.batcher.max_batch)}
        except DataError as exc:  # one unreadable file: score the others one by one
            if len(jobs) == 1:
                jobs[0].path.unlink(missing_ok=True)  # no result, so no orphaned image either
                return [UploadError(str(exc))]
            return [r for j in jobs for r in self._score_jobs([j])]
        per_image = (time.perf_counter() - t0) / len(jobs)
        for job in jobs:
            out.append(self._record(job, scored[str(job.path)], model, per_image, len(jobs)))
        return out

    def _record(self, job: Job, judged: Judged, model: ModelVersion, seconds: float, batch: int) -> Result:
        t0 = time.perf_counter()
        amap = judged.original_map()
        finding = make_finding(judged.score, amap, model.threshold, invalid=judged.verdict.invalid_reason)
        heat = job.path  # a frame refused before scoring has no map: its "overlay" is the frame itself
        if amap is not None:
            lo, hi = model.map_range or (float(amap.min()), float(amap.max()))
            heat = self.store.root / "images" / f"{job.id}_heatmap.png"
            overlay(load_image(job.path), amap, vmin=lo, vmax=hi).save(heat)
        result = Result(
            job.id, time.time(), job.source, str(job.path.relative_to(self.store.root)),
            str(heat.relative_to(self.store.root)), judged.score, model.threshold, judged.verdict.label, model.version,
            [r.to_dict() for r in finding.regions],
            {"score_ms": 1000 * seconds, "record_ms": 1000 * (time.perf_counter() - t0), "batch": batch},
            reason=judged.verdict.invalid_reason,
        )
        self.store.add(result, seen_key=job.seen_key)
        return result

    def versions(self) -> list[dict[str, Any]]:
        return self.store.versions()

    def _switch(self, detector: Detector, extra: dict[str, Any], note: str) -> ModelVersion:
        """Write ``detector`` as a new model file next to the current one and serve it."""
        path = next_version_path(self.current.path)
        save_detector(detector, path, extra={**extra, "parent": self.current.version, "note": note})
        new = ModelVersion.load(path)
        self.store.add_version(new.version, str(path), note)
        self._versions[new.version] = new
        self.current = new  # requests already batched keep the version they started with
        log.info("Serving model version %s (%s).", new.version, note)
        return new

    def use_version(self, version: str) -> ModelVersion:
        """Serve a version this station has recorded (KeyError if it has none such)."""
        with self._update:
            if version not in self._versions:
                known = {v["version"]: v["path"] for v in self.store.versions()}
                if version not in known:
                    raise KeyError(version)
                self._versions[version] = ModelVersion.load(known[version])
            self.current = self._versions[version]
            return self.current

    def feedback(self, result_id: str, label: str) -> tuple[Result, dict[str, Any] | None]:
        """Record a review; a first "normal" on an image adds it to the model's normal data."""
        with self._update:
            known = self.store.get(result_id)
            if known is not None and known.verdict == "invalid" and label == "normal":
                raise ConfigError(
                    f"Result {result_id} could not be judged ({known.reason}); a frame the model cannot judge is never "
                    "taught as a good part. Send a proper image of the part instead."
                )
            result, previous = self.store.set_review(result_id, label)
            if label != "normal" or previous == "normal":
                return result, None
            detector = load_detector(self.current.path)  # a private copy: the served one is never mutated
            change = detector.add_normals(training_samples([Record(self.store.root / result.image_file)], detector.preprocess))
            new = self._switch(detector, self.current.extra, f"good part {result_id}: {change}")
            return result, {"version": new.version, **change}

    def set_threshold(self, value: float | None = None, *, f1: bool = False) -> ModelVersion:
        """A new version with a threshold chosen by hand, or F1-optimal on reviewed images."""
        with self._update:
            if f1:
                reviewed = self.store.reviewed()
                scores = np.array([s for s, _ in reviewed])
                labels = np.array([r == "defect" for _, r in reviewed])
                thr = f1_optimal(scores, labels)
                thr = Threshold(thr.value, "f1-optimal on images reviewed at the station", thr.n_normal, thr.n_defective, "station reviews")
            elif value is not None:
                thr = Threshold(value, "set by hand at the station", 0, 0, "station")
            else:
                raise ConfigError("Give a threshold value, or ask for the F1-optimal one on reviewed images.")
            detector = load_detector(self.current.path)
            extra = {**self.current.extra, "threshold": thr.to_dict()}
            return self._switch(detector, extra, thr.method)
