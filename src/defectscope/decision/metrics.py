"""Paper-standard metrics: AUROC, AP, F1-max (image and pixel level) and AUPRO.

All curves are exact (every distinct score is a threshold, ties grouped), computed from
one sort, so pixel metrics over tens of millions of pixels stay O(n log n). Plain NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from defectscope.decision.verdict import flagged


@dataclass(frozen=True)
class Curve:
    """Cumulative true/false positives at each distinct threshold, highest threshold first."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: float
    negatives: float


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("Scores contain NaN or infinity.")
    return scores, labels


def weighted_curves(scores: np.ndarray, *weights: tuple[np.ndarray, np.ndarray]) -> list[Curve]:
    """Curves where each item adds its own weight to TP and FP (0/1 weights = ordinary ROC).

    All (positive, negative) weight pairs share one sort of ``scores``: pixel metrics need
    two curves (ROC/PR and PRO) over the same tens of millions of pixels.
    """
    order = np.argsort(-scores)  # order inside a tie does not matter: ties are grouped below
    s = scores[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    out = []
    for pos_w, neg_w in weights:
        tp = np.cumsum(pos_w[order], dtype=np.float64)
        fp = np.cumsum(neg_w[order], dtype=np.float64)
        out.append(Curve(s[last], tp[last], fp[last], float(tp[-1]), float(fp[-1])))
    return out


def curve(scores: np.ndarray, labels: np.ndarray) -> Curve:
    scores, labels = _check(scores, labels)
    return weighted_curves(scores, _label_weights(labels))[0]


def _label_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return labels.astype(np.float64), (~labels).astype(np.float64)


def _defined(c: Curve) -> bool:
    return c.positives > 0 and c.negatives > 0


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    return curve_auroc(curve(scores, labels))


def curve_auroc(c: Curve) -> float:
    if not _defined(c):
        return float("nan")
    tpr = np.r_[0.0, c.tp / c.positives]
    fpr = np.r_[0.0, c.fp / c.negatives]
    return float(np.trapezoid(tpr, fpr))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n, as scikit-learn defines it."""
    return curve_ap(curve(scores, labels))


def curve_ap(c: Curve) -> float:
    if c.positives == 0:
        return float("nan")
    precision = c.tp / (c.tp + c.fp)
    recall = np.r_[0.0, c.tp / c.positives]
    return float(np.sum(np.diff(recall) * precision))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (score >= t is defective)."""
    return curve_f1_max(curve(scores, labels))


def curve_f1_max(c: Curve) -> tuple[float, float]:
    if c.positives == 0:
        return float("nan"), float("nan")
    precision = c.tp / (c.tp + c.fp)
    recall = c.tp / c.positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(c.thresholds[best])


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    PRO(t) = mean over connected ground-truth regions (8-connectivity, all images) of the
    fraction of the region above t; FPR(t) over all defect-free pixels. Each region pixel
    carries weight 1 / (|region| * n_regions), so the cumulative sum of weights along the
    sorted scores *is* PRO(t): one sort gives the exact curve.
    """
    weights = pro_weights(masks)
    if weights is None:
        return float("nan")
    scores = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    return pro_area(weighted_curves(scores, weights)[0], fpr_limit)


def pro_weights(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-pixel (PRO weight, FPR weight) over the concatenated masks; None without regions."""
    structure = np.ones((3, 3), dtype=bool)
    labelled = [ndimage.label(np.asarray(m, dtype=bool), structure=structure) for m in masks]
    n_regions = sum(k for _, k in labelled)
    if n_regions == 0:
        return None
    n_normal = sum(int((lab == 0).sum()) for lab, _ in labelled)
    pro_w, fpr_w = [], []
    for lab, k in labelled:
        sizes = np.bincount(lab.ravel(), minlength=k + 1).astype(np.float64)
        sizes[0] = np.inf  # background pixels carry no PRO weight
        pro_w.append((1.0 / (sizes[lab] * n_regions)).ravel())
        fpr_w.append((lab == 0).ravel() / max(n_normal, 1))
    return np.concatenate(pro_w), np.concatenate(fpr_w)


def pro_area(c: Curve, fpr_limit: float) -> float:
    """Normalised area under PRO(FPR) from 0 to ``fpr_limit`` (interpolated at the limit)."""
    fpr, pro = np.r_[0.0, c.fp], np.r_[0.0, c.tp]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    if cut < fpr.size:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        fpr, pro = np.r_[fpr[:cut], fpr_limit], np.r_[pro[:cut], y_at]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """The largest true-positive rate of any threshold whose false-positive rate is at most
    ``fpr`` (threshold-free: what the best threshold for that false-alarm budget would
    catch on this set). NaN when only one class is present."""
    return curve_tpr_at_fpr(curve(scores, labels), fpr)


def curve_tpr_at_fpr(c: Curve, fpr: float) -> float:
    if not _defined(c):
        return float("nan")
    ok = c.fp / c.negatives <= fpr + 1e-12
    return float((c.tp[ok] / c.positives).max()) if ok.any() else 0.0


def misclassified(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int]:
    """(false positives, false negatives) at ``threshold``, by the verdict rule (`verdict.flagged`)."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    pred = flagged(scores, threshold)  # a NaN score is never a pass
    return int(np.sum(pred & ~labels)), int(np.sum(~pred & labels))


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image AUROC, AP, TPR at FPR 1% and 5% (the operating points a line runs at), F1-max,
    its threshold and the misclassifications there."""
    c = curve(scores, labels)
    f1, thr = curve_f1_max(c)
    fp, fn = misclassified(scores, labels, thr) if np.isfinite(thr) else (0, 0)
    return {
        "image_auroc": curve_auroc(c),
        "tpr_at_fpr1": curve_tpr_at_fpr(c, 0.01),
        "tpr_at_fpr5": curve_tpr_at_fpr(c, 0.05),
        "image_ap": curve_ap(c),
        "image_f1max": f1,
        "f1_threshold": thr,
        "false_positives": fp,
        "false_negatives": fn,
    }


def curve_points(c: Curve, fpr_max: float = 1.0, n: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR or PRO) of a curve sampled on an even FPR grid up to ``fpr_max``, for plots.

    FPR and TPR are normalised by the curve's totals; a PRO curve's weights are already
    normalised (its ``fp`` and ``tp`` sums are 1)."""
    fpr = np.r_[0.0, c.fp / max(c.negatives, 1e-300)]
    tpr = np.r_[0.0, c.tp / max(c.positives, 1e-300)]
    grid = np.linspace(0.0, fpr_max, n)
    return grid, np.interp(grid, fpr, tpr)


def pixel_metrics(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3, *, with_curves: bool = False
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max over all pixels of the set, and AUPRO (one shared sort).

    ``with_curves``: also return plot points of the ROC and PRO curves under "curves"."""
    flat_maps = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    flat_masks = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    scores, labels = _check(flat_maps, flat_masks)
    del flat_maps, flat_masks
    pro = pro_weights(masks)
    curves = weighted_curves(scores, _label_weights(labels), *([pro] if pro is not None else []))
    c = curves[0]
    out: dict[str, Any] = {
        "pixel_auroc": curve_auroc(c),
        "pixel_ap": curve_ap(c),
        "pixel_f1max": curve_f1_max(c)[0],
        "aupro": pro_area(curves[1], fpr_limit) if pro is not None else float("nan"),
    }
    if with_curves:
        out["curves"] = {"pixel_roc": curve_points(c)}
        if pro is not None:
            out["curves"]["pro"] = curve_points(curves[1], fpr_limit)
    return out
