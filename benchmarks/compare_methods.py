"""PatchCore, PaDiM and SPADE side by side on the real datasets (default backbone).

Each (method, dataset) runs in a fresh process so its peak RSS is its own. Prints one
table: image AUROC, pixel AUROC, AUPRO, fit time, predict ms/image, peak RSS. Then the
PaDiM memory check: fit on 761 normal images at 256 px (magnetic_tile train/good plus
test/good, which are normal too) and report peak RSS and the covariance bank's size.

    python benchmarks/compare_methods.py [--methods patchcore,padim,spade] [--datasets battery_weld,magnetic_tile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def run_one(method: str, dataset: str) -> dict:
    from defectscope.evaluation.evaluate import evaluate

    result = evaluate(method, DATASETS / dataset)
    row = result.overall
    return {**{k: row.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}, **result.cost}


def padim_761() -> dict:
    from defectscope.data.datasets import iter_samples, load_dataset
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import peak_rss_mb, reset_peak_rss

    ds = load_dataset(DATASETS / "magnetic_tile")
    records = (ds.train + [r for r in ds.test if r.label == 0])[:761]
    reset_peak_rss()
    det = make_detector("padim")
    det.fit(iter_samples(records, det.preprocess))
    return {"images": len(records), "peak_rss_mb": peak_rss_mb(), **det.info, **det.timings}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="patchcore,padim,spade")
    ap.add_argument("--datasets", default="battery_weld,magnetic_tile")
    ap.add_argument("--_one", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_padim761", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(*args._one)))
        return
    if args._padim761:
        print(json.dumps(padim_761()))
        return
    print("| dataset | method | image AUROC | pixel AUROC | AUPRO | fit s | predict ms/img | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        for method in args.methods.split(","):
            r = child(["--_one", method, dataset])
            print(
                f"| {dataset} | {method} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                f"{r['fit_s']:.1f} | {r['predict_ms_per_image']:.1f} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )
    if "padim" in args.methods:
        r = child(["--_padim761"])
        print(
            f"\nPaDiM fit on {r['images']} images ({r['grid'][0]}x{r['grid'][1]} positions, d={r['d']}): "
            f"peak RSS {r['peak_rss_mb']:.0f} MB, inverse covariances {r['covariance_mb']:.0f} MB (float32), "
            f"fit {r['fit_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
