"""The k-shot protocol on the real datasets: methods x k in {1, 2, 4, 8} x 5 seeds.

Prints image and pixel AUROC as mean ± std over seeds, and predict ms/image. PatchCore
runs without a coreset in this protocol (its `fewshot_config`); PaDiM at k = 1 has no
spread to estimate, so its covariance is eps * I (a scaled Euclidean distance to the
single image's features).

    python benchmarks/fewshot.py [--methods patchcore,padim,spade,fastrecon] [--shots 1,2,4,8] [--seeds 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectscope.data.datasets import load_dataset
from defectscope.evaluate import evaluate_fewshot

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="patchcore,padim,spade,fastrecon")
    ap.add_argument("--datasets", default="battery_weld,magnetic_tile")
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    shots = [int(k) for k in args.shots.split(",")]
    print("| dataset | method | k | image AUROC | pixel AUROC | AUPRO | predict ms/img |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        ds = load_dataset(DATASETS / name)
        for method in args.methods.split(","):
            result = evaluate_fewshot(method, ds, shots=shots, seeds=list(range(args.seeds)))
            for k, st in result.summary().items():
                cells = [f"{st[c][0]:.3f} ± {st[c][1]:.3f}" for c in ("image_auroc", "pixel_auroc", "aupro")]
                print(f"| {name} | {method} | {k} | " + " | ".join(cells) + f" | {st['predict_ms_per_image'][0]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
