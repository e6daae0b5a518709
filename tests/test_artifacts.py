"""Model files: identical scores after a round trip; tampered, truncated, foreign files refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ModelFileError
from defectscope.modelfiles.artifacts import load_detector, read_manifest, save_detector


@pytest.fixture(scope="module")
def fitted_path(tmp_path_factory: pytest.TempPathFactory, battery: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    det = make_detector("patchcore", coreset_ratio=0.05)
    ds = load_dataset(battery)
    det.fit(iter_samples(ds.train[:8], det.preprocess))
    x = torch.stack([s.image for s in iter_samples(ds.test[:2], det.preprocess)])
    pred = det.predict(x)
    path = save_detector(det, tmp_path_factory.mktemp("m") / "model.dscope", extra={"threshold": {"value": 1.0}})
    return path, x, pred.scores


def test_round_trip_gives_identical_scores(fitted_path: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path, x, scores = fitted_path
    det = load_detector(path)
    assert torch.equal(det.predict(x).scores, scores)
    manifest = read_manifest(path)
    assert manifest["method"] == "patchcore" and manifest["extra"]["threshold"]["value"] == 1.0
    assert manifest["info"]["weights_hash"] and len(manifest["sha256"]) == 64


def test_existing_file_is_not_overwritten(fitted_path: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path = fitted_path[0]
    before = path.read_bytes()
    with pytest.raises(ModelFileError, match="already exists"):
        save_detector(load_detector(path), path)
    assert path.read_bytes() == before


def test_tampered_tensor_bytes_are_refused(fitted_path: tuple[Path, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    data = bytearray(fitted_path[0].read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "tampered.dscope"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="modified"):
        load_detector(bad)


def test_tampered_manifest_is_refused(fitted_path: tuple[Path, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    data = fitted_path[0].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["manifest"])
    manifest["config"]["num_neighbors"] = 1
    header["__metadata__"]["manifest"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "edited.dscope"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(ModelFileError, match="modified"):
        load_detector(bad)


def test_truncated_foreign_and_missing_files(fitted_path: tuple[Path, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    data = fitted_path[0].read_bytes()
    (tmp_path / "cut.dscope").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.dscope"):
        load_detector(tmp_path / "cut.dscope")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="not a defectscope model"):
        load_detector(tmp_path / "other.safetensors")
    (tmp_path / "pickle.dscope").write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(ModelFileError, match="pickle.dscope"):
        load_detector(tmp_path / "pickle.dscope")
    with pytest.raises(ModelFileError, match="not found"):
        load_detector(tmp_path / "nope.dscope")
