"""Decision thresholds from normal images only: the old held-out rule against the new one.

old: hold out 10% of train/good (seeded), fit on the rest, 0.99 quantile of the held-out
     scores (what `fit` did before). Which images are held out is chance, so the old rule
     runs with seeds 0..N-1 (--seeds) and its rows give mean ± std over them.
new: fit on all of train/good, score every training image leaving it out (memory banks)
     or cross-fitted (others), 0.99 quantile, i.e. a stated false-alarm rate of 0.01.
For each: the threshold, how many normal scores set it, the false-alarm rate on
test/good, the miss rate on the defective test images, and the fit time (including the
scoring that sets the threshold). The test split is only used to measure, never to set.

    python benchmarks/thresholds.py [--datasets magnetic_tile,battery_weld] [--methods patchcore] [--rate 0.01]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def run(dataset: str, method: str, rule: str, rate: float, seed: int = 0) -> dict:
    from defectscope import pipeline
    from defectscope.data.datasets import load_dataset
    from defectscope.detectors.base import make_detector
    from defectscope.evaluate import error_rates, score_records

    ds = load_dataset(DATASETS / dataset)
    det = make_detector(method)
    t0 = time.perf_counter()
    fitted = pipeline.fit(det, ds.train, false_alarm_rate=rate, holdout=0.1 if rule == "old" else 0.0, seed=seed)
    fit_s = time.perf_counter() - t0
    scored = score_records(det, ds.test)
    thr = fitted.threshold
    far, miss = error_rates(scored, thr.value)
    return {
        "dataset": dataset,
        "method": method,
        "rule": f"{rule} ({thr.source})",
        "threshold": thr.value,
        "scores": thr.n_normal,
        "fit_images": int(len(ds.train) - (thr.n_normal if rule == "old" else 0)),
        "far": far,
        "miss": miss,
        "fit_s": fit_s,
    }


def _cell(values: list[float], digits: int = 3) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f}" if v.size == 1 else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="magnetic_tile,battery_weld")
    ap.add_argument("--methods", default="patchcore")
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, default=10, help="seeds of the old rule's held-out draw")
    args = ap.parse_args()
    print(f"stated false-alarm rate {args.rate}; old rule over {args.seeds} seeds (mean ± std)")
    print("| dataset | method | rule | threshold | normal scores | fit images | test/good false-alarm rate | mean abs(FAR - stated) | miss rate | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        for method in args.methods.split(","):
            for rule in ("old", "new"):
                runs = [run(dataset, method, rule, args.rate, seed) for seed in range(args.seeds if rule == "old" else 1)]
                first = runs[0]
                print(
                    f"| {dataset} | {method} | {first['rule']} | {_cell([r['threshold'] for r in runs], 2)} | {first['scores']} | "
                    f"{first['fit_images']} | {_cell([r['far'] for r in runs])} | "
                    f"{sum(abs(r['far'] - args.rate) for r in runs) / len(runs):.3f} | {_cell([r['miss'] for r in runs])} | "
                    f"{_cell([r['fit_s'] for r in runs], 1)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
