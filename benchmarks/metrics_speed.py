"""Pixel metrics over a magnetic_tile-sized test set: one shared sort against two.

`pixel_metrics` takes the ROC/PR curve and the PRO curve from one sort of all pixels; the
"two sorts" row calls `auroc` and `aupro` separately (what it did before). Synthetic maps
of 256 x 200 with a rectangular defect in every second image.

    python benchmarks/metrics_speed.py [--images 678]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from defectscope.decision.metrics import aupro, auroc, pixel_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=678)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    maps, masks = [], []
    for i in range(args.images):
        m = np.zeros((256, 200), bool)
        if i % 2:
            y, x = rng.integers(0, 200, 2)
            m[y : y + 30, x : x + 20] = True
        maps.append((rng.random(m.shape) + 0.5 * m).astype(np.float32))
        masks.append(m)
    flat_maps, flat_masks = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    print(f"{flat_maps.size / 1e6:.1f} M pixels\n")
    print("| pixel metrics | seconds | pixel AUROC | AUPRO |")
    print("|---|---|---|---|")
    t = time.perf_counter()
    two = auroc(flat_maps, flat_masks), aupro(maps, masks)
    print(f"| two sorts (auroc + aupro) | {time.perf_counter() - t:.1f} | {two[0]:.6f} | {two[1]:.6f} |")
    t = time.perf_counter()
    one = pixel_metrics(maps, masks)
    print(
        f"| one sort (pixel_metrics) | {time.perf_counter() - t:.1f} | {one['pixel_auroc']:.6f} | {one['aupro']:.6f} |"
    )


if __name__ == "__main__":
    main()
