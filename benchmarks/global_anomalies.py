"""Anomalies of the whole image: does PatchCore's whole-image branch catch what patches miss,
and what does it cost on the real defects?

Per dataset, every test/good image (never trained on) gets one copy per whole-image kind
(`synthesis.GLOBAL_KINDS`: rotate, rescale, colour, remove), written to a scratch folder.
PatchCore is fitted on train/good at each ``--weights`` value of ``whole_image`` (0 = the
branch off, today's default), its threshold at a stated 1% false-alarm rate from the
training images alone. Per kind: image AUROC and TPR at FPR 1% (test/good against that
kind's copies) and recall at the model's threshold; beside them the real test split's image
AUROC, TPR@FPR1%, realized false-alarm rate and recall (pixel metrics do not move: the
branch leaves the map alone).

    python benchmarks/global_anomalies.py [--datasets magnetic_tile,battery_weld,bsdata] [--weights 0,0.25,1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def global_copies(goods: list, out: Path, seed: int = 0) -> list:
    """One copy of every good record per whole-image kind, as defective records."""
    from defectscope.data.datasets import Record
    from defectscope.data.images import load_image_uint8
    from defectscope.synthesis import GLOBAL_KINDS, synthesize

    rng = np.random.default_rng(seed)
    records = []
    for kind in GLOBAL_KINDS:
        (out / kind).mkdir(parents=True)
        for j, rec in enumerate(goods):
            image, mask = synthesize(load_image_uint8(rec.path), kind, rng)
            path, mask_path = out / kind / f"{j:04d}.png", out / kind / f"{j:04d}_mask.png"
            Image.fromarray(image).save(path)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
            records.append(Record(path, 1, kind, mask_path))
    return records


def run(dataset: str, weights: list[float]) -> list[dict]:
    from defectscope.data.datasets import load_dataset
    from defectscope.decision.metrics import auroc, tpr_at_fpr
    from defectscope.decision.thresholds import from_normal
    from defectscope.detectors.base import make_detector
    from defectscope.evaluation.evaluate import score_records
    from defectscope.synthesis import GLOBAL_KINDS

    ds = load_dataset(DATASETS / dataset)
    goods = [r for r in ds.test if r.label == 0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = global_copies(goods, Path(tmp))
        for w in weights:
            det = make_detector("patchcore", whole_image=w)
            t0 = time.perf_counter()
            normal = det.fit_scored(ds.train)
            fit_s = time.perf_counter() - t0
            thr = from_normal(normal.scores, false_alarm_rate=0.01, source=normal.how).value
            real = score_records(det, ds.test)
            synth = score_records(det, synthetic)
            good = real.scores[real.labels == 0]
            row = {"dataset": dataset, "w": w, "fit_s": fit_s}
            row["real AUROC"] = auroc(real.scores, real.labels)
            row["real TPR@1%"] = tpr_at_fpr(real.scores, real.labels, 0.01)
            row["real FAR"] = float((good >= thr).mean())
            row["real recall"] = float((real.scores[real.labels == 1] >= thr).mean())
            kinds = np.array([r.defect for r in synthetic])
            for kind in GLOBAL_KINDS:
                s = np.concatenate([good, synth.scores[kinds == kind]])
                y = np.r_[np.zeros(good.size), np.ones(int((kinds == kind).sum()))]
                row[f"{kind} AUROC"] = auroc(s, y)
                row[f"{kind} TPR@1%"] = tpr_at_fpr(s, y, 0.01)
                row[f"{kind} recall"] = float((synth.scores[kinds == kind] >= thr).mean())
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="magnetic_tile,battery_weld,bsdata")
    ap.add_argument("--weights", default="0,0.25,1")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    rows = [r for d in args.datasets.split(",") for r in run(d, weights)]
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
