"""How often `defectscope ask` answers right, on the test splits of real datasets.

For PatchCore full-shot and few-shot (k = 2: the fewest normal images that still give a
threshold, since a 1-shot model has no unseen normal image to set one from), per dataset:
  - yes/no accuracy at the model's own threshold (AnomalyGPT reports 86.1% 1-shot on MVTec AD);
  - position accuracy: the grid cell named for the top region holds the centre of the
    largest ground-truth region (over defective images answered "yes", and over all
    defective images, a "no" counting as wrong);
  - defect-type accuracy (datasets with several types, e.g. magnetic_tile): 3 labelled
    examples per type drawn from the test split (masks as the region) and left out of
    scoring, over 5 seeds (mean ± std), with the share named "unknown";
  - with ``--llm smollm2`` (or a URL): the share of the model's phrasings kept (not
    contradicting the finding) and seconds per answer, on ``--llm-images`` images.

    python benchmarks/answers.py [--data DIR ...] [--llm smollm2] [--llm-images 12]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from defectscope import pipeline
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.data.images import load_mask
from defectscope.decision.answers import answer, language_model
from defectscope.decision.defect_types import DefectTypes, features, signature
from defectscope.decision.explain import grid_position, make_finding
from defectscope.decision.scoring import score_samples
from defectscope.detectors.base import make_detector, training_options

ROOT = Path(__file__).resolve().parents[1]
DATA = [ROOT.parent / "shared" / "datasets" / n for n in ("magnetic_tile", "battery_weld")]
EXAMPLES_PER_TYPE, SEEDS = 3, 5


def truth_cell(mask_path: Path) -> str:
    """Grid cell of the centre of the largest ground-truth region."""
    mask = load_mask(mask_path)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, n + 1))
    cy, cx = ndimage.center_of_mass(mask, labels, int(np.argmax(sizes)) + 1)
    return grid_position(cy, cx, *mask.shape)


def scored(detector, threshold: float, records) -> list[dict]:
    rows = []
    for rec, j in zip(records, score_samples(detector, iter_samples(records, detector.preprocess), score_refused=True), strict=True):
        amap = j.original_map()
        rows.append({"rec": rec, "sample": j.sample, "amap": amap, "finding": make_finding(j.score, amap, threshold)})
    return rows


def type_accuracy(detector, rows: list[dict], seed: int) -> tuple[float, float, int]:
    """(accuracy, unknown share, images) of naming the top region's type, examples left out."""
    rng = np.random.default_rng(seed)
    kinds = sorted({r["rec"].defect for r in rows if r["rec"].label})
    chosen: set[int] = set()
    signatures = {}
    for kind in kinds:
        idx = [i for i, r in enumerate(rows) if r["rec"].defect == kind and r["rec"].mask_path is not None]
        pick = rng.choice(idx, min(EXAMPLES_PER_TYPE, len(idx)), replace=False)
        chosen |= set(pick.tolist())
        sigs = (signature(features(detector, rows[i]["sample"].image), rows[i]["sample"].mask) for i in pick)
        signatures[kind] = [s for s in sigs if s is not None]
    types = DefectTypes.from_signatures(signatures)
    right = unknown = n = 0
    for i, r in enumerate(rows):
        if i in chosen or not r["rec"].label or not r["finding"].regions:
            continue
        named = types.label(detector, r["sample"], r["amap"], r["finding"]).regions[0].kind
        n += 1
        right += named == r["rec"].defect
        unknown += named == "unknown"
    return right / max(n, 1), unknown / max(n, 1), n


def llm_rows(llm, rows: list[dict], n: int) -> tuple[float, float, int]:
    """(share kept, seconds per answer, answers) of the model's phrasings on n images."""
    pick = rows[:: max(1, len(rows) // n)][:n]
    kept, seconds = 0, []
    for r in pick:
        a = answer(r["finding"], "Is there an anomaly in this image, and where?", llm=llm)
        kept += a.source == "llm"
        seconds.append(a.llm_seconds or 0.0)
    return kept / len(pick), float(np.mean(seconds)), len(pick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", default=DATA)
    parser.add_argument("--shots", nargs="+", default=["full", "2"])
    parser.add_argument("--llm", default=None)
    parser.add_argument("--llm-images", type=int, default=12)
    args = parser.parse_args()
    llm = language_model(args.llm)
    print(f"{'dataset':<14} {'shots':<5} {'yes/no acc':>10} {'position (yes)':>14} {'position (all)':>14} {'type acc (5 seeds)':>20} {'unknown':>8} {'LLM kept':>9} {'s/answer':>9}")
    for data in args.data:
        ds = load_dataset(data)
        for shots in args.shots:
            train = ds.train if shots == "full" else ds.train[: int(shots)]
            det = make_detector("patchcore", **training_options("patchcore", len(train), {}))
            fitted = pipeline.fit(det, train)
            rows = scored(fitted.detector, fitted.threshold.value, ds.test)
            yes_no = np.mean([bool(r["finding"].defective) == bool(r["rec"].label) for r in rows])
            defective = [r for r in rows if r["rec"].label and r["rec"].mask_path is not None]
            hits = [r["finding"].regions[0].position == truth_cell(r["rec"].mask_path) for r in defective if r["finding"].regions]
            pos_yes, pos_all = np.mean(hits) if hits else float("nan"), sum(hits) / max(len(defective), 1)
            type_cell = unknown_cell = "-"
            if len(ds.defects) > 1:
                accs = [type_accuracy(fitted.detector, rows, seed) for seed in range(SEEDS)]
                a = np.array([x[0] for x in accs])
                type_cell = f"{a.mean():.3f}±{a.std():.3f} (n={accs[0][2]})"
                unknown_cell = f"{np.mean([x[1] for x in accs]):.2f}"
            llm_cell = sec_cell = "-"
            if llm is not None and shots == "full":
                kept, sec, n = llm_rows(llm, rows, args.llm_images)
                llm_cell, sec_cell = f"{kept:.2f} ({n})", f"{sec:.1f}"
            print(
                f"{data.name:<14} {shots:<5} {yes_no:10.3f} {pos_yes:14.3f} {pos_all:14.3f} {type_cell:>20} {unknown_cell:>8} {llm_cell:>9} {sec_cell:>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
