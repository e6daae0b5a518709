"""MuSc on real images: a pasted defect among good images is found and located."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import defect_crop, paste_defect

from defectscope.data.datasets import Sample, iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError


@pytest.fixture(scope="module")
def batch(battery: Path) -> tuple[list[Sample], torch.Tensor]:
    """12 good weld crops of one size (one camera framing), one with a real weld defect pasted in."""
    ds = load_dataset(battery)
    det = make_detector("musc")
    goods = [s for s in iter_samples(ds.train + [r for r in ds.test if r.label == 0], det.preprocess) if s.image.shape[1:] == (164, 256)][:12]
    crop = defect_crop(list(iter_samples([r for r in ds.test if r.label][:10], det.preprocess)))
    image, mask = paste_defect(goods[5].image, crop, seed=0)
    goods[5] = Sample(image, goods[5].geometry, "pasted.png")
    return goods, mask


def run(samples: list[Sample], **config) -> list:
    det = make_detector("musc", **config).fit(None)
    return list(det.predict_samples(samples))


def test_pasted_defect_ranks_first_and_map_peaks_inside(batch) -> None:
    samples, mask = batch
    out = run(samples)
    scores = torch.cat([p.scores for _, p in out])
    assert int(scores.argmax()) == 5
    amap = out[5][1].maps[0]
    assert amap.shape == samples[5].image.shape[-2:]
    peak = int(amap.argmax())
    assert bool(mask.flatten()[peak])


def test_same_seed_same_result_and_subsampling(batch) -> None:
    samples, _ = batch
    a = torch.cat([p.scores for _, p in run(samples, max_refs=4, seed=1)])
    b = torch.cat([p.scores for _, p in run(samples, max_refs=4, seed=1)])
    c = torch.cat([p.scores for _, p in run(samples, max_refs=4, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_references_exclude_self() -> None:
    det = make_detector("musc", max_refs=5)
    refs = det._references(9)
    assert refs.shape == (9, 5)
    assert not (refs == torch.arange(9)[:, None]).any()
    assert all(len(set(r.tolist())) == 5 for r in refs)


def test_needs_two_images(batch) -> None:
    with pytest.raises(ConfigError, match="at least two"):
        run(batch[0][:1])
