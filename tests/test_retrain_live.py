"""The station's review-to-retrain loop in headless Chromium: confirm a defect, outline it,
retrain, and the new version scores a similar defect higher against its threshold."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from playwright.sync_api import expect
from test_station_live import review_page, serving

from defectscope import pipeline
from defectscope.data.datasets import Record, load_dataset, load_mask
from defectscope.data.images import load_image
from defectscope.detectors import make_detector
from defectscope.modelfiles.artifacts import save_detector
from defectscope.serve.retrain import TRAINED_ON

FAST = {"preprocess": {"size": 128}, "hidden": 128, "steps": 80, "seed": 0}


def pasted(image: Path, crop: torch.Tensor, at: tuple[int, int], out: Path) -> tuple[Path, tuple[int, int, int, int]]:
    """``image`` with a real defect crop pasted at ``at`` (x, y); the file and the box it covers."""
    arr = torch.from_numpy(load_image(image)).permute(2, 0, 1).clone()
    x, y = at
    h, w = min(crop.shape[1], arr.shape[1] - y), min(crop.shape[2], arr.shape[2] - x)
    arr[:, y : y + h, x : x + w] = crop[:, :h, :w]
    Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out)
    return out, (x, y, x + w, y + h)


def largest_defect(records: list[Record]) -> torch.Tensor:
    """The real defect with the largest mask among ``records``, cropped at the camera's pixels."""
    best = max(records, key=lambda r: int(load_mask(r.mask_path).sum()))
    image, mask = torch.from_numpy(load_image(best.path)).permute(2, 0, 1), torch.from_numpy(load_mask(best.mask_path))
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return image[:, int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1]


def margin(url: str, image: Path) -> float:
    """Score over the served version's threshold, for ``image`` posted through the API."""
    r = httpx.post(f"{url}/v1/predict", files={"files": (image.name, image.read_bytes(), "image/png")}, timeout=120).json()["results"][0]
    return r["score"] / r["threshold"]


def test_confirm_outline_retrain_and_a_similar_defect_scores_higher(tmp_path: Path, battery: Path) -> None:
    ds = load_dataset(battery)
    normals = tmp_path / "normals"
    normals.mkdir()
    for r in ds.train[:20]:
        (normals / r.path.name).write_bytes(r.path.read_bytes())
    fitted = pipeline.fit(make_detector("supersimplenet", **FAST), [Record(p) for p in sorted(normals.iterdir())])
    model = save_detector(fitted.detector, tmp_path / "ssn.dscope", extra={**fitted.extra(), TRAINED_ON: str(normals)})
    crop = largest_defect([r for r in ds.test if r.label][:10])
    shown, box = pasted(ds.train[30].path, crop, (40, 20), tmp_path / "shown.png")
    similar, _ = pasted(ds.train[34].path, crop, (120, 30), tmp_path / "similar.png")
    args = ("--retrain-set", 'preprocess={"size": 128}', "--retrain-set", "hidden=128", "--retrain-set", "steps=80")
    with serving(model, tmp_path / "store", args=args) as (url, _):
        before = margin(url, similar)
        with review_page(url) as (page, first):
            page.set_input_files("#file-input", str(shown))
            expect(page.locator("#detail-meta")).to_contain_text("shown.png", timeout=60_000)
            page.wait_for_function("document.getElementById('detail-image').naturalWidth > 0")
            page.click("#btn-defect")
            expect(page.locator("#review-state")).to_have_text("reviewed: defect", timeout=30_000)
            page.click("#btn-outline")
            img = page.locator("#detail-image").bounding_box()
            natural = page.evaluate("[document.getElementById('detail-image').naturalWidth, document.getElementById('detail-image').naturalHeight]")
            sx, sy = img["width"] / natural[0], img["height"] / natural[1]
            page.mouse.move(img["x"] + box[0] * sx, img["y"] + box[1] * sy)
            page.mouse.down()
            page.mouse.move(img["x"] + box[2] * sx, img["y"] + box[3] * sy, steps=5)
            page.mouse.up()
            assert page.locator("#outline-boxes .outline-box").count() == 1
            page.click("#btn-save-outline")
            expect(page.locator("#message")).to_contain_text("Outline saved", timeout=30_000)
            page.click("#btn-retrain")
            expect(page.locator("#retrain-state")).to_contain_text("done", timeout=300_000)
            expect(page.locator("#retrain-state")).to_contain_text("1 reviewed defects, 1 outlined")
            expect(page.locator("#model-version")).not_to_have_text(first, timeout=30_000)
        after = margin(url, similar)
    assert after > before, (before, after)
    mask = next((tmp_path / "store" / "outlines").iterdir())
    drawn = np.asarray(Image.open(mask)) > 0
    assert drawn.shape == tuple(reversed(Image.open(shown).size))  # the image's own pixels
    ys, xs = np.nonzero(drawn)
    assert abs(xs.min() - box[0]) <= 3 and abs(ys.min() - box[1]) <= 3 and abs(xs.max() - box[2]) <= 3
