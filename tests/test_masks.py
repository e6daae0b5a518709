"""Ground-truth masks: where they land after resizing, and how they are binarised.

Each test here failed before the audit's fixes (top-left nearest resizing, ``> 0``
binarisation, alpha channel ignored).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data.images import Preprocess, load_mask


def _centroid(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    ys, xs = np.nonzero(np.asarray(mask))
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("shape", [(400, 256), (110, 90), (630, 397)])
def test_resized_mask_sits_where_the_resized_image_shows_it(shape: tuple[int, int]) -> None:
    """The mask must cover what the (centre-aligned, bilinear) image resize puts there."""
    h, w = shape
    mask = np.zeros(shape, bool)
    mask[h // 3 + 1 : h // 3 + h // 4, w // 5 + 3 : w // 5 + w // 3] = True
    pre = Preprocess(256, "aspect")
    image, geo = pre.image(np.repeat(mask[..., None].astype(np.float32), 3, axis=2))
    reference = image[0] > 0.5  # where the defect's pixels end up in the network input
    resized = pre.mask(mask, geo)
    offset = _centroid(resized) - _centroid(reference)
    assert np.abs(offset).max() < 0.15, f"mask shifted by {offset} px against the image"
    assert (resized != reference).float().mean() < 0.01


def test_letterboxed_mask_is_centre_aligned_too() -> None:
    mask = np.zeros((300, 180), bool)
    mask[101:171, 37:99] = True
    pre = Preprocess(256, "letterbox")
    image, geo = pre.image(np.repeat(mask[..., None].astype(np.float32), 3, axis=2))
    offset = _centroid(pre.mask(mask, geo)) - _centroid(image[0] > 0.5)
    assert np.abs(offset).max() < 0.15


def _square(size: int = 64, side: int = 10) -> np.ndarray:
    arr = np.zeros((size, size), np.uint8)
    arr[20 : 20 + side, 25 : 25 + side] = 255
    return arr


def test_jpeg_mask_does_not_grow(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gt" / "a_mask.jpg"
    path.parent.mkdir()
    Image.fromarray(_square()).save(path, quality=75)
    assert (np.asarray(Image.open(path)) > 0).sum() > 110  # the ringing a `> 0` rule would count
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        mask = load_mask(path)
    assert abs(int(mask.sum()) - 100) <= 4
    assert "grey levels" in caplog.text and str(path) in caplog.text


def test_lossy_warning_once_per_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "jpeg_masks"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_square()).save(folder / f"{i}_mask.jpg", quality=70)
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        for i in range(3):
            load_mask(folder / f"{i}_mask.jpg")
    assert caplog.text.count("grey levels") == 1


@pytest.mark.parametrize("value", [1.0, 0.7])
def test_constant_float_mask_is_all_defective(tmp_path: Path, value: float) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((20, 30), value, np.float32), mode="F").save(path)
    assert load_mask(path).all()


def test_empty_and_small_range_masks(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "empty.png")
    assert not load_mask(tmp_path / "empty.png").any()
    ones = (_square() > 0).astype(np.uint8)  # 0/1 label masks stay exact
    Image.fromarray(ones).save(tmp_path / "01.png")
    assert load_mask(tmp_path / "01.png").sum() == 100
    Image.fromarray(ones.astype(np.uint16) * 65535).save(tmp_path / "16.png")
    assert load_mask(tmp_path / "16.png").sum() == 100


def test_mask_in_alpha_channel_only(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = _square()
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert load_mask(tmp_path / "alpha.png").sum() == 100
    rgba[..., 0] = _square()  # colour carries the mask: alpha then is not used
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "colour.png")
    assert load_mask(tmp_path / "colour.png").sum() == 100


def test_palette_mask(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_square()).convert("P").save(buf, format="PNG")
    (tmp_path / "p.png").write_bytes(buf.getvalue())
    assert load_mask(tmp_path / "p.png").sum() == 100
