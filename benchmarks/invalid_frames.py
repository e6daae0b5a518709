"""Frame checks and "not the trained part" on the shared datasets: what each model calls invalid.

For each dataset, the default model (PatchCore, as `defectscope fit` makes it, frame limits
learned from train/good) judges:
- its own test/good and test/defect images: share called invalid (target <= 1%), and image
  AUROC over all images and over the valid ones only (unchanged is the target);
- the other datasets' test images: share called invalid (target 100%) and normal;
- synthetic camera faults made from its own test images (black, white, heavy blur,
  half-covered, heavy noise, far wrong exposure both ways, part shifted out of frame):
  share invalid / defect / normal (target: none normal);
- the cost: predict ms/image with the checks against the detector alone (decode included,
  best of two passes), target <= 5% more.

    python benchmarks/invalid_frames.py [--datasets magnetic_tile,battery_weld,bsdata] [--others 100] [--every 4]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from defectscope import pipeline
from defectscope.data.datasets import Record, Sample, iter_samples, load_dataset
from defectscope.decision.metrics import image_metrics
from defectscope.decision.scoring import Judge, score_samples
from defectscope.detectors.base import make_detector, training_options
from defectscope.evaluation.evaluate import score_records

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
NAMES = ("magnetic_tile", "battery_weld", "bsdata")


def faults(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Camera faults of one network-size image (3 x H x W in [0, 1])."""
    w = image.shape[2]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    half = image.clone()
    half[:, :, : w // 2] = 0  # half the lens covered
    shifted = torch.roll(image, w // 2, 2)
    shifted[:, :, : w // 2] = 0  # the part half out of frame, an empty (dark) fixture beside it
    return {
        "black": image * 0,
        "white": image * 0 + 1,
        "heavy blur": torch.from_numpy(ndimage.gaussian_filter(image.numpy(), (0, 6, 6))),
        "half covered": half,
        "heavy noise": (image + 0.3 * noise).clamp(0, 1),
        "far underexposed": image * 0.15,
        "far overexposed": (image * 4).clamp(0, 1),
        "shifted out of frame": shifted,
    }


def verdicts(detector, judge: Judge, samples) -> Counter:
    return Counter(j.verdict.label for j in score_samples(detector, samples, judge=judge))


def timed(fn) -> float:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def table(title: str, header: str, rows: list[str]) -> None:
    """Print one markdown table under a heading."""
    print(f"\n### {title}\n\n| {header} |\n|" + "---|" * (header.count("|") + 1))
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(NAMES))
    parser.add_argument("--others", type=int, default=100, help="images of each other dataset (evenly spaced over its test split)")
    parser.add_argument("--every", type=int, default=4, help="camera faults on every N-th own test image")
    args = parser.parse_args()
    names = args.datasets.split(",")
    data = {n: load_dataset(DATASETS / n) for n in NAMES}
    own_rows, other_rows, fault_rows, cost_rows = [], [], [], []
    for name in names:
        ds = data[name]
        detector = make_detector("patchcore", **training_options("patchcore", len(ds.train), {}))
        t0 = time.perf_counter()
        fitted = pipeline.fit(detector, ds.train)
        fit_s = time.perf_counter() - t0
        judge = fitted.judge()
        scored = score_records(detector, ds.test, judge=judge)
        invalid = np.array([v.label == "invalid" for v in scored.verdicts])
        good, bad = scored.labels == 0, scored.labels == 1
        auroc_all = image_metrics(scored.scores, scored.labels)["image_auroc"]
        auroc_valid = image_metrics(scored.scores[~invalid], scored.labels[~invalid])["image_auroc"]
        reasons = Counter(v.reason.split(":")[0] for v in scored.verdicts if v.label == "invalid")
        own_rows.append(
            f"| {name} | {invalid[good].sum()}/{good.sum()} ({invalid[good].mean():.1%}) | {invalid[bad].sum()}/{bad.sum()} "
            f"({invalid[bad].mean():.1%}) | {auroc_all:.4f} | {auroc_valid:.4f} | {fit_s:.1f} | "
            + (", ".join(f"{k} {v}" for k, v in reasons.items()) or "-") + " |"
        )
        for other in NAMES:
            if other == name:
                continue
            recs = data[other].test[:: max(1, len(data[other].test) // args.others)][: args.others]
            counts = verdicts(detector, judge, iter_samples(recs, detector.preprocess))
            n = sum(counts.values())
            other_rows.append(f"| {name} | {other} | {n} | {counts['invalid'] / n:.1%} | {counts['defect'] / n:.1%} | {counts['normal'] / n:.1%} |")
        picked = ds.test[:: args.every]
        per_fault: dict[str, list[Sample]] = {}
        for s in iter_samples(picked, detector.preprocess):
            for kind, image in faults(s.image).items():
                per_fault.setdefault(kind, []).append(Sample(image, s.geometry, s.path))
        for kind, samples in per_fault.items():
            counts = verdicts(detector, judge, samples)
            n = sum(counts.values())
            fault_rows.append(f"| {name} | {kind} | {n} | {counts['invalid'] / n:.1%} | {counts['defect'] / n:.1%} | {counts['normal'] / n:.1%} |")
        recs = [Record(r.path) for r in ds.test]
        bare = timed(lambda: [p for _, p in detector.predict_samples(iter_samples(recs, detector.preprocess))])  # noqa: B023
        checked = timed(lambda: list(score_samples(detector, iter_samples(recs, detector.preprocess), judge=judge)))  # noqa: B023
        cost_rows.append(f"| {name} | {len(recs)} | {1000 * bare / len(recs):.1f} | {1000 * checked / len(recs):.1f} | {checked / bare - 1:+.1%} |")
    table("Own test images", "dataset | test/good invalid | test/defect invalid | image AUROC, all | image AUROC, valid only | fit s | reasons", own_rows)
    table("Other products", "model | images of | n | invalid | defect | normal", other_rows)
    table("Synthetic camera faults", "model | fault | n | invalid | defect | normal", fault_rows)
    table("Cost (decode + predict, best of 2)", "dataset | images | detector alone ms/img | with checks ms/img | change", cost_rows)


if __name__ == "__main__":
    main()
