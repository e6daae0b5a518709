"""Every detection method, one per file; importing this package registers them all."""

from defectscope.detectors import (  # noqa: F401
    anomalyclip,
    anomalydino,
    fastrecon,
    musc,
    padim,
    patchcore,
    realnet,
    spade,
    supersimplenet,
    winclip,
)
from defectscope.detectors.base import REGISTRY, Detector, Prediction, make_detector, register

__all__ = ["REGISTRY", "Detector", "Prediction", "make_detector", "register"]
