"""A station left on the line: access off loopback, limits while reading, a supervised
watcher, atomic corrections, thresholds from re-scored reviews, bounded growth. Each test
is one finding of the station review; every one failed on the station before it."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import expect, sync_playwright
from test_report import CHROMIUM_FLAGS, chromium
from test_station import local, model, station  # noqa: F401 - the station tests' fixtures
from test_station_live import serving

from defectscope.data.datasets import Record, iter_samples
from defectscope.decision.scoring import Judge, score_samples
from defectscope.decision.thresholds import f1_optimal
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError
from defectscope.modelfiles.artifacts import load_detector, save_detector
from defectscope.serve import station as station_module
from defectscope.serve.access import Access
from defectscope.serve.app import Limits, create_app
from defectscope.serve.retention import Retention, folder_bytes
from defectscope.serve.station import Station
from defectscope.serve.store import SQLiteStore
from defectscope.serve.watch import FolderWatcher

TOKEN, READ = "change-token-0123456789", "read-only-token-0123456789"


def upload(client: TestClient, path: Path, **kw) -> httpx.Response:
    return client.post("/v1/predict", files={"files": (path.name, path.read_bytes(), "image/png")}, **kw)


def flagged(client: TestClient, battery: Path, **kw) -> dict:
    for p in sorted((battery / "test/defective").iterdir())[:8]:
        r = upload(client, p, **kw).json()["results"][0]
        if r["verdict"] == "defect":
            return {**r, "path": p}
    pytest.fail("The model flags none of the first 8 defective images.")


# --- access ----------------------------------------------------------------------------


def test_off_loopback_every_route_but_healthz_needs_a_token(station: Station, battery: Path) -> None:
    app = create_app(station, access=Access.for_bind("127.0.0.2", TOKEN, READ))
    c = local(app, "127.0.0.2")
    good = sorted((battery / "test/good").iterdir())[0]
    rid = upload(c, good, headers={"X-Token": TOKEN}).json()["results"][0]["id"]
    for path in ("/v1/model", "/v1/results", f"/v1/results/{rid}", f"/v1/results/{rid}/image", f"/v1/results/{rid}/heatmap",
                 "/v1/scores", "/static/app.js", "/openapi.json", "/docs"):
        assert c.get(path).status_code == 401, path
    assert upload(c, good).status_code == 401  # nobody without the token fills the store
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    assert c.get("/healthz").status_code == 200
    reader = {"Authorization": f"Bearer {READ}"}
    assert c.get(f"/v1/results/{rid}/image", headers=reader).status_code == 200
    assert upload(c, good, headers=reader).status_code == 403  # read-only means read-only
    assert c.post("/v1/feedback", json={"id": rid, "label": "defect"}, headers=reader).status_code == 403
    assert c.post("/v1/feedback", json={"id": rid, "label": "defect"}, headers={"X-Token": TOKEN}).status_code == 200


def test_a_short_or_missing_token_off_loopback_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a token"):
        Access.for_bind("0.0.0.0")
    with pytest.raises(ConfigError, match="at least 16"):
        Access.for_bind("127.0.0.2", "s3cret")


def test_host_check_defeats_dns_rebinding_on_a_loopback_station(station: Station) -> None:
    c = local(create_app(station))
    assert c.get("/v1/results").status_code == 200
    assert c.get("/v1/results", headers={"Host": "attacker.example"}).status_code == 400
    assert c.get("/healthz", headers={"Host": "attacker.example:8000"}).status_code == 400


def test_no_token_in_urls_and_the_page_keeps_none(station: Station) -> None:
    c = local(create_app(station, access=Access.for_bind("127.0.0.2", TOKEN)), "127.0.0.2")
    assert c.get(f"/v1/results?token={TOKEN}").status_code == 400
    assert c.get(f"/?token={TOKEN}").status_code == 400
    js = (Path(station_module.__file__).parent / "web" / "app.js").read_text()
    assert "localStorage" not in js and "URLSearchParams" not in js


def test_login_sets_a_strict_httponly_session_cookie_not_the_token(station: Station) -> None:
    c = local(create_app(station, access=Access.for_bind("127.0.0.2", TOKEN, READ)), "127.0.0.2")
    assert c.post("/login", data={"token": "wrong-token-0123456789"}, follow_redirects=False).status_code == 401
    r = c.post("/login", data={"token": READ}, follow_redirects=False)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and READ not in cookie and TOKEN not in cookie
    assert c.get("/").status_code == 200 and c.get("/v1/results").status_code == 200
    assert c.post("/v1/threshold", json={"value": 5.0}).status_code == 403  # the read-only session cannot change
    c.post("/login", data={"token": TOKEN})
    assert c.post("/v1/threshold", json={"value": 5.0}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/v1/threshold", json={"value": 5.0}, headers={"Origin": "http://127.0.0.2"}).status_code == 200


def test_model_description_names_no_server_path(station: Station, model: Path) -> None:
    c = local(create_app(station))
    text = c.get("/v1/model").text
    assert str(model.parent) not in text and str(station.store.root) not in text
    assert all("path" not in v for v in json.loads(text)["versions"])


# --- limits ----------------------------------------------------------------------------


def test_wrong_field_name_and_malformed_requests_are_4xx_never_500(station: Station, battery: Path) -> None:
    c = local(create_app(station, limits=Limits(rate="100000/second")))
    good = sorted((battery / "test/good").iterdir())[0]
    wrong_field = c.post("/v1/predict", files={"file": (good.name, good.read_bytes(), "image/png")})
    assert wrong_field.status_code == 422 and "'files'" in wrong_field.text
    bad = [
        c.post("/v1/predict", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}),
        c.post("/v1/predict", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}),
        c.post("/v1/predict", content=b"", headers={"Content-Type": "image/png"}),
        c.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 50),
        c.post("/v1/predict", content=b"abc", headers={"Content-Length": "not-a-number"}),
        c.post("/v1/feedback", content=b"{not json", headers={"Content-Type": "application/json"}),
        c.post("/v1/feedback", json={"id": "x" * 10_000, "label": "normal"}),
        c.post("/v1/feedback", json={"id": "nope", "label": "maybe"}),
        c.post("/v1/threshold", json={"value": "NaN"}),
        c.post("/v1/threshold", json={"value": -1}),
        c.post("/v1/model", json={"version": "doesnotexist"}),
        c.get("/v1/results?limit=-5"),
        c.get("/v1/results?offset=99999999999999999999"),
        c.get("/v1/results/../../etc/passwd"),
        c.get("/v1/results/nope/image"),
        c.put("/v1/predict"),
    ]
    assert all(400 <= r.status_code < 500 for r in bad), [(r.request.url.path, r.status_code, r.text[:80]) for r in bad]


def test_an_oversized_multipart_upload_is_refused_with_413(station: Station, battery: Path) -> None:
    c = local(create_app(station, limits=Limits(max_request_mb=1)))
    big = [("files", (f"{i}.png", b"\0" * 400_000, "image/png")) for i in range(4)]  # 1.6 MB in one form
    r = c.post("/v1/predict", files=big)
    assert r.status_code == 413
    assert not any((station.store.root / "images").iterdir())  # nothing was written


def test_a_chunked_body_is_cut_off_at_the_limit_not_read_whole(model: Path, tmp_path: Path) -> None:
    """A raw chunked body has no Content-Length: the station stops reading at its 32 MB
    image limit (plus what the sockets buffer), not after the whole 200 MB."""
    sent = [0]

    def body():
        for _ in range(200):
            sent[0] += 2**20
            yield b"\0" * 2**20

    with serving(model, tmp_path / "store") as (url, _):
        try:
            r = httpx.post(f"{url}/v1/predict", content=body(), headers={"Content-Type": "image/png"}, timeout=60)
            assert r.status_code == 413
        except httpx.HTTPError:
            pass  # the station closed the connection while the client was still sending: also a refusal
        assert sent[0] < 100 * 2**20, f"the station read {sent[0] / 2**20:.0f} MB of a refused body"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_a_client_over_its_rate_gets_429_and_healthz_is_exempt(station: Station) -> None:
    c = local(create_app(station, limits=Limits(rate="5/minute")))
    codes = [c.get("/v1/results").status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3
    assert int(c.get("/v1/results").headers["retry-after"]) >= 1
    assert all(c.get("/healthz").status_code == 200 for _ in range(10))


def test_decoding_runs_off_the_event_loop(station: Station, battery: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one upload is being checked and stored, /healthz still answers."""
    release, entered = threading.Event(), threading.Event()
    original = station.store_uploads

    def slow(uploads):
        entered.set()
        release.wait(30)
        return original(uploads)

    monkeypatch.setattr(station, "store_uploads", slow)
    good = sorted((battery / "test/good").iterdir())[0]
    with local(create_app(station)) as c:
        t = threading.Thread(target=upload, args=(c, good))
        t.start()
        assert entered.wait(30)
        answered = []
        probe = threading.Thread(target=lambda: answered.append(c.get("/healthz").status_code))
        probe.start()
        probe.join(10)
        release.set()
        t.join(60)
        probe.join(30)
    assert answered == [200]
    assert not t.is_alive()


# --- supervision -----------------------------------------------------------------------


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_watcher_survives_unreadable_files_and_a_failing_store(
    station: Station, battery: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop = tmp_path / "camera"
    drop.mkdir()
    locked, good = drop / "locked.png", sorted((battery / "test/good").iterdir())
    refusals = {"read": 2, "store": 2}
    real_read, real_seen = Path.read_bytes, station.store.seen

    def read_bytes(self: Path) -> bytes:
        if self == locked and refusals["read"]:
            refusals["read"] -= 1
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    def seen(key: str) -> bool:
        if refusals["store"]:
            refusals["store"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real_seen(key)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(station.store, "seen", seen)
    watcher = FolderWatcher(station, drop, settle_s=0.1, poll_s=0.02, retry_s=0.05)
    app = local(create_app(station, watcher=watcher))
    watcher.start()
    try:
        locked.write_bytes(good[0].read_bytes())
        (drop / "fine.png").write_bytes(good[1].read_bytes())
        assert wait_for(lambda: station.store.count() == 2), app.get("/healthz").json()
        health = app.get("/healthz").json()
        assert health["status"] == "ok" and health["watcher"]["state"] == "running"
        assert health["watcher"]["errors"] == 4 and health["watcher"]["last_error"]["file"] is not None
    finally:
        watcher.stop()


def test_a_vanished_watch_folder_makes_healthz_unhealthy_until_it_returns(station: Station, battery: Path, tmp_path: Path) -> None:
    drop = tmp_path / "camera"
    drop.mkdir()
    watcher = FolderWatcher(station, drop, settle_s=0.1, poll_s=0.02, retry_s=0.01)
    app = local(create_app(station, watcher=watcher))
    watcher.start()
    try:
        assert wait_for(lambda: watcher.health.state == "running")
        drop.rmdir()
        assert wait_for(lambda: app.get("/healthz").status_code == 503)
        assert "gone" in app.get("/healthz").json()["watcher"]["last_error"]["error"]
        drop.mkdir()
        (drop / "back.png").write_bytes(sorted((battery / "test/good").iterdir())[0].read_bytes())
        assert wait_for(lambda: station.store.count() == 1 and app.get("/healthz").status_code == 200, 60)
    finally:
        watcher.stop()


# --- corrections -----------------------------------------------------------------------


def test_a_failed_correction_leaves_no_trace_and_a_retry_teaches(
    station: Station, battery: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = local(create_app(station))
    r = flagged(c, battery)
    before = station.current.version
    files_before = sorted(station.models_dir.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(station_module, "save_detector", disk_full)
    failed = c.post("/v1/feedback", json={"id": r["id"], "label": "normal"})
    assert failed.status_code >= 400
    assert c.get(f"/v1/results/{r['id']}").json()["review"] is None
    assert station.current.version == before and sorted(station.models_dir.iterdir()) == files_before
    assert len(c.get("/v1/model").json()["versions"]) == 1
    monkeypatch.undo()
    retry = c.post("/v1/feedback", json={"id": r["id"], "label": "normal"})
    assert retry.status_code == 200 and retry.json()["model_update"] is not None
    assert station.current.version != before
    again = upload(c, r["path"]).json()["results"][0]
    assert again["score"] < r["score"]


def test_f1_threshold_uses_scores_of_the_current_model(station: Station, battery: Path) -> None:
    """An image scored before the same part was taught as normal carries a stale, high
    score; the threshold must come from what the current model says about it."""
    c = local(create_app(station))
    a = flagged(c, battery)
    again = upload(c, a["path"]).json()["results"][0]  # the same part, scored before teaching
    good = sorted((battery / "test/good").iterdir())[0]
    g = upload(c, good).json()["results"][0]
    assert c.post("/v1/feedback", json={"id": a["id"], "label": "normal"}).json()["model_update"] is not None
    c.post("/v1/feedback", json={"id": again["id"], "label": "defect"})  # inspectors disagree about this part
    c.post("/v1/feedback", json={"id": g["id"], "label": "normal"})
    out = c.post("/v1/threshold", json={"f1_from_reviews": True})
    assert out.status_code == 200, out.text
    current = load_detector(station.current.path)
    paths = [a["path"], a["path"], good]
    judged = list(score_samples(current, iter_samples([Record(p) for p in paths], current.preprocess), judge=Judge(None)))
    expected = f1_optimal([j.score for j in judged], [False, True, False]).value
    assert out.json()["threshold"]["value"] == pytest.approx(expected, rel=1e-5)
    assert out.json()["threshold"]["value"] < again["score"]  # not the stale score


# --- bounds ----------------------------------------------------------------------------


def test_versions_in_memory_and_on_disk_are_bounded_and_pins_hold(model: Path, tmp_path: Path, battery: Path) -> None:
    st = Station(model, SQLiteStore(tmp_path / "store"), retention=Retention(keep_versions=2), keep_in_memory=2)
    try:
        c = local(create_app(st))
        first = st.current.version
        made = []
        for value in (10.0, 11.0, 12.0, 13.0):
            made.append(c.post("/v1/threshold", json={"value": value}).json()["version"])
            if value == 10.0:
                assert c.post("/v1/model/pin", json={"version": made[0]}).status_code == 200
        assert len(st._versions) <= 2
        on_disk = sorted(p.name for p in st.models_dir.iterdir())
        assert len(on_disk) == 3  # two newest + the pinned one
        assert model.exists()  # the file the station was started with is never deleted
        versions = {v["version"]: v for v in c.get("/v1/model").json()["versions"]}
        assert versions[made[1]]["pruned"] is not None and versions[made[0]]["pruned"] is None
        assert c.post("/v1/model", json={"version": made[1]}).status_code == 409  # pruned: refused with the reason
        assert c.post("/v1/model", json={"version": first}).status_code == 200  # reloaded from disk on demand
    finally:
        st.close()


def test_retention_deletes_oldest_images_first_and_keeps_their_rows(model: Path, tmp_path: Path, battery: Path) -> None:
    goods = sorted((battery / "test/good").iterdir())[:4]
    st = Station(model, SQLiteStore(tmp_path / "store"))
    try:
        c = local(create_app(st))
        ids = [upload(c, p).json()["results"][0]["id"] for p in goods]
        per_result = [sum(f.stat().st_size for f in (st.store.root / "images").glob(f"{i}*")) for i in ids]
        # room for all but about two and a half results' images: the two oldest must go
        st.retention = Retention(max_store_gb=(folder_bytes(st.store.root) - 2.5 * per_result[0]) / 0.9 / 2**30)
        st.sweep()
        rows = [c.get(f"/v1/results/{i}").json() for i in ids]
        purged = [r["purged"] is not None for r in rows]
        assert purged[0] and purged == sorted(purged, reverse=True)  # oldest first
        assert c.get(f"/v1/results/{ids[0]}/image").status_code == 410
        assert c.get("/v1/results").json()["total"] == 4  # every record is kept
        old = Retention(keep_days=1)
        st.retention = old
        assert station_module.purge_images(st.store, old, now=time.time() + 2 * 86400) == purged.count(False)
    finally:
        st.close()


def test_serve_refuses_musc(tmp_path: Path) -> None:
    path = save_detector(make_detector("musc").fit(None), tmp_path / "musc.dscope")
    with pytest.raises(ConfigError, match="scores images against each other"):
        Station(path, SQLiteStore(tmp_path / "store"))


# --- the review page off loopback, in a browser ------------------------------------------


def test_review_page_logs_in_off_loopback_without_a_token_in_the_url(model: Path, tmp_path: Path, battery: Path) -> None:
    good = sorted((battery / "test/good").iterdir())[0]
    with serving(model, tmp_path / "store", host="127.0.0.2", args=("--token", TOKEN)) as (url, _), sync_playwright() as pw:
        assert httpx.get(f"{url}/v1/results", timeout=10).status_code == 401
        assert httpx.post(f"{url}/v1/predict", files={"files": (good.name, good.read_bytes(), "image/png")}, timeout=60).status_code == 401
        assert "path" not in httpx.get(f"{url}/v1/model", headers={"X-Token": TOKEN}, timeout=10).text
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS[1:], headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            assert page.url.endswith("/login")
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            expect(page.locator("#model-version")).not_to_have_text("", timeout=30_000)
            page.wait_for_load_state("networkidle")
            with page.expect_response(lambda r: r.url.endswith("/v1/predict"), timeout=60_000) as scored:
                page.set_input_files("#file-input", str(good))
            assert scored.value.status == 200, scored.value.text()
            expect(page.locator("#detail-verdict")).not_to_have_text("", timeout=60_000)
            assert TOKEN not in page.url and page.evaluate("document.cookie") == ""  # HttpOnly: the page cannot read it
        finally:
            browser.close()


def test_outlines_and_retraining_refuse_what_they_cannot_use(station: Station, battery: Path) -> None:
    """An outline needs a confirmed defect; retraining needs confirmed defects and normal images."""
    client = local(create_app(station))
    image = sorted((battery / "test/defective").iterdir())[0]
    rid = client.post("/v1/predict", files={"files": (image.name, image.read_bytes(), "image/png")}).json()["results"][0]["id"]
    assert client.post("/v1/retrain").status_code == 409  # nothing confirmed yet
    assert client.post(f"/v1/results/{rid}/outline", json={"boxes": [[1, 1, 9, 9]]}).status_code == 409  # not confirmed
    client.post("/v1/feedback", json={"id": rid, "label": "defect"})
    assert client.post(f"/v1/results/{rid}/outline", json={"polygons": [[[1, 1], [2, 2]]]}).status_code == 409
    assert client.post(f"/v1/results/{rid}/outline", json={"boxes": "everything"}).status_code == 422
    assert client.post("/v1/results/nope/outline", json={"boxes": []}).status_code == 404
    assert client.post(f"/v1/results/{rid}/outline", json={"boxes": [[1, 1, 9, 9]]}).json()["outlined"] is True
    assert (station.store.root / "outlines" / f"{rid}.png").is_file()
    assert client.post("/v1/retrain").status_code == 202  # the model records no normal images: the reason comes back
    for _ in range(200):
        state = client.get("/v1/retrain").json()
        if state["state"] != "running":
            break
        time.sleep(0.05)
    assert state["state"] == "failed" and "--retrain-normals" in state["error"]
