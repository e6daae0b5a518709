"""Load on a live station (127.0.0.1 only, bounded in requests and time).

Fits PatchCore on battery_weld train/good (or uses --model), starts `defectscope serve` in
its own process, and for 1, 4 and 16 concurrent clients posts real test images (one per
request): images/s, p50 and p99 latency, errors, and the server's RSS at the start and at
the end. For reference, the CLI's `predict` throughput on the same images (heatmaps on,
as the station writes them).

    python benchmarks/serve_load.py [--requests 2000] [--clients 1,4,16] [--model M.dscope]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fit_model(folder: Path) -> Path:
    from defectscope import pipeline
    from defectscope.data.datasets import load_dataset
    from defectscope.detectors import make_detector
    from defectscope.modelfiles.artifacts import save_detector

    fitted = pipeline.fit(make_detector("patchcore"), load_dataset(DATASETS / "battery_weld").train)
    return save_detector(fitted.detector, folder / "weld.dscope", extra=fitted.extra())


def load(url: str, images: list[Path], clients: int, n: int, deadline_s: float) -> dict:
    payloads = [(p.name, p.read_bytes()) for p in images]
    latencies: list[float] = []
    errors = [0]
    counter = iter(range(n))
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def worker() -> None:
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                try:
                    ok = c.post(f"{url}/v1/predict", files={"files": (name, data, "image/png")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - t0) if ok else None
                    errors[0] += 0 if ok else 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat) + errors[0],
        "images_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": errors[0],
    }


def cli_predict(model: Path, images: list[Path], out: Path) -> float:
    """images/s of the `predict` command, start-up (Python, torch, model load) included."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "defectscope.cli", "predict", str(model), *map(str, images), "--out", str(out)], capture_output=True, text=True)
    if run.returncode not in (0, 4):  # 4: some frames were judged invalid, which is a result, not a failure
        raise RuntimeError(f"predict failed ({run.returncode}): {run.stderr[-2000:]}")
    return len(images) / (time.perf_counter() - t0)


def library_predict(model: Path, images: list[Path], out: Path) -> float:
    """images/s of the same run in-process, model already loaded (what the CLI does after start-up)."""
    from defectscope.decision.scoring import Judge
    from defectscope.engines.local import predict_folder
    from defectscope.modelfiles.artifacts import load_detector, read_manifest

    detector, extra = load_detector(model), read_manifest(model)["extra"]
    t0 = time.perf_counter()
    predict_folder(detector, images, out, judge=Judge.of(extra, str(model)), map_range=extra["map_range"])
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    from test_station_live import serving

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests in all, shared evenly by the client counts")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--max-seconds", type=float, default=600, help="time bound per client count")
    args = ap.parse_args()
    images = sorted((DATASETS / "battery_weld" / "test" / "good").iterdir()) + sorted((DATASETS / "battery_weld" / "test" / "defective").iterdir())
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or fit_model(tmp)
        cli = cli_predict(model, images, tmp / "cli")
        reference = library_predict(model, images, tmp / "lib")
        print(f"predict on {len(images)} images, heatmaps on: {cli:.1f} images/s as a command (start-up included), "
              f"{reference:.1f} images/s once loaded (the reference below)")
        with serving(model, tmp / "store") as (url, proc):
            start = rss_mb(proc.pid)
            print("| clients | requests | images/s | share of predict | p50 ms | p99 ms | errors |")
            print("|---|---|---|---|---|---|---|")
            for c in levels:
                r = load(url, images, c, args.requests // len(levels), args.max_seconds)
                print(f"| {c} | {r['requests']} | {r['images_s']:.1f} | {r['images_s'] / reference:.0%} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |", flush=True)
            print(f"server RSS: {start:.0f} MB at start, {rss_mb(proc.pid):.0f} MB after the requests")


if __name__ == "__main__":
    main()
