"""defectscope: visual anomaly detection for production lines.

The Python API (`defectscope.api`)::

    import defectscope as ds
    model = ds.fit("good_parts/")            # or ds.load("line3.dscope")
    r = model.predict("part.png")            # r.verdict, r.score, r.anomaly_map, r.regions
    table = ds.evaluate("mvtec_layout_dataset/", method="padim")

Lower level: `make_detector`, `load_detector`, `save_detector`, `Detector`, `Prediction`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from defectscope.api import Model, Result, evaluate, fit, load, tune  # noqa: E402
from defectscope.detectors import Detector, Prediction, make_detector  # noqa: E402
from defectscope.modelfiles.artifacts import load_detector, save_detector  # noqa: E402

__all__ = [
    "Detector", "Model", "Prediction", "Result", "__version__", "evaluate", "fit", "load", "load_detector", "make_detector",
    "save_detector", "tune",
]
