"""Labelled defects against none: SuperSimpleNet per supervision regime, PatchCore beside it.

For each dataset, K labelled defects (``--ks``) x seeds (``--seeds``): K defective test
images drawn by the seed (`evaluation.evaluate.labelled_split`) train SuperSimpleNet with
their masks ("masks") or as image labels only ("labels"); the rest of the test split is
scored. K = 0 is unsupervised SuperSimpleNet. PatchCore (the default model, fitted once per
dataset) scores the same remaining test images. Both thresholds are a stated 1% false-alarm
rate on normal training images only. Columns: image AUROC, pixel AUROC, AUPRO, TPR at FPR
1% (from the test ROC), recall and realized false-alarm rate at the model's threshold,
training minutes; mean over seeds (with the spread where there are several).

SuperSimpleNet trains for ``--steps`` steps or ``--budget-s`` seconds, whichever ends first
(the paper: 300 epochs of batch 32 on a GPU); each run is printed as it finishes.

Time it alone: two processes using both cores slow each other several-fold.

    python benchmarks/supervision.py [--datasets magnetic_tile,battery_weld,bsdata] [--ks 0,5,10,20] [--seeds 0,1,2,3,4]
        [--regimes masks,labels] [--steps 1500] [--budget-s 600]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
COLS = ("image_auroc", "pixel_auroc", "aupro", "tpr_at_fpr1", "test_recall", "test_false_alarm_rate", "fit_min")


def row_of(result) -> dict[str, float]:
    thr = result.threshold or {}
    return {
        **{k: result.overall[k] for k in ("image_auroc", "pixel_auroc", "aupro", "tpr_at_fpr1")},
        "test_recall": thr.get("test_recall", float("nan")), "test_false_alarm_rate": thr.get("test_false_alarm_rate", float("nan")),
        "fit_min": result.cost["fit_s"] / 60,
    }


def cell(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.3f}" if v.size == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def main() -> None:
    from defectscope.data.datasets import load_dataset
    from defectscope.decision.thresholds import Threshold
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate, labelled_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="magnetic_tile,battery_weld,bsdata")
    ap.add_argument("--ks", default="0,5,10,20")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--regimes", default="masks,labels")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--budget-s", type=float, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    ks, seeds, regimes = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")], args.regimes.split(",")
    ssn = {"steps": args.steps, "budget_s": args.budget_s, "batch_size": args.batch_size}
    print(f"SuperSimpleNet: {args.steps} steps of batch {args.batch_size} or {args.budget_s:g} s; "
          "threshold at a stated 1% false-alarm rate on normal images\n")
    print("| data | model | K | seeds | image AUROC | pixel AUROC | AUPRO | TPR@FPR1% | recall at thr | false alarms at thr | train min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        ds = load_dataset(DATASETS / name)
        patchcore = make_detector("patchcore")
        t0 = time.perf_counter()
        full = evaluate(patchcore, ds, false_alarm_rate=0.01)
        pc_fit = time.perf_counter() - t0
        threshold = Threshold(**{f.name: full.threshold[f.name] for f in fields(Threshold)})
        for k in ks:
            runs: dict[str, list[dict[str, float]]] = {}
            for regime in regimes if k else ["unsupervised"]:
                for seed in seeds if k else seeds[:1]:
                    labelled, rest = labelled_split(ds, k, seed, masks=regime == "masks")
                    det = make_detector("supersimplenet", seed=seed, **ssn)
                    if labelled:
                        det.use_defects(labelled)
                    runs.setdefault(f"supersimplenet ({regime})", []).append(row_of(evaluate(det, rest, false_alarm_rate=0.01)))
                    if regime == regimes[0] or not k:
                        pc = row_of(evaluate(patchcore, rest, fitted=True, threshold=threshold))
                        runs.setdefault("patchcore", []).append({**pc, "fit_min": pc_fit / 60})
            for model, rows in runs.items():
                cells = " | ".join(cell([r[c] for r in rows]) for c in COLS)
                print(f"| {name} | {model} | {k} | {len(rows)} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
