"""The one way to score images: frame checks, the detector, "not the part", the verdict.

`score_samples` is what every path calls (CLI predict local and on Ray, the station and
its folder watcher, `ask`, evaluation, exported graphs, the Python API): a frame the
model's `Gate` refuses never reaches the detector (unless ``score_refused``, for
evaluation tables that need every score), a non-finite score is ``invalid``, and the
verdict comes from `verdict.decide`. A `Judge` is what a model file says about deciding:
its threshold and its frame limits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from defectscope.data.datasets import Sample
from defectscope.data.images import to_original
from defectscope.decision.gate import Gate
from defectscope.decision.verdict import Verdict, check_threshold, decide
from defectscope.detectors.base import Detector


@dataclass(frozen=True)
class Judge:
    """How a model turns a score into a verdict: its threshold and its frame limits."""

    threshold: float | None = None
    gate: Gate = field(default_factory=Gate.fixed)

    @classmethod
    def of(cls, extra: dict[str, Any], source: str, threshold: float | None = None) -> Judge:
        """The judge a model file's (or exported graph's) recorded ``extra`` describes;
        ``threshold`` overrides the recorded one. A recorded threshold that is not a finite
        positive number is refused (a model fitted with NaN scores would pass every part)."""
        if threshold is not None:
            thr: float | None = check_threshold(threshold, "--threshold")
        else:
            recorded = (extra.get("threshold") or {}).get("value")
            thr = None if recorded is None else check_threshold(recorded, f"threshold recorded in {source}")
        return cls(thr, Gate.from_extra(extra, source))


@dataclass
class Judged:
    """One image's outcome: its score (None when a frame check refused it before scoring or
    the detector gave a non-finite one), the verdict with its reason, and the anomaly map at
    network size (None when refused)."""

    sample: Sample
    score: float | None
    verdict: Verdict
    map: torch.Tensor | None

    @property
    def path(self) -> str:
        return self.sample.path

    def original_map(self) -> np.ndarray | None:
        """The anomaly map at the original image's size (None when the frame was not scored)."""
        return None if self.map is None else to_original(self.map, self.sample.geometry).numpy()


def score_samples(
    detector: Detector,
    samples: Iterable[Sample],
    *,
    judge: Judge | None = None,
    batch_size: int = 8,
    score_refused: bool = False,
) -> Iterator[Judged]:
    """Judge every sample (see module docstring). Refused frames are yielded as soon as the
    next scored batch is (so not always in input order); ``score_refused`` scores them too,
    keeping their ``invalid`` verdict, and keeps the input order."""
    judge = judge or Judge()
    refused: dict[int, str] = {}
    waiting: list[Judged] = []

    def admitted() -> Iterator[Sample]:
        for s in samples:
            reason = judge.gate.check_frame(s)
            if reason is None or score_refused:
                if reason is not None:
                    refused[id(s)] = reason
                yield s
            else:
                waiting.append(Judged(s, None, decide(None, judge.threshold, reason), None))

    for group, pred in detector.predict_samples(admitted(), batch_size=batch_size):
        yield from waiting
        waiting.clear()
        for sample, score, amap in zip(group, pred.scores.tolist(), pred.maps, strict=True):
            reason = refused.pop(id(sample), None)
            finite = math.isfinite(score)
            if reason is None and finite:
                reason = judge.gate.check_map(amap)
            yield Judged(sample, score if finite else None, decide(score, judge.threshold, reason), amap)
    yield from waiting
