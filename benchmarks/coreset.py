"""Coreset selection at scale: exact greedy, the cell-restricted greedy and anomalib.

Real patch features (PatchCore's 152-d EfficientNet-Lite0 features of bsdata's training
images at their native 1130 x 460 px, about 4 million patches); the 32k and 500k rows are
seeded random subsets of them, so every implementation sees identical input. Each row of
the table selects 1% of the rows (``--ratio``) and reports seconds and the covering radius
in the full 152-d space (max over rows of the distance to the nearest chosen row; at 4M
rows measured on a seeded sample of 262,144 rows, a lower bound, said in the table).

- exact: greedy k-center over all rows (`greedy_coreset(..., cell_rows=None)`), in the
  152-d space and, as before this benchmark, after a random projection to 128-d;
- lazy cells: the default (`greedy_coreset`): the same greedy, centres applied lazily to
  Voronoi cells of 4k rows (the plain loop below 16 cells);
- anomalib: KCenterGreedy from anomalib (``--anomalib-python``, an interpreter with anomalib
  installed; it runs in its own process) where it finishes within ``--anomalib-timeout``.

Time it alone: two processes using both cores slow each other several-fold.

    python benchmarks/coreset.py [--sizes 32768,500000,4000000] [--anomalib-python PY]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from defectscope.data.datasets import batches, iter_samples, load_dataset
from defectscope.detectors import make_detector
from defectscope.features import flatten_patches
from defectscope.memory import covering_radius, greedy_coreset

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bsdata"
CACHE = Path(tempfile.gettempdir()) / "defectscope_bsdata_native_patches.pt"
RADIUS_ROWS = 262_144

ANOMALIB_SNIPPET = """
import sys, time, torch
from anomalib.models.components.sampling import KCenterGreedy
x = torch.load(sys.argv[1])
torch.manual_seed(0)
sampler = KCenterGreedy(embedding=x, sampling_ratio=float(sys.argv[2]))
t = time.perf_counter()
idx = sampler.select_coreset_idxs()
print(time.perf_counter() - t)
torch.save(torch.tensor(idx), sys.argv[3])
"""


def native_patches(data: Path) -> torch.Tensor:
    """PatchCore's patch features of every training image at its own pixel size (cached)."""
    if CACHE.is_file():
        return torch.load(CACHE)
    det = make_detector("patchcore", preprocess={"size": 1130})
    feats = []
    for b in batches(iter_samples(load_dataset(data).train, det.preprocess), 4):
        feats.append(flatten_patches(det.embed(torch.stack([s.image for s in b]))))
    x = torch.cat(feats)
    torch.save(x, CACHE)
    return x


def radius(x: torch.Tensor, idx: torch.Tensor) -> tuple[float, str]:
    if x.shape[0] > RADIUS_ROWS:
        return covering_radius(x, idx, max_rows=RADIUS_ROWS), " (sampled)"
    return covering_radius(x, idx), ""


def run_anomalib(python: str, x: torch.Tensor, ratio: float, timeout: float) -> tuple[float, torch.Tensor] | None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(x, f"{tmp}/x.pt")
        try:
            out = subprocess.run(
                [python, "-c", ANOMALIB_SNIPPET, f"{tmp}/x.pt", str(ratio), f"{tmp}/idx.pt"],
                capture_output=True, text=True, check=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None
        return float(out.stdout.split()[-1]), torch.load(f"{tmp}/idx.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sizes", default="32768,500000,4000000")
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--exact-max", type=int, default=500_000, help="largest size at which exact greedy runs")
    ap.add_argument("--anomalib-python", default=None)
    ap.add_argument("--anomalib-timeout", type=float, default=600.0)
    args = ap.parse_args()
    full = native_patches(Path(args.data))
    print(f"{full.shape[0]:,} real patch features ({full.shape[1]}-d), selecting {args.ratio:.0%}\n")
    print("| rows | chosen | implementation | seconds | covering radius | vs exact |")
    print("|---|---|---|---|---|---|")
    gave_up = None  # anomalib's size that ran out of time: larger ones are not tried
    for size in [int(s) for s in args.sizes.split(",")]:
        pick = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(0))[: min(size, full.shape[0])]
        x = full[pick].contiguous()
        n = max(1, round(args.ratio * x.shape[0]))
        runs = []
        if x.shape[0] <= args.exact_max:
            runs.append(("exact greedy", lambda x=x, n=n: greedy_coreset(x, n, cell_rows=None)))
            runs.append(("exact greedy, 128-d projection", lambda x=x, n=n: greedy_coreset(x, n, cell_rows=None, proj_dim=128)))
        runs.append(("lazy cells (default)", lambda x=x, n=n: greedy_coreset(x, n)))
        exact_r = None
        for name, fn in runs:
            t = time.perf_counter()
            idx = fn()
            s = time.perf_counter() - t
            r, note = radius(x, idx)
            exact_r = r if name == "exact greedy" else exact_r
            rel = "-" if exact_r is None else f"{r / exact_r:.3f}"
            print(f"| {x.shape[0]:,} | {n:,} | {name} | {s:.1f} | {r:.2f}{note} | {rel} |", flush=True)
        if args.anomalib_python and gave_up is not None:
            print(f"| {x.shape[0]:,} | {n:,} | anomalib KCenterGreedy | not run (stopped at {gave_up:,} rows) | - | - |", flush=True)
        elif args.anomalib_python:
            got = run_anomalib(args.anomalib_python, x, n / x.shape[0], args.anomalib_timeout)
            if got is None:
                gave_up = x.shape[0]
                print(f"| {x.shape[0]:,} | {n:,} | anomalib KCenterGreedy | > {args.anomalib_timeout:.0f} (stopped) | - | - |", flush=True)
            else:
                r, note = radius(x, got[1])
                rel = "-" if exact_r is None else f"{r / exact_r:.3f}"
                print(f"| {x.shape[0]:,} | {n:,} | anomalib KCenterGreedy | {got[0]:.1f} | {r:.2f}{note} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
