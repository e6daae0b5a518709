"""`serve --watch DIR`: score the images a camera PC drops into a folder, each exactly once.

watchdog reports new and moved-in files; a file is scored once its size and modification
time have stopped changing (half-written files are waited for). Each file is known by
its absolute path, size and modification time; the store records that key in the same
transaction as the result, so a restart neither skips nor repeats a file. On start (and
whenever watching has to be started again) the folder is scanned for files that arrived
while nobody watched.

The watching thread is its own supervisor: every error is recorded with its file and
retried with back-off, and `WatchHealth` tells /healthz how it is doing.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from defectscope.data.images import IMAGE_SUFFIXES
from defectscope.errors import DataError
from defectscope.serve.station import Job, Station, check_upload
from defectscope.serve.store import new_id

log = logging.getLogger("defectscope")


def file_key(path: Path) -> str:
    """A file's identity for "scored once": absolute path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


MAX_ATTEMPTS = 5  # tries per file before it is given up (and recorded as such)
FAILING_AFTER = 5  # consecutive failed passes after which /healthz reports the watcher unhealthy
MAX_BACKOFF_S = 60.0


def backoff(failures: int, base: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: doubling, capped at a minute."""
    return min(MAX_BACKOFF_S, base * 2 ** max(0, failures - 1))


@dataclass
class WatchHealth:
    """What /healthz says about the watcher; ``failing`` makes the station unhealthy."""

    state: str = "starting"  # running | retrying | failing | stopped
    queued: int = 0  # files handed to the scorer
    errors: int = 0  # failures of any kind since start
    given_up: int = 0  # files dropped after MAX_ATTEMPTS failures
    consecutive: int = 0  # failures since the last success
    last_error: dict[str, Any] | None = None  # {"file", "error", "at"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FolderWatcher(FileSystemEventHandler):
    """Feeds finished image files of ``folder`` to the station's batcher, supervised: any
    error (a file moved away between listing and reading, one the station may not read, a
    store that fails to write, the folder itself vanishing) is recorded with its file, the
    file is tried again with back-off, and the watcher goes on; it never dies quietly."""

    def __init__(
        self, station: Station, folder: str | Path, *, settle_s: float = 0.5, poll_s: float = 0.1, retry_s: float = 1.0
    ) -> None:
        self.station, self.folder = station, Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"Watch folder not found: {self.folder}. Create it or check the path.")
        self.settle_s, self.poll_s, self.retry_s = settle_s, poll_s, retry_s  # retry_s: the first back-off
        self._pending: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, stable since)
        self._retry: dict[Path, tuple[int, float]] = {}  # path -> (failed attempts, not before)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self.health = WatchHealth()
        self._thread = threading.Thread(target=self._run, name="defectscope-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._stop_observer()
        self.health.state = "stopped"

    @property
    def healthy(self) -> bool:
        return self.health.state != "failing"

    def on_created(self, event: FileSystemEvent) -> None:
        self._note(Path(event.src_path))

    def on_modified(self, event: FileSystemEvent) -> None:
        self._note(Path(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        self._note(Path(event.dest_path))

    def _note(self, path: Path) -> None:
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            with self._lock:
                self._pending.setdefault(path, (-1, -1, 0.0))

    def _start_observer(self) -> None:
        """(Re)start watchdog on the folder and list what arrived while nobody watched."""
        self._stop_observer()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"the watch folder {self.folder} is gone (unmounted or deleted)")
        observer = Observer()
        observer.schedule(self, str(self.folder), recursive=True)
        observer.start()
        self._observer = observer
        for path in sorted(self.folder.rglob("*")):
            self._note(path)

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def _run(self) -> None:
        """The supervisor: one pass after another; a failed pass is recorded and retried
        after a back-off, so the thread outlives every error."""
        while not self._stop.is_set():
            try:
                if self._observer is None or not self._observer.is_alive() or not self.folder.is_dir():
                    self._start_observer()
                    if self.health.state != "starting":
                        self._recovered()
                self._check()
            except Exception as exc:  # noqa: BLE001 - supervision: record, back off, go on
                self._failed(None, exc, counts=True)
                self._stop.wait(backoff(self.health.consecutive, self.retry_s))
                continue
            if self.health.state == "starting":
                self.health.state = "running"
            self._stop.wait(self.poll_s)

    def _failed(self, path: Path | None, exc: BaseException, *, counts: bool) -> None:
        """Record a failure; ``counts``: the watcher's or the store's (not one file's), so
        enough of them in a row make the station unhealthy."""
        h = self.health
        h.errors += 1
        h.last_error = {"file": None if path is None else str(path), "error": f"{type(exc).__name__}: {exc}", "at": time.time()}
        if counts:
            h.consecutive += 1
            h.state = "failing" if h.consecutive >= FAILING_AFTER else "retrying"
        log.warning("Watching %s: %s%s", self.folder, "" if path is None else f"{path}: ", h.last_error["error"])

    def _recovered(self) -> None:
        self.health.consecutive = 0
        self.health.state = "running"

    def _check(self) -> None:
        now = time.monotonic()
        ready = []
        with self._lock:
            for path, (size, mtime, since) in list(self._pending.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    self._pending[path] = (st.st_size, st.st_mtime_ns, now)
                elif st.st_size > 0 and now - since >= self.settle_s:
                    ready.append(path)
                    del self._pending[path]
            ready += [p for p, (_, not_before) in self._retry.items() if not_before <= now and p not in ready]
        for path in ready:
            self._submit(path)

    def _retry_later(self, path: Path, exc: BaseException, *, counts: bool) -> None:
        """Record the failure and try ``path`` again after a back-off (at most MAX_ATTEMPTS)."""
        self._failed(path, exc, counts=counts)
        with self._lock:
            attempts = self._retry.get(path, (0, 0.0))[0] + 1
            if attempts < MAX_ATTEMPTS:
                self._retry[path] = (attempts, time.monotonic() + backoff(attempts, self.retry_s))
                return
            self._retry.pop(path, None)
        self.health.given_up += 1
        log.error("Watching %s: gave up on %s after %d attempts; fix it and touch the file to try again.", self.folder, path, attempts)

    def _done_with(self, path: Path) -> None:
        with self._lock:
            self._retry.pop(path, None)

    def _submit(self, path: Path) -> None:
        """Hand one settled file to the scorer. Reading it may fail for the file's own
        reasons (gone: dropped; not readable: retried, not held against the watcher);
        the store failing is the station's problem and counts towards unhealthy."""
        try:
            key = file_key(path)
            data = path.read_bytes()
        except FileNotFoundError:  # moved or deleted between listing and reading: nothing to score
            self._done_with(path)
            return
        except OSError as exc:  # e.g. PermissionError while the camera still holds the file
            self._retry_later(path, exc, counts=False)
            return
        try:
            suffix = check_upload(data, str(path))
        except DataError as exc:  # not an image: retrying will not help
            self._done_with(path)
            log.warning("Not scored: %s", exc)
            return
        try:
            if self.station.store.seen(key):
                self._done_with(path)
                return
            rid = new_id()
            kept = self.station.store.root / "images" / f"{rid}{suffix}"
            kept.write_bytes(data)
        except Exception as exc:  # noqa: BLE001 - the store could not read or write: retry with back-off
            self._retry_later(path, exc, counts=True)
            return
        self._done_with(path)
        self.health.queued += 1
        future = self.station.batcher.submit(Job(rid, kept, f"watch:{path}", seen_key=key))
        future.add_done_callback(lambda f, p=path, k=kept: self._scored(p, k, f))

    def _scored(self, path: Path, kept: Path, future: Future) -> None:
        """A scoring failure that is not the file's fault (e.g. the store could not record
        the result) sends the file back to be tried again."""
        exc = future.exception()
        if exc is None:
            if self.health.consecutive:
                self._recovered()
            return
        if isinstance(exc, DataError):
            log.warning("Not scored: %s: %s", path, exc)
            return
        kept.unlink(missing_ok=True)  # no result was recorded for this copy; the retry makes its own
        self._retry_later(path, exc, counts=True)
