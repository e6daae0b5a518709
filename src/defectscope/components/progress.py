"""The progress callback every long-running step takes."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (stage, done, total; 0 = unknown)
