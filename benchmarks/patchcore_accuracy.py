"""PatchCore accuracy by input geometry, side by side with the naive set-up.

`squash` (every image distorted to 256 x 256) is the naive PatchCore the project measures
itself against; `aspect` (default: long side 256, shape kept) and `letterbox` keep the
shape. Same weights (tf_efficientnet_lite0), 1% coreset, paper image score.

    python benchmarks/patchcore_accuracy.py [--datasets battery_weld,magnetic_tile]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectscope.evaluation.evaluate import evaluate

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="battery_weld,magnetic_tile")
    ap.add_argument("--modes", default="squash,letterbox,aspect")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    print("| dataset | resize | image AUROC | pixel AUROC | AUPRO | image AP | pixel AP | fit s | predict ms/img |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        for mode in args.modes.split(","):
            result = evaluate("patchcore", DATASETS / name, config={"preprocess": {"size": args.size, "resize": mode}})
            r = result.overall
            print(
                f"| {name} | {mode} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                f"{r['image_ap']:.3f} | {r['pixel_ap']:.3f} | {result.cost['fit_s']:.1f} | {result.cost['predict_ms_per_image']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
