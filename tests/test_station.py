"""The station over HTTP (in-process): scoring, the store, corrections, bad input, watching."""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectscope import pipeline
from defectscope.data.datasets import load_dataset
from defectscope.detectors import make_detector
from defectscope.modelfiles.artifacts import save_detector
from defectscope.serve.access import Access
from defectscope.serve.app import create_app
from defectscope.serve.station import Station
from defectscope.serve.store import SQLiteStore
from defectscope.serve.watch import FolderWatcher


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, battery: Path) -> Path:
    """PatchCore on 12 normal battery-weld images, threshold from all of them."""
    fitted = pipeline.fit(make_detector("patchcore"), load_dataset(battery).train[:12])
    return save_detector(fitted.detector, tmp_path_factory.mktemp("model") / "weld.dscope", extra=fitted.extra())


@pytest.fixture()
def station(model: Path, tmp_path: Path):
    st = Station(model, SQLiteStore(tmp_path / "store"))
    yield st
    st.close()


def local(app, host: str = "127.0.0.1") -> TestClient:
    """A client that reaches the app as a browser on ``host`` would (the Host header is checked)."""
    return TestClient(app, base_url=f"http://{host}")


@pytest.fixture()
def client(station: Station) -> TestClient:
    return local(create_app(station))


def flagged_image(client: TestClient, battery: Path) -> tuple[Path, dict]:
    """The first defective test image the model flags (scored through the API)."""
    for p in sorted((battery / "test/defective").iterdir())[:8]:
        r = client.post("/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")}).json()["results"][0]
        if r["verdict"] == "defect":
            return p, r
    pytest.fail("The model flags none of the first 8 defective images.")


def test_predict_record_and_read_back(client: TestClient, battery: Path) -> None:
    paths = sorted((battery / "test/good").iterdir())[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    out = client.post("/v1/predict", files=files)
    assert out.status_code == 200, out.text
    results = out.json()["results"]
    model = client.get("/v1/model").json()
    for r, path in zip(results, paths, strict=True):
        assert r["threshold"] == pytest.approx(model["threshold"]["value"])
        assert r["verdict"] == ("defect" if r["score"] >= r["threshold"] else "normal")
        assert r["model_version"] == model["version"] and "score_ms" in r["timings"]
        heat = client.get(r["heatmap_url"])
        assert heat.status_code == 200 and Image.open(io.BytesIO(heat.content)).size == Image.open(path).size
    raw = client.post("/v1/predict", content=paths[0].read_bytes(), headers={"content-type": "image/png", "x-filename": "a.png"})
    assert raw.status_code == 200 and raw.json()["results"][0]["score"] == pytest.approx(results[0]["score"], rel=1e-5)
    page = client.get("/v1/results", params={"limit": 2}).json()
    assert page["total"] == 4 and len(page["items"]) == 2
    assert client.get("/healthz").json() == {"status": "ok", "model_version": model["version"]}
    assert model["method"] == "patchcore" and model["threshold"]["source"] == "10-fold cross-fitting, coreset selected again per fold"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_regions_are_inside_the_image_and_above_threshold(client: TestClient, battery: Path) -> None:
    path, r = flagged_image(client, battery)
    w, h = Image.open(path).size
    assert r["regions"], "a flagged image should have a region above the threshold"
    for g in r["regions"]:
        assert 0 <= g["x"] < w and 0 <= g["y"] < h and g["x"] + g["width"] <= w and g["y"] + g["height"] <= h
        assert 0 < g["area_share"] <= 1
    # cut at the threshold, or (a smoothed map below it) halfway up to its peak: never a region elsewhere
    assert all(g["peak"] >= r["threshold"] for g in r["regions"]) or max(g["peak"] for g in r["regions"]) < r["threshold"]
    said = client.get(f"/v1/results/{r['id']}/answer", params={"q": "where is it?"}).json()
    assert said["source"] == "rules" and r["regions"][0]["position"] in said["text"]


def test_good_part_feedback_teaches_a_new_version(client: TestClient, station: Station, battery: Path, model: Path) -> None:
    path, first = flagged_image(client, battery)
    old = first["model_version"]
    out = client.post("/v1/feedback", json={"id": first["id"], "label": "normal"}).json()
    assert out["model_update"]["added_patches"] > 0 and out["model_version"] != old
    assert model.exists() and Path(station.current.path).name == "weld.v2.dscope"  # the old file stays
    again = client.post("/v1/predict", files={"files": (path.name, path.read_bytes(), "image/png")}).json()["results"][0]
    assert again["model_version"] == out["model_version"] and again["score"] < again["threshold"]
    versions = client.get("/v1/model").json()["versions"]
    assert [v["version"] for v in versions] == [old, out["model_version"]]
    assert client.get(f"/v1/results/{first['id']}").json()["model_version"] == old  # who scored it stays recorded
    confirm = client.post("/v1/feedback", json={"id": again["id"], "label": "defect"}).json()
    assert confirm["model_update"] is None


def test_threshold_by_hand_and_from_reviews(client: TestClient, battery: Path) -> None:
    goods = sorted((battery / "test/good").iterdir())[:3]
    bads = sorted((battery / "test/defective").iterdir())[:3]
    ids = {}
    for p, label in [*((g, "normal") for g in goods), *((b, "defect") for b in bads)]:
        ids[p] = client.post("/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")}).json()["results"][0]["id"]
    for p in bads:
        client.post("/v1/feedback", json={"id": ids[p], "label": "defect"})
    hand = client.post("/v1/threshold", json={"value": 40.0}).json()
    assert hand["threshold"]["value"] == 40.0 and hand["threshold"]["source"] == "station"
    for p in goods:
        client.post("/v1/feedback", json={"id": ids[p], "label": "normal"})
    f1 = client.post("/v1/threshold", json={"f1_from_reviews": True})
    assert f1.status_code == 200, f1.text
    assert f1.json()["threshold"]["method"].startswith("f1-optimal on 6 images reviewed at the station, re-scored by version")


def test_bad_input_gets_a_clear_4xx_and_the_station_keeps_serving(client: TestClient, battery: Path, tmp_path: Path) -> None:
    good = sorted((battery / "test/good").iterdir())[0]
    jpeg = io.BytesIO()
    Image.open(good).convert("RGB").save(jpeg, format="JPEG")
    big = io.BytesIO()
    Image.new("L", (7100, 7100)).save(big, format="PNG")  # 50 megapixels
    cases = {
        "text": (b"this is not an image\n", 400, "not a readable image"),
        "truncated": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], 400, "not a readable image"),
        "empty": (b"", 400, "empty"),
        "huge": (big.getvalue(), 413, "megapixels"),
    }
    for name, (data, status, words) in cases.items():
        out = client.post("/v1/predict", files={"files": (f"{name}.png", data, "image/png")})
        assert out.status_code == status and words in out.json()["detail"], (name, out.text)
    assert client.post("/v1/feedback", json={"id": "nope", "label": "normal"}).status_code == 404
    assert client.post("/v1/feedback", json={"id": "nope", "label": "maybe"}).status_code == 422
    assert client.post("/v1/predict", files={"files": ("../../etc/x.png", good.read_bytes(), "image/png")}).status_code == 200
    assert not (tmp_path / "etc").exists()  # the upload's name never becomes a path
    mixed = [("files", ("ok.png", good.read_bytes(), "image/png")), ("files", ("bad.png", b"junk", "image/png"))]
    assert client.post("/v1/predict", files=mixed).status_code == 400  # one bad file refuses the request
    assert client.get("/v1/results").json()["total"] == 1  # refused uploads leave no result
    assert len(list((tmp_path / "store" / "images").iterdir())) == 2  # nor any file: one image, one heatmap


def test_two_inspectors_correct_the_same_image_at_once(client: TestClient, battery: Path) -> None:
    _, r = flagged_image(client, battery)
    before = len(client.get("/v1/model").json()["versions"])
    replies = []

    def correct() -> None:
        replies.append(client.post("/v1/feedback", json={"id": r["id"], "label": "normal"}))

    threads = [threading.Thread(target=correct) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [x.status_code for x in replies] == [200, 200]
    assert sum(x.json()["model_update"] is not None for x in replies) == 1  # taught once
    assert len(client.get("/v1/model").json()["versions"]) == before + 1
    assert client.get(f"/v1/results/{r['id']}").json()["review"] == "normal"


def test_restart_keeps_everything(model: Path, tmp_path: Path, battery: Path) -> None:
    store = tmp_path / "store"
    st = Station(model, SQLiteStore(store))
    c = local(create_app(st))
    p = sorted((battery / "test/good").iterdir())[0]
    rid = c.post("/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")}).json()["results"][0]["id"]
    c.post("/v1/feedback", json={"id": rid, "label": "defect"})
    st.close()
    st.store.close()
    again = Station(model, SQLiteStore(store))
    r = local(create_app(again)).get(f"/v1/results/{rid}").json()
    assert r["review"] == "defect" and any((store / "images").glob(f"{rid}*"))
    again.close()


def test_token_guards_changes_off_loopback(station: Station) -> None:
    access = Access.for_bind("127.0.0.2", "change-token-0123456789")
    c = TestClient(create_app(station, access=access), base_url="http://127.0.0.2")
    assert c.post("/v1/threshold", json={"value": 1.0}).status_code == 401
    assert c.post("/v1/threshold", json={"value": 1.0}, headers={"X-Token": "wrong"}).status_code == 401
    assert c.post("/v1/threshold", json={"value": 1.0}, headers={"X-Token": "change-token-0123456789"}).status_code == 200


def watch_until(station: Station, drop: Path, count: int, drop_files) -> None:
    """Watch ``drop`` while ``drop_files()`` writes into it, until ``count`` results (60 s at most)."""
    watcher = FolderWatcher(station, drop, settle_s=0.3, poll_s=0.05)
    watcher.start()
    drop_files()
    deadline = time.monotonic() + 60
    while station.store.count() < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # long enough for a duplicate to show up, were there one
    watcher.stop()
    station.close()


def test_watch_folder_scores_each_file_once_across_a_restart(
    model: Path, tmp_path: Path, battery: Path, caplog: pytest.LogCaptureFixture
) -> None:
    drop, store = tmp_path / "camera", tmp_path / "store"
    drop.mkdir()
    images = sorted((battery / "test/good").iterdir())[:3]

    def camera() -> None:
        data = images[0].read_bytes()
        with (drop / "half.png").open("wb") as fh:  # a camera still writing
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.15)
            fh.write(data[len(data) // 2 :])
        for p in images[1:]:
            (drop / p.name).write_bytes(p.read_bytes())

    with caplog.at_level(logging.WARNING, logger="defectscope"):
        first = Station(model, SQLiteStore(store))
        watch_until(first, drop, 3, camera)
    assert first.store.count() == 3
    assert "Not scored" not in caplog.text  # the half-written file was waited for, not tried
    again = Station(model, SQLiteStore(store))
    watch_until(again, drop, 4, lambda: (drop / "late.png").write_bytes(images[0].read_bytes()))
    sources = sorted(r.source for r in again.store.query(limit=10))
    assert len(sources) == 4 and len(set(sources)) == 4, sources  # the first three were not repeated


def test_unreadable_result_store_is_a_clear_error(tmp_path: Path) -> None:
    from defectscope.errors import DataError

    (tmp_path / "results.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(DataError, match="not a usable results store"):
        SQLiteStore(tmp_path)



def test_version_switch_drops_no_request(client: TestClient, battery: Path) -> None:
    """Clients keep posting while a correction writes and switches to a new version."""
    _, flagged = flagged_image(client, battery)
    good = sorted((battery / "test/good").iterdir())[:4]
    statuses, versions = [], set()

    def post(p: Path) -> None:
        r = client.post("/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")})
        statuses.append(r.status_code)
        versions.add(r.json()["results"][0]["model_version"])

    threads = [threading.Thread(target=post, args=(good[i % 4],)) for i in range(12)]
    for t in threads[:6]:
        t.start()
    switch = client.post("/v1/feedback", json={"id": flagged["id"], "label": "normal"})
    for t in threads[6:]:
        t.start()
    for t in threads:
        t.join()
    assert switch.status_code == 200 and statuses == [200] * 12
    assert versions <= {flagged["model_version"], switch.json()["model_version"]}
