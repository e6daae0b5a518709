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
(the paper: 300 epochs of batch 32 on a GPU); ``--budget-s 0`` drops the time limit, so a
run's result does not depend on what else the machine is doing (only its minutes do). Each run is printed as it finishes (a JSON
line), and appended to ``--log`` if given; runs already in that log are not run again, so
the whole grid (about 100 runs of 4-6 minutes) can be spread over several sittings.

Time it alone: two processes using both cores slow each other several-fold.

    python benchmarks/supervision.py [--datasets magnetic_tile,battery_weld,bsdata] [--ks 0,5,10,20] [--seeds 0,1,2,3,4]
        [--regimes masks,labels] [--steps 300] [--budget-s 0] [--log runs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from functools import partial
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
    from defectscope.detectors import make_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="magnetic_tile,battery_weld,bsdata")
    ap.add_argument("--ks", default="0,5,10,20")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--regimes", default="masks,labels")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=0, help="seconds of training at most; 0: no limit")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--log", type=Path, help="a JSON-lines file: each run is appended as it ends, and runs already in it "
                    "(same dataset, model, K, seed and training settings) are taken from it, so a grid can span sessions")
    args = ap.parse_args()
    ks, seeds, regimes = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")], args.regimes.split(",")
    ssn = {"steps": args.steps, "budget_s": args.budget_s or None, "batch_size": args.batch_size}
    # a logged run counts only if it was made with the same settings, defaults included
    config = json.loads(json.dumps({k: v for k, v in make_detector("supersimplenet", **ssn).config().items() if k != "seed"}))
    pc_config = json.loads(json.dumps(make_detector("patchcore").config()))
    done = [json.loads(line) for line in args.log.read_text().splitlines()] if args.log and args.log.exists() else []
    limit = f" or {args.budget_s:g} s" if args.budget_s else ""
    print(f"SuperSimpleNet: {args.steps} steps of batch {args.batch_size}{limit}; "
          "threshold at a stated 1% false-alarm rate on normal images\n")
    tables = []
    for name in args.datasets.split(","):
        ds = load_dataset(DATASETS / name)
        patchcore: dict = {}
        for k in ks:
            runs: dict[str, list[dict[str, float]]] = {}
            for regime in regimes if k else ["unsupervised"]:
                for seed in seeds:
                    key = {"data": name, "model": f"supersimplenet ({regime})", "k": k, "seed": seed, "config": config}
                    runs.setdefault(key["model"], []).append(logged(done, key) or run(
                        key, partial(ssn_row, ds, k, seed, regime, ssn), args.log, done))
                    if regime == regimes[0] or not k:
                        pc = {"data": name, "model": "patchcore", "k": k, "seed": seed, "config": pc_config}
                        runs.setdefault("patchcore", []).append(logged(done, pc) or run(
                            pc, partial(patchcore_row, ds, k, seed, patchcore), args.log, done))
            for model, rows in runs.items():
                cells = " | ".join(cell([r[c] for r in rows]) for c in COLS)
                tables.append(f"| {name} | {model} | {k} | {len(rows)} | {cells} |")
    print("| data | model | K | seeds | image AUROC | pixel AUROC | AUPRO | TPR@FPR1% | recall at thr | false alarms at thr | train min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(tables))


def logged(done: list[dict], key: dict) -> dict | None:
    """The row of a run already in the log, if there is one."""
    return next((row for row in done if all(row.get(k) == v for k, v in key.items())), None)


def run(key: dict, measure, log: Path | None, done: list[dict]) -> dict:
    """Measure one run, print it and append it to the log."""
    row = {**key, **measure(), "ended": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    done.append(row)
    if log:
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def ssn_row(ds, k: int, seed: int, regime: str, ssn: dict) -> dict[str, float]:
    """SuperSimpleNet trained with K labelled defects of the seed (none for K = 0), scored on the rest."""
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate, labelled_split

    labelled, rest = labelled_split(ds, k, seed, masks=regime == "masks")
    det = make_detector("supersimplenet", seed=seed, **ssn)
    if labelled:
        det.use_defects(labelled)
    return {**row_of(evaluate(det, rest, false_alarm_rate=0.01)), "train_steps": len(det.losses)}


def patchcore_row(ds, k: int, seed: int, fitted: dict) -> dict[str, float]:
    """PatchCore (fitted once per dataset, kept in ``fitted``) on the same remaining test images."""
    from defectscope.decision.thresholds import Threshold
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate, labelled_split

    if not fitted:
        fitted["model"] = make_detector("patchcore")
        t0 = time.perf_counter()
        full = evaluate(fitted["model"], ds, false_alarm_rate=0.01)
        fitted["fit_min"] = (time.perf_counter() - t0) / 60
        fitted["threshold"] = Threshold(**{f.name: full.threshold[f.name] for f in fields(Threshold)})
    _, rest = labelled_split(ds, k, seed)
    row = row_of(evaluate(fitted["model"], rest, fitted=True, threshold=fitted["threshold"]))
    return {**row, "fit_min": fitted["fit_min"]}


if __name__ == "__main__":
    main()
