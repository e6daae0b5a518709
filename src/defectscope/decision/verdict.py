"""The one verdict rule: every path that calls a part good or bad asks `decide`.

A verdict is ``normal``, ``defect``, ``invalid`` (the model cannot judge the frame: a
frame check refused it, or its score is not a finite number) or ``unknown`` (the model
has no decision threshold). ``invalid`` is never a good part: a line that stops on
anything but ``normal`` stops on a dead camera too. A threshold must be a finite,
positive number wherever it is set (every method's scores are distances, Mahalanobis
distances or probabilities, so 0 would flag every part and NaN would pass every part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from defectscope.errors import ConfigError

Label = Literal["normal", "defect", "invalid", "unknown"]
VERDICTS: tuple[Label, ...] = ("normal", "defect", "invalid", "unknown")


@dataclass(frozen=True)
class Verdict:
    """What the line is told about one image, and why when it is not a plain score."""

    label: Label
    reason: str | None = None

    @property
    def judged(self) -> bool:
        """Whether the model could judge the frame (its score means something)."""
        return self.label != "invalid"

    @property
    def invalid_reason(self) -> str | None:
        """Why the frame could not be judged (None for a judged frame)."""
        return None if self.judged else self.reason


def check_threshold(value: float | None, where: str = "threshold") -> float:
    """``value`` as a float, or a `ConfigError` naming ``where`` if it is not finite and positive."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"The {where} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(
            f"The {where} is {number}: a threshold must be a finite number above 0 (scores at or above it are "
            "defects). Refit the model, or set a threshold such as the one `defectscope fit` printed."
        )
    return number


def not_a_number(score: float | None) -> str | None:
    """The reason a score cannot be used, or None for a finite score."""
    if score is None:
        return "the frame was not scored"
    if not math.isfinite(score):
        return f"the model's score is {score} (not a finite number); the frame cannot be judged"
    return None


def decide(score: float | None, threshold: float | None, invalid: str | None = None) -> Verdict:
    """The verdict of one image: ``invalid`` when a frame check gave a reason or the score
    is not finite, ``unknown`` without a threshold, else ``defect`` at or above the threshold."""
    reason = invalid or not_a_number(score)
    if reason is not None:
        return Verdict("invalid", reason)
    if threshold is None:
        return Verdict("unknown", "the model has no decision threshold")
    return Verdict("defect" if score >= threshold else "normal")  # type: ignore[operator]


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """`decide` over many scores: True where the image is not called normal (NaN included)."""
    return ~(np.asarray(scores, dtype=np.float64) < threshold)
