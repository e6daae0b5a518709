"""Export a fitted model to one ONNX or OpenVINO graph: resized image in, (score, map) out.

The graph is the method's own scoring code (`Detector.export_graph`) traced by
``torch.export`` and translated by ``torch.onnx``: normalisation, backbone, patch
aggregation, exact nearest-neighbour distances as tiled matrix products and a min, the
paper's image-score re-weighting, upsampling and Gaussian smoothing. The batch size is
free; height and width are fixed (`trace_onnx` says why): size x size for letterbox and
squash models, the input of one camera image's shape for aspect models. An image of
another shape is refused by the runner (a line in errors.csv), never silently resized.

What the runtime needs besides the graph travels in the file's metadata (ONNX
``metadata_props`` / OpenVINO ``rt_info``, key ``defectscope``): method, preprocessing,
threshold and heatmap range, the source model's content hash, and a SHA-256 of the graph
itself so that a modified file is refused (`defectscope.modelfiles.runtimes`).

OpenVINO files are converted from the ONNX graph and saved with float32 weights
(``compress_to_fp16=False``; OpenVINO's default would halve them and move scores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope import __version__
from defectscope.data.images import MIN_SIDE, Preprocess, image_size
from defectscope.errors import ConfigError, ModelFileError
from defectscope.modelfiles.artifacts import load_detector, read_manifest

log = logging.getLogger("defectscope")
FORMAT = "defectscope-export"
FORMAT_VERSION = 1
META_KEY = "defectscope"
FORMATS = {"onnx": ".onnx", "openvino": ".xml"}


def onnx_graph_hash(model: Any) -> str:
    """SHA-256 of an ONNX model without its metadata (what the metadata vouches for)."""
    bare = type(model)()
    bare.CopyFrom(model)
    del bare.metadata_props[:]
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (OpenVINO's weights file)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def outputs_of(out: Path, fmt: str) -> list[Path]:
    """The files an export to ``out`` writes (OpenVINO: the .xml graph and its .bin weights)."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}; use {' or '.join(FORMATS)}.")
    if out.suffix.lower() != FORMATS[fmt]:
        raise ConfigError(f"An {fmt} export is written to a {FORMATS[fmt]} file; got {out}.")
    return [out] if fmt == "onnx" else [out, out.with_suffix(".bin")]


def _metadata(model_path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    preprocess = manifest["config"].get("preprocess", {})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": manifest["method"],
        "preprocess": preprocess,
        "extra": manifest.get("extra", {}),
        "source_model": model_path.name,
        "source_sha256": manifest["sha256"],
        "weights_hash": manifest.get("info", {}).get("weights_hash"),
        "defectscope_version": __version__,
    }


def trace_onnx(graph: torch.nn.Module, input_size: tuple[int, int]) -> Any:
    """The ONNX model (onnx.ModelProto) of ``graph``: input ``image`` N x 3 x H x W with
    (H, W) = ``input_size``, outputs ``score`` (N) and ``map`` (N x H x W); N is free.

    Height and width are fixed: with them symbolic, torch.export spends over ten minutes
    reasoning about EfficientNet's nested same-padding shapes (measured), and a fixed
    shape is what edge runtimes optimise best. The graph first runs once in torch on the
    example input: that fills the cached upsampling and smoothing matrices with real
    tensors, which the trace then holds as constants (a matrix first built while tracing
    would be traced as float64 operations instead), and gives the reference that the
    exported graph must reproduce on the same input (`check_parity`)."""
    from torch.export import Dim

    x = torch.rand(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    graph = graph.eval()
    with torch.no_grad():
        reference = graph(x)
    try:
        with contextlib.redirect_stdout(None), torch.no_grad():  # torch.onnx prints its progress
            program = torch.onnx.export(
                graph, (x,), dynamo=True, dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}},
                input_names=["image"], output_names=["score", "map"], verbose=False,
            )
    except Exception as exc:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])[:300]
        raise ConfigError(
            f"This model's scoring could not be traced into one graph ({type(exc).__name__}: {reason}). A backbone "
            "shipped as TorchScript (inception_v3_tf, or an ensemble holding it) cannot be exported; fit on another "
            "backbone (EfficientNet-Lite, VGG19, DINOv2) to export."
        ) from exc
    check_parity(program.model_proto, x, reference)
    return program.model_proto


def check_parity(model: Any, x: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Refuse an export whose graph, run by onnxruntime on ``x``, does not give torch's
    scores (1e-4 relative) and maps (1e-3 of their range)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    score, amap = session.run(["score", "map"], {"image": x.numpy()})
    ref_score, ref_map = (t.numpy() for t in reference)
    score_err = float(np.max(np.abs(score - ref_score) / np.maximum(np.abs(ref_score), 1e-12)))
    map_err = float(np.max(np.abs(amap - ref_map)) / max(float(ref_map.max() - ref_map.min()), 1e-12))
    if score_err > 1e-4 or map_err > 1e-3:
        raise ConfigError(
            f"The exported graph does not reproduce torch (score error {score_err:.2g} relative, map error "
            f"{map_err:.2g} of its range); nothing was written. Please report this with the model's method and options."
        )


def input_size_for(preprocess: Preprocess, example: str | Path | None, input_size: tuple[int, int] | None) -> tuple[int, int]:
    """The network input (H, W) the graph is fixed to: the model's size x size for letterbox
    and squash; for aspect models the size an ``example`` camera image gets, or ``input_size``;
    for tiled models one tile (the runtime cuts and stitches as torch does)."""
    if preprocess.tile is not None:
        if input_size is not None or example is not None:
            raise ConfigError(f"This model scores {preprocess.tile} x {preprocess.tile} tiles; the graph takes one tile. Drop --example / --input-size.")
        return preprocess.tile, preprocess.tile
    if preprocess.resize != "aspect":
        if input_size is not None or example is not None:
            raise ConfigError(f"This model resizes every image to {preprocess.size} x {preprocess.size} ({preprocess.resize}); drop --example / --input-size.")
        return preprocess.size, preprocess.size
    if (example is None) == (input_size is None):
        raise ConfigError(
            "This model keeps each image's aspect ratio (resize aspect), so its input size depends on the camera: pass "
            "--example IMAGE (an image from the line) or --input-size HxW. For crops of many shapes, fit with --resize letterbox."
        )
    if example is not None:
        return preprocess.geometry(*image_size(example)).input
    h, w = input_size
    if min(h, w) < MIN_SIDE or max(h, w) > preprocess.size:
        raise ConfigError(f"--input-size {h}x{w}: each side must be {MIN_SIDE}..{preprocess.size} (the model's long side).")
    return h, w


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, removed afterwards: files are written there and
    moved into place only once complete, so a failed export leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_model(
    model_path: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    *,
    example: str | Path | None = None,
    input_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Export the model file ``model_path`` to ``out`` (.onnx or .xml); returns the files written.

    The model file is loaded with its hash checked (a modified file is refused); existing
    outputs are kept unless ``overwrite``; see `input_size_for` for the graph's input size."""
    model_path, out = Path(model_path), Path(out)
    targets = outputs_of(out, fmt)
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise ModelFileError(f"{existing[0]} already exists; choose another -o or pass --overwrite.")
    detector = load_detector(model_path)
    graph = detector.export_graph()
    size = input_size_for(detector.preprocess, example, input_size)
    meta = {**_metadata(model_path, read_manifest(model_path)), "input_size": list(size)}
    onnx_model = trace_onnx(graph, size)
    with _staging(out) as tmp:
        if fmt == "onnx":
            _write_onnx(onnx_model, meta, tmp / out.name)
        else:
            _write_openvino(onnx_model, meta, tmp / out.name)
        for target in targets:
            os.replace(tmp / target.name, target)
    return targets


def _write_onnx(model: Any, meta: dict[str, Any], path: Path) -> None:
    import onnx

    meta = {**meta, "graph_sha256": onnx_graph_hash(model)}
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    onnx.save_model(model, str(path))


def _write_openvino(model: Any, meta: dict[str, Any], path: Path) -> None:
    import onnx

    try:
        import openvino as ov
    except ImportError as exc:
        raise ConfigError("OpenVINO export needs openvino: pip install openvino.") from exc
    source = path.with_suffix(".source.onnx")
    onnx.save_model(model, str(source))
    converted = ov.convert_model(str(source))
    source.unlink()
    ov.save_model(converted, str(path), compress_to_fp16=False)
    meta = {**meta, "weights_sha256": file_hash(path.with_suffix(".bin"))}
    converted.set_rt_info(json.dumps(meta), [META_KEY])
    ov.save_model(converted, str(path), compress_to_fp16=False)
