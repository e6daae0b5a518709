"""RealNet settings compared on a synthetic validation split made from train/good only.

The issue's route for choosing RealNet's settings without the test split:
`make_synthetic_split` keeps half of the dataset's train/good to fit on and puts Perlin,
CutPaste and Poisson defects with exact masks on the other half. PatchCore's default and
RealNet runs (``--runs``: AFS on = the default per-stage ratios, off = every channel, each at
its own number of steps, so runs of equal minutes can be compared) are fitted and scored on
it. The DDPM, if it was trained on all of train/good, has seen the validation split's normal
images: say so when quoting the numbers.

Run it alone: two processes on two cores slow each other several-fold.

    python benchmarks/realnet_validation.py --ddpm DDPM [--dataset battery_weld] [--runs on:300,off:300] [--n 20] [--skip-patchcore]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from defectscope.detectors.base import make_detector
from defectscope.evaluation.evaluate import evaluate
from defectscope.synthesis.split import make_synthetic_split

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def realnet_run(text: str) -> tuple[str, int]:
    """One ``--runs`` item, ``on:STEPS`` or ``off:STEPS``, as (AFS, steps); anything else is refused."""
    afs, _, steps = text.partition(":")
    if afs not in ("on", "off") or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected on:STEPS or off:STEPS, got {text!r}")
    return afs, int(steps)


def realnet_runs(text: str) -> list[tuple[str, int]]:
    return [realnet_run(item) for item in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="battery_weld")
    ap.add_argument("--ddpm", required=True, help="the dataset's DDPM (defectscope train-ddpm)")
    ap.add_argument("--runs", type=realnet_runs, default="on:300,off:300", help="RealNet runs as AFS:steps, AFS on or off")
    ap.add_argument("--skip-patchcore", action="store_true")
    ap.add_argument("--n", type=int, default=20, help="synthetic defects per kind")
    ap.add_argument("--work", type=Path, default=Path("/tmp/defectscope_realnet_validation"))
    args = ap.parse_args()
    val = args.work / f"{args.dataset}_val_n{args.n}"
    if not val.exists():
        make_synthetic_split(DATASETS / args.dataset, val, kinds=("perlin", "cutpaste", "poisson"), n=args.n, seed=0)
    rows = [] if args.skip_patchcore else [("patchcore (default)", "patchcore", {})]
    rows += [(f"realnet, AFS {afs}, {steps} steps", "realnet", {"ddpm": args.ddpm, "steps": steps, **({"afs_ratio": 1.0} if afs == "off" else {})})
             for afs, steps in args.runs]
    print("| method | image AUROC | pixel AUROC | AUPRO | minutes | synthesis + features s | training s |")
    print("|---|---|---|---|---|---|---|")
    for label, method, options in rows:
        start = time.perf_counter()
        det = make_detector(method, **options)
        r = evaluate(det, val).overall
        pool_s, train_s = det.info.get("pool_s", "-"), det.info.get("train_s", "-")
        print(f"| {label} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {(time.perf_counter() - start) / 60:.1f} | "
              f"{pool_s} | {train_s} |", flush=True)


if __name__ == "__main__":
    main()
