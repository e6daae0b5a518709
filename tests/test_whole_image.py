"""PatchCore's whole-image branch: it catches whole-image changes patches miss, keeps the
threshold's promise machinery intact, and survives the model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope import pipeline
from defectscope.components.whole_image import WholeImageGaussian
from defectscope.data.datasets import Record, iter_samples, load_dataset
from defectscope.data.images import load_image_uint8
from defectscope.decision.metrics import auroc
from defectscope.detectors.base import make_detector
from defectscope.errors import ConfigError
from defectscope.evaluation.evaluate import score_records
from defectscope.modelfiles.artifacts import load_detector, save_detector
from defectscope.synthesis import synthesize


@pytest.fixture(scope="module")
def rescaled(battery: Path, tmp_path_factory) -> tuple[list[Record], list[Record]]:
    """battery_weld's test/good images and a zoomed-in copy of each (the wrong distance to
    the camera: every patch still looks like weld, the image as a whole does not)."""
    goods = [r for r in load_dataset(battery).test if r.label == 0]
    out = tmp_path_factory.mktemp("rescaled")
    rng = np.random.default_rng(0)
    copies = []
    for j, rec in enumerate(goods):
        image, _ = synthesize(load_image_uint8(rec.path), "rescale", rng)
        Image.fromarray(image).save(out / f"{j}.png")
        copies.append(Record(out / f"{j}.png", 1, "rescale"))
    return goods, copies


@pytest.fixture(scope="module")
def fitted(battery: Path) -> dict[float, pipeline.Fitted]:
    train = load_dataset(battery).train
    return {w: pipeline.fit(make_detector("patchcore", whole_image=w), train) for w in (0.0, 1.0)}


def test_branch_catches_a_whole_image_change_patches_miss(fitted, rescaled) -> None:
    goods, copies = rescaled
    labels = np.r_[np.zeros(len(goods)), np.ones(len(copies))]
    result = {w: auroc(score_records(f.detector, goods + copies).scores, labels) for w, f in fitted.items()}
    # measured: 0.52 without the branch, 0.71 with it (benchmarks/global_anomalies.py)
    assert result[1.0] > result[0.0] + 0.1, result


def test_threshold_scores_carry_the_branch(battery: Path) -> None:
    train = load_dataset(battery).train[:20]
    plain = make_detector("patchcore").fit_scored(train)
    branch = make_detector("patchcore", whole_image=1.0).fit_scored(train)
    assert "whole-image" in branch.how
    term = branch.scores - plain.scores  # same patch part (same seed, same folds), plus w * u * e >= 0
    assert (term >= -1e-4).all() and (term > 0).any()
    np.testing.assert_allclose(branch.medians, plain.medians, rtol=1e-5)  # the maps are the patch maps


def test_model_file_round_trip_and_refusals(tmp_path: Path, battery: Path) -> None:
    train = [Record(p) for p in sorted((battery / "train/good").iterdir())[:12]]
    det = pipeline.fit(make_detector("patchcore", whole_image=0.5), train).detector
    path = save_detector(det, tmp_path / "m.dscope")
    again = load_detector(path)
    np.testing.assert_allclose(score_records(again, train[:4]).scores, score_records(det, train[:4]).scores, rtol=1e-5)
    assert again.wi_unit == det.wi_unit > 0
    state = {k: v for k, v in det.state().items() if not k.startswith("wi_")}
    with pytest.raises(ConfigError, match="no whole-image branch"):
        type(det).from_state(det.config(), state)
    with pytest.raises(ConfigError, match="tile"):
        make_detector("patchcore", whole_image=1.0, preprocess={"tile": 128})
    with pytest.raises(ConfigError, match="weight"):
        make_detector("patchcore", whole_image=-1)


def test_adding_normals_refits_the_gaussian(battery: Path) -> None:
    train = load_dataset(battery).train

    det = make_detector("patchcore", whole_image=1.0)
    det.fit(iter_samples(train[:20], det.preprocess))
    before = det.wi.pooled.shape[0]
    det.add_normals(iter_samples(train[20:25], det.preprocess))
    assert det.wi.pooled.shape[0] == before + 5


def test_gaussian_held_out_scores_are_unseen() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(60, 8)))
    model, held = WholeImageGaussian.fit(x)
    in_sample = model.distance(x.float()).numpy()
    assert held.mean() > in_sample.mean()  # an image scored by a Gaussian that saw it looks more normal
    far = model.exceedance(model.distance(torch.full((1, 8), 6.0)))
    assert float(far) > 1 and float(model.exceedance(torch.tensor([model.low]))) == 0
