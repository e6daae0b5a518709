"""Fail safe on the line: no frame the model cannot judge is ever called a good part.

A corpus built here from a real battery-weld image, thinking like a line that fails: a
dead or covered camera, a float frame with NaN or infinity, crops, another product, and
files that are not what they claim. Each goes through `predict` over a folder (the run
goes on; rows carry the verdict and reason, undecodable files land in errors.csv), the
station (a 4xx or ``invalid``, never a 500) and `ask` ("I cannot judge this image").
"""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import EXIT_SKIPPED, app
from defectscope.data.datasets import Record, load_sample
from defectscope.data.images import Preprocess
from defectscope.decision.gate import Gate, learn_frames
from defectscope.decision.metrics import misclassified
from defectscope.decision.scoring import Judge, score_samples
from defectscope.decision.thresholds import Threshold, from_normal
from defectscope.decision.verdict import decide
from defectscope.errors import ConfigError, DataError
from defectscope.modelfiles.artifacts import load_detector, read_manifest, save_detector
from defectscope.serve.app import create_app
from defectscope.serve.station import Station
from defectscope.serve.store import SQLiteStore

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, battery: Path) -> Path:
    """PatchCore on every battery-weld training image, as `defectscope fit` writes it."""
    path = tmp_path_factory.mktemp("failsafe") / "weld.dscope"
    code, out = run("fit", str(battery), "-o", str(path))
    assert code == 0, out
    return path


def _png_with_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR claiming another size (CRC fixed, so only the pixels lie)."""
    start = png.index(b"IHDR")
    ihdr = bytearray(png[start : start + 17])
    ihdr[4:12] = struct.pack(">II", width, height)
    return png[:start] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + png[start + 21 :]


def write_corpus(folder: Path, battery: Path, magnetic: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(frames that decode but cannot be judged, files that cannot be decoded)."""
    folder.mkdir()
    good = sorted((battery / "test/good").iterdir())[0]
    real = np.asarray(Image.open(good).convert("L"))
    h, w = real.shape
    rng = np.random.default_rng(0)
    frames = {
        "black": np.zeros((h, w), np.uint8),
        "white": np.full((h, w), 255, np.uint8),
        "grey": np.full((h, w), 128, np.uint8),
        "dark_noise": np.clip(rng.normal(2, 2, (h, w)), 0, 255).astype(np.uint8),  # lens cap: sensor noise only
        "one_pixel": np.zeros((1, 1), np.uint8) + 120,
        "sliver": real[:4, :].repeat(5, axis=1)[:, :2000],
    }
    judged: dict[str, Path] = {}
    for name, arr in frames.items():
        judged[name] = folder / f"{name}.png"
        Image.fromarray(arr).save(judged[name])
    judged["nan"] = folder / "nan.tiff"
    Image.fromarray(np.full((h, w), np.nan, np.float32), mode="F").save(judged["nan"])
    with_inf = real.astype(np.float32)
    with_inf[h // 2, w // 2] = np.inf
    judged["inf"] = folder / "inf.tiff"
    Image.fromarray(with_inf, mode="F").save(judged["inf"])
    judged["transparent"] = folder / "transparent.png"
    Image.new("RGBA", (w, h), (0, 0, 0, 0)).save(judged["transparent"])
    judged["flat16"] = folder / "flat16.png"
    Image.fromarray(np.full((h, w), 3000, np.uint16)).save(judged["flat16"])
    judged["other_product"] = folder / "magnetic_tile.png"
    Image.open(sorted((magnetic / "test/good").iterdir())[0]).save(judged["other_product"])

    png = good.read_bytes()
    broken = {
        "bomb": _png_with_size(png, 20000, 20000),
        "lying_header": _png_with_size(png, 3000, 3000),
        "truncated": png[: len(png) // 3],
        "not_an_image": b"GIF89a but really just text\n",
        "empty": b"",
    }
    unreadable = {}
    for name, data in broken.items():
        unreadable[name] = folder / f"{name}.png"
        unreadable[name].write_bytes(data)
    return judged, unreadable


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, battery: Path, magnetic: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "frames", battery, magnetic)


def test_predict_calls_every_bad_frame_invalid_and_goes_on(model: Path, corpus, battery: Path, tmp_path: Path) -> None:
    judged, unreadable = corpus
    good = sorted((battery / "test/good").iterdir())[:2]
    folder = next(iter(judged.values())).parent
    code, out = run("predict", str(model), str(folder), *map(str, good), "--out", str(tmp_path / "o"))
    assert code == EXIT_SKIPPED, out  # some files could not be decoded; the rest were judged
    assert f"{len(unreadable)} unreadable" in out and f"{len(judged)} invalid" in out
    with (tmp_path / "o/scores.csv").open() as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    for name, path in judged.items():
        row = rows[path.name]
        assert row["verdict"] == "invalid" and row["reason"], (name, row)
    assert "not the trained part" in rows["magnetic_tile.png"]["reason"] or "training images" in rows["magnetic_tile.png"]["reason"]
    assert "non-finite" in rows["nan.tiff"]["reason"] and "non-finite" in rows["inf.tiff"]["reason"]
    assert "too small" in rows["one_pixel.png"]["reason"] and "uniform" in rows["black.png"]["reason"]
    assert all(rows[p.name]["verdict"] in ("normal", "defect") for p in good)  # real parts are still judged
    with (tmp_path / "o/errors.csv").open() as fh:
        errors = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert errors.keys() == {p.name for p in unreadable.values()}
    assert "decompression bomb" in errors["bomb.png"] or "megapixels" in errors["bomb.png"]
    assert not any("0x" in reason for reason in errors.values())  # no Python object reprs
    doc = json.loads((tmp_path / "o/scores.json").read_text())  # valid JSON: no bare NaN
    assert all(r["score"] is None or np.isfinite(r["score"]) for r in doc["images"])


def test_station_answers_4xx_or_invalid_never_500_or_normal(model: Path, corpus, tmp_path: Path) -> None:
    judged, unreadable = corpus
    station = Station(model, SQLiteStore(tmp_path / "store"))
    try:
        client = TestClient(create_app(station), base_url="http://127.0.0.1")
        for name, path in {**judged, **unreadable}.items():
            out = client.post("/v1/predict", files={"files": (path.name, path.read_bytes(), "application/octet-stream")})
            assert out.status_code < 500, (name, out.text)
            if out.status_code == 200:
                result = out.json()["results"][0]
                assert result["verdict"] == "invalid" and result["reason"], (name, result)
                words = client.get(f"/v1/results/{result['id']}/answer").json()["text"]
                assert words.startswith("I cannot judge this image"), (name, words)
                refused = client.post("/v1/feedback", json={"id": result["id"], "label": "normal"})
                assert refused.status_code == 409 and "never taught" in refused.json()["detail"]  # a dead frame is not a good part
            else:
                assert name in unreadable, (name, out.text)
        assert client.get("/v1/results?verdict=invalid").json()["total"] == len(judged)
        for bad in ('{"value": NaN}', '{"value": Infinity}', '{"value": 0}', '{"value": -3}'):
            out = client.post("/v1/threshold", content=bad, headers={"content-type": "application/json"})
            assert out.status_code == 422, (bad, out.text)
        assert client.get("/v1/model").json()["threshold"]["value"] > 0
    finally:
        station.close()


def test_ask_says_it_cannot_judge(model: Path, corpus) -> None:
    judged, _ = corpus
    for name in ("black", "white", "nan", "one_pixel"):
        code, out = run("ask", str(model), str(judged[name]))
        assert code == 0 and out.startswith("I cannot judge this image:"), (name, out)


def test_thresholds_that_pass_every_part_are_refused(model: Path, battery: Path, tmp_path: Path) -> None:
    image = str(sorted((battery / "test/good").iterdir())[0])
    for bad in ("nan", "inf", "0", "-1"):
        code, out = run("predict", str(model), image, "--threshold", bad, "--out", str(tmp_path / bad))
        assert code == 2 and "finite number above 0" in out, (bad, out)
    manifest = read_manifest(model)
    extra = {**manifest["extra"], "threshold": {**manifest["extra"]["threshold"], "value": float("nan")}}
    stale = save_detector(load_detector(model), tmp_path / "nan-threshold.dscope", extra=extra)
    code, out = run("predict", str(stale), image, "--out", str(tmp_path / "stale"))
    assert code == 2 and "threshold recorded in" in out, out
    with pytest.raises(ConfigError, match="not a finite number"):
        from_normal(np.array([1.0, 2.0, np.nan, 3.0]))
    with pytest.raises(ConfigError):
        Threshold(float("nan"), "by hand", 0, 0)


def test_one_verdict_rule() -> None:
    assert decide(float("nan"), 1.0).label == "invalid"
    assert decide(float("inf"), 1.0).label == "invalid"
    assert decide(None, 1.0, "uniform").label == "invalid"
    assert decide(0.5, None).label == "unknown"
    assert decide(1.0, 1.0).label == "defect" and decide(0.99, 1.0).label == "normal"
    # evaluation counts a NaN on a good image as a false alarm, never as a pass
    assert misclassified(np.array([np.nan, 0.5, 2.0]), np.array([0, 1, 1]), 1.0) == (1, 1)


def test_resume_refuses_a_folder_scored_by_another_model(model: Path, battery: Path, tmp_path: Path) -> None:
    images = str(battery / "test/good")
    out = tmp_path / "o"
    assert run("predict", str(model), images, "--out", str(out), "--no-heatmaps")[0] == 0
    code, text = run("predict", str(model), images, "--out", str(out), "--no-heatmaps", "--resume", "--threshold", "99")
    assert code == 2 and "cannot be mixed" in text, text
    assert run("predict", str(model), images, "--out", str(out), "--no-heatmaps", "--resume")[0] == 0


def test_fit_refuses_a_bad_training_image_before_any_work(battery: Path, tmp_path: Path) -> None:
    train = tmp_path / "train"
    train.mkdir()
    for p in sorted((battery / "train/good").iterdir())[:4]:
        (train / p.name).write_bytes(p.read_bytes())
    Image.new("L", (400, 256)).save(train / "lens_cap.png")
    code, out = run("fit", str(train), "-o", str(tmp_path / "m.dscope"))
    assert code == 2 and "lens_cap.png" in out and "uniform" in out and not (tmp_path / "m.dscope").exists()
    (train / "lens_cap.png").write_bytes(_png_with_size((train / sorted(p.name for p in train.iterdir())[0]).read_bytes(), 20000, 20000))
    code, out = run("fit", str(train), "-o", str(tmp_path / "m.dscope"))
    assert code == 2 and "lens_cap.png" in out and "Traceback" not in out


def test_set_values_that_are_not_json_are_refused_unless_text(battery: Path, tmp_path: Path) -> None:
    code, out = run("fit", str(battery), "-o", str(tmp_path / "m.dscope"), "--set", "coreset_ratio=0.l")
    assert code == 2 and "not a JSON value" in out
    code, out = run("fit", str(battery), "-o", str(tmp_path / "m.dscope"), "--set", "backbone=no_such_net")
    assert code == 2 and "not a JSON value" not in out  # a text option takes a bare word (and fails on its own terms)


def test_gate_is_recorded_and_an_old_file_keeps_the_fixed_checks(model: Path, battery: Path, caplog: pytest.LogCaptureFixture) -> None:
    extra = read_manifest(model)["extra"]
    gate = Gate.from_extra(extra, str(model))
    assert gate.learned and gate.not_part is not None and gate.n_images == 45
    old = Gate.from_extra({"threshold": extra["threshold"]}, "old.dscope")
    assert not old.learned and "records no frame limits" in caplog.text
    sample = load_sample(Record(sorted((battery / "test/good").iterdir())[0]), Preprocess())
    sample.image = sample.image * 0
    assert old.check_frame(sample) is not None  # a black frame is refused even by a model file without limits
    detector = load_detector(model)
    with pytest.raises(DataError, match="uniform"):
        learn_frames([sample])
    judged = next(score_samples(detector, [sample], judge=Judge(1.0, old)))
    assert judged.verdict.label == "invalid" and judged.score is None
