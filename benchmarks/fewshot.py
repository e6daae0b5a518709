"""The k-shot protocol on the real datasets: methods x k in {1, 2, 4, 8} x 5 seeds.

Prints image and pixel AUROC as mean ± std over seeds, and predict ms/image. PatchCore
runs without a coreset in this protocol (its `fewshot_config`); PaDiM at k = 1 has no
spread to estimate, so its covariance is eps * I (a scaled Euclidean distance to the
single image's features).

A method may carry options after colons (JSON values), e.g. ``patchcore:backbone=dinov2_vits14``
(PatchCore on the DINOv2 ViT-S/14) or ``anomalydino:preprocess={"size":448}``.

    python benchmarks/fewshot.py [--methods patchcore,padim,spade,fastrecon] [--shots 1,2,4,8] [--seeds 5]
    python benchmarks/fewshot.py --methods anomalydino,patchcore:backbone=dinov2_vits14,fastrecon:backbone=dinov2_vits14
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from defectscope.data.datasets import load_dataset
from defectscope.evaluation.evaluate import evaluate_fewshot

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value:key=value`` -> (name, options); values are JSON where they parse."""
    name, *items = spec.split(":")
    options: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="patchcore,padim,spade,fastrecon", help="comma-separated; see above for options")
    ap.add_argument("--datasets", default="battery_weld,magnetic_tile")
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    shots = [int(k) for k in args.shots.split(",")]
    print("| dataset | method | k | image AUROC | pixel AUROC | AUPRO | predict ms/img |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        ds = load_dataset(DATASETS / name)
        for spec in args.methods.split(","):
            method, options = parse_method(spec)
            result = evaluate_fewshot(method, ds, shots=shots, seeds=list(range(args.seeds)), config=options)
            for k, st in result.summary().items():
                cells = [f"{st[c][0]:.3f} ± {st[c][1]:.3f}" for c in ("image_auroc", "pixel_auroc", "aupro")]
                print(f"| {name} | {spec} | {k} | " + " | ".join(cells) + f" | {st['predict_ms_per_image'][0]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
