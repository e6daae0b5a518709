"""The Ray engine gives the local engine's rows: a local Ray started for the run, and a
`ray start --head` cluster on 127.0.0.1 joined by address (both stopped by the test)."""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import run

from defectscope import pipeline
from defectscope.cli import EXIT_INVALID
from defectscope.data.datasets import load_dataset
from defectscope.decision.scoring import Judge
from defectscope.detectors import make_detector
from defectscope.engines.local import predict_folder
from defectscope.engines.ray_engine import ray_scorer
from defectscope.modelfiles.artifacts import load_detector, read_manifest, save_detector
from defectscope.pipeline import expand_images


def rows(folder: Path) -> dict[str, tuple[float | None, str, str]]:
    with (folder / "scores.csv").open() as fh:
        return {r["path"]: (float(r["score"]) if r["score"] else None, r["verdict"], r["reason"]) for r in csv.DictReader(fh)}


def same_rows(a: dict[str, tuple[float | None, str, str]], b: dict[str, tuple[float | None, str, str]]) -> None:
    assert a.keys() == b.keys()
    for path in a:  # threads per worker differ from the local run: sums may round differently
        assert (a[path][0] is None) == (b[path][0] is None), path
        if a[path][0] is not None:
            assert b[path][0] == pytest.approx(a[path][0], rel=1e-5), path
        assert b[path][1:] == a[path][1:], path


@pytest.fixture(scope="module")
def weld_model(tmp_path_factory: pytest.TempPathFactory, battery: Path) -> Path:
    train = load_dataset(battery).train[:40]
    fitted = pipeline.fit(make_detector("patchcore"), train)
    return save_detector(fitted.detector, tmp_path_factory.mktemp("ray") / "weld.dscope", extra=fitted.extra())


def test_local_ray_with_two_workers_gives_the_local_scores(weld_model: Path, magnetic: Path, tmp_path: Path) -> None:
    """80 real images (with two broken files among them; 3 blocks of 32 paths over 2 actors),
    heatmaps on: same rows, same errors, same maps."""
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((magnetic / "test").rglob("*.jpg"))[::8][:80]:
        shutil.copy(p, images / f"{p.parent.name}_{p.name}")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "truncated.jpg").write_bytes((images / min(p.name for p in images.iterdir())).read_bytes()[:300])
    paths, _ = expand_images([images])
    detector, manifest = load_detector(weld_model), read_manifest(weld_model)
    extra = manifest["extra"]
    kwargs = {"judge": Judge.of(extra, str(weld_model)), "map_range": extra["map_range"], "model_id": manifest["sha256"]}
    local = predict_folder(detector, paths, tmp_path / "local", **kwargs)
    ray = predict_folder(detector, paths, tmp_path / "ray", scorer=ray_scorer(weld_model.read_bytes(), workers=2), **kwargs)
    assert local.scored == ray.scored == 80 and local.skipped == ray.skipped == 2
    # magnetic tiles through a battery-weld model: not the trained part, so none may be called normal
    assert local.invalid == ray.invalid > 0 and not any(r["verdict"] == "normal" for r in local.rows)
    same_rows(rows(tmp_path / "local"), rows(tmp_path / "ray"))
    judged = sum(1 for r in local.rows if r["score"] is not None)
    errors = [(tmp_path / f / "errors.csv").read_text().splitlines() for f in ("local", "ray")]
    assert sorted(errors[0]) == sorted(errors[1]) and len(errors[0]) == 3
    heatmaps = sorted(p.name for p in (tmp_path / "local").glob("*_heatmap.png"))
    assert len(heatmaps) == judged and heatmaps == sorted(p.name for p in (tmp_path / "ray").glob("*_heatmap.png"))
    for name in heatmaps[::8]:
        a, b = (np.asarray(Image.open(tmp_path / f / name), dtype=int) for f in ("local", "ray"))
        assert np.abs(a - b).max() <= 1, name
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "ray" / "scores.parquet").column_names == ["path", "score", "verdict", "reason"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_against_a_ray_start_head_cluster(weld_model: Path, battery: Path, tmp_path: Path) -> None:
    ray_cli = Path(sys.executable).parent / "ray"
    port = free_port()
    temp = Path("/tmp") / f"ray-test-{port}"  # Ray's socket paths must stay short
    log_path = tmp_path / "ray-head.log"
    head_log = log_path.open("w")
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=head_log, stderr=subprocess.STDOUT,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = subprocess.run([str(ray_cli), "status", f"--address={address}"], capture_output=True, timeout=60, check=False)
            if status.returncode == 0:
                break
            assert head.poll() is None, f"ray start --head exited:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        else:
            pytest.fail(f"the Ray head did not come up within 90 s:\n{log_path.read_text()[-3000:]}")
        images = battery / "test" / "defective"
        code, out = run("predict", str(weld_model), str(images), "--out", str(tmp_path / "cluster"), "--no-heatmaps",
                        "--engine", "ray", "--address", address, "--workers", "2")
        assert code in (0, EXIT_INVALID), out  # a very dark defect image may be refused as a frame (exit 4)
        assert run("predict", str(weld_model), str(images), "--out", str(tmp_path / "local"), "--no-heatmaps")[0] == code
        same_rows(rows(tmp_path / "local"), rows(tmp_path / "cluster"))
        assert len(rows(tmp_path / "cluster")) == len(list(images.iterdir()))
    finally:
        head.terminate()  # `ray start --block` stops the head's processes when it is terminated
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        head_log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_cluster_that_is_not_there_is_a_clear_error(weld_model: Path, battery: Path, tmp_path: Path) -> None:
    code, out = run("predict", str(weld_model), str(battery / "test" / "good"), "--out", str(tmp_path / "o"),
                    "--engine", "ray", "--address", f"127.0.0.1:{free_port()}")
    assert code == 2 and "ray start --head" in out, out


def test_a_method_that_scores_images_against_each_other_is_refused_on_ray(battery: Path, tmp_path: Path) -> None:
    code, out = run("predict", "--method", "musc", str(battery / "test" / "good"), "--out", str(tmp_path / "o"), "--engine", "ray")
    assert code == 2 and "Use --engine local" in out, out
