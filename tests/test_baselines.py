"""PaDiM and SPADE: same contract, save/load, streaming statistics, floors on real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import seeded_subset

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError
from defectscope.evaluation.evaluate import evaluate
from defectscope.modelfiles.artifacts import load_detector, save_detector


@pytest.fixture(scope="module")
def weld(battery: Path):
    return load_dataset(battery)


@pytest.mark.parametrize("method", ["padim", "spade"])
def test_save_load_predict_identical(method: str, weld, tmp_path: Path) -> None:
    det = make_detector(method)
    det.fit(iter_samples(weld.train[:6], det.preprocess))
    x = torch.stack([s.image for s in iter_samples(weld.test[:2], det.preprocess)])
    before = det.predict(x)
    loaded = load_detector(save_detector(det, tmp_path / "m.dscope"))
    after = loaded.predict(x)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)
    assert before.maps.shape == (2, *x.shape[-2:])


def test_padim_streaming_matches_direct_covariance(weld) -> None:
    det = make_detector("padim", batch_size=3, d=20)
    samples = list(iter_samples(weld.train[:7], det.preprocess))
    det.fit(samples)
    e = det.embed(torch.stack([s.image for s in samples])).double()  # 7 x h x w x d
    mean = e.mean(0)
    c = e - mean
    cov = torch.einsum("nhwi,nhwj->hwij", c, c) / 6 + 0.01 * torch.eye(20, dtype=torch.float64)
    assert torch.allclose(det.mean.double(), mean, atol=1e-4)
    identity = det.inv_cov.double() @ cov  # float32 inverse of a matrix with condition ~1e4
    assert (identity - torch.eye(20, dtype=torch.float64)).abs().max() < 1e-2


def test_padim_float16_storage_and_aligned_only(weld, tmp_path: Path) -> None:
    det = make_detector("padim", storage="float16")
    det.fit(iter_samples(weld.train[:4], det.preprocess))
    assert det.info["covariance_mb"] == pytest.approx(det.inv_cov.numel() * 2 / 2**20)
    loaded = load_detector(save_detector(det, tmp_path / "h.dscope"))
    assert loaded.inv_cov.dtype == torch.float16
    x = torch.stack([s.image for s in iter_samples(weld.test[:2], det.preprocess)])
    assert torch.allclose(loaded.predict(x).scores, det.predict(x).scores, rtol=2e-2)
    with pytest.raises(ConfigError, match="one input size"):
        make_detector("padim", preprocess={"resize": "aspect"})


def test_spade_caps_k_at_training_size(weld) -> None:
    det = make_detector("spade", k=50)
    det.fit(iter_samples(weld.train[:3], det.preprocess))
    s = next(iter_samples(weld.test[:1], det.preprocess))
    pred = det.predict(s.image[None])
    assert torch.isfinite(pred.scores).all() and pred.maps.shape[-2:] == s.image.shape[-2:]


def overall(method: str, data: Path) -> dict:
    return evaluate(method, data).overall


@pytest.mark.slow
def test_padim_battery_weld_floors(battery: Path) -> None:
    row = overall("padim", battery)
    assert row["image_auroc"] >= 0.68 and row["pixel_auroc"] >= 0.85


@pytest.mark.slow
def test_spade_battery_weld_floors_on_a_subset(battery: Path) -> None:
    """All 45 training images, 59 seeded test images (19 good, 40 defective): measured
    0.662 / 0.935 / 0.782; the full run is benchmarks/compare_methods.py."""
    row = evaluate("spade", seeded_subset(load_dataset(battery), per_defect=40, good=19)).overall
    measured = (row["image_auroc"], row["pixel_auroc"], row["aupro"])
    assert all(v >= f for v, f in zip(measured, (0.62, 0.90, 0.74), strict=True)), measured


@pytest.mark.slow
def test_padim_magnetic_tile_floors_on_a_subset(magnetic: Path) -> None:
    """The seeded subset of `seeded_subset` (200 train, 120 test): measured 0.782 / 0.861 /
    0.791; the full run (0.874 / 0.805 / 0.771) is benchmarks/compare_methods.py."""
    row = evaluate("padim", seeded_subset(load_dataset(magnetic), per_defect=12, good=60, train=200)).overall
    measured = (row["image_auroc"], row["pixel_auroc"], row["aupro"])
    assert all(v >= f for v, f in zip(measured, (0.74, 0.82, 0.75), strict=True)), measured

