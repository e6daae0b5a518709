"""Tiling against whole-image scoring: PatchCore on bsdata, magnetic_tile and battery_weld.

Per dataset: the default (the long side resized to 256 px) and tiling at two scales
(``--settings``; e.g. ``0.5:256`` = images at half their pixels, 256 px tiles, overlap
0.25). Prints image AUROC, pixel AUROC, AUPRO, fit seconds, predict ms/image, peak RSS
and bank size; with ``--seeds``, one row per coreset seed and their mean. Each setting
and seed runs in a fresh process, so peak RSS is its own. Pixel metrics of tiled runs are
computed on maps and masks shrunk to at most ``--metric-size`` px on the long side (the
default run's maps are smaller than that and stay as they are).

Time it alone: two processes using both cores slow each other several-fold.

    python benchmarks/tiling.py [--datasets bsdata,magnetic_tile,battery_weld] [--settings 0.5:256,1:512] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def run_one(data: str, scale: float | None, tile: int | None, metric_size: int, proj_dim: int | None, seed: int) -> dict:
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate

    pre = {} if tile is None else {"tile": tile, "scale": scale}
    det = make_detector("patchcore", preprocess=pre, proj_dim=proj_dim, seed=seed)
    result = evaluate(det, data, metric_size=None if tile is None else metric_size)
    r, c = result.overall, result.cost
    return {**{k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")}, **c, "bank_rows": det.bank.shape[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="bsdata,magnetic_tile,battery_weld")
    ap.add_argument("--settings", default="0.5:256,1:512", help="comma-separated SCALE:TILE")
    ap.add_argument("--metric-size", type=int, default=640)
    ap.add_argument("--proj-dim", default="128", help="PatchCore's coreset projection; 'none' selects in the full space")
    ap.add_argument("--seeds", default="0", help="comma-separated coreset seeds; more than one adds a mean row")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one is not None:
        data, scale, tile, seed = json.loads(args._one)
        proj = None if args.proj_dim.lower() == "none" else int(args.proj_dim)
        print(json.dumps(run_one(data, scale, tile, args.metric_size, proj, seed)))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| dataset | setting | seed | image AUROC | pixel AUROC | AUPRO | fit s | predict ms/img | peak RSS MB | bank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    settings: list[tuple[float | None, int | None]] = [(None, None)]
    for item in args.settings.split(","):
        scale, tile = item.split(":")
        settings.append((float(scale), int(tile)))
    for name in args.datasets.split(","):
        for scale, tile in settings:
            label = "default (long side 256)" if tile is None else f"scale {scale:g}, tile {tile}"
            rows = [r for seed in seeds if (r := _run_setting(name, label, scale, tile, seed, args)) is not None]
            if len(rows) > 1:
                mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("image_auroc", "pixel_auroc", "aupro")}
                print(f"| {name} | {label} | mean of {len(rows)} | {mean['image_auroc']:.3f} | {mean['pixel_auroc']:.3f} | {mean['aupro']:.3f} | | | | |", flush=True)


def _run_setting(name: str, label: str, scale: float | None, tile: int | None, seed: int, args: argparse.Namespace) -> dict | None:
    """One setting and seed in a fresh process (so peak RSS is its own); prints its row."""
    one = json.dumps([str(DATASETS / name), scale, tile, seed])
    out = subprocess.run(
        [sys.executable, __file__, "--_one", one, "--metric-size", str(args.metric_size), "--proj-dim", args.proj_dim],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        print(f"| {name} | {label} | {seed} | failed: {out.stderr.strip().splitlines()[-1]} |||||||", flush=True)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"| {name} | {label} | {seed} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['fit_s']:.0f} | "
        f"{r['predict_ms_per_image']:.0f} | {r['peak_rss_mb']:.0f} | {int(r['bank_rows']):,} |",
        flush=True,
    )
    return r


if __name__ == "__main__":
    main()
