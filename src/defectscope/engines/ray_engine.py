"""Batch scoring on a Ray cluster with Ray Data: the same rows as the local engine.

The driver lists the images (so ``--resume`` can skip those already done) and hands them
to Ray Data as a dataset of paths; an actor pool scores them, each actor loading the model
once from the model file's bytes (shipped through Ray's object store, so worker machines
need no copy of it, only the images at the same paths, e.g. on a shared mount). Actors
read their own files, so reading is as parallel as scoring. Every actor scores with
`engines.local.local_scorer` (so `scoring.score_samples`) on the detector that `artifacts.load_detector` returns (hash
checked), exactly as the local engine does; a file an actor cannot read comes back as an
error row and the run goes on. Results stream back to the driver, which writes them with
the local engine's writer (`engines.local.predict_folder`). Ray schedules everything;
nothing here decides which machine does what.

Without an address a local Ray is started (and stopped) for the run; with one
(``ray start --head`` prints it) the run joins that cluster and leaves it running.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.backbones.runtime import runtime_env_vars
from defectscope.engines.local import OnError, Scored, Scorer, local_scorer
from defectscope.errors import ConfigError, DataError, DefectscopeError

BLOCK_PATHS = 32  # images per Ray Data block: the first results arrive after one block per worker


def has_ray() -> bool:
    return importlib.util.find_spec("ray") is not None


class _ModelActor:
    """One Ray actor: loads the model once, then scores batches of paths."""

    def __init__(self, model_ref: Any, threads: int, batch_size: int, want_maps: bool) -> None:
        import ray
        import torch

        from defectscope.decision.scoring import Judge
        from defectscope.modelfiles.artifacts import load_detector, read_manifest

        torch.set_num_threads(threads)
        data, threshold = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        fd, tmp = tempfile.mkstemp(suffix=".dscope")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.detector = load_detector(tmp)
            self.judge = Judge.of(read_manifest(tmp).get("extra", {}), "the model file", threshold)
        finally:
            os.unlink(tmp)
        self.batch_size, self.want_maps = batch_size, want_maps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        errors: dict[str, str] = {}
        paths = [Path(p) for p in batch["path"].tolist()]
        groups = local_scorer(self.detector, self.judge, batch_size=self.batch_size)(paths, self.want_maps, lambda p, e: errors.__setitem__(p, str(e)))
        scored = {r.path: r for group in groups for r in group}
        out: dict[str, list[Any]] = {k: [] for k in ("path", "score", "verdict", "reason", "error", "map", "height", "width")}
        for key in map(str, paths):
            r = scored.get(key)
            amap = None if r is None else r.map
            keep = amap is not None
            out["path"].append(key)
            out["score"].append(float("nan") if r is None or r.score is None else r.score)
            out["verdict"].append("" if r is None else r.verdict)
            out["reason"].append("" if r is None else r.reason or "")
            out["error"].append(errors.get(key) or ("" if r is not None else "the Ray worker returned no result for this image"))
            out["map"].append(amap.astype(np.float32).tobytes() if keep else b"")  # bytes: maps differ in shape
            out["height"].append(amap.shape[0] if keep else 0)
            out["width"].append(amap.shape[1] if keep else 0)
        return out


def _unpack(batch: dict[str, np.ndarray], on_error: OnError) -> Iterator[list[Scored]]:
    """Rows of one result batch back to `Scored` (errors reported through ``on_error``)."""
    good: list[Scored] = []
    keys = ("path", "score", "verdict", "reason", "error", "map", "height", "width")
    for path, score, verdict, reason, error, raw, h, w in zip(*(batch[k] for k in keys), strict=True):
        if error or not verdict:
            on_error(str(path), DataError(str(error or "the Ray worker returned no verdict for this image")))
            continue
        amap = np.frombuffer(raw, dtype=np.float32).reshape(int(h), int(w)) if h else None
        score = float(score)
        good.append(Scored(str(path), score if np.isfinite(score) else None, str(verdict), str(reason) or None, amap))
    if good:
        yield good


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at HOST:PORT."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms are Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"Nothing answers at the Ray address {address} ({exc}). Start a cluster with `ray start --head` and pass "
            "the address it prints, or leave out --address to run a local Ray."
        ) from exc


def _connect(address: str | None, workers: int | None) -> tuple[bool, int]:
    """Join the cluster at ``address`` or start a local Ray; (started here, CPUs in the cluster)."""
    import ray

    if ray.is_initialized():
        return False, int(ray.cluster_resources().get("CPU", 1))
    kwargs: dict[str, Any] = {
        "include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": runtime_env_vars()},  # workers run the backbone where this process would
    }
    try:
        if address is None:
            ray.init(num_cpus=max(workers or 0, os.cpu_count() or 1), **kwargs)
        else:
            _check_reachable(address)
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"Cannot connect to the Ray cluster at {address}: {exc}. Start one with `ray start --head` and pass "
            "the address it prints, or leave out --address to run a local Ray."
        ) from exc
    return True, int(ray.cluster_resources().get("CPU", 1))


def ray_scorer(
    model_bytes: bytes, *, threshold: float | None = None, address: str | None = None, workers: int | None = None, batch_size: int = 8
) -> Scorer:
    """A `Scorer` that runs on Ray: ``workers`` actors (default: one per 2 CPUs of the
    cluster), each with an equal share of the cluster's CPUs as torch threads, each judging
    with the model file's recorded frame limits and ``threshold`` (None: the file's own)."""
    if not has_ray():
        raise ConfigError("--engine ray needs Ray: pip install 'ray[data]' (or `pip install defectscope[ray]`).")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}.")

    def run(paths: list[Path], want_maps: bool, on_error: OnError) -> Iterator[list[Scored]]:
        import ray
        import ray.data

        started, cpus = _connect(address, workers)
        try:
            n = workers or max(1, cpus // 2)
            threads = max(1, cpus // n)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            if not paths:
                return
            given = {str(p.resolve()): str(p) for p in paths}  # workers may run elsewhere: send absolute paths
            ds = ray.data.from_items(  # small blocks: Ray Data returns a block's rows only when all are scored
                [{"path": p} for p in given], override_num_blocks=max(1, math.ceil(len(given) / BLOCK_PATHS))
            )
            scored = ds.map_batches(
                _ModelActor,
                fn_constructor_kwargs={"model_ref": ray.put((model_bytes, threshold)), "threads": threads, "batch_size": batch_size, "want_maps": want_maps},
                batch_size=batch_size,
                batch_format="numpy",
                concurrency=n,
                num_cpus=threads if threads * n <= cpus else cpus / n,
            )
            try:
                for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
                    batch["path"] = np.array([given[p] for p in batch["path"]], dtype=object)
                    yield from _unpack(batch, on_error)
            except ray.exceptions.RayError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
                if isinstance(cause, DefectscopeError):
                    raise type(cause)(str(cause)) from None
                raise DefectscopeError(f"The Ray run failed: {cause}") from exc
        finally:
            if started:
                ray.shutdown()

    return run
