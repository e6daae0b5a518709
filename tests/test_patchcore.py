"""PatchCore on the real datasets: accuracy floors a few points under what was measured.

Measured (default: tf_efficientnet_lite0, 256 px long side, aspect kept, 1% coreset,
paper image score), see benchmarks/patchcore_accuracy.py for the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import seeded_subset

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.evaluation.evaluate import evaluate


@pytest.mark.slow
def test_battery_weld_floors(battery: Path) -> None:
    row = evaluate("patchcore", battery).overall
    print(row)
    # One seed's coreset: over seeds 0-4 image AUROC is 0.891-0.909 (mean 0.903); the
    # earlier bfloat16 selection gave 0.894-0.942 (mean 0.910), its 0.942 being seed 0's.
    assert row["image_auroc"] >= 0.88
    assert row["pixel_auroc"] >= 0.84
    assert row["aupro"] >= 0.58


@pytest.mark.slow
def test_magnetic_tile_floors_on_a_subset(magnetic: Path) -> None:
    """200 seeded training images, 120 test images (60 good, 12 per defect type): measured
    0.913 / 0.886 / 0.721; the full run (0.946 / 0.834 / 0.708) is benchmarks/compare_methods.py."""
    subset = seeded_subset(load_dataset(magnetic), per_defect=12, good=60, train=200)
    row = evaluate("patchcore", subset).overall
    measured = (row["image_auroc"], row["pixel_auroc"], row["aupro"])
    assert all(v >= f for v, f in zip(measured, (0.87, 0.85, 0.68), strict=True)), measured


def test_same_seed_same_scores_and_maps_at_input_size(battery: Path) -> None:
    ds = load_dataset(battery)
    runs = []
    for _ in range(2):
        det = make_detector("patchcore", coreset_ratio=0.05, seed=3)
        det.fit(iter_samples(ds.train[:6], det.preprocess))
        x = torch.stack([s.image for s in iter_samples(ds.test[:2], det.preprocess)])
        runs.append(det.predict(x))
    assert torch.equal(runs[0].scores, runs[1].scores)
    assert runs[0].maps.shape == (2, *x.shape[-2:])


def test_defect_region_scores_higher_than_the_rest(battery: Path) -> None:
    """On real defective images, the map is higher inside the mask than outside."""
    ds = load_dataset(battery)
    det = make_detector("patchcore").fit(iter_samples(ds.train, make_detector("patchcore").preprocess))
    inside, outside = [], []
    for s in iter_samples([r for r in ds.test if r.label][:10], det.preprocess):
        amap = det.predict(s.image[None]).maps[0]
        inside.append(float(amap[s.mask].mean()))
        outside.append(float(amap[~s.mask].mean()))
    assert sum(i > o for i, o in zip(inside, outside, strict=True)) >= 8
