"""Does the threshold keep its promise? Stated false-alarm rate against the rate realized on
test/good, with a 95% Clopper-Pearson interval, for the ways PatchCore scores its own
training images (the scores the threshold is the quantile of):

cross-fit      10 folds (--folds), each fold's coreset selected again from the other folds (the default)
leave-one-out  each image's entries dropped from the coreset that was selected with it

One fit per dataset and scheme gives the normal scores; the threshold at each stated rate
is their (1 - rate) quantile (`thresholds.from_normal`). The test split only measures:
the false-alarm count on test/good, recall on the defective images, and beside them the
threshold-free TPR at FPR 1% / 5% from the test ROC. Fit s includes the normal scores.

    python benchmarks/thresholds.py [--datasets magnetic_tile,bsdata] [--schemes cross-fit,leave-one-out] [--plot docs/assets]

``--plot DIR``: per dataset, stated against realized rate (one line per scheme, the default
scheme's 95% interval dashed) as DIR/calibration_<dataset>.svg, for the docs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
RATES = (0.01, 0.02, 0.05, 0.10)


def calibration(dataset: str, scheme: str, rates: tuple[float, ...], folds: int = 5) -> tuple[list[dict], float, dict[str, float]]:
    """Rows per stated rate, the fit time (s) and the threshold-free operating points."""
    from defectscope.data.datasets import load_dataset
    from defectscope.decision.metrics import tpr_at_fpr
    from defectscope.decision.thresholds import from_normal
    from defectscope.detectors.base import make_detector
    from defectscope.evaluation.evaluate import score_records

    ds = load_dataset(DATASETS / dataset)
    det = make_detector("patchcore", normal_scores=scheme)
    t0 = time.perf_counter()
    normal = det.fit_scored(ds.train, folds=folds)
    fit_s = time.perf_counter() - t0
    scored = score_records(det, ds.test)
    good, bad = scored.scores[scored.labels == 0], scored.scores[scored.labels == 1]
    rows = []
    for rate in rates:
        thr = from_normal(normal.scores, false_alarm_rate=rate, source=normal.how).value
        k = int((~(good < thr)).sum())  # NaN counts as flagged, as everywhere
        ci = binomtest(k, good.size).proportion_ci(confidence_level=0.95, method="exact")
        rows.append({
            "rate": rate, "threshold": thr, "k": k, "n": good.size, "low": ci.low, "high": ci.high,
            "inside": ci.low <= rate <= ci.high, "recall": float((~(bad < thr)).mean()),
        })
    points = {f"TPR@FPR{int(100 * f)}%": tpr_at_fpr(scored.scores, scored.labels, f) for f in (0.01, 0.05)}
    return rows, fit_s, points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="magnetic_tile,bsdata")
    ap.add_argument("--schemes", default="cross-fit,leave-one-out")
    ap.add_argument("--rates", default=",".join(str(r) for r in RATES))
    ap.add_argument("--folds", type=int, default=10, help="cross-fitting folds (what `fit` uses: 10)")
    ap.add_argument("--plot", type=Path, help="folder for the calibration plots (SVG)")
    args = ap.parse_args()
    rates = tuple(float(r) for r in args.rates.split(","))
    print("| dataset | normal scores | stated rate | threshold | false alarms on test/good | realized rate | 95% interval | stated inside | recall | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        plotted = {}
        for scheme in args.schemes.split(","):
            rows, fit_s, points = calibration(dataset, scheme, rates, args.folds)
            plotted[scheme] = rows
            label = f"{args.folds}-fold {scheme}" if scheme == "cross-fit" else scheme
            for r in rows:
                print(
                    f"| {dataset} | {label} | {r['rate']:.0%} | {r['threshold']:.3f} | {r['k']}/{r['n']} | {r['k'] / r['n']:.3f} | "
                    f"[{r['low']:.3f}, {r['high']:.3f}] | {'yes' if r['inside'] else '**no**'} | {r['recall']:.3f} | {fit_s:.1f} |",
                    flush=True,
                )
            print(f"| {dataset} | (threshold-free, test ROC) | {', '.join(f'{k} {v:.3f}' for k, v in points.items())} | | | | | | | |", flush=True)
        if args.plot is not None:
            plot(dataset, plotted, args.folds, args.plot)


def plot(dataset: str, plotted: dict[str, list[dict]], folds: int, folder: Path) -> Path:
    """Stated (x) against realized (y) false-alarm rate per scheme; the diagonal is the promise."""
    from defectscope.components.charts import Axes, Series, line_chart

    colours = {"cross-fit": "#1f5fbf", "leave-one-out": "#c92a2a"}
    stated = np.array([r["rate"] for r in next(iter(plotted.values()))])
    top = max(0.15, *(r["high"] for rows in plotted.values() for r in rows))
    series = [Series(stated, np.array([r["k"] / r["n"] for r in rows]), colours.get(s, "#444"), f"{folds}-fold {s}" if s == "cross-fit" else s)
              for s, rows in plotted.items()]
    if "cross-fit" in plotted:
        rows = plotted["cross-fit"]
        series += [Series(stated, np.array([r[b] for r in rows]), "#9bb7e6", f"95% interval ({b})") for b in ("low", "high")]
    svg = line_chart(series, Axes(0, top, 0, top, "stated false-alarm rate", "realized on test/good"), f"{dataset}: does the threshold keep its promise?", diagonal=True)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"calibration_{dataset}.svg"
    out.write_text(svg, encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
