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
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope.data.datasets import Record, iter_samples
from defectscope.data.images import FORMATS, check_pixels, decode_problem, load_image
from defectscope.data.tiles import training_samples
from defectscope.decision.explain import make_finding
from defectscope.decision.scoring import Judge, Judged, score_samples
from defectscope.decision.thresholds import Threshold, f1_optimal
from defectscope.detectors.base import Detector
from defectscope.errors import ConfigError, DataError, DefectscopeError
from defectscope.evaluation.report import overlay
from defectscope.modelfiles.artifacts import Recorded, load_detector, read_manifest, save_detector
from defectscope.serve.retention import GB, Retention, prune_versions, purge_images
from defectscope.serve.retrain import retrain, reviewed_records, save_outline
from defectscope.serve.store import Result, SQLiteStore, Version, new_id

log = logging.getLogger("defectscope")
MAX_UPLOAD_BYTES = 32 * 2**20
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


class UploadError(DataError):
    """An upload that cannot be scored (not an image, truncated, empty, too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ModelVersion(Recorded):
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

    def describe(self) -> dict[str, Any]:
        """What clients may know of this version: server paths (a model's own file, or one an
        option names, e.g. CLIP weights or learned prompts) are cut to their file names."""
        m = self.manifest
        return without_paths({
            "version": self.version,
            "file": self.path.name,
            "method": m["method"],
            "options": m["config"],
            "threshold": self.extra.get("threshold"),
            "map_range": self.map_range,
            "sha256": m["sha256"],
            "weights_hash": m.get("info", {}).get("weights_hash"),
            "defectscope_version": m.get("defectscope_version"),
            "info": m.get("info", {}),
            "parent": self.extra.get("parent"),
        })


def without_paths(value: Any) -> Any:
    """``value`` with every absolute path string replaced by its file name."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return Path(value).name
    return value


def next_version_path(folder: Path, model: Path) -> Path:
    """``<folder>/model.v2.dscope`` (or the next free number) for a version of ``model``;
    never an existing file."""
    stem = model.name.removesuffix(".dscope")
    base = stem.rsplit(".v", 1)[0] if stem.rsplit(".v", 1)[-1].isdigit() else stem
    n = 2
    while (candidate := folder / f"{base}.v{n}.dscope").exists():
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
    """The serving state: store, current model version (and a few recent ones in memory),
    batcher, retention, and the lock that serialises model changes."""

    def __init__(
        self,
        model: str | Path,
        store: SQLiteStore,
        *,
        max_batch: int = 8,
        window_s: float = 0.01,
        retention: Retention | None = None,
        keep_in_memory: int = 3,
        sweep_s: float = 60.0,
        retrain_options: dict[str, Any] | None = None,
        retrain_normals: str | Path | None = None,
    ) -> None:
        """``retrain_options``: method options for `start_retrain` (e.g. a training budget);
        ``retrain_normals``: its normal images when the model does not record them."""
        if keep_in_memory < 1:
            raise ConfigError(f"keep_in_memory must be at least 1, got {keep_in_memory}.")
        self.store, self.retention, self.keep_in_memory = store, retention or Retention(), keep_in_memory
        self.max_batch = max_batch
        self.models_dir = (store.root / "models").resolve()
        self.models_dir.mkdir(exist_ok=True)
        current = ModelVersion.load(model)
        if current.detector.scores_jointly:
            raise ConfigError(
                f"{current.detector.name} cannot be served: it scores images against each other, so one client's "
                "score would depend on the images other clients sent in the same micro-batch, and a lone upload has "
                "nothing to compare with. Score folders with `defectscope predict` instead."
            )
        self.store.add_version(Version(current.version, str(current.path.resolve()), "loaded", time.time(), pinned=True))
        self.store.pin(current.version, True)  # the file the station was started with is the user's: never pruned
        self._versions: OrderedDict[str, ModelVersion] = OrderedDict()
        self._update = threading.Lock()
        self._serve(current)
        self.batcher = MicroBatcher(self._score_jobs, max_batch=max_batch, window_s=window_s)
        self._closing, self._wake, self._written = threading.Event(), threading.Event(), 0
        self._sweeper = threading.Thread(target=self._sweep_every, args=(sweep_s,), name="defectscope-retention", daemon=True)
        self._sweeper.start()
        self.retrain_options, self.retrain_normals = retrain_options or {}, retrain_normals
        self.retraining: dict[str, Any] = {"state": "idle"}
        self._retrainer: threading.Thread | None = None

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self.batcher.close()
        self._sweeper.join(timeout=30)

    def _sweep_every(self, seconds: float) -> None:
        """Apply the retention rule at start, every ``seconds``, and as soon as the images
        written since the last sweep reach 5% of --max-store-gb; a failed sweep is logged
        and tried again next time (it never stops the station)."""
        while not self._closing.is_set():
            self._written = 0
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - retention must not take the station down; the log says why
                log.exception("Retention sweep of %s failed; trying again in %.0f s.", self.store.root, seconds)
            self._wake.wait(seconds)
            self._wake.clear()

    def _wrote(self, *paths: Path) -> None:
        """Count bytes written to the store; wake the sweeper when a size limit may be near."""
        if self.retention.max_store_gb is None:
            return
        self._written += sum(p.stat().st_size for p in paths if p.is_file())
        if self._written > 0.05 * self.retention.max_store_gb * GB:
            self._wake.set()

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

    def _score(self, model: ModelVersion, paths: list[Path]) -> dict[str, Judged]:
        """Score stored images with ``model`` as one batch: the one scoring path."""
        samples = iter_samples([Record(p) for p in paths], model.detector.preprocess)
        return {j.path: j for j in score_samples(model.detector, samples, judge=model.judge, batch_size=self.max_batch)}

    def _score_jobs(self, jobs: list[Job]) -> list[Result | Exception]:
        """Score stored images with the current version (as one batch) and record them."""
        model = self.current
        t0 = time.perf_counter()
        try:
            scored = self._score(model, [j.path for j in jobs])
        except DataError as exc:  # one unreadable file: score the others one by one
            if len(jobs) == 1:
                jobs[0].path.unlink(missing_ok=True)  # no result, so no orphaned image either
                return [UploadError(str(exc))]
            return [r for j in jobs for r in self._score_jobs([j])]
        per_image = (time.perf_counter() - t0) / len(jobs)
        return [self._record(job, scored[str(job.path)], model, per_image, len(jobs)) for job in jobs]

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
        self._wrote(job.path, heat)
        return result

    def versions(self) -> list[dict[str, Any]]:
        """The versions this station has served, as clients may see them (no paths)."""
        return [{**v.public(), "in_memory": v.version in self._versions, "serving": v.version == self.current.version}
                for v in self.store.versions()]

    def _serve(self, model: ModelVersion) -> None:
        """Make ``model`` current and keep it and the most recently served versions in memory;
        requests already batched keep the version they started with."""
        self._versions[model.version] = model
        self._versions.move_to_end(model.version)
        self.current = model
        while len(self._versions) > self.keep_in_memory:
            self._versions.popitem(last=False)
        log.info("Serving model version %s.", model.version)

    def _write_version(self, detector: Detector, extra: dict[str, Any], note: str) -> tuple[ModelVersion, Version]:
        """Write ``detector`` as a new model file in the store and load it back; nothing is
        recorded or served yet (a failure leaves no file behind)."""
        path = next_version_path(self.models_dir, self.current.path)
        try:
            save_detector(detector, path, extra={**extra, "parent": self.current.version, "note": note})
            new = ModelVersion.load(path)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise DefectscopeError(
                f"Could not write the new model version ({exc.strerror or exc}); nothing was recorded. "
                "Free space in the store (or fix its permissions) and send the correction again."
            ) from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return new, Version(new.version, str(path), note, time.time())

    def _commit(self, new: ModelVersion, record: Any) -> Any:
        """Run ``record()`` (the store transaction that records the new version); on failure
        delete the new file, so the change leaves no trace; on success serve it and prune."""
        try:
            out = record()
        except BaseException:
            new.path.unlink(missing_ok=True)
            raise
        self._serve(new)
        self.prune()
        return out

    def use_version(self, version: str) -> ModelVersion:
        """Serve a version this station has recorded (KeyError if it has none such)."""
        with self._update:
            known = {v.version: v for v in self.store.versions()}
            if version not in known:
                raise KeyError(version)
            if known[version].pruned is not None:
                raise ConfigError(f"Model version {version} was deleted by retention; pin versions you may want to return to.")
            self._serve(self._versions.get(version) or ModelVersion.load(known[version].path))
            return self.current

    def pin(self, version: str, pinned: bool) -> dict[str, Any]:
        """Keep a version from retention (or let retention delete it again)."""
        with self._update:
            return self.store.pin(version, pinned).public()

    def feedback(self, result_id: str, label: str) -> tuple[Result, dict[str, Any] | None]:
        """Record a review; a first "normal" on an image adds it to the model's normal data.
        The review, the new model file and the switch to it happen together or not at all:
        if teaching fails the review is not recorded, so a retry teaches the image."""
        with self._update:
            known = self.store.get(result_id)
            if known is None:
                raise KeyError(result_id)
            if label != "normal" or known.review == "normal":
                return self.store.set_review(result_id, label)[0], None
            if known.verdict == "invalid":
                raise ConfigError(
                    f"Result {result_id} could not be judged ({known.reason}); a frame the model cannot judge is never "
                    "taught as a good part. Send a proper image of the part instead."
                )
            if known.purged is not None:
                raise ConfigError(f"Result {result_id}'s image was deleted by the store's retention rule; it cannot be taught.")
            detector = load_detector(self.current.path)  # a private copy: the served one is never mutated
            change = detector.add_normals(training_samples([Record(self.store.root / known.image_file)], detector.preprocess))
            new, version = self._write_version(detector, self.current.extra, f"good part {result_id}: {change}")
            result, _ = self._commit(new, lambda: self.store.set_review(result_id, label, version=version))
            return result, {"version": new.version, **change}

    def rescored_reviews(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, is_defect) of the reviewed images, scored again by the current version:
        scores recorded by older versions (or before an image was taught) mean nothing to it."""
        reviewed = [r for r in self.store.reviewed() if (self.store.root / r.image_file).is_file()]
        if not reviewed:
            raise ConfigError("No reviewed images to set a threshold from; review some results first.")
        judged = self._score(self.current, [self.store.root / r.image_file for r in reviewed])
        pairs = [(j.score, r.review == "defect") for r in reviewed
                 if (j := judged[str(self.store.root / r.image_file)]).score is not None]
        return np.array([s for s, _ in pairs], dtype=float), np.array([d for _, d in pairs], dtype=bool)

    def set_threshold(self, value: float | None = None, *, f1: bool = False) -> ModelVersion:
        """A new version with a threshold chosen by hand, or F1-optimal on the reviewed
        images re-scored by the current version."""
        with self._update:
            if f1:
                scores, labels = self.rescored_reviews()
                thr = f1_optimal(scores, labels)
                how = f"f1-optimal on {len(scores)} images reviewed at the station, re-scored by version {self.current.version}"
                thr = Threshold(thr.value, how, thr.n_normal, thr.n_defective, "station reviews")
            elif value is not None:
                thr = Threshold(value, "set by hand at the station", 0, 0, "station")
            else:
                raise ConfigError("Give a threshold value, or ask for the F1-optimal one on reviewed images.")
            detector = load_detector(self.current.path)
            new, version = self._write_version(detector, {**self.current.extra, "threshold": thr.to_dict()}, thr.method)
            self._commit(new, lambda: self.store.add_version(version))
            return new

    def outline(self, result_id: str, shapes: dict[str, list[Any]]) -> dict[str, Any]:
        """Keep an inspector's outline of a confirmed defect (boxes and polygons in the
        image's pixels) as its mask for retraining; an empty outline removes it."""
        known = self.store.get(result_id)
        if known is None:
            raise KeyError(result_id)
        if known.review != "defect":
            raise ConfigError(f"Result {result_id} is not a confirmed defect; confirm it before outlining the defect.")
        return {"id": result_id, "outlined": save_outline(self.store, known, shapes).is_file()}

    def start_retrain(self) -> dict[str, Any]:
        """Fit a new version from the normal images, the reviewed good parts and the reviewed
        defects (`serve.retrain`) in the background; `retraining` says how it goes."""
        with self._update:
            if self._retrainer is not None and self._retrainer.is_alive():
                raise ConfigError("A retraining is already running; wait for it to finish.")
            if not reviewed_records(self.store)[1]:
                raise ConfigError("No confirmed defects to learn from yet; confirm defects on the review page first.")
            self.retraining = {"state": "running", "stage": "starting", "started": time.time()}
            self._retrainer = threading.Thread(target=self._retrain, args=(self.retrain_normals,), name="defectscope-retrain", daemon=True)
            self._retrainer.start()
            return dict(self.retraining)

    def _retrain(self, normals: str | Path | None) -> None:
        def report(stage: str, done: int, total: int) -> None:
            self.retraining.update(stage=stage, done=done, total=total)

        try:
            detector, extra, summary = retrain(self.store, self.current.path, normals=normals, options=self.retrain_options, progress=report)
            note = f"retrained with {summary['reviewed_defects']} reviewed defects ({summary['outlined']} outlined)"
            with self._update:
                new, version = self._write_version(detector, extra, note)
                self._commit(new, lambda: self.store.add_version(version))
            self.retraining = {"state": "done", "version": new.version, **summary, "finished": time.time()}
        except Exception as exc:  # noqa: BLE001 - any failure is reported to the page; the served model is untouched
            log.warning("Retraining failed: %s", exc)
            self.retraining = {"state": "failed", "error": str(exc), "finished": time.time()}

    def sweep(self) -> dict[str, Any]:
        """Apply the retention rule now: delete old images and surplus model versions."""
        purged = purge_images(self.store, self.retention)
        with self._update:
            pruned = self.prune()
        return {"images_purged": purged, "versions_pruned": pruned}

    def prune(self) -> list[str]:
        """Delete station-written versions beyond the rule (never the served or pinned ones)."""
        pruned = prune_versions(self.store, self.retention, self.models_dir, {self.current.version})
        for v in pruned:
            self._versions.pop(v, None)
        return pruned
