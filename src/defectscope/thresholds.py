"""Decision thresholds: F1-optimal with defective validation images, else from normal ones.

An F1-optimal threshold needs defective images that are *not* the test set; without any,
anomalib's returns the minimum score and flags everything. Here, with normal images only,
the threshold comes from held-out normal scores: a high quantile, or mean + k * std.
Every threshold says how it was obtained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from defectscope.errors import ConfigError
from defectscope.metrics import f1_max


@dataclass(frozen=True)
class Threshold:
    """A score at or above ``value`` means defective; ``method`` says where it came from."""

    value: float
    method: str
    n_normal: int
    n_defective: int

    def to_dict(self) -> dict:
        return asdict(self)


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> Threshold:
    """Threshold maximising F1 on a validation set with both normal and defective images."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ConfigError("An F1-optimal threshold needs both normal and defective validation images.")
    _, value = f1_max(scores, labels)
    return Threshold(value, "f1-optimal on validation images", int((~labels).sum()), int(labels.sum()))


def from_normal(scores: np.ndarray, *, quantile: float | None = 0.99, sigmas: float | None = None) -> Threshold:
    """Threshold from held-out *normal* scores: a quantile, or mean + ``sigmas`` * std."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        raise ConfigError("A threshold from normal images needs at least two held-out normal images.")
    if sigmas is not None:
        value = float(scores.mean() + sigmas * scores.std(ddof=1))
        return Threshold(value, f"mean + {sigmas:g} std of held-out normal scores", scores.size, 0)
    if quantile is None or not 0 < quantile <= 1:
        raise ConfigError(f"quantile must be in (0, 1], got {quantile}.")
    value = float(np.quantile(scores, quantile))
    return Threshold(value, f"{quantile:g} quantile of held-out normal scores", scores.size, 0)


def choose(scores: np.ndarray, labels: np.ndarray, *, quantile: float = 0.99) -> Threshold:
    """F1-optimal when the validation scores include defective images, normal-only otherwise."""
    labels = np.asarray(labels).astype(bool)
    if labels.any() and not labels.all():
        return f1_optimal(scores, labels)
    return from_normal(np.asarray(scores)[~labels], quantile=quantile)
