"""defectscope: visual anomaly detection for production lines.

Public API: `make_detector`, `load_detector`, `save_detector`, `evaluate`, `Prediction`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from defectscope.artifacts import load_detector, save_detector  # noqa: E402
from defectscope.detectors import Detector, Prediction, make_detector  # noqa: E402
from defectscope.evaluate import evaluate  # noqa: E402

__all__ = ["Detector", "Prediction", "__version__", "evaluate", "load_detector", "make_detector", "save_detector"]
