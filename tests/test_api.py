"""The Python API: the same rows as the CLI on real images, any image form, the same errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import defectscope as ds
from defectscope.errors import DataError, DefectscopeError


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, battery: Path) -> tuple[ds.Model, Path]:
    model = ds.fit(sorted((battery / "train/good").iterdir())[:12])
    path = model.save(tmp_path_factory.mktemp("api") / "weld.dscope")
    return model, path


def test_api_rows_equal_the_cli_rows(fitted: tuple[ds.Model, Path], battery: Path, tmp_path: Path) -> None:
    _, path = fitted
    images = sorted((battery / "test/good").iterdir())[:3] + sorted((battery / "test/defective").iterdir())[:5]
    subprocess.run([sys.executable, "-m", "defectscope.cli", "predict", str(path), *map(str, images), "--out", str(tmp_path / "cli"),
                    "--no-heatmaps"], check=False, capture_output=True)
    with (tmp_path / "cli" / "scores.csv").open() as fh:
        cli = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    results = ds.load(path).predict_many(images)
    assert len(results) == len(images) == len(cli)
    for img, r in zip(images, results, strict=True):
        row = cli[img.name]
        assert r.verdict == row["verdict"] and (r.reason or "") == row["reason"]
        assert (r.score is None and row["score"] == "") or r.score == pytest.approx(float(row["score"]), rel=1e-5)
    summary = ds.load(path).predict_folder(images, tmp_path / "api")
    assert summary.scored == len(images)
    with (tmp_path / "api" / "scores.csv").open() as fh:
        assert [r["verdict"] for r in csv.DictReader(fh)] == [cli[p.name]["verdict"] for p in images]


def test_a_path_a_pil_image_and_an_array_score_alike(fitted: tuple[ds.Model, Path], battery: Path) -> None:
    model, _ = fitted
    p = sorted((battery / "test/defective").iterdir())[0]
    pil = Image.open(p)
    grey = np.asarray(pil.convert("L"))
    rgb = np.asarray(pil.convert("RGB"))
    by_path, by_pil, by_grey, by_float = model.predict_many([p, pil, grey, rgb.astype(np.float32) / 255])
    for other in (by_pil, by_grey, by_float):
        assert other.verdict == by_path.verdict and other.score == pytest.approx(by_path.score, rel=1e-4)
    r = by_path
    assert r.anomaly_map.shape == grey.shape and r.threshold == model.threshold
    assert r.overlay().size == pil.size
    assert r.answer("where is it?").text
    assert "Result(" in repr(r) and "patchcore" in repr(model)


def test_a_dead_camera_frame_is_invalid_not_normal(fitted: tuple[ds.Model, Path]) -> None:
    model, _ = fitted
    black = model.predict(np.zeros((300, 400), np.uint8))
    nan = model.predict(np.full((300, 400, 3), np.nan, np.float32))
    for r in (black, nan):
        assert r.verdict == "invalid" and r.score is None and r.reason and r.is_defective is None
    assert black.overlay().size == (400, 300)


def test_errors_are_the_clis(fitted: tuple[ds.Model, Path], tmp_path: Path) -> None:
    model, path = fitted
    with pytest.raises(DataError, match="divide by 255"):
        model.predict(np.full((64, 64), 200.0))
    with pytest.raises(DataError, match="H x W"):
        model.predict(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(DefectscopeError, match="not found|No such"):
        model.predict(tmp_path / "missing.png")
    with pytest.raises(DefectscopeError, match="already exists"):
        model.save(path)
    (tmp_path / "bad.dscope").write_bytes(b"not a model")
    with pytest.raises(DefectscopeError):
        ds.load(tmp_path / "bad.dscope")


def test_evaluate_returns_a_table_object(small_mvtec: Path) -> None:
    table = ds.evaluate(small_mvtec, method="padim")
    assert "overall" in table.to_markdown() and "tpr_at_fpr1" in table.to_markdown()
    frame = table.to_dataframe()
    assert "image_auroc" in frame.columns and "overall" in frame.index
    assert table.threshold is not None and "EvalResult(padim" in repr(table)
