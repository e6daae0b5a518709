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
    assert all(row["verdict"] in ("normal", "defect") for row in scores["images"])
    assert len(list((tmp_path / "pred2").glob("*_heatmap.png"))) == 8
    code, out = run("predict", str(model), str(small_mvtec / "test/good"), "--out", str(tmp_path / "pred"))
    assert code == 2 and "already exists" in out and "--resume" in out  # nothing overwritten
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
        (("predict", "/no/model.dscope", "x.png"), "Defectscope model file not found"),
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
    assert len(rows) == 8 and all(r["verdict"] == "unknown" for r in rows)  # no verdict without normal data
    code, out = run("predict", "--method", "patchcore", str(small_mvtec / "test"))
    assert code == 2 and "defectscope fit" in out


def test_fit_threshold_from_all_images_and_validation_guard(small_mvtec: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.dscope"
    code, out = run("fit", str(small_mvtec), "-o", str(model), "--false-alarm-rate", "0.05")
    assert code == 0, out
    assert "10-fold cross-fitting, coreset selected again per fold normal scores of 12 images" in out and "0.95 quantile" in out
    code, out = run("fit", str(small_mvtec), "-o", str(tmp_path / "v.dscope"), "--validation", str(small_mvtec))
    assert code == 2 and "--force" in out and not (tmp_path / "v.dscope").exists()
    code, out = run("fit", str(small_mvtec), "-o", str(tmp_path / "v.dscope"), "--validation", str(small_mvtec), "--force")
    assert code == 0 and "f1-optimal" in out, out
    code, out = run("fit", str(small_mvtec), "-o", str(tmp_path / "r.dscope"), "--false-alarm-rate", "2")
    assert code == 2 and "between 0 and 1" in out


def test_demo_says_each_warning_once_on_one_line(tmp_path: Path) -> None:
    """The bundled sample has 40 orphan masks: the demo says so once, with the count, and
    its paths unbroken at 80 columns; it writes the model, report.md and report.html."""
    from defectscope.demo import SAMPLE

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "have no image" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 40 masks"), lines
    assert str(SAMPLE / "ground_truth" / "defective") in lines[0] and str(SAMPLE / "test" / "defective") in lines[0]
    for name in ("model.dscope", "report.md", "report.html", "metrics.json"):
        assert (tmp_path / "demo" / name).is_file()
    assert "cross-fitting, coreset selected again per fold" in (tmp_path / "demo" / "report.md").read_text()


def test_add_normals_writes_a_new_model_and_keeps_the_old(small_mvtec: Path, tmp_path: Path) -> None:
    model, new = tmp_path / "m.dscope", tmp_path / "m2.dscope"
    assert run("fit", str(small_mvtec), "-o", str(model))[0] == 0
    before = model.read_bytes()
    code, out = run("add-normals", str(model), str(small_mvtec / "test/good"), "-o", str(new))
    assert code == 0 and "added_patches" in out, out
    assert model.read_bytes() == before and new.is_file()
    from defectscope.modelfiles.artifacts import read_manifest

    extra = read_manifest(new)["extra"]
    assert extra["parent"] == read_manifest(model)["sha256"][:12] and extra["threshold"] == read_manifest(model)["extra"]["threshold"]
    code, out = run("add-normals", str(model), str(small_mvtec / "test/good"), "-o", str(new))
    assert code == 2 and "already exists" in out


def test_predict_streams_skips_broken_files_and_resumes(small_mvtec: Path, tmp_path: Path) -> None:
    """A folder where some files are not images: every good file is scored, every broken
    one listed in errors.csv, exit status 3; a killed run resumed gives the same rows once."""
    import csv
    import shutil

    model = tmp_path / "m.dscope"
    assert run("fit", str(small_mvtec), "-o", str(model))[0] == 0
    folder = tmp_path / "mixed"
    shutil.copytree(small_mvtec / "test", folder)
    (folder / "good" / "notes.png").write_text("not an image")
    png = next((folder / "defective").iterdir()).read_bytes()
    (folder / "defective" / "cut.png").write_bytes(png[: len(png) // 3])
    code, out = run("predict", str(model), str(folder), "--out", str(tmp_path / "all"), "--no-heatmaps")
    assert code == 3, out
    assert "scored 8 images" in out and "2 unreadable" in out
    with (tmp_path / "all/errors.csv").open() as fh:
        errors = list(csv.DictReader(fh))
    assert sorted(Path(e["path"]).name for e in errors) == ["cut.png", "notes.png"] and all(e["reason"] for e in errors)
    code, out = run("predict", str(model), str(folder), "--out", str(tmp_path / "strict"), "--strict", "--no-heatmaps")
    assert code == 2 and "Cannot read" in out
    full = (tmp_path / "all/scores.csv").read_text().splitlines()
    # an interrupted run: the first 5 rows, the 6th cut mid-line by a kill
    part = tmp_path / "part"
    part.mkdir()
    (part / "scores.csv").write_text("\n".join(full[:6]) + "\n" + full[6][:9])
    shutil.copy(tmp_path / "all/run.json", part / "run.json")  # which model scored it
    code, out = run("predict", str(model), str(folder), "--out", str(part), "--resume", "--no-heatmaps")
    assert code == 3 and "5 already done" in out, out
    resumed = (part / "scores.csv").read_text().splitlines()
    assert sorted(resumed) == sorted(full) and len(set(resumed)) == len(resumed)
    assert len((part / "scores.jsonl").read_text().splitlines()) == 8


def test_killed_predict_resumed_gives_the_uninterrupted_rows(battery: Path, small_mvtec: Path, tmp_path: Path) -> None:
    """SIGKILL a real `defectscope predict` half-way, resume it: same rows, none twice."""
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time

    model = tmp_path / "m.dscope"
    assert run("fit", str(small_mvtec), "-o", str(model))[0] == 0
    folder = battery / "test"
    whole = tmp_path / "whole"
    assert run("predict", str(model), str(folder), "--out", str(whole), "--no-heatmaps")[0] == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "defectscope.cli", "predict", str(model), str(folder), "--out", str(cut), "--no-heatmaps"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        csv_file = cut / "scores.csv"
        if csv_file.exists() and len(csv_file.read_text().splitlines()) > 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kept = len((cut / "scores.csv").read_text().splitlines()) - 1
    assert 0 < kept < 112
    code, out = run("predict", str(model), str(folder), "--out", str(cut), "--resume", "--no-heatmaps")
    assert code == 0 and "already done" in out, out
    def rows(folder: Path) -> list[tuple[str, float, str]]:
        with (folder / "scores.csv").open() as fh:
            return sorted((r["path"], float(r["score"]), r["verdict"]) for r in csv.DictReader(fh))

    a, b = rows(whole), rows(cut)
    assert len(b) == len({r[0] for r in b}) == 112  # every image once
    assert [r[0] for r in a] == [r[0] for r in b] and [r[2] for r in a] == [r[2] for r in b]
    assert all(abs(x[1] - y[1]) <= 1e-5 * abs(x[1]) for x, y in zip(a, b, strict=True))  # batches may differ
