"""Decision thresholds: from normal scores at a stated false-alarm rate, or F1 on validation.

With normal images only, the threshold is the (1 - false-alarm rate) quantile of normal
scores. Those scores must come from a model that did not see the image it scores: by
default every training image scored leaving itself out (memory banks) or its fold out
(cross-fitting), so no image is held out of the fit; the old rule of holding out a
fraction is kept as an option. An F1-optimal threshold needs defective images that are
*not* the test set; without any, anomalib's returns the minimum score and flags
everything. Every threshold says how it was obtained and from how many scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from defectscope.decision.metrics import f1_max
from defectscope.decision.verdict import check_threshold
from defectscope.errors import ConfigError

DEFAULT_FALSE_ALARM_RATE = 0.01


@dataclass(frozen=True)
class Threshold:
    """A score at or above ``value`` means defective; ``method`` says where it came from.

    ``source``: which scores set it ("leave-one-image-out", "5-fold cross-fitting",
    "held-out", "validation"); ``false_alarm_rate``: the rate it was set for (None for F1).
    """

    value: float
    method: str
    n_normal: int
    n_defective: int
    source: str = ""
    false_alarm_rate: float | None = None

    def __post_init__(self) -> None:
        check_threshold(self.value, f"threshold ({self.method})")

    def to_dict(self) -> dict:
        return asdict(self)


def check_rate(rate: float) -> float:
    """A false-alarm rate must be a fraction strictly between 0 and 1."""
    if not 0 < rate < 1:
        raise ConfigError(f"The false-alarm rate must be between 0 and 1 (e.g. 0.01), got {rate}.")
    return rate


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> Threshold:
    """Threshold maximising F1 on a validation set with both normal and defective images."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ConfigError("An F1-optimal threshold needs both normal and defective validation images.")
    if not np.all(np.isfinite(scores)):
        raise ConfigError("An F1-optimal threshold needs finite scores; leave out the images the model could not judge.")
    _, value = f1_max(scores, labels)
    return Threshold(value, "f1-optimal on validation images", int((~labels).sum()), int(labels.sum()), "validation")


def from_normal(
    scores: np.ndarray, *, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, source: str = "held-out", sigmas: float | None = None
) -> Threshold:
    """Threshold from normal scores of unseen images: the (1 - rate) quantile, or mean + ``sigmas`` * std.

    With fewer than 1 / rate scores the quantile lies between the largest ones: the method
    string then says the rate is not resolved by the data.
    """
    scores = np.asarray(scores, dtype=np.float64)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ConfigError(
            f"{bad} of {scores.size} normal images got a score that is not a finite number, so no threshold can be set "
            "from them; check those images (frame checks refuse NaN pixels) or report the method's failure."
        )
    if scores.size < 2:
        raise ConfigError("A threshold from normal images needs the scores of at least two normal images.")
    what = f"{source} normal scores of {scores.size} images"
    if sigmas is not None:
        value = float(scores.mean() + sigmas * scores.std(ddof=1))
        return Threshold(value, f"mean + {sigmas:g} std of {what}", scores.size, 0, source)
    rate = check_rate(false_alarm_rate)
    value = float(np.quantile(scores, 1.0 - rate))
    method = f"{1 - rate:g} quantile of {what} (false-alarm rate {rate:g})"
    if scores.size * rate < 1:
        method += f"; {scores.size} scores cannot resolve a rate of {rate:g}, so it lies near their maximum"
    return Threshold(value, method, scores.size, 0, source, rate)


def choose(
    scores: np.ndarray, labels: np.ndarray, *, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, source: str = "held-out"
) -> Threshold:
    """F1-optimal when the validation scores include defective images, normal-only otherwise."""
    labels = np.asarray(labels).astype(bool)
    if labels.any() and not labels.all():
        return f1_optimal(scores, labels)
    return from_normal(np.asarray(scores)[~labels], false_alarm_rate=false_alarm_rate, source=source)
