"""Zero-shot MuSc next to PatchCore full-shot and PatchCore / FastRecon at k = 1 and 4.

MuSc sees only the test split (unlabeled); the others fit on train/good (all, or k seeded
shots, seed 0). Prints image AUROC, pixel AUROC, AUPRO, seconds per image and peak RSS.
With ``--scale N`` it also scores a batch of N unlabeled images (magnetic_tile test +
train, 256 px) to show MuSc's time and memory at that size.

    python benchmarks/zero_shot.py [--datasets battery_weld,magnetic_tile] [--scale 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.data.fewshot import sample_shots
from defectscope.detectors import make_detector
from defectscope.detectors.base import fewshot_options
from defectscope.evaluation.evaluate import evaluate, peak_rss_mb, reset_peak_rss

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def row(name: str, label: str, result) -> str:
    r = result.overall
    s_per_img = result.cost["predict_ms_per_image"] / 1000
    return (
        f"| {name} | {label} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
        f"{s_per_img:.3f} | {result.cost['peak_rss_mb']:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="battery_weld,magnetic_tile")
    ap.add_argument("--scale", type=int, default=0)
    args = ap.parse_args()
    print("| dataset | method | image AUROC | pixel AUROC | AUPRO | s/image (predict) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        ds = load_dataset(DATASETS / name)
        print(row(name, "MuSc (zero-shot, rescore)", evaluate("musc", ds)), flush=True)
        print(row(name, "MuSc (zero-shot, no rescore)", evaluate("musc", ds, config={"rescore": False})), flush=True)
        print(row(name, "PatchCore full-shot", evaluate("patchcore", ds)), flush=True)
        for method in ("patchcore", "fastrecon"):
            for k in (1, 4):
                cfg = fewshot_options(method)
                print(row(name, f"{method} k={k} (seed 0)", evaluate(method, ds, config=cfg, train=sample_shots(ds.train, k, 0))), flush=True)
    if args.scale:
        ds = load_dataset(DATASETS / "magnetic_tile")
        records = (ds.test + ds.train)[: args.scale]
        det = make_detector("musc")
        reset_peak_rss()
        t = time.perf_counter()
        n = sum(len(batch) for batch, _ in det.predict_samples(iter_samples(records, det.preprocess)))
        elapsed = time.perf_counter() - t
        print(f"\nMuSc on a batch of {n} unlabeled images (M = {det.max_refs} references each): "
              f"{elapsed:.0f} s ({elapsed / n:.2f} s/image), peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
