"""The backbone's runtime (`defectscope.backbones.runtime`): parity with torch on real
images, refusal when parity fails, the graph cache, and models that cross runtimes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import defectscope as ds
from defectscope.backbones import get_backbone, runtime
from defectscope.cli import app
from defectscope.data.images import load_image
from defectscope.errors import ConfigError
from defectscope.modelfiles.artifacts import read_manifest

EXPORTABLE = [("tf_efficientnet_lite0", 256), ("tf_efficientnet_lite2", 256), ("dinov2_vits14", 224), ("vgg19", 128)]


def real_batch(folder: Path, size: int) -> torch.Tensor:
    """Two real images (not the parity image) resized to size x size."""
    images = [torch.from_numpy(load_image(p)).permute(2, 0, 1) for p in sorted(folder.iterdir())[:2]]
    return torch.stack([F.interpolate(im[None], size=(size, size), mode="bilinear", align_corners=False)[0] for im in images])


@pytest.mark.parametrize("name,size", EXPORTABLE)
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_runtime_features_match_torch_on_real_images(name: str, size: int, engine: str, magnetic: Path) -> None:
    backbone = get_backbone(name, None, "auto", engine)
    x = real_batch(magnetic / "test" / "blowhole", size)
    got, want = backbone(x), backbone.module(x)
    assert backbone.runtime_for((size, size)) == engine  # it did not fall back to torch
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= 1e-4 * float(w.abs().max())


def test_a_backbone_no_runtime_takes_runs_in_torch_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    backbone = get_backbone("inception_v3_tf", None, "auto", "auto")
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        assert backbone.runtime_for((128, 128)) == "torch"
    assert "runs in torch" in caplog.text
    with pytest.raises(ConfigError, match="cannot run the inception_v3_tf backbone"):
        get_backbone("inception_v3_tf", None, "auto", "openvino").runtime_for((128, 128))


def perturbed(build):
    """A graph builder whose features are off by 1e-3 of their scale: what a broken runtime does."""

    def run_off(*args):
        run = build(*args)
        return lambda x: [a + 1e-3 * np.abs(a).max() for a in run(x)]

    return run_off


def test_runtime_refused_when_it_does_not_reproduce_torch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime, "openvino_run", perturbed(runtime.openvino_run))
    asked = runtime.RuntimeBackbone(get_backbone("tf_efficientnet_lite0", None, "auto", "torch"), "openvino")
    with pytest.raises(ConfigError, match=r"openvino does not reproduce torch.*largest difference 0\.001"):
        asked.runtime_for((160, 160))
    auto = runtime.RuntimeBackbone(get_backbone("tf_efficientnet_lite0", None, "auto", "torch"), "auto")
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        assert auto.runtime_for((160, 160)) == "onnxruntime"  # the next runtime, said out loud
    assert "openvino cannot run" in caplog.text and "does not reproduce torch" in caplog.text


def no_tracing(*args, **kwargs):
    raise AssertionError("traced again although the graph is cached")


def test_graphs_are_cached_per_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path))
    module = get_backbone("tf_efficientnet_lite0", None, "auto", "torch")
    runtime.RuntimeBackbone(module, "onnxruntime").runtime_for((96, 96))
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # one graph with height and width free
    monkeypatch.setattr(torch.onnx, "export", no_tracing)
    fresh = runtime.RuntimeBackbone(module, "onnxruntime")  # a new process would start like this
    assert fresh.runtime_for((96, 96)) == "onnxruntime"
    assert fresh.runtime_for((130, 75)) == "onnxruntime"  # the same graph, checked at a second size when loaded


def test_a_graph_tied_to_its_size_gets_one_per_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """DINOv2's traced graph keeps the position-embedding grid of its trace size: wrong at any
    other size, which the second-size check catches; each size then gets its own graph."""
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path))
    module = get_backbone("dinov2_vits14", None, "auto", "torch")
    assert runtime.RuntimeBackbone(module, "onnxruntime").runtime_for((112, 112)) == "onnxruntime"
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # the size-free attempt and the 112 x 112 graph
    monkeypatch.setattr(torch.onnx, "export", no_tracing)
    fresh = runtime.RuntimeBackbone(module, "onnxruntime")
    assert fresh.runtime_for((112, 112)) == "onnxruntime"
    with pytest.raises(ConfigError, match="traced again"):
        fresh.runtime_for((140, 140))  # another size is another graph


def test_model_fitted_in_torch_predicts_the_same_in_openvino(small_mvtec: Path, tmp_path: Path) -> None:
    model = ds.fit(small_mvtec, runtime="torch")
    path = model.save(tmp_path / "weld.dscope")
    assert "runtime" not in read_manifest(path)["config"]  # the file records nothing of the runtime
    images = sorted((small_mvtec / "test" / "defective").iterdir())
    rows = {}
    for engine in ("torch", "openvino"):
        loaded = ds.load(path, runtime=engine)
        rows[engine] = loaded.predict_many(images)
        if engine != "torch":
            assert set(loaded.detector.backbone.runtimes().values()) == {engine}
    for a, b in zip(rows["torch"], rows["openvino"], strict=True):
        assert a.verdict == b.verdict
        assert a.score == pytest.approx(b.score, rel=1e-5)
        assert np.allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-5 * float(np.abs(a.anomaly_map).max()))


def test_bad_runtime_names_are_refused() -> None:
    result = CliRunner().invoke(app, ["fit", "nowhere", "--runtime", "cuda"])
    assert result.exit_code == 2 and "Unknown runtime 'cuda'" in result.output
    with pytest.raises(ConfigError, match="Unknown runtime"):
        ds.fit(Path("nowhere"), runtime="tensorrt")
