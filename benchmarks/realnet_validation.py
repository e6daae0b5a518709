"""RealNet settings compared on a synthetic validation split made from train/good only.

The issue's route for choosing RealNet's settings without the test split:
`make_synthetic_split` keeps half of the dataset's train/good to fit on and puts Perlin,
CutPaste and Poisson defects with exact masks on the other half. PatchCore's default, RealNet's
default and RealNet with AFS off (every channel) are fitted and scored on it. The DDPM, if it
was trained on all of train/good, has seen the validation split's normal images: say so
when quoting the numbers.

Run it alone: two processes on two cores slow each other several-fold.

    python benchmarks/realnet_validation.py --ddpm DDPM [--dataset battery_weld] [--steps 300] [--n 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from defectscope.detectors.base import make_detector
from defectscope.evaluate import evaluate
from defectscope.synthesis.split import make_synthetic_split

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="battery_weld")
    ap.add_argument("--ddpm", required=True, help="the dataset's DDPM (defectscope train-ddpm)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=20, help="synthetic defects per kind")
    ap.add_argument("--work", type=Path, default=Path("/tmp/defectscope_realnet_validation"))
    args = ap.parse_args()
    val = args.work / f"{args.dataset}_val_n{args.n}"
    if not val.exists():
        make_synthetic_split(DATASETS / args.dataset, val, kinds=("perlin", "cutpaste", "poisson"), n=args.n, seed=0)
    rows = [
        ("patchcore (default)", "patchcore", {}),
        (f"realnet, AFS on, {args.steps} steps", "realnet", {"ddpm": args.ddpm, "steps": args.steps}),
        (f"realnet, AFS off, {args.steps} steps", "realnet", {"ddpm": args.ddpm, "steps": args.steps, "afs_ratio": 1.0}),
    ]
    print("| method | image AUROC | pixel AUROC | AUPRO | minutes |")
    print("|---|---|---|---|---|")
    for label, method, options in rows:
        start = time.perf_counter()
        r = evaluate(make_detector(method, **options), val).overall
        print(f"| {label} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {(time.perf_counter() - start) / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
