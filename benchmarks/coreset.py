"""Coreset selection at scale: exact greedy, the cell-restricted greedy and anomalib.

Real patch features (PatchCore's 152-d EfficientNet-Lite0 features of bsdata's training
images at their native 1130 x 460 px, about 4 million patches); the 32k and 500k rows are
seeded random subsets of them, so every implementation sees identical input. Each row of
the table selects 1% of the rows (``--ratio``) and reports seconds and the covering radius
in the full 152-d space (max over rows of the distance to the nearest chosen row; at 4M
rows measured on a seeded sample of 262,144 rows, a lower bound, said in the table).

- exact: greedy k-center over all rows (`greedy_coreset(..., cell_rows=None)`: one cell, so
  every centre reads every row), in the 152-d space and after a random projection to 128-d
  (PatchCore's default);
- lazy cells: the default (`greedy_coreset`): the same greedy, centres applied lazily to
  Voronoi cells of 4k rows (at most n / 4 cells), compiled (`defectscope.components.kcenter`; the
  first call in a process loads it from numba's cache, timed once before the table);
  up to 100k rows every implementation runs ``--repeats`` times and the median is shown;
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
from collections.abc import Callable
from pathlib import Path

import torch

from defectscope.components.features import flatten_patches
from defectscope.components.memory import covering_radius, greedy_coreset
from defectscope.data.datasets import batches, iter_samples, load_dataset
from defectscope.detectors import make_detector

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bsdata"
CACHE = Path(tempfile.gettempdir()) / "defectscope_bsdata_native_patches.pt"
RADIUS_ROWS = 262_144

ANOMALIB_SNIPPET = """
import sys, time, torch
from anomalib.models.components.sampling import KCenterGreedy
x = torch.load(sys.argv[1])
seconds = []
for _ in range(int(sys.argv[4])):
    torch.manual_seed(0)
    sampler = KCenterGreedy(embedding=x, sampling_ratio=float(sys.argv[2]))
    t = time.perf_counter()
    idx = sampler.select_coreset_idxs()
    seconds.append(time.perf_counter() - t)
print(sorted(seconds)[len(seconds) // 2])
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


def repeats_for(rows: int, repeats: int) -> int:
    """Runs whose median is reported: small sizes take a fraction of a second, where one run
    on this VM varies up to 2x; large ones run once."""
    return repeats if rows <= 100_000 else 1


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """(median seconds over ``repeats`` runs, the selection)."""
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        idx = fn()
        seconds.append(time.perf_counter() - t)
    return sorted(seconds)[len(seconds) // 2], idx


def run_anomalib(python: str, x: torch.Tensor, ratio: float, timeout: float | None, repeats: int) -> tuple[float, torch.Tensor] | None:
    """(median seconds, selection) of anomalib's KCenterGreedy run by ``python`` (its own
    virtualenv) on ``x``; None when it takes longer than ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(x, f"{tmp}/x.pt")
        try:
            out = subprocess.run(
                [python, "-c", ANOMALIB_SNIPPET, f"{tmp}/x.pt", str(ratio), f"{tmp}/idx.pt", str(repeats)],
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
    ap.add_argument("--repeats", type=int, default=5, help="runs per row up to 100k rows; the median is reported")
    args = ap.parse_args()
    full = native_patches(Path(args.data))
    print(f"{full.shape[0]:,} real patch features ({full.shape[1]}-d), selecting {args.ratio:.0%}\n")
    t = time.perf_counter()
    greedy_coreset(full[:1000], 10)
    print(f"first call in this process (numba loads the compiled loop): {time.perf_counter() - t:.2f} s\n")
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
        repeats = repeats_for(x.shape[0], args.repeats)
        for name, fn in runs:
            s, idx = timed(fn, repeats)
            r, note = radius(x, idx)
            exact_r = r if name == "exact greedy" else exact_r
            rel = "-" if exact_r is None else f"{r / exact_r:.3f}"
            print(f"| {x.shape[0]:,} | {n:,} | {name} | {s:.2f} | {r:.2f}{note} | {rel} |", flush=True)
        if args.anomalib_python and gave_up is not None:
            print(f"| {x.shape[0]:,} | {n:,} | anomalib KCenterGreedy | not run (stopped at {gave_up:,} rows) | - | - |", flush=True)
        elif args.anomalib_python:
            got = run_anomalib(args.anomalib_python, x, n / x.shape[0], args.anomalib_timeout, repeats)
            if got is None:
                gave_up = x.shape[0]
                print(f"| {x.shape[0]:,} | {n:,} | anomalib KCenterGreedy | > {args.anomalib_timeout:.0f} (stopped) | - | - |", flush=True)
            else:
                r, note = radius(x, got[1])
                rel = "-" if exact_r is None else f"{r / exact_r:.3f}"
                print(f"| {x.shape[0]:,} | {n:,} | anomalib KCenterGreedy | {got[0]:.2f} | {r:.2f}{note} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
