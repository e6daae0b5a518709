"""Files of named tensors with a JSON manifest: the format under model and prompts files.

One safetensors file (loading never executes code) whose string header holds a manifest:
the writer's fields plus a SHA-256 over them and every tensor. A file that is missing,
truncated, of another format or modified since it was written is refused with the fix.
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

from defectscope.errors import ModelFileError


def content_hash(state: dict[str, torch.Tensor], manifest_core: dict[str, Any]) -> str:
    """SHA-256 over the manifest's core fields and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(manifest_core, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_tensors(path: str | Path, state: dict[str, torch.Tensor], core: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write tensors and a JSON manifest (``core`` plus their content hash) to one safetensors
    file, atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ModelFileError(f"{path} already exists; choose another name or pass overwrite=True (CLI: --overwrite).")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
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


def read_tensors(path: str | Path, fmt: str, version: int, fix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors) of a file written by `write_tensors` in format ``fmt``; a missing,
    truncated, foreign or modified file raises `ModelFileError` ending in ``fix``."""
    path = Path(path)
    manifest = manifest_of(path, fmt, version, fix)
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is damaged ({exc}); {fix}.") from exc
    core = {k: v for k, v in manifest.items() if k != "sha256"}
    if content_hash(state, core) != manifest.get("sha256"):
        raise ModelFileError(f"{path} has been modified since it was saved (content hash mismatch); refusing to load it. {fix[0].upper()}{fix[1:]}.")
    return manifest, state


NOUNS: dict[str, str] = {}  # format -> what a message calls such a file


def manifest_of(path: Path, fmt: str, version: int, fix: str) -> dict[str, Any]:
    """The manifest of ``path`` (tensors not read), checked to be format ``fmt`` at a version
    this defectscope reads; messages name the file as ``NOUNS[fmt]`` and end in ``fix``."""
    noun = NOUNS.get(fmt, fmt)
    if not path.is_file():
        raise ModelFileError(f"{noun[0].upper()}{noun[1:]} file not found: {path}; {fix}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable {noun} file ({exc}); it is truncated or foreign; {fix}.") from exc
    try:
        manifest = json.loads(metadata["manifest"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is a safetensors file but not a {noun} file (no manifest); {fix}.") from exc
    return check_format(path, manifest, fmt, version, fix)


def check_format(path: Path, manifest: dict[str, Any], fmt: str, version: int, fix: str) -> dict[str, Any]:
    """``manifest`` if it declares format ``fmt`` at a version this defectscope reads."""
    if manifest.get("format") != fmt:
        raise ModelFileError(f"{path} is not a {fmt} file (format {manifest.get('format')!r}); {fix}.")
    if manifest.get("format_version", 0) > version:
        raise ModelFileError(f"{path} was written by a newer defectscope; upgrade to read it.")
    return manifest


