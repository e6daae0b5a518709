"""PatchCore speed and memory on a real dataset; coreset selection against anomalib.

Prints, for coreset ratios 1% and 10%: fit time split into feature extraction and coreset
selection, predict ms/image split into backbone and scoring, and peak RSS. Each setting
runs in a fresh process so peak RSS is its own.

Then the greedy coreset alone on identical input (32,768 real patch features, pick 3,276):
ours (lazy cells, the default, and one cell, the plain greedy) against anomalib's KCenterGreedy when an interpreter with
anomalib is given (``--anomalib-python``; anomalib lives in its own virtualenv), with the
covering radius each selection reaches (lower is better).

    python benchmarks/patchcore_speed.py [--data ../shared/datasets/magnetic_tile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "magnetic_tile"

def run_setting(data: str, ratio: float) -> dict:
    """Fit and predict in this process; return the timings."""
    import torch

    from defectscope.data.datasets import batches, iter_samples, load_dataset
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import peak_rss_mb

    ds = load_dataset(data)
    det = make_detector("patchcore", coreset_ratio=ratio)
    det.fit(iter_samples(ds.train, det.preprocess))
    fit = dict(det.timings)
    samples = list(iter_samples(ds.test, det.preprocess))
    det.timings["backbone_s"] = det.timings["scoring_s"] = 0.0
    for b in batches(iter(samples), 1):
        det.predict(torch.stack([s.image for s in b]))
    n = len(samples)
    return {
        "ratio": ratio,
        "images": int(fit["images"]),
        "patches": int(fit["patches"]),
        "bank": int(det.bank.shape[0]),
        "features_s": fit["features_s"],
        "coreset_s": fit["coreset_s"],
        "backbone_ms": 1000 * det.timings["backbone_s"] / n,
        "scoring_ms": 1000 * det.timings["scoring_s"] / n,
        "peak_rss_mb": peak_rss_mb(),
    }


def coreset_comparison(data: str, anomalib_python: str | None) -> list[dict]:
    import torch

    from defectscope.components.features import flatten_patches
    from defectscope.components.memory import CELL_ROWS, covering_radius, greedy_coreset
    from defectscope.data.datasets import iter_samples, load_dataset
    from defectscope.detectors import make_detector

    ds = load_dataset(data)
    det = make_detector("patchcore")
    feats, total = [], 0
    for s in iter_samples(ds.train, det.preprocess):
        f = flatten_patches(det.embed(s.image[None]))
        feats.append(f)
        total += len(f)
        if total >= 32768:
            break
    x = torch.cat(feats)[:32768].contiguous()
    n = 3276
    t = time.perf_counter()
    greedy_coreset(x[:1000], 10)  # numba compiles the loop, or loads it from its cache
    rows = [{"impl": "defectscope first call in a process (compiled loop loaded), 10 of 1,000", "s": time.perf_counter() - t, "radius": float("nan")}]
    for name, cell_rows in (("defectscope (lazy cells, the default)", CELL_ROWS), ("defectscope (one cell: plain greedy)", None)):
        t = time.perf_counter()
        idx = greedy_coreset(x, n, cell_rows=cell_rows)
        rows.append({"impl": name, "s": time.perf_counter() - t, "radius": covering_radius(x, idx)})
    if anomalib_python:
        from coreset import run_anomalib  # benchmarks/coreset.py: one way to time anomalib's selection

        seconds, idx = run_anomalib(anomalib_python, x, n / x.shape[0], timeout=None, repeats=1)
        rows.append({"impl": "anomalib KCenterGreedy", "s": seconds, "radius": covering_radius(x, idx)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--ratios", default="0.01,0.1")
    ap.add_argument("--anomalib-python", default=None, help="python of a virtualenv with anomalib installed")
    ap.add_argument("--_one", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one is not None:
        print(json.dumps(run_setting(args.data, args._one)))
        return
    print(f"PatchCore (tf_efficientnet_lite0, 256 px aspect) on {args.data}\n")
    print("| coreset | train imgs | patches | bank | features s | coreset s | backbone ms/img | scoring ms/img | scoring/backbone | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--_one", str(ratio)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {ratio:.0%} | {r['images']} | {r['patches']} | {r['bank']} | {r['features_s']:.1f} | {r['coreset_s']:.1f} | "
            f"{r['backbone_ms']:.1f} | {r['scoring_ms']:.1f} | {r['scoring_ms'] / r['backbone_ms']:.2f} | {r['peak_rss_mb']:.0f} |",
            flush=True,
        )
    print("\nGreedy coreset alone: 3,276 of 32,768 real patch features (152-d; benchmarks/coreset.py: larger sizes)\n")
    print("| implementation | seconds | covering radius (full 152-d) |")
    print("|---|---|---|")
    rows = coreset_comparison(args.data, args.anomalib_python)
    for r in rows:
        radius = "-" if r["radius"] != r["radius"] else f"{r['radius']:.2f}"
        print(f"| {r['impl']} | {r['s']:.2f} | {radius} |")
    if len(rows) == 4:
        print(f"\nspeed-up over anomalib: {rows[3]['s'] / rows[1]['s']:.0f}x (lazy cells), {rows[3]['s'] / rows[2]['s']:.0f}x (plain greedy)")


if __name__ == "__main__":
    main()
