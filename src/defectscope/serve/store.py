"""The station's results store: every scored image, its verdict, model version and review.

`ResultStore` is the small interface the station uses; `SQLiteStore` implements it with
the standard library's sqlite3 in WAL mode inside the store folder (one file, safe
against a killed process: a row is either committed or absent). A server database can
replace it by implementing the same methods.

Images and heatmaps are kept as files under ``<store>/images`` named by result id, never
by the uploaded name.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from defectscope.errors import DataError

REVIEWS = ("normal", "defect")


@dataclass
class Result:
    """One scored image as the station recorded it."""

    id: str
    created: float
    source: str  # "upload:<name>" or "watch:<path>" (for people; never used as a path)
    image_file: str  # relative to the store folder
    heatmap_file: str
    score: float | None  # None when a frame check refused the image before scoring
    threshold: float | None
    verdict: str  # `verdict.decide`: "defect", "normal", "invalid" or "unknown" (no threshold)
    model_version: str
    regions: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    review: str | None = None
    reviewed_at: float | None = None
    reason: str | None = None  # why the verdict is invalid
    purged: float | None = None  # when retention deleted the image and heatmap (the row stays)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultStore(Protocol):
    """What the station needs from a store; SQLite by default."""

    root: Path

    def add(self, result: Result, *, seen_key: str | None = None) -> None: ...
    def get(self, result_id: str) -> Result | None: ...
    def query(self, *, verdict: str | None = None, review: str | None = None, limit: int = 50, offset: int = 0) -> list[Result]: ...
    def count(self, *, verdict: str | None = None, review: str | None = None) -> int: ...
    def set_review(self, result_id: str, label: str, *, version: Version | None = None) -> tuple[Result, str | None]: ...
    def reviewed(self) -> list[Result]: ...
    def oldest_images(self, *, before: float | None = None, limit: int = 500) -> list[Result]: ...
    def mark_purged(self, ids: list[str]) -> None: ...
    def scores(self, limit: int = 2000) -> list[tuple[float, float, str]]: ...
    def seen(self, key: str) -> bool: ...
    def add_version(self, version: Version) -> None: ...
    def versions(self) -> list[Version]: ...
    def pin(self, version: str, pinned: bool) -> Version: ...
    def mark_pruned(self, version: str) -> None: ...


@dataclass
class Version:
    """A model version the station served: the file it lives in (server-side only, never
    sent to clients), why it was made, and whether retention may delete it."""

    version: str
    path: str
    note: str
    created: float
    pinned: bool = False
    pruned: float | None = None  # when retention deleted its file

    def public(self) -> dict[str, Any]:
        """What a client may see (no server paths)."""
        return {k: v for k, v in asdict(self).items() if k != "path"}


def new_id() -> str:
    """A result id that is safe as a file name and unguessable."""
    return uuid.uuid4().hex


def outline_name(result_id: str) -> str:
    """Where a reviewed defect's outline (its mask, drawn on the review page) is kept, in the store."""
    return f"outlines/{result_id}.png"


SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, created REAL NOT NULL, source TEXT NOT NULL,
    image_file TEXT NOT NULL, heatmap_file TEXT NOT NULL, score REAL, threshold REAL,
    verdict TEXT NOT NULL, model_version TEXT NOT NULL, regions TEXT NOT NULL, timings TEXT NOT NULL,
    review TEXT, reviewed_at REAL, reason TEXT, purged REAL
);
CREATE INDEX IF NOT EXISTS results_created ON results(created);
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, result_id TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY, path TEXT NOT NULL, note TEXT NOT NULL, created REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, pruned REAL
);
"""
ADDED_COLUMNS = {"results": {"purged": "REAL"}, "versions": {"pinned": "INTEGER NOT NULL DEFAULT 0", "pruned": "REAL"}}


class SQLiteStore:
    """`ResultStore` in ``<root>/results.sqlite3`` (WAL mode); thread-safe."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.root / "results.sqlite3", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.root / 'results.sqlite3'} is not a usable results store ({exc}); move it away or choose another --store.") from exc

    def _columns(self, table: str) -> list[str]:
        return [row[1] for row in self._db.execute(f"PRAGMA table_info({table})")]

    def _migrate(self) -> None:
        """Bring an older store to this schema, keeping every row, each step in one
        transaction: a store from before verdict reasons is rebuilt (score may be NULL),
        columns added since (retention, pinning) are appended."""
        columns = self._columns("results")
        if "reason" not in columns:
            with self._tx() as db:
                db.execute("ALTER TABLE results RENAME TO results_old")
                db.execute("DROP INDEX IF EXISTS results_created")
                for statement in SCHEMA.split(";")[:2]:
                    db.execute(statement)
                names = ", ".join(columns)
                db.execute(f"INSERT INTO results ({names}) SELECT {names} FROM results_old")
                db.execute("DROP TABLE results_old")
        for table, added in ADDED_COLUMNS.items():
            missing = [c for c in added if c not in self._columns(table)]
            if missing:
                with self._tx() as db:
                    for column in missing:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {added[column]}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, result: Result, *, seen_key: str | None = None) -> None:
        """Record a result (and, in the same transaction, that a watched file was scored)."""
        r = result
        with self._tx() as db:
            db.execute(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.id, r.created, r.source, r.image_file, r.heatmap_file, r.score, r.threshold, r.verdict,
                 r.model_version, json.dumps(r.regions), json.dumps(r.timings), r.review, r.reviewed_at, r.reason, r.purged),
            )
            if seen_key is not None:
                db.execute("INSERT OR REPLACE INTO seen VALUES (?,?,?)", (seen_key, r.id, r.created))

    @staticmethod
    def _row(row: tuple) -> Result:
        values = list(row)
        values[9], values[10] = json.loads(values[9]), json.loads(values[10])
        return Result(*values)

    def get(self, result_id: str) -> Result | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM results WHERE id = ?", (result_id,)).fetchone()
        return None if row is None else self._row(row)

    @staticmethod
    def _where(verdict: str | None, review: str | None) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if verdict is not None:
            clauses.append("verdict = ?")
            args.append(verdict)
        if review == "unreviewed":
            clauses.append("review IS NULL")
        elif review is not None:
            clauses.append("review = ?")
            args.append(review)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def query(self, *, verdict: str | None = None, review: str | None = None, limit: int = 50, offset: int = 0) -> list[Result]:
        where, args = self._where(verdict, review)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM results{where} ORDER BY created DESC, id LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
        return [self._row(r) for r in rows]

    def count(self, *, verdict: str | None = None, review: str | None = None) -> int:
        where, args = self._where(verdict, review)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM results{where}", args).fetchone()[0])

    def set_review(self, result_id: str, label: str, *, version: Version | None = None) -> tuple[Result, str | None]:
        """Record an inspector's label (the last correction wins) and, in the same
        transaction, the model version it produced: both are recorded or neither. Returns
        the result and the label it had before. KeyError for an unknown id."""
        if label not in REVIEWS:
            raise DataError(f"Unknown review label {label!r}; use one of {', '.join(REVIEWS)}.")
        with self._tx() as db:
            row = db.execute("SELECT review FROM results WHERE id = ?", (result_id,)).fetchone()
            if row is None:
                raise KeyError(result_id)
            db.execute("UPDATE results SET review = ?, reviewed_at = ? WHERE id = ?", (label, time.time(), result_id))
            if version is not None:
                self._insert_version(db, version)
            full = db.execute("SELECT * FROM results WHERE id = ?", (result_id,)).fetchone()
        return self._row(full), row[0]

    def scores(self, limit: int = 2000) -> list[tuple[float, float, str]]:
        """(time, score, review or '') of the latest ``limit`` results, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT created, score, COALESCE(review, '') FROM results WHERE score IS NOT NULL ORDER BY created DESC LIMIT ?", (limit,)
            ).fetchall()
        return [tuple(r) for r in reversed(rows)]

    def reviewed(self) -> list[Result]:
        """Every reviewed result the model could judge whose image is still kept (a frame
        refused as invalid has no score a threshold could be set on)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM results WHERE review IS NOT NULL AND verdict != 'invalid' AND purged IS NULL ORDER BY created"
            ).fetchall()
        return [self._row(r) for r in rows]

    def oldest_images(self, *, before: float | None = None, limit: int = 500) -> list[Result]:
        """The oldest results whose images are still kept (created before ``before``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM results WHERE purged IS NULL AND created < ? ORDER BY created LIMIT ?",
                (float("inf") if before is None else before, limit),
            ).fetchall()
        return [self._row(r) for r in rows]

    def mark_purged(self, ids: list[str]) -> None:
        """Record that these results' images were deleted; their rows are kept."""
        with self._tx() as db:
            db.executemany("UPDATE results SET purged = ? WHERE id = ?", [(time.time(), i) for i in ids])

    def seen(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None

    @staticmethod
    def _insert_version(db: sqlite3.Connection, v: Version) -> None:
        db.execute("INSERT OR IGNORE INTO versions VALUES (?,?,?,?,?,?)", (v.version, v.path, v.note, v.created, int(v.pinned), v.pruned))

    def add_version(self, version: Version) -> None:
        with self._tx() as db:
            self._insert_version(db, version)

    def versions(self) -> list[Version]:
        """Every version this station has served, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT version, path, note, created, pinned, pruned FROM versions ORDER BY created").fetchall()
        return [Version(v, p, n, c, bool(pin), pr) for v, p, n, c, pin, pr in rows]

    def pin(self, version: str, pinned: bool) -> Version:
        """Keep (or release) a version from retention; KeyError if there is none such."""
        with self._tx() as db:
            if db.execute("UPDATE versions SET pinned = ? WHERE version = ?", (int(pinned), version)).rowcount == 0:
                raise KeyError(version)
        return next(v for v in self.versions() if v.version == version)

    def mark_pruned(self, version: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE versions SET pruned = ? WHERE version = ?", (time.time(), version))
