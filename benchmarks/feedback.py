"""The station's correction loop, measured on magnetic_tile (PatchCore, full-shot).

Fit on train/good with the threshold from all training images at a stated false-alarm
rate (--rate; at 0.01 magnetic_tile's test/good may have no false alarm to correct),
serve the model from a temporary station, score test/good, split it into two seeded
halves, and mark every false alarm of half A as a good part (POST-equivalent
`Station.feedback`, which adds the image to the bank and switches to a new version).
Then report, before and after: the false-alarm rate on half B (never corrected), image
AUROC on the full test split, and the bank size.

    python benchmarks/feedback.py [--dataset magnetic_tile] [--rate 0.01] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    from defectscope import pipeline
    from defectscope.data.datasets import load_dataset
    from defectscope.decision.metrics import auroc
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import score_records
    from defectscope.modelfiles.artifacts import save_detector
    from defectscope.serve.station import Station
    from defectscope.serve.store import SQLiteStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="magnetic_tile")
    ap.add_argument("--rate", type=float, default=0.01, help="stated false-alarm rate of the threshold")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = load_dataset(DATASETS / args.dataset)
    fitted = pipeline.fit(make_detector("patchcore"), ds.train, false_alarm_rate=args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_detector(fitted.detector, Path(tmp) / "model.dscope", extra=fitted.extra())
        station = Station(model, SQLiteStore(Path(tmp) / "store"))
        thr = station.current.threshold
        good = [r for r in ds.test if r.label == 0]
        order = np.random.default_rng(args.seed).permutation(len(good))
        half_a, half_b = [good[i] for i in order[: len(good) // 2]], [good[i] for i in order[len(good) // 2 :]]

        def measure() -> tuple[float, float, int]:
            det = station.current.detector
            b = score_records(det, half_b).scores
            full = score_records(det, ds.test)
            return float(np.mean(b >= thr)), auroc(full.scores, full.labels), int(det.bank.shape[0])

        far_b0, auc0, bank0 = measure()
        t0 = time.perf_counter()
        jobs = station.store_uploads([(r.path.read_bytes(), r.path.name) for r in half_a])
        results = [station.batcher.submit(j).result() for j in jobs]
        alarms = [r for r in results if r.verdict == "defect"]
        for r in alarms:
            station.feedback(r.id, "normal")
        correct_s = time.perf_counter() - t0
        far_b1, auc1, bank1 = measure()
        station.close()
    print(f"{args.dataset}: threshold {thr:.4g} ({fitted.threshold.method})")
    print(f"half A: {len(half_a)} good images, {len(alarms)} false alarms marked as good parts ({correct_s:.1f} s incl. scoring)")
    print("| | false-alarm rate, half B | image AUROC, full test | bank size |")
    print("|---|---|---|---|")
    print(f"| before | {far_b0:.3f} | {auc0:.4f} | {bank0} |")
    print(f"| after | {far_b1:.3f} | {auc1:.4f} | {bank1} |")
    print(f"AUROC change {auc1 - auc0:+.4f} (must not drop by more than 0.01)")


if __name__ == "__main__":
    main()
