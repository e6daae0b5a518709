"""`serve --watch DIR`: score the images a camera PC drops into a folder, each exactly once.

watchdog reports new and moved-in files; a file is scored once its size and modification
time have stopped changing (half-written files are waited for). Each file is known by
its absolute path, size and modification time; the store records that key in the same
transaction as the result, so a restart neither skips nor repeats a file. On start, the
folder is scanned for files that arrived while the station was down.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from defectscope.data.images import IMAGE_SUFFIXES
from defectscope.errors import DataError
from defectscope.serve.station import Job, Station, check_upload
from defectscope.serve.store import new_id

log = logging.getLogger("defectscope")


def file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class FolderWatcher(FileSystemEventHandler):
    """Feeds finished image files of ``folder`` to the station's batcher."""

    def __init__(self, station: Station, folder: str | Path, *, settle_s: float = 0.5, poll_s: float = 0.1) -> None:
        self.station, self.folder = station, Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"Watch folder not found: {self.folder}. Create it or check the path.")
        self.settle_s, self.poll_s = settle_s, poll_s
        self._pending: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, stable since)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = Observer()
        self._thread = threading.Thread(target=self._run, name="defectscope-watch", daemon=True)

    def start(self) -> None:
        for path in sorted(self.folder.rglob("*")):
            self._note(path)
        self._observer.schedule(self, str(self.folder), recursive=True)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()
        self._observer.join(timeout=10)
        self._thread.join(timeout=10)

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

    def _run(self) -> None:
        while not self._stop.is_set():
            self._check()
            self._stop.wait(self.poll_s)

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
        for path in ready:
            self._submit(path)

    def _submit(self, path: Path) -> None:
        try:
            key = file_key(path)
        except FileNotFoundError:
            return
        if self.station.store.seen(key):
            return
        try:
            suffix = check_upload(path.read_bytes(), str(path))
        except DataError as exc:
            log.warning("Not scored: %s", exc)
            return
        rid = new_id()
        kept = self.station.store.root / "images" / f"{rid}{suffix}"
        shutil.copyfile(path, kept)
        future = self.station.batcher.submit(Job(rid, kept, f"watch:{path}", seen_key=key))
        future.add_done_callback(lambda f, p=path: f.exception() and log.warning("Not scored: %s: %s", p, f.exception()))
