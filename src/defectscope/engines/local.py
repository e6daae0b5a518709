"""Batch scoring on this machine: streaming, resumable, and never sunk by one bad file.

Results are appended to ``OUT/scores.csv`` and ``OUT/scores.jsonl`` as each batch
completes (flushed), so an interrupted run keeps everything it scored; ``resume`` skips
the images already in ``scores.csv`` (a half-written last line from a killed run is cut
off first, so no row appears twice). A file that cannot be read goes to
``OUT/errors.csv`` (path, reason) and the run goes on, unless ``strict``. At the end
``scores.json`` (threshold + every row) is written, and ``scores.parquet`` when pyarrow
is installed. Scoring itself is `pipeline.score_samples`, the one way to score; where it
runs is a `Scorer`: `local_scorer` here, `defectscope.engines.ray_engine.ray_scorer` on a
Ray cluster. Both feed the same writer, so the files, resume and errors are the same.
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
from defectscope.detectors.base import Detector, Progress
from defectscope.errors import DataError
from defectscope.pipeline import output_names, score_samples
from defectscope.report import save_overlay

FIELDS = ("path", "score", "defective")

Scored = tuple[str, float, np.ndarray | None]  # path, image score, anomaly map at the original size (if asked)
OnError = Callable[[str, DataError], None]
Scorer = Callable[[list[Path], bool, OnError], Iterator[list[Scored]]]
"""A scorer scores ``paths`` (``want_maps``: return maps too), calls ``on_error`` for a file it
cannot read and goes on, and yields results batch by batch in any order."""


def local_scorer(detector: Detector, *, batch_size: int = 8) -> Scorer:
    """Score in this process with `pipeline.score_samples`, reading files lazily."""

    def run(paths: list[Path], want_maps: bool, on_error: OnError) -> Iterator[list[Scored]]:
        samples = iter_samples([Record(p) for p in paths], detector.preprocess, on_error=lambda r, e: on_error(str(r.path), e))
        batch: list[Scored] = []
        for sample, score, amap in score_samples(detector, samples, batch_size=batch_size):
            batch.append((sample.path, score, amap if want_maps else None))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    return run


@dataclass
class RunSummary:
    """What a run did: images scored now and before (resumed), flagged, skipped as unreadable."""

    scored: int
    resumed: int
    flagged: int
    skipped: int
    rows: list[dict[str, Any]]

    def line(self, out: Path) -> str:
        parts = [f"scored {self.scored} images"]
        if self.resumed:
            parts.append(f"{self.resumed} already done (resumed)")
        parts.append(f"{self.flagged} flagged defective")
        parts.append(f"{self.skipped} skipped (see {out / 'errors.csv'})" if self.skipped else "0 skipped")
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
        row["score"] = float(row["score"])
        row["defective"] = None if row.get("defective") in (None, "") else row["defective"] == "True"
    return rows


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
    threshold: float | None = None,
    map_range: tuple[float, float] | None = None,
    overlays: bool = True,
    resume: bool = False,
    strict: bool = False,
    batch_size: int = 8,
    scorer: Scorer | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Score ``paths`` into ``out`` (see module docstring); never overwrites a result.
    ``scorer``: where scoring runs (default: `local_scorer` of ``detector``)."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "scores.csv").exists():
        raise DataError(f"{out / 'scores.csv'} already exists: pass --resume to continue that run, or use an empty --out folder.")
    done = _read_done(out) if resume else []
    finished = {str(Path(r["path"]).resolve()) for r in done}
    todo = [p for p in paths if str(p.resolve()) not in finished]
    names = output_names(paths)
    if overlays:
        clash = [out / f"{names[p]}_heatmap.png" for p in todo if (out / f"{names[p]}_heatmap.png").exists()]
        if clash and not resume:
            raise DataError(f"{clash[0]} already exists ({len(clash)} heatmaps would be overwritten); use an empty --out folder.")
    scorer = scorer or local_scorer(detector, batch_size=batch_size)
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
            rows = [{"path": p, "score": s, "defective": None if threshold is None else bool(s >= threshold)} for p, s, _ in batch]
            writer.rows(rows)
            new_rows += rows
            for p, _, amap in batch if overlays else ():
                path = Path(p)
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
    (out / "scores.json").write_text(json.dumps({"threshold": threshold, "images": rows}, indent=2))
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out / "scores.parquet")
    flagged = sum(1 for r in rows if r.get("defective"))
    return RunSummary(len(new_rows), len(done), flagged, skipped, rows)
