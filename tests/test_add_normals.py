"""Teaching a fitted model more normal images without refitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError
from defectscope.evaluation.evaluate import score_records
from defectscope.modelfiles.artifacts import load_detector, save_detector


@pytest.fixture(scope="module")
def weld(battery: Path):
    return load_dataset(battery)


@pytest.mark.parametrize("method", ["patchcore", "padim", "spade", "fastrecon"])
def test_a_good_part_scores_lower_after_it_is_added(method: str, weld, tmp_path: Path) -> None:
    det = make_detector(method)
    det.fit(iter_samples(weld.train[:12], det.preprocess))
    taught = load_detector(save_detector(det, tmp_path / "m.dscope"))  # what the station does: a saved copy
    new = weld.train[12:15]
    before = score_records(taught, new).scores
    change = taught.add_normals(iter_samples(new, taught.preprocess))
    after = score_records(taught, new).scores
    assert (after < before).all(), (before, after, change)
    reloaded = load_detector(save_detector(taught, tmp_path / "m.v2.dscope"))
    assert np.allclose(score_records(reloaded, new).scores, after, rtol=1e-4)  # the update survives a save


def test_padim_update_equals_a_fit_on_all_images(weld) -> None:
    """The running mean/covariance update gives the model a fit on all images would."""
    a = make_detector("padim", d=30)
    a.fit(iter_samples(weld.train[:10], a.preprocess))
    a.add_normals(iter_samples(weld.train[10:16], a.preprocess))
    b = make_detector("padim", d=30)
    b.fit(iter_samples(weld.train[:16], b.preprocess))
    assert a.n_images == b.n_images == 16
    assert torch.allclose(a.mean, b.mean, atol=1e-4)
    x = torch.stack([s.image for s in iter_samples(weld.test[:3], a.preprocess)])
    assert torch.allclose(a.predict(x).scores, b.predict(x).scores, rtol=1e-3)


def test_patchcore_grows_only_where_the_bank_missed_something(weld) -> None:
    det = make_detector("patchcore")
    det.fit(iter_samples(weld.train, det.preprocess))
    assert det.radius > 0
    again = det.add_normals(iter_samples(weld.train[:3], det.preprocess))  # already covered
    new = det.add_normals(iter_samples([r for r in weld.test if r.label][:3], det.preprocess))
    assert again["added_patches"] < new["added_patches"]
    assert new["bank_after"] == new["bank_before"] + new["added_patches"]


def test_model_file_without_the_needed_state_is_refused(weld, tmp_path: Path) -> None:
    det = make_detector("patchcore")
    det.fit(iter_samples(weld.train[:4], det.preprocess))
    det.radius = None  # as in files written before add-normals existed
    old = load_detector(save_detector(det, tmp_path / "old.dscope"))
    with pytest.raises(ConfigError, match="predates adding normal images.*refit"):
        old.add_normals(iter_samples(weld.train[4:5], old.preprocess))
