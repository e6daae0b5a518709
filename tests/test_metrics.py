"""Metrics against scikit-learn and against a slow, obviously-correct AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from defectscope.decision.metrics import (
    aupro,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
    misclassified,
    pixel_metrics,
    tpr_at_fpr,
)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_ap_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 15, 400).astype(float)  # many ties
    labels = rng.random(400) < 0.2 + scores / 40
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_f1_max_matches_sklearn_curve_and_threshold() -> None:
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=300), rng.random(300) < 0.3
    scores[labels] += 1.0
    p, r, t = precision_recall_curve(labels, scores)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)
    best, thr = f1_max(scores, labels)
    assert best == pytest.approx(f1.max())
    pred = scores >= thr
    tp = np.sum(pred & labels)
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(best)
    fp, fn = misclassified(scores, labels, thr)
    assert fp == np.sum(pred & ~labels) and fn == np.sum(~pred & labels)


def test_single_class_is_nan_not_a_crash() -> None:
    assert np.isnan(auroc(np.arange(5.0), np.zeros(5)))
    assert np.isnan(image_metrics(np.arange(5.0), np.zeros(5))["image_ap"])


def slow_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """Direct definition: every distinct score as a threshold, per-region overlaps, trapezoid."""
    regions = []
    for i, m in enumerate(masks):
        lab, k = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == j) for j in range(1, k + 1)]
    normal = np.concatenate([(~m).ravel() for m in masks])
    allmaps = np.concatenate([a.ravel() for a in maps])
    pts = [(0.0, 0.0)]
    for t in sorted(set(allmaps.tolist()), reverse=True):
        fpr = np.sum((allmaps >= t) & normal) / normal.sum()
        pro = np.mean([np.mean(maps[i][reg] >= t) for i, reg in regions])
        pts.append((fpr, pro))
    fpr, pro = np.array(pts).T
    keep = fpr <= limit
    x, y = list(fpr[keep]), list(pro[keep])
    nxt = np.argmax(fpr > limit) if np.any(fpr > limit) else None
    if nxt:
        x0, y0, x1, y1 = fpr[nxt - 1], pro[nxt - 1], fpr[nxt], pro[nxt]
        x.append(limit)
        y.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / limit)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(3):
        m = np.zeros((16, 16), bool)
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, 12, 2)
            m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = True
        masks.append(m)
        maps.append(np.round(rng.random((16, 16)) + 0.6 * m, 2))  # rounded: ties
    if not any(m.any() for m in masks):
        masks[0][2:5, 2:5] = True
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-9)
    shared_sort = pixel_metrics(maps, masks)  # ROC and PRO curves from one sort
    assert shared_sort["aupro"] == pytest.approx(slow_aupro(maps, masks), abs=1e-6)
    flat_maps, flat_masks = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    assert shared_sort["pixel_auroc"] == pytest.approx(auroc(flat_maps, flat_masks), abs=1e-6)


def test_perfect_and_inverted_maps() -> None:
    m = np.zeros((20, 20), bool)
    m[5:9, 5:9] = True
    m[12:15, 1:3] = True
    perfect = pixel_metrics([m.astype(float)], [m])
    assert perfect["pixel_auroc"] == 1.0 and perfect["aupro"] == pytest.approx(1.0)
    assert pixel_metrics([1.0 - m], [m])["aupro"] == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tpr_at_fpr_matches_the_sklearn_roc_with_ties(seed: int) -> None:
    """The best recall of any threshold that flags at most 1% / 5% of the good images."""
    rng = np.random.default_rng(seed)
    scores = np.round(np.r_[rng.normal(0, 1, 500), rng.normal(1.5, 1, 120)], 1)  # rounded: many ties
    labels = np.r_[np.zeros(500), np.ones(120)].astype(bool)
    fpr, tpr, _ = roc_curve(labels, scores)
    for budget in (0.0, 0.01, 0.05, 0.2):
        assert tpr_at_fpr(scores, labels, budget) == pytest.approx(tpr[fpr <= budget].max())
    assert image_metrics(scores, labels)["tpr_at_fpr1"] == pytest.approx(tpr[fpr <= 0.01].max())
    assert np.isnan(tpr_at_fpr(scores, np.zeros_like(labels), 0.01))
