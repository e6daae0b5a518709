"""Batch scoring at scale: the local engine against Ray with 1 and 2 workers.

Makes ``--images`` distinct images from real magnetic_tile images (each a seeded flip
and crop of one, saved as JPEG) in ``--workdir``, fits PatchCore on magnetic_tile's
train/good (or takes ``--model``), then runs `defectscope predict --no-heatmaps` with each
engine in its own process, one after the other: images/s, seconds to the first result
row in scores.csv, and peak RSS per scoring process (the CLI for local; each Ray actor for
Ray, read from /proc while it runs). Rows of every run are checked to be the same images.
Then a table of what N machines like this one would score, from the measured per-worker
rate: an extrapolation that assumes linear scaling and storage that keeps up.

    python benchmarks/batch_scale.py [--images 20000] [--workdir /tmp/batch_scale]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"
CLI = [sys.executable, "-m", "defectscope.cli"]


def make_images(n: int, folder: Path, seed: int = 0) -> list[Path]:
    """``n`` distinct variants (flip + crop of 85-100% per side) of the real images, reused if present."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.jpg"))
    if len(have) >= n:
        return have[:n]
    sources = sorted(DATA.glob("t*/*/*.jpg"))
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("L")
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        if rng.random() < 0.5:
            img = ImageOps.flip(img)
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.85, 1.0)), int(h * rng.uniform(0.85, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img.crop((x, y, x + cw, y + ch)).save(folder / f"img_{i:06d}.jpg", quality=95)
    return sorted(folder.glob("*.jpg"))[:n]


def rss_by_pid(match: str) -> dict[int, float]:
    """RSS (MB) of every process whose command line contains ``match``."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if match not in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[int(proc.name)] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return out


def run(model: Path, folder: Path, out: Path, engine_args: list[str], rss_match: str | None) -> dict:
    cmd = [*CLI, "predict", str(model), str(folder), "--out", str(out), "--no-heatmaps", *engine_args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, peak = None, {}
    while proc.poll() is None:
        if first is None and (out / "scores.csv").exists() and len((out / "scores.csv").read_bytes().splitlines()) > 1:
            first = time.monotonic() - t0
        pids = rss_by_pid(rss_match) if rss_match else {proc.pid: rss_by_pid("defectscope.cli predict").get(proc.pid, 0.0)}
        for pid, mb in pids.items():
            peak[pid] = max(peak.get(pid, 0.0), mb)
        time.sleep(0.25)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    with (out / "scores.csv").open() as fh:
        paths = sorted(r["path"] for r in csv.DictReader(fh))
    return {"wall": wall, "first": first, "peak": sorted(peak.values(), reverse=True), "paths": paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/batch_scale"))
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    folder = args.workdir / f"images_{args.images}"
    images = make_images(args.images, folder)
    model = args.model
    if model is None:
        model = args.workdir / "magnetic.dscope"
        if not model.exists():
            subprocess.run([*CLI, "fit", str(DATA), "-o", str(model)], check=True, stdout=subprocess.DEVNULL)
    runs = {}
    for name, extra, match in (
        ("local", [], None),
        ("ray, 1 worker", ["--engine", "ray", "--workers", "1"], "MapWorker"),
        ("ray, 2 workers", ["--engine", "ray", "--workers", "2"], "MapWorker"),
    ):
        out = args.workdir / f"out_{args.images}_{name.replace(' ', '').replace(',', '_')}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        runs[name] = run(model, folder, out, extra, match)
        r = runs[name]
        print(f"<!-- {name}: {r['wall']:.0f} s -->", flush=True)
    reference = runs["local"]["paths"]
    assert all(r["paths"] == reference for r in runs.values()), "engines scored different images"
    n = len(images)
    print(f"\n# {n} images (flips/crops of magnetic_tile), PatchCore 1% coreset, heatmaps off, 2 cores\n")
    print("| engine | images/s | first result s | wall s | peak RSS per scoring process MB |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        peaks = ", ".join(f"{p:.0f}" for p in r["peak"][:2])
        print(f"| {name} | {n / r['wall']:.1f} | {r['first']:.1f} | {r['wall']:.0f} | {peaks} |")
    per_worker = n / runs["ray, 2 workers"]["wall"] / 2
    print(f"\nExtrapolation (not measured): machines like this one, 2 Ray workers each, at {per_worker:.1f} images/s per worker\n")
    print("| machines | images/s | images/day |")
    print("|---|---|---|")
    for m in (1, 4, 16, 64):
        rate = per_worker * 2 * m
        print(f"| {m} | {rate:.0f} | {rate * 86400:,.0f} |")


if __name__ == "__main__":
    main()
