"""Scoring with an exported graph (`defectscope.modelfiles.export`) in ONNX Runtime or OpenVINO.

An `ExportedModel` stands where a fitted detector stands: it has the model's
preprocessing and a ``predict`` that returns a `Prediction`, so `scoring.score_samples`,
batch runs and their output files are the same as for a model file. Only the graph runs
in the runtime; decoding and resizing images is the package's, as for torch.

Loading refuses a file without defectscope metadata, of another format version, or whose
graph (ONNX) or weights (OpenVINO) no longer match the hash recorded at export.
OpenVINO is asked for float32 inference: on CPUs with bfloat16 units its default
precision hint would be bfloat16, and scores would no longer match torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from defectscope.data.datasets import Sample
from defectscope.data.images import Geometry, Preprocess
from defectscope.data.tensorfile import check_format
from defectscope.detectors.base import Detector, Prediction, Progress
from defectscope.errors import ConfigError, DataError, ModelFileError
from defectscope.modelfiles.export import FORMAT, FORMAT_VERSION, META_KEY, file_hash, onnx_graph_hash

RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino"}


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` names an exported graph (by its suffix) rather than a model file."""
    return Path(path).suffix.lower() in RUNTIMES


def _check_metadata(path: Path, raw: str | None) -> dict[str, Any]:
    refit = "export the model file again with `defectscope export MODEL -o ...`"
    if not raw:
        raise ModelFileError(f"{path} has no defectscope metadata (threshold, preprocessing); it was not written by `defectscope export`: {refit}.")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} has damaged defectscope metadata ({exc}); {refit}.") from exc
    return check_format(path, meta, FORMAT, FORMAT_VERSION, refit)


def _modified(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{path} has been modified since it was exported (hash mismatch); refusing to run it. "
        "Export the model file again with `defectscope export`."
    )


def _verified_onnx(path: Path) -> tuple[Any, dict[str, Any]]:
    """An exported ONNX file's model and metadata, its graph checked against the recorded hash."""
    import onnx

    try:
        model = onnx.load_model(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise ModelFileError(f"{path} is not a readable ONNX file ({exc}); export it again.") from exc
    meta = _check_metadata(path, {p.key: p.value for p in model.metadata_props}.get(META_KEY))
    if onnx_graph_hash(model) != meta.get("graph_sha256"):
        raise _modified(path)
    return model, meta


class _OnnxSession:
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        model, self.meta = _verified_onnx(path)
        self._session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, amap = self._session.run(["score", "map"], {"image": x})
        return score, amap


class _OpenVinoSession:
    """An OpenVINO IR (.xml + .bin) or an exported .onnx file, compiled for the CPU in float32."""

    def __init__(self, path: Path) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ConfigError(f"Running {path} with OpenVINO needs openvino: pip install openvino.") from exc
        core = ov.Core()
        if path.suffix.lower() == ".onnx":
            _, self.meta = _verified_onnx(path)
            model = core.read_model(str(path))
        else:
            model, self.meta = self._read_ir(core, path)
        self._compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self._request = self._compiled.create_infer_request()

    @staticmethod
    def _read_ir(core: Any, path: Path) -> tuple[Any, dict[str, Any]]:
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise ModelFileError(f"{path} needs its weights file {weights} beside it; copy both files.")
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise ModelFileError(f"{path} is not a readable OpenVINO graph ({exc}); export it again.") from exc
        meta = _check_metadata(path, model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None)
        if file_hash(weights) != meta.get("weights_sha256"):
            raise _modified(weights)
        return model, meta

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._request.infer({"image": x})
        return result[self._compiled.output("score")], result[self._compiled.output("map")]


@dataclass(frozen=True)
class FixedInput(Preprocess):
    """The model's preprocessing, refusing images whose network input is not the graph's:
    the sample loader then reports such a file (errors.csv in a batch run) and goes on."""

    input_size: tuple[int, int] = (256, 256)

    def geometry(self, h: int, w: int) -> Geometry:
        geo = super().geometry(h, w)
        if self.tile is not None:
            if min(geo.input) < self.tile:
                raise DataError(
                    f"An image of {h} x {w} pixels becomes {geo.input[0]} x {geo.input[1]} at scale {self.scale:g}, smaller than "
                    f"one {self.tile} x {self.tile} tile, the only input this exported graph takes; score it with the .dscope model."
                )
            return geo
        if geo.input != self.input_size:
            raise DataError(
                f"An image of {h} x {w} pixels becomes a {geo.input[0]} x {geo.input[1]} input, but this exported graph takes "
                f"{self.input_size[0]} x {self.input_size[1]} only; export again with --example set to such an image, "
                "or fit with --resize letterbox for crops of many shapes."
            )
        return geo


class ExportedModel(Detector):
    """A detector whose scoring runs an exported graph; it cannot be fitted or saved again."""

    name = "exported"
    needs_training_images = False

    def __init__(self, path: str | Path, runtime: str | None = None) -> None:
        """``runtime``: onnxruntime or openvino (default: by suffix; OpenVINO also runs .onnx files)."""
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in RUNTIMES:
            raise ModelFileError(f"{self.path} is not an exported graph (.onnx or .xml).")
        if not self.path.is_file():
            raise ModelFileError(f"Exported model not found: {self.path}. Write one with `defectscope export MODEL -o {self.path}`.")
        self.runtime = runtime or RUNTIMES[suffix]
        if self.runtime not in ("onnxruntime", "openvino") or (suffix == ".xml" and self.runtime != "openvino"):
            raise ConfigError(f"Cannot run {self.path} with {self.runtime!r}: .onnx runs in onnxruntime or openvino, .xml in openvino.")
        self._session = _OnnxSession(self.path) if self.runtime == "onnxruntime" else _OpenVinoSession(self.path)
        self.meta = self._session.meta
        self.method = self.meta["method"]
        self.preprocess = FixedInput(**self.meta["preprocess"], input_size=tuple(self.meta["input_size"]))

    @property
    def extra(self) -> dict[str, Any]:
        """Threshold and heatmap range, as a model file's manifest holds them."""
        return self.meta.get("extra", {})

    def predict(self, batch: torch.Tensor) -> Prediction:
        if tuple(batch.shape[-2:]) != self.preprocess.input_size:
            raise DataError(f"{self.path} takes {self.preprocess.input_size} inputs, got {tuple(batch.shape[-2:])}.")
        score, amap = self._session.run(np.ascontiguousarray(batch.numpy(), dtype=np.float32))
        return Prediction(torch.from_numpy(np.asarray(score)), torch.from_numpy(np.asarray(amap)))

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        raise ConfigError(f"{self.path} is an exported graph; fit the model file and export it again.")

    def config(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def state(self) -> dict[str, torch.Tensor]:
        raise ConfigError(f"{self.path} is an exported graph; it cannot be saved as a model file.")

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise ConfigError(f"{self.path} is an exported graph; it cannot load a model file's state.")

    @property
    def info(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "method": self.method, "source_sha256": self.meta.get("source_sha256")}
