"""Image decoding for every mode a factory camera produces, and resize geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data.images import Preprocess, crop_content, image_size, load_image, load_mask, to_original
from defectscope.errors import DataError


@pytest.fixture()
def real_rgb(battery: Path) -> np.ndarray:
    return np.asarray(Image.open(sorted((battery / "train/good").iterdir())[0]).convert("RGB"))


def test_greyscale_is_replicated_to_three_equal_channels(battery: Path) -> None:
    path = sorted((battery / "train/good").iterdir())[0]
    assert Image.open(path).mode in ("L", "I;16", "P", "RGB")
    arr = load_image(path)
    assert arr.shape[2] == 3 and arr.dtype == np.float32
    assert np.allclose(arr[..., 0], arr[..., 2])
    assert 0.0 <= arr.min() and arr.max() <= 1.0


def test_rgba_palette_16bit_and_rgb_agree(tmp_path: Path, real_rgb: np.ndarray) -> None:
    grey = real_rgb[..., 0]
    Image.fromarray(real_rgb).save(tmp_path / "rgb.png")
    Image.fromarray(real_rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    rgb = load_image(tmp_path / "rgb.png")
    assert np.allclose(load_image(tmp_path / "rgba.png"), rgb)
    assert np.allclose(load_image(tmp_path / "g16.png")[..., 0], grey / 255.0, atol=1e-4)
    assert np.allclose(load_image(tmp_path / "pal.png")[..., 0], grey / 255.0, atol=1 / 255)


def test_exif_orientation_is_applied(tmp_path: Path, real_rgb: np.ndarray) -> None:
    img = Image.fromarray(real_rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    arr = load_image(tmp_path / "rot.jpg")
    h, w = real_rgb.shape[:2]
    assert arr.shape[:2] == (w, h)
    assert image_size(tmp_path / "rot.jpg") == (w, h)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_name_the_file(tmp_path: Path, content: bytes | None, battery: Path) -> None:
    path = tmp_path / "bad.png"
    if content is None:  # a real PNG cut in half
        data = sorted((battery / "train/good").iterdir())[0].read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.png"):
        load_image(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_mask_is_boolean(battery: Path) -> None:
    mask = load_mask(sorted((battery / "ground_truth/defective").iterdir())[0])
    assert mask.dtype == bool and mask.any() and not mask.all()


def test_aspect_keeps_shape_and_one_scale() -> None:
    pre = Preprocess(256, "aspect")
    g1, g2 = pre.geometry(1250, 500), pre.geometry(89, 400)
    assert g1.input == (256, 102)  # long side 256, 500/1250 kept
    assert g2.input == (57, 256)  # same 0.64 scale as a 400-wide crop of any height
    assert Preprocess(256, "squash").geometry(1250, 500).input == (256, 256)


def test_letterbox_pads_and_maps_back(real_rgb: np.ndarray) -> None:
    pre = Preprocess(128, "letterbox")
    arr = real_rgb.astype(np.float32) / 255.0
    x, geo = pre.image(arr)
    assert tuple(x.shape) == (3, 128, 128)
    top, left, ch, cw = geo.content
    assert (ch, cw) != (128, 128) and max(ch, cw) == 128
    assert torch.all(x[:, :top] == 0)
    amap = torch.zeros(128, 128)
    amap[top : top + ch, left : left + cw] = 1.0
    back = to_original(amap, geo)
    assert tuple(back.shape) == arr.shape[:2] and torch.allclose(back, torch.ones_like(back))
    assert crop_content(amap, geo).shape == (ch, cw)
