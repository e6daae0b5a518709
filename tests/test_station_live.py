"""A live `defectscope serve` on 127.0.0.1: the review page in headless Chromium, and a kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from test_report import CHROMIUM_FLAGS, chromium

from defectscope import pipeline
from defectscope.data.datasets import load_dataset
from defectscope.detectors import make_detector
from defectscope.modelfiles.artifacts import save_detector


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, battery: Path) -> Path:
    fitted = pipeline.fit(make_detector("patchcore"), load_dataset(battery).train[:12])
    return save_detector(fitted.detector, tmp_path_factory.mktemp("live") / "weld.dscope", extra=fitted.extra())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: Path, store: Path, host: str = "127.0.0.1", args: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the station as a separate process on ``host`` (loopback range only); always stop it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", "serve", str(model), "--host", host, "--port", str(port), "--store", str(store), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://{host}:{port}"
    try:
        for _ in range(300):  # up to 60 s for the model to load
            if proc.poll() is not None:
                pytest.fail(f"the station exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the station did not answer /healthz within 60 s")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@contextmanager
def review_page(url: str) -> Iterator[tuple[Page, str]]:
    """The station's review page at ``url`` in headless Chromium, once it shows the served
    model version: (the page, that version). The browser is always closed."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS[1:], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            version = httpx.get(f"{url}/v1/model").json()["version"]
            expect(page.locator("#model-version")).to_have_text(version)
            yield page, version
        finally:
            browser.close()


def test_review_page_upload_correct_and_rescore(model: Path, tmp_path: Path, battery: Path) -> None:
    defective = sorted((battery / "test/defective").iterdir())[:8]
    with serving(model, tmp_path / "store") as (url, _):
        flagged = None
        for p in defective:  # the first defective image this model flags, found through the API
            r = httpx.post(f"{url}/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")}, timeout=60).json()["results"][0]
            if r["verdict"] == "defect":
                flagged = p
                break
        assert flagged is not None, "the model flags none of the first 8 defective images"
        with review_page(url) as (page, first_version):
            page.set_input_files("#file-input", str(flagged))
            expect(page.locator("#detail-verdict")).to_have_text("defect", timeout=60_000)
            page.wait_for_function("document.getElementById('detail-heatmap').naturalWidth > 0")
            assert page.locator("#boxes .box").count() >= 1
            page.fill("#ask-question", "where is it?")
            page.click("#ask button")
            expect(page.locator("#ask-answer")).to_contain_text("The anomaly is at the", timeout=30_000)
            page.click("#btn-good")
            expect(page.locator("#model-version")).not_to_have_text(first_version, timeout=60_000)
            new_version = page.locator("#model-version").inner_text()
            assert new_version == httpx.get(f"{url}/v1/model").json()["version"]
            page.set_input_files("#file-input", str(flagged))
            expect(page.locator("#detail-verdict")).to_have_text("normal", timeout=60_000)
            expect(page.locator("#detail-meta")).to_contain_text(new_version)
            assert "would flip" in page.locator("#flip-count").inner_text()
            shot = tmp_path / "station.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"station screenshot: {shot}")  # noqa: T201 - asked for in the test's output
            if os.environ.get("DEFECTSCOPE_UPDATE_DOCS") == "1":  # the docs' screenshot comes from this test
                shutil.copyfile(shot, Path(__file__).resolve().parents[1] / "docs" / "assets" / "station.png")
    rows = [p for p in (tmp_path / "store" / "images").iterdir() if p.name.endswith("_heatmap.png")]
    assert len(rows) >= 3


def test_killed_mid_request_loses_no_recorded_result(model: Path, tmp_path: Path, battery: Path) -> None:
    images = sorted((battery / "test/good").iterdir())[:6]
    acknowledged: list[str] = []
    store = tmp_path / "store"
    with serving(model, store) as (url, proc):
        stop = threading.Event()

        def client(i: int) -> None:
            with httpx.Client(timeout=30) as c:
                n = 0
                while not stop.is_set() and n < 200:
                    p = images[(i + n) % len(images)]
                    n += 1
                    try:
                        r = c.post(f"{url}/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acknowledged.append(r.json()["results"][0]["id"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-request: clients are still posting
        stop.set()
        for t in threads:
            t.join(timeout=30)
        proc.wait(timeout=15)
    assert len(acknowledged) >= 12
    with serving(model, store) as (url, _):
        for rid in acknowledged:
            assert httpx.get(f"{url}/v1/results/{rid}").status_code == 200, rid
