"""`tune` chooses on normal training images alone and records what it compared."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import defectscope as ds
from defectscope.cli import app
from defectscope.errors import DataError
from defectscope.evaluation.tune import Candidate
from defectscope.modelfiles.artifacts import read_manifest

runner = CliRunner()


GRID = ["--backbones", "tf_efficientnet_lite0", "--sizes", "128", "--whole-image-weights", "0,1", "--no-tiles"]


def _blank_test_split(root: Path, to: Path) -> Path:
    """A copy of ``root`` whose test images are black frames of the same sizes (masks still fit)."""
    shutil.copytree(root, to)
    for p in (to / "test").rglob("*.png"):
        with Image.open(p) as im:
            size, mode = im.size, im.mode
        Image.new(mode, size).save(p)
    return to


def test_tune_never_looks_at_the_test_split_and_records_its_table(small_mvtec: Path, tmp_path: Path) -> None:
    blank = _blank_test_split(small_mvtec, tmp_path / "blank")
    out = tmp_path / "tuned.dscope"
    result = runner.invoke(app, ["tune", str(blank), "-o", str(out), *GRID])
    again = runner.invoke(app, ["tune", str(small_mvtec), "-o", str(tmp_path / "again.dscope"), *GRID])
    assert result.exit_code == 0 and again.exit_code == 0, result.output + again.output
    same = read_manifest(tmp_path / "again.dscope")["extra"]["tune"]
    assert result.exit_code == 0, result.output
    extra = read_manifest(out)["extra"]
    table = extra["tune"]
    assert len(table["rows"]) == 2 and extra["threshold"]["value"] > 0
    tried = [r for r in table["rows"] if r["criterion"] is not None]
    best = max(tried, key=lambda r: r["criterion"])
    assert table["choice"] == best["label"] and table["options"] == best["options"]
    assert set(table["validation"]["defects"]) >= {"rotate", "rescale", "colour", "remove", "cutpaste"}
    assert read_manifest(out)["config"]["preprocess"]["size"] == best["options"]["preprocess"]["size"]
    assert "chose" in result.output
    assert [r["criterion"] for r in same["rows"]] == [r["criterion"] for r in table["rows"]]  # test pixels changed nothing


def test_budget_stops_new_candidates(small_mvtec: Path) -> None:
    grid = [Candidate("tf_efficientnet_lite0", 128), Candidate("tf_efficientnet_lite0", 160)]
    from defectscope.data.datasets import training_records
    from defectscope.evaluation.tune import tune

    _, result = tune(training_records(small_mvtec), grid=grid, budget_s=0.0)
    assert result.rows[0].criterion is not None
    assert result.rows[1].criterion is None and "budget" in result.rows[1].note


def test_too_few_images_is_a_clear_error(tmp_path: Path, battery: Path) -> None:
    (tmp_path / "few").mkdir()
    for p in sorted((battery / "train/good").iterdir())[:5]:
        shutil.copy(p, tmp_path / "few" / p.name)
    with pytest.raises(DataError, match="at least 8"):
        ds.tune(tmp_path / "few")


def test_a_bad_candidate_is_refused_before_any_fit(small_mvtec: Path) -> None:
    result = runner.invoke(app, ["tune", str(small_mvtec), "-o", "x.dscope", "--whole-image-weights", "0,-1"])
    assert result.exit_code == 2 and "whole_image" in result.output
    result = runner.invoke(app, ["tune", str(small_mvtec), "-o", "x.dscope", "--sizes", "128,abc"])
    assert result.exit_code == 2 and "--sizes" in result.output
