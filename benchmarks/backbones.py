"""PatchCore on every backbone whose weights exist offline, at the operating point.

One row per (dataset, backbone): image AUROC, pixel AUROC, AUPRO, TPR at FPR 1% (from the
test ROC), and at the model's own threshold (stated false-alarm rate 1%, set from the
training images alone) the realized false-alarm rate on test/good and the recall; fit s
(threshold included), predict ms/image, peak RSS. Each run is a fresh process, so peak RSS
is its own. Time it alone.

    python benchmarks/backbones.py [--datasets magnetic_tile,battery_weld,bsdata]
        [--backbones tf_efficientnet_lite0,...] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BACKBONES = (
    "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "inception_v3_tf", "vgg19",
    "dinov2_vits14", "tf_efficientnet_lite0+inception_v3_tf",
)


def run_one(dataset: str, backbone: str, options: dict) -> dict:
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate

    result = evaluate(make_detector("patchcore", backbone=backbone, **options), DATASETS / dataset, false_alarm_rate=0.01)
    row, t = result.overall, result.threshold or {}
    keep = ("image_auroc", "pixel_auroc", "aupro", "tpr_at_fpr1", "tpr_at_fpr5")
    return {**{k: row.get(k) for k in keep}, **result.cost, **{k: t.get(k) for k in ("test_false_alarm_rate", "test_recall")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="magnetic_tile,battery_weld,bsdata")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--set", action="append", default=[], help="PatchCore option KEY=JSON for every run")
    ap.add_argument("--_one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(args._one[0], args._one[1], json.loads(args._one[2])), default=float))
        return
    options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    print("| dataset | backbone | image AUROC | pixel AUROC | AUPRO | TPR@FPR1% | TPR@FPR5% | realized FAR at threshold | recall at threshold | fit s | predict ms/img | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        for backbone in args.backbones.split(","):
            out = subprocess.run([sys.executable, __file__, "--_one", dataset, backbone, json.dumps(options)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {dataset} | {backbone} | failed: {out.stderr.strip().splitlines()[-1][:200]} |||||||||", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {dataset} | {backbone} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['tpr_at_fpr1']:.3f} | "
                f"{r['tpr_at_fpr5']:.3f} | {r['test_false_alarm_rate']:.3f} | {r['test_recall']:.3f} | {r['fit_s']:.1f} | "
                f"{r['predict_ms_per_image']:.1f} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
