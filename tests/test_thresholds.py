"""Thresholds from the normal scores of every training image, each scored as unseen."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectscope import pipeline
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.decision.thresholds import from_normal
from defectscope.detectors.base import make_detector
from defectscope.errors import ConfigError
from defectscope.evaluation.evaluate import score_records
from defectscope.modelfiles.artifacts import read_manifest, save_detector


def _scores_without(method: str, records: list, i: int, **options) -> float:
    """Score of record i from a model fitted on all the other records (the definition)."""
    det = make_detector(method, **options)
    det.fit(iter_samples([r for j, r in enumerate(records) if j != i], det.preprocess))
    return float(score_records(det, [records[i]]).scores[0])


@pytest.mark.parametrize(
    ("method", "options"),
    [("patchcore", {"coreset_ratio": 1.0}), ("spade", {}), ("padim", {}), ("fastrecon", {})],
)
def test_normal_scores_are_leave_one_out(battery: Path, method: str, options: dict) -> None:
    """Each training image's score equals that of a model fitted without it. PatchCore
    and SPADE leave the image out of the fitted bank, PaDiM downdates its Gaussians in
    closed form, FastRecon cross-fits (with as many folds as images: leave-one-out)."""
    records = load_dataset(battery).train[:5]
    det = make_detector(method, **options)
    normal = det.fit_scored(records, folds=len(records))
    assert normal is not None and normal.scores.shape == (5,)
    # PaDiM's twin inverts a covariance of 4 images in 100 dimensions (condition ~1e4) in
    # float32: its own rounding is ~1e-3; the closed form runs in float64.
    rel = 2e-3 if method == "padim" else 1e-4
    for i in (0, 3):
        assert normal.scores[i] == pytest.approx(_scores_without(method, records, i, **options), rel=rel)
    # and the detector itself is fitted on all five
    in_sample = score_records(det, records).scores
    assert np.all(in_sample <= normal.scores + 1e-6) if method in ("patchcore", "spade") else in_sample.shape == (5,)


def test_coreset_cross_fit_selects_each_folds_coreset_without_its_images(battery: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a coreset, every fold's coreset is selected again from the other folds' patches
    only (as many entries as the fitted coreset), so no held-out image ever shaped the bank
    it is scored against."""
    from defectscope.detectors import patchcore

    calls, owners = [], []
    real_select, real_collect = patchcore.greedy_coreset, patchcore.PatchCore._collect

    def recording(rows, n, **kw):
        calls.append(({r.numpy().tobytes() for r in rows}, rows.shape[0], n))
        return real_select(rows, n, **kw)

    def collect(self, images, progress):
        feats, owner, grids, pooled = real_collect(self, images, progress)
        owners.append((feats, owner))
        return feats, owner, grids, pooled

    monkeypatch.setattr(patchcore, "greedy_coreset", recording)
    monkeypatch.setattr(patchcore.PatchCore, "_collect", collect)
    records = load_dataset(battery).train[:20]
    det = make_detector("patchcore", coreset_ratio=0.05)
    normal = det.fit_scored(records, folds=4)
    assert normal.how == "4-fold cross-fitting, coreset selected again per fold" and normal.scores.shape == (20,)
    (_, total, n_fit), folds = calls[0], calls[1:]
    feats, owner = owners[0]
    image_rows = [{r.numpy().tobytes() for r in feats[owner == i]} for i in range(20)]
    held_out = [{i for i in range(20) if not image_rows[i] <= rows} for rows, _, _ in folds]
    assert len(folds) == 4 and all(n == n_fit == det.bank.shape[0] for _, _, n in folds)
    assert sorted(i for h in held_out for i in h) == list(range(20))  # each image held out exactly once
    for (_, size, _), h in zip(folds, held_out, strict=True):  # and the fold saw every other image's patches
        assert size == total - sum(int((owner == i).sum()) for i in h)


def test_coreset_cross_fit_scores_look_like_unseen_normal_images(battery: Path) -> None:
    """With the 1% coreset the cross-fitted score must sit in the range of the test split's
    good images, far above in-sample scores."""
    ds = load_dataset(battery)
    det = make_detector("patchcore")
    normal = det.fit_scored(ds.train)
    assert normal.how == "10-fold cross-fitting, coreset selected again per fold" and normal.scores.shape == (45,)
    good = [r for r in ds.test if r.label == 0]
    test_good = score_records(det, good).scores
    in_sample = score_records(det, ds.train).scores
    assert np.median(in_sample) < np.median(normal.scores)
    assert abs(np.median(normal.scores) - np.median(test_good)) < 0.25 * np.median(test_good)


def test_fit_uses_every_image_and_records_the_rule(small_mvtec: Path, tmp_path: Path) -> None:
    records = load_dataset(small_mvtec).train
    det = make_detector("patchcore")
    fitted = pipeline.fit(det, records, false_alarm_rate=0.05)
    assert det.timings["images"] == len(records)  # nothing held out
    thr = fitted.threshold
    assert thr.n_normal == len(records) and thr.source.startswith("10-fold cross-fitting")
    assert thr.false_alarm_rate == 0.05 and "0.95 quantile" in thr.method
    path = save_detector(det, tmp_path / "m.dscope", extra=fitted.extra())
    saved = read_manifest(path)["extra"]["threshold"]
    assert saved["n_normal"] == len(records) and saved["source"] == thr.source
    old = pipeline.fit(make_detector("patchcore"), records, holdout=0.2)
    assert old.threshold.source == "held-out" and old.threshold.n_normal < len(records)


def test_quantile_rule_and_unresolvable_rate() -> None:
    scores = np.arange(1000, dtype=float)
    thr = from_normal(scores, false_alarm_rate=0.01, source="leave-one-image-out")
    assert np.mean(scores >= thr.value) == pytest.approx(0.01, abs=0.002)
    few = from_normal(np.arange(20.0), false_alarm_rate=0.01)
    assert "cannot resolve" in few.method
    with pytest.raises(ConfigError, match="between 0 and 1"):
        from_normal(scores, false_alarm_rate=1.5)


def test_validation_that_is_the_test_split_is_refused(small_mvtec: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="test split of .*--force"):
        pipeline.fit(make_detector("patchcore"), small_mvtec, validation=small_mvtec)
    copy = tmp_path / "renamed_copy"
    shutil.copytree(small_mvtec, copy)  # the same images under another folder still count
    records = load_dataset(small_mvtec).train
    with pytest.raises(ConfigError, match="4 of 8 validation images|of 8 validation images"):
        pipeline.fit(make_detector("patchcore"), records, validation=copy, test_of=small_mvtec)
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        fitted = pipeline.fit(make_detector("patchcore"), small_mvtec, validation=copy, force=True)
    assert fitted.threshold.source == "validation" and "--force" in caplog.text


def test_validation_sharing_training_images_is_refused(small_mvtec: Path, tmp_path: Path) -> None:
    val = tmp_path / "val"
    for sub in ("train/good", "test/good", "test/defective", "ground_truth/defective"):
        (val / sub).mkdir(parents=True)
    for p in sorted((small_mvtec / "train/good").iterdir())[:2]:
        shutil.copy(p, val / "test/good" / f"renamed_{p.name}")
        shutil.copy(p, val / "train/good" / p.name)
    for p in sorted((small_mvtec / "test/defective").iterdir())[:2]:
        shutil.copy(p, val / "test/defective" / p.name)
        shutil.copy(small_mvtec / "ground_truth/defective" / p.name, val / "ground_truth/defective" / p.name)
    with pytest.raises(ConfigError, match="2 of 4 validation images are also the training images"):
        pipeline.fit(make_detector("patchcore"), small_mvtec, validation=val)
