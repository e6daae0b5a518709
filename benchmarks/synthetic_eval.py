"""PatchCore on a synthetic test split made from magnetic_tile/train/good.

Half of the normal training images are kept for fitting; synthetic defects are made on
the other half (never seen by the model). Prints image and pixel AUROC per defect kind.

    python benchmarks/synthetic_eval.py [--n 50] [--kinds perlin,cutpaste,scar,scratch,noise,poisson]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from defectscope.evaluation.evaluate import evaluate
from defectscope.synthesis.split import make_synthetic_split

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--kinds", default="perlin,cutpaste,scar,scratch,noise,poisson")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", default=None, help="also write the contact sheet here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synthetic"
        summary = make_synthetic_split(SOURCE, out, kinds=args.kinds.split(","), n=args.n, seed=args.seed, preview=args.preview)
        result = evaluate("patchcore", out)
    print(f"PatchCore (defaults) fitted on {summary.train} magnetic_tile normal images; {summary.good} untouched test/good\n")
    print("| kind | images | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|")
    for r in result.rows:
        print(f"| {r['defect']} | {r['n_images']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} |")


if __name__ == "__main__":
    main()
