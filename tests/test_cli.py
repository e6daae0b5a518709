"""The command line end to end on a small copy of real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from defectscope.cli import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_fit_predict_evaluate(small_mvtec: Path, tmp_path: Path) -> None:
    model = tmp_path / "weld.dscope"
    code, out = run("fit", str(small_mvtec), "-o", str(model), "--set", "coreset_ratio=0.1")
    assert code == 0, out
    assert "threshold" in out and model.is_file()
    code, out = run("predict", str(model), str(small_mvtec / "test"), "--out", str(tmp_path / "pred"))
    assert code == 0, out  # folders are searched recursively
    assert len(json.loads((tmp_path / "pred/scores.json").read_text())["images"]) == 8
    code, out = run(
        "predict", str(model), str(small_mvtec / "test/good"), str(small_mvtec / "test/defective"), "--out", str(tmp_path / "pred2")
    )
    assert code == 0, out
    scores = json.loads((tmp_path / "pred2/scores.json").read_text())
    assert len(scores["images"]) == 8 and scores["threshold"] is not None
    assert all("defective" in row for row in scores["images"])
    assert len(list((tmp_path / "pred2").glob("*_heatmap.png"))) == 8
    code, out = run("predict", str(model), str(small_mvtec / "test/good"), "--out", str(tmp_path / "pred"))
    assert code == 2 and "already exists" in out  # nothing overwritten
    table = tmp_path / "table.csv"
    code, out = run("evaluate", str(small_mvtec), "--set", "coreset_ratio=0.1", "-o", str(table))
    assert code == 0, out
    assert "image_auroc" in table.read_text() and "overall" in table.read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (("fit", "/no/such/folder"), "not found"),
        (("evaluate", "/no/such/folder"), "not found"),
        (("fit", ".", "--method", "nosuchmethod"), "Unknown method"),
        (("predict", "/no/model.dscope", "x.png"), "Model file not found"),
        (("fit", ".", "--set", "coreset_ratio=3"), "coreset_ratio"),
    ],
)
def test_user_errors_exit_cleanly(args: tuple[str, ...], message: str) -> None:
    code, out = run(*args)
    assert code == 2 and message in out.replace("\n", " ")


def test_zero_shot_predict_needs_no_model(small_mvtec: Path, tmp_path: Path) -> None:
    code, out = run("predict", "--method", "musc", str(small_mvtec / "test"), "--out", str(tmp_path / "z"))
    assert code == 0, out
    rows = json.loads((tmp_path / "z/scores.json").read_text())["images"]
    assert len(rows) == 8 and all("defective" not in r for r in rows)  # no threshold without normal data
    code, out = run("predict", "--method", "patchcore", str(small_mvtec / "test"))
    assert code == 2 and "defectscope fit" in out
