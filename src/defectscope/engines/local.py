"""Batch scoring on this machine: streaming, resumable, and never sunk by one bad file.

Results are appended to ``OUT/scores.csv`` and ``OUT/scores.jsonl`` as each batch
completes (flushed), so an interrupted run keeps everything it scored. Every row has the
image's path, score (empty / null when a frame check refused it before scoring), verdict
(`verdict.decide`: normal, defect, invalid or unknown) and the reason for an invalid one.
``OUT/run.json`` records which model file and threshold scored the folder; ``resume``
skips the images already in ``scores.csv`` (a half-written last line from a killed run is
cut off first, so no row appears twice) and refuses a folder scored by another model or
threshold. A file that cannot be decoded goes to ``OUT/errors.csv`` (path, reason) and
the run goes on, unless ``strict``. At the end ``scores.json`` (threshold + every row;
valid JSON, no bare NaN) is written, and ``scores.parquet`` when pyarrow is installed.
Scoring itself is `scoring.score_samples`, the one way to score; where it runs is a
`Scorer`: `local_scorer` here, `defectscope.engines.ray_engine.ray_scorer` on a Ray
cluster. Both feed the same writer, so the files, resume and errors are the same.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.datasets import Record, iter_samples
from defectscope.data.images import load_image
from defectscope.decision.scoring import Judge, score_samples
from defectscope.detectors.base import Detector, Progress
from defectscope.errors import DataError
from defectscope.evaluation.report import save_overlay
from defectscope.pipeline import output_names

FIELDS = ("path", "score", "verdict", "reason")


@dataclass
class Scored:
    """One image's row, and its anomaly map at the original size when asked for."""

    path: str
    score: float | None
    verdict: str
    reason: str | None
    map: np.ndarray | None = None

    def row(self) -> dict[str, Any]:
        return {"path": self.path, "score": self.score, "verdict": self.verdict, "reason": self.reason}


OnError = Callable[[str, DataError], None]
Scorer = Callable[[list[Path], bool, OnError], Iterator[list[Scored]]]
"""A scorer scores ``paths`` (``want_maps``: return maps too), calls ``on_error`` for a file it
cannot read and goes on, and yields results batch by batch in any order."""


def local_scorer(detector: Detector, judge: Judge, *, batch_size: int = 8) -> Scorer:
    """Score in this process with `scoring.score_samples`, reading files lazily."""

    def run(paths: list[Path], want_maps: bool, on_error: OnError) -> Iterator[list[Scored]]:
        samples = iter_samples([Record(p) for p in paths], detector.preprocess, on_error=lambda r, e: on_error(str(r.path), e))
        batch: list[Scored] = []
        for j in score_samples(detector, samples, judge=judge, batch_size=batch_size):
            batch.append(Scored(j.path, j.score, j.verdict.label, j.verdict.reason, j.original_map() if want_maps else None))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    return run


@dataclass
class RunSummary:
    """What a run did: images scored now and before (resumed), flagged defective, invalid
    (frames the model could not judge), skipped as unreadable, and files ignored for their
    extension when folders were listed."""

    scored: int
    resumed: int
    flagged: int
    invalid: int
    skipped: int
    rows: list[dict[str, Any]]
    ignored: int = 0

    def line(self, out: Path) -> str:
        parts = [f"scored {self.scored} images"]
        if self.resumed:
            parts.append(f"{self.resumed} already done (resumed)")
        parts.append(f"{self.flagged} flagged defective")
        parts.append(f"{self.invalid} invalid (could not be judged; reasons in {out / 'scores.csv'})" if self.invalid else "0 invalid")
        parts.append(f"{self.skipped} unreadable (see {out / 'errors.csv'})" if self.skipped else "0 unreadable")
        if self.ignored:
            parts.append(f"{self.ignored} files ignored (not an image suffix)")
        return ", ".join(parts) + f"; results in {out}"


def _cut_partial_line(path: Path) -> None:
    """Drop a last line without its newline (a write interrupted by a kill)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _read_done(out: Path) -> list[dict[str, Any]]:
    """Rows already in ``scores.csv`` (for --resume), with scores as floats."""
    path = out / "scores.csv"
    if not path.exists():
        return []
    _cut_partial_line(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["score"] = float(row["score"]) if row.get("score") else None
        row["reason"] = row.get("reason") or None
    return rows


def _check_run(out: Path, run: dict[str, Any], resume: bool) -> None:
    """Record which model and threshold score ``out``; on resume, refuse another one."""
    path = out / "run.json"
    if resume and (out / "scores.csv").exists():
        before = json.loads(path.read_text()) if path.exists() else None
        if before != run:
            was = "an unrecorded model (an older defectscope)" if before is None else f"model {before.get('model')} at threshold {before.get('threshold')}"
            raise DataError(
                f"{out} was scored by {was}; this run uses model {run['model']} at threshold {run['threshold']}. "
                "Rows of two models cannot be mixed: use a new --out folder."
            )
    path.write_text(json.dumps(run, indent=2))


class _Appender:
    """scores.csv + scores.jsonl (+ errors.csv), appended and flushed batch by batch."""

    def __init__(self, out: Path, done: list[dict[str, Any]]) -> None:
        new_csv = not (out / "scores.csv").exists()
        self._csv = (out / "scores.csv").open("a", newline="")
        self._rows = csv.DictWriter(self._csv, fieldnames=FIELDS)
        if new_csv:
            self._rows.writeheader()
        with (out / "scores.jsonl").open("w") as fh:  # rebuilt from the csv: the two always agree
            fh.writelines(json.dumps(r) + "\n" for r in done)
        self._jsonl = (out / "scores.jsonl").open("a")
        self._errors_path = out / "errors.csv"
        self._errors = None

    def rows(self, rows: list[dict[str, Any]]) -> None:
        self._jsonl.writelines(json.dumps(r) + "\n" for r in rows)
        self._jsonl.flush()
        self._rows.writerows(rows)
        self._csv.flush()

    def error(self, path: str, reason: str) -> None:
        if self._errors is None:
            new = not self._errors_path.exists()
            self._errors = self._errors_path.open("a", newline="")
            self._error_writer = csv.writer(self._errors)
            if new:
                self._error_writer.writerow(["path", "reason"])
        self._error_writer.writerow([path, reason])
        self._errors.flush()

    def close(self) -> None:
        for fh in (self._csv, self._jsonl, self._errors):
            if fh is not None:
                fh.close()


def predict_folder(
    detector: Detector,
    paths: list[Path],
    out: Path,
    *,
    judge: Judge | None = None,
    model_id: str = "zero-shot",
    map_range: tuple[float, float] | None = None,
    overlays: bool = True,
    resume: bool = False,
    strict: bool = False,
    batch_size: int = 8,
    scorer: Scorer | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Score ``paths`` into ``out`` (see module docstring); never overwrites a result.
    ``judge``: threshold and frame limits; ``model_id``: the model file's hash (recorded in
    run.json for --resume); ``scorer``: where scoring runs (default: `local_scorer`)."""
    judge = judge or Judge()
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "scores.csv").exists():
        raise DataError(f"{out / 'scores.csv'} already exists: pass --resume to continue that run, or use an empty --out folder.")
    _check_run(out, {"model": model_id, "threshold": judge.threshold}, resume)
    done = _read_done(out) if resume else []
    finished = {str(Path(r["path"]).resolve()) for r in done}
    todo = [p for p in paths if str(p.resolve()) not in finished]
    names = output_names(paths)
    if overlays:
        clash = [out / f"{names[p]}_heatmap.png" for p in todo if (out / f"{names[p]}_heatmap.png").exists()]
        if clash and not resume:
            raise DataError(f"{clash[0]} already exists ({len(clash)} heatmaps would be overwritten); use an empty --out folder.")
    scorer = scorer or local_scorer(detector, judge, batch_size=batch_size)
    writer = _Appender(out, done)
    new_rows: list[dict[str, Any]] = []
    skipped = 0
    deferred: list[tuple[Path, np.ndarray]] = []  # overlays wait for the run's map range when the model has none

    def bad_file(path: str, exc: DataError) -> None:
        nonlocal skipped
        if strict:
            raise exc
        skipped += 1
        writer.error(path, str(exc))

    try:
        for batch in scorer(todo, overlays, bad_file):
            rows = [r.row() for r in batch]
            writer.rows(rows)
            new_rows += rows
            for r in batch if overlays else ():
                path, amap = Path(r.path), r.map
                if amap is None:
                    continue
                if map_range is None:
                    deferred.append((path, amap.astype(np.float16)))
                else:
                    save_overlay(out / f"{names[path]}_heatmap.png", load_image(path), amap, vmin=map_range[0], vmax=map_range[1])
            if progress:
                progress("predict", len(new_rows) + skipped, len(todo))
    finally:
        writer.close()
    if deferred:
        lo, hi = min(float(m.min()) for _, m in deferred), max(float(m.max()) for _, m in deferred)
        for path, amap in deferred:
            save_overlay(out / f"{names[path]}_heatmap.png", load_image(path), amap.astype(np.float32), vmin=lo, vmax=hi)
    order = {str(p): i for i, p in enumerate(paths)}
    rows = done + sorted(new_rows, key=lambda r: order.get(r["path"], len(order)))
    (out / "scores.json").write_text(json.dumps({"threshold": judge.threshold, "images": rows}, indent=2, allow_nan=False))
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out / "scores.parquet")
    flagged = sum(1 for r in rows if r["verdict"] == "defect")
    invalid = sum(1 for r in rows if r["verdict"] == "invalid")
    return RunSummary(len(new_rows), len(done), flagged, invalid, skipped, rows)
