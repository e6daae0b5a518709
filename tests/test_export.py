"""Exported graphs (ONNX, OpenVINO) score real images as the torch model does, and refuse bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from defectscope import pipeline
from defectscope.cli import app
from defectscope.data.datasets import Record, iter_samples
from defectscope.data.images import image_size
from defectscope.decision.scoring import score_samples
from defectscope.detectors.base import make_detector
from defectscope.errors import ConfigError, DataError, ModelFileError
from defectscope.modelfiles.artifacts import load_detector, read_manifest, save_detector
from defectscope.modelfiles.export import export_model, trace_onnx
from defectscope.modelfiles.runtimes import ExportedModel

runner = CliRunner()
TRAIN, TEST = 10, 12
# (method, dataset, options): magnetic_tile crops come in many shapes, so those models letterbox;
# battery_weld keeps the aspect ratio and is exported for the shape of one camera image.
# Each method once per input mode: PatchCore both ways (and with its whole-image branch), PaDiM letterboxed,
# FastRecon and SuperSimpleNet at the camera's aspect.
CASES = [
    ("patchcore", "magnetic", {"coreset_ratio": 0.1, "preprocess": {"resize": "letterbox"}}),
    ("patchcore", "battery", {"coreset_ratio": 0.1}),
    ("patchcore", "battery", {"coreset_ratio": 0.1, "whole_image": 1.0}),  # the whole-image branch inside the graph
    ("padim", "magnetic", {}),
    ("fastrecon", "battery", {}),
    ("supersimplenet", "battery", {"steps": 3}),  # a short training: the graph must equal the heads it has
]


def _test_images(root: Path, preprocess, shape: tuple[int, int] | None) -> list[Path]:
    """Every k-th test image (good and defective) of the given network input shape."""
    paths = sorted((root / "test").glob("*/*"))
    if shape is not None:
        paths = [p for p in paths if preprocess.geometry(*image_size(p)).input == shape]
    return paths[:: max(1, len(paths) // TEST)][:TEST]


def _fit(root: Path, method: str, options: dict, path: Path) -> Path:
    train = sorted((root / "train/good").iterdir())[:TRAIN]
    fitted = pipeline.fit(make_detector(method, **options), [Record(p) for p in train])
    return save_detector(fitted.detector, path, extra=fitted.extra())


def _scores(model, paths: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    rows = list(score_samples(model, iter_samples([Record(p) for p in paths], model.preprocess), score_refused=True))
    return np.array([r.score for r in rows]), [r.original_map() for r in rows]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{d}" for m, d, _ in CASES])
def exported(request, tmp_path_factory, magnetic: Path, battery: Path) -> tuple[Path, Path, list[Path]]:
    method, name, options = request.param
    root = {"magnetic": magnetic, "battery": battery}[name]
    tmp = tmp_path_factory.mktemp(f"{method}-{name}")
    model = _fit(root, method, options, tmp / "model.dscope")
    det = load_detector(model)
    aspect = det.preprocess.resize == "aspect"
    example = _commonest_shape(root) if aspect else None
    onnx_file = export_model(model, tmp / "model.onnx", "onnx", example=example)[0]
    shape = det.preprocess.geometry(*image_size(example)).input if aspect else None
    return model, onnx_file, _test_images(root, det.preprocess, shape)


def _commonest_shape(root: Path) -> Path:
    """A test image of the most frequent image size (the camera's)."""
    paths = sorted((root / "test").glob("*/*"))
    sizes = Counter(image_size(p) for p in paths)
    return next(p for p in paths if image_size(p) == sizes.most_common(1)[0][0])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_scores_maps_and_verdicts_match_torch(exported, runtime: str) -> None:
    model, onnx_file, images = exported
    det = load_detector(model)
    runner_ = ExportedModel(onnx_file, runtime)
    ref_scores, ref_maps = _scores(det, images)
    got_scores, got_maps = _scores(runner_, images)
    assert len(got_scores) == len(images) == TEST
    np.testing.assert_allclose(got_scores, ref_scores, rtol=1e-4, atol=0)
    for ref, got in zip(ref_maps, got_maps, strict=True):
        assert np.abs(ref - got).max() <= 1e-3 * (ref.max() - ref.min())
    threshold = runner_.extra["threshold"]["value"]
    assert ((got_scores >= threshold) == (ref_scores >= threshold)).all()
    assert runner_.info["source_sha256"] == read_manifest(model)["sha256"]


def test_openvino_ir_through_the_cli_matches_the_model_file(tmp_path: Path, battery: Path) -> None:
    model = _fit(battery, "patchcore", {"coreset_ratio": 0.1}, tmp_path / "weld.dscope")
    images = sorted((battery / "test").glob("*/*"))[::10]
    example = _commonest_shape(battery)
    xml = tmp_path / "weld.xml"
    result = runner.invoke(app, ["export", str(model), "-o", str(xml), "--format", "openvino", "--example", str(example)])
    assert result.exit_code == 0, result.output
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    out_torch, out_ov = tmp_path / "torch", tmp_path / "ov"
    assert runner.invoke(app, ["predict", str(model), *map(str, images), "--out", str(out_torch), "--no-heatmaps"]).exit_code == 0
    result = runner.invoke(app, ["predict", str(xml), *map(str, images), "--out", str(out_ov), "--no-heatmaps"])
    # battery_weld has two image shapes: those of the other shape are refused one by one, the rest scored
    assert result.exit_code == 3, result.output
    errors = (out_ov / "errors.csv").read_text()
    assert "export again with --example" in errors
    torch_rows = {r["path"]: r for r in json.loads((out_torch / "scores.json").read_text())["images"]}
    ov_rows = json.loads((out_ov / "scores.json").read_text())["images"]
    assert ov_rows and len(ov_rows) + errors.count("\n") - 1 == len(images)
    for row in ov_rows:
        assert row["score"] == pytest.approx(torch_rows[row["path"]]["score"], rel=1e-4)
        assert row["verdict"] == torch_rows[row["path"]]["verdict"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, battery: Path) -> Path:
    return _fit(battery, "padim", {"preprocess": {"size": 64}}, tmp_path_factory.mktemp("padim") / "small.dscope")


def test_existing_output_is_kept_unless_overwrite(small_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(ModelFileError, match="already exists"):
        export_model(small_model, out)
    assert out.read_bytes() == b"keep me"
    export_model(small_model, out, overwrite=True)
    assert ExportedModel(out).method == "padim"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_tampered_model_file_is_not_exported(small_model: Path, tmp_path: Path) -> None:
    data = bytearray(small_model.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "bad.dscope"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="modified"):
        export_model(bad, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_exported_file_without_metadata_or_modified_is_refused(small_model: Path, tmp_path: Path) -> None:
    import onnx

    good = export_model(small_model, tmp_path / "m.onnx")[0]
    model = onnx.load_model(str(good))
    del model.metadata_props[:]
    onnx.save_model(model, str(tmp_path / "bare.onnx"))
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ModelFileError, match="no defectscope metadata"):
            ExportedModel(tmp_path / "bare.onnx", runtime)
    model = onnx.load_model(str(good))
    init = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save_model(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(ModelFileError, match="modified since it was exported"):
        ExportedModel(tmp_path / "edited.onnx")
    result = runner.invoke(app, ["predict", str(tmp_path / "bare.onnx"), str(good), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "no defectscope metadata" in result.output


def test_what_cannot_be_exported_says_why(tmp_path: Path, battery: Path) -> None:
    spade = _fit(battery, "spade", {"preprocess": {"size": 64}}, tmp_path / "spade.dscope")
    with pytest.raises(ConfigError, match="spade models cannot be exported: its image-level"):
        export_model(spade, tmp_path / "spade.onnx")
    hnsw = _fit(battery, "patchcore", {"index": "hnsw", "preprocess": {"size": 64}}, tmp_path / "hnsw.dscope")
    with pytest.raises(ConfigError, match="approximate hnsw index"):
        export_model(hnsw, tmp_path / "hnsw.onnx")
    aspect = _fit(battery, "fastrecon", {"preprocess": {"size": 64}}, tmp_path / "fr.dscope")
    with pytest.raises(ConfigError, match="--example IMAGE"):
        export_model(aspect, tmp_path / "fr.onnx")
    with pytest.raises(ConfigError, match="xml"):
        export_model(aspect, tmp_path / "fr.onnx", "openvino", input_size=(32, 64))
    assert not list(tmp_path.glob("*.onnx"))


def test_wrong_input_shape_is_refused_per_image(small_model: Path, tmp_path: Path) -> None:
    runner_ = ExportedModel(export_model(small_model, tmp_path / "m.onnx")[0])
    with pytest.raises(DataError, match="takes"):
        runner_.predict(torch.rand(1, 3, 64, 48))


class _ScriptedGraph(torch.nn.Module):
    """A scoring graph holding a TorchScript block, as the Inception backbone does."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.jit.script(torch.nn.Conv2d(3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.block(x)[:, 0]
        return amap.flatten(1).amax(1), amap


def test_a_graph_that_cannot_be_traced_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="could not be traced into one graph.*TorchScript"):
        trace_onnx(_ScriptedGraph(), (32, 32))
