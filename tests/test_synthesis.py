"""Defect synthesis on real images: exact masks, seeds, greyscale, and the synthetic split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.datasets import load_dataset
from defectscope.data.images import load_image_uint8
from defectscope.errors import ConfigError, DataError
from defectscope.synthesis import GLOBAL_KINDS, KINDS, otsu_foreground, synthesize
from defectscope.synthesis.split import make_synthetic_split

RUNNABLE = [k for k in KINDS if k != "texture"]


@pytest.fixture(scope="module")
def grey_images(magnetic: Path) -> list[np.ndarray]:
    return [load_image_uint8(p) for p in sorted((magnetic / "train/good").iterdir())[:4]]


@pytest.fixture(scope="module")
def rgb_image(battery: Path) -> np.ndarray:
    grey = load_image_uint8(sorted((battery / "train/good").iterdir())[0])
    return np.stack([grey, np.roll(grey, 5, axis=1), 255 - grey], axis=2)  # a real image, 3 distinct channels


@pytest.mark.parametrize("kind", RUNNABLE)
def test_mask_non_empty_and_exactly_the_changed_pixels(kind: str, grey_images: list[np.ndarray]) -> None:
    base = grey_images[0]
    others = grey_images[1:]
    out, mask = synthesize(base, kind, np.random.default_rng(1), donors=others, textures=others, generated=others)
    assert out.shape == base.shape and out.dtype == np.uint8  # greyscale stays greyscale
    assert mask.any()
    assert np.array_equal(mask, out != base)


@pytest.mark.parametrize("kind", ["perlin", "cutpaste", "poisson", "texture", *GLOBAL_KINDS])
def test_rgb_any_size(kind: str, rgb_image: np.ndarray) -> None:
    img = rgb_image[:101, :333]
    out, mask = synthesize(img, kind, np.random.default_rng(0), donors=[rgb_image[::-1]], textures=[rgb_image])
    assert out.shape == img.shape and np.array_equal(mask, (out != img).any(axis=2)) and mask.any()


@pytest.mark.parametrize("kind", ["perlin", "scar", "poisson"])
def test_same_seed_same_output_other_seed_differs(kind: str, grey_images: list[np.ndarray]) -> None:
    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        return synthesize(grey_images[0], kind, np.random.default_rng(seed), donors=grey_images[1:])

    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_whole_image_kinds_change_the_whole_image(grey_images: list[np.ndarray]) -> None:
    grey = grey_images[0]
    rgb_grey = np.stack([grey] * 3, axis=2)  # a greyscale camera saved as RGB
    out, _ = synthesize(rgb_grey, "colour", np.random.default_rng(0))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all() and abs(out.mean() - grey.mean()) > 3
    for kind in ("rotate", "rescale"):
        out, mask = synthesize(grey, kind, np.random.default_rng(0))
        assert out.shape == grey.shape and mask.mean() > 0.5, (kind, mask.mean())
    _, mask = synthesize(grey, "remove", np.random.default_rng(0))
    assert 0.03 < mask.mean() < 0.3


def test_foreground_restriction(grey_images: list[np.ndarray]) -> None:
    base = grey_images[0].copy()
    base[:, : base.shape[1] // 2] = 0  # a dark half is background
    fg = otsu_foreground(base)
    assert fg[:, base.shape[1] // 2 + 5 :].mean() > 0.5 and not fg[:, :10].any()
    _, mask = synthesize(base, "perlin", np.random.default_rng(0), foreground=fg)
    assert mask.any() and not (mask & ~fg).any()


def test_bad_kind_and_missing_sources(grey_images: list[np.ndarray]) -> None:
    with pytest.raises(ConfigError, match="Unknown defect kind"):
        synthesize(grey_images[0], "lava", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="donor"):
        synthesize(grey_images[0], "poisson", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="train-ddpm"):
        synthesize(grey_images[0], "sdas", np.random.default_rng(0))


def test_synthetic_split_is_a_dataset(magnetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    summary = make_synthetic_split(magnetic, out, kinds=["perlin", "cutpaste"], n=4, seed=0, preview=tmp_path / "sheet.png")
    ds = load_dataset(out)
    assert ds.defects == ["cutpaste", "perlin"] and len(ds.test) == 4 + 8
    train_names = {r.path.name for r in ds.train}
    assert not train_names & {r.path.name for r in ds.test if r.label == 0}  # fit and test images disjoint
    for r in ds.test:
        if r.label:
            assert np.asarray(Image.open(r.mask_path)).any()
    assert summary.preview is not None and summary.preview.is_file()
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_split(magnetic, out, n=1)
