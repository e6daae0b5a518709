"""A live station under abuse (127.0.0.1 only, bounded in requests and time).

Starts `defectscope serve` in its own process (PatchCore on battery_weld train/good, or
--model) and measures, from the server's /proc RSS and its store folder:
1. oversized uploads: a 1 GB raw chunked body, a 1 GB multipart body sent chunked, and a
   multipart request that declares 1 GB: status, bytes the client got to send, RSS growth;
2. 32 clients sending --malformed tiny malformed requests, once with the default rate
   limit and once with it effectively off, while one client polls /healthz: status
   counts (HTTP 500s must be 0) and /healthz p50/p99 latency;
3. --corrections "good part" corrections in a row (upload + feedback, each a new model
   version) on a station with --keep-versions 5 --keep-in-memory 2 --max-store-gb 0.02:
   RSS, model files and store bytes every 50 corrections.

    python benchmarks/serve_abuse.py [--malformed 2000] [--corrections 500] [--model M.dscope]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DATASETS, fit_model, rss_mb  # noqa: E402

GB, MB = 2**30, 2**20


def zeros(total: int, sent: list[int], head: bytes = b"", tail: bytes = b"") -> Iterator[bytes]:
    """``head`` + ``total`` zero bytes in 1 MB chunks + ``tail``, counting what was taken."""
    yield head
    chunk = b"\0" * MB
    while sent[0] < total:
        sent[0] += MB
        yield chunk
    yield tail


def oversized(url: str, pid: int) -> list[tuple[str, str, float, float]]:
    """(case, outcome, MB the client sent, server RSS growth MB) for each 1 GB upload."""
    boundary = "defectscopeabuse"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    cases = [
        ("1 GB raw body, chunked", {"Content-Type": "image/png"}, b"", b"", False),
        ("1 GB multipart, chunked", multipart, head, tail, False),
        ("1 GB multipart, Content-Length declared", multipart, head, tail, True),
    ]
    rows = []
    for name, headers, h, t, declared in cases:
        before, sent = rss_mb(pid), [0]
        body = zeros(GB, sent, h, t)
        if declared:
            headers = {**headers, "Content-Length": str(len(h) + GB + len(t))}
        try:
            r = httpx.post(f"{url}/v1/predict", content=body, headers=headers, timeout=120)
            outcome = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            outcome = f"connection closed by the station ({type(exc).__name__})"
        time.sleep(0.5)
        rows.append((name, outcome, sent[0] / MB, rss_mb(pid) - before))
    return rows


MALFORMED: list[tuple[str, str, dict]] = [
    ("POST", "/v1/predict", {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
    ("POST", "/v1/predict", {"files": {"file": ("a.png", b"\x89PNG....", "image/png")}}),
    ("POST", "/v1/predict", {"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}),
    ("POST", "/v1/predict", {"content": b""}),
    ("POST", "/v1/feedback", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}),
    ("POST", "/v1/feedback", {"json": {"id": "x", "label": "maybe"}}),
    ("POST", "/v1/threshold", {"json": {"value": "NaN"}}),
    ("GET", "/v1/results?limit=-1", {}),
    ("GET", "/v1/results/nope/image", {}),
    ("GET", "/v1/nothing-here", {}),
    ("PUT", "/v1/predict", {}),
    ("GET", "/v1/results", {"headers": {"Host": "attacker.example"}}),
]


def malformed(url: str, n: int, clients: int) -> tuple[Counter, list[float]]:
    """Status counts of ``n`` malformed requests from ``clients`` threads, and /healthz
    latencies (ms) measured meanwhile by one more client."""
    counts: Counter = Counter()
    latencies: list[float] = []
    lock, done = threading.Lock(), threading.Event()
    jobs = iter(range(n))

    def attacker() -> None:
        with httpx.Client(timeout=30) as c:
            while (i := next(jobs, None)) is not None:
                method, path, kw = MALFORMED[i % len(MALFORMED)]
                try:
                    code = c.request(method, f"{url}{path}", **kw).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                with lock:
                    counts[code] += 1

    def prober() -> None:
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.get(f"{url}/healthz")
                latencies.append(1000 * (time.perf_counter() - t0))
                time.sleep(0.02)

    probe = threading.Thread(target=prober)
    probe.start()
    threads = [threading.Thread(target=attacker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    probe.join()
    return counts, latencies


def corrections(url: str, pid: int, store: Path, n: int, deadline_s: float) -> list[tuple[int, float, int, float]]:
    """(corrections so far, RSS MB, model files in the store, store MB) every 50 corrections."""
    from defectscope.serve.retention import folder_bytes

    images = sorted((DATASETS / "battery_weld" / "test").rglob("*.png"))
    rows, stop_at = [(0, rss_mb(pid), len(list((store / "models").glob("*.dscope"))), folder_bytes(store) / MB)], time.monotonic() + deadline_s
    with httpx.Client(timeout=120) as c:
        i, k = 0, 0
        while i < n:
            p, k = images[k % len(images)], k + 1
            scored = c.post(f"{url}/v1/predict", files={"files": (p.name, p.read_bytes(), "image/png")}).json()["results"][0]
            if scored["verdict"] == "invalid":
                continue  # a frame the model cannot judge is never taught (refused with 409): not a correction
            i += 1
            r = c.post(f"{url}/v1/feedback", json={"id": scored["id"], "label": "normal"})
            if r.status_code != 200:
                print(f"correction {i}: HTTP {r.status_code} {r.text[:200]}")
            if i % 50 == 0 or i == n or time.monotonic() > stop_at:
                rows.append((i, rss_mb(pid), len(list((store / "models").glob("*.dscope"))), folder_bytes(store) / MB))
                print(f"  {i} corrections: RSS {rows[-1][1]:.0f} MB, {rows[-1][2]} model files, store {rows[-1][3]:.1f} MB", flush=True)
            if time.monotonic() > stop_at:
                break
    return rows


def main() -> None:
    from test_station_live import serving

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--malformed", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--corrections", type=int, default=500)
    ap.add_argument("--max-seconds", type=float, default=1800, help="time bound for the corrections")
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or fit_model(tmp)
        with serving(model, tmp / "store1") as (url, proc):
            print("## Oversized uploads (station limits: 32 MB raw image, 128 MB multipart request)\n")
            print("| upload | outcome | MB the client sent | server RSS growth MB |\n|---|---|---|---|")
            for name, outcome, sent, grew in oversized(url, proc.pid):
                print(f"| {name} | {outcome} | {sent:.0f} | {grew:+.1f} |", flush=True)
        print(f"\n## {args.malformed} malformed requests from {args.clients} clients, /healthz polled meanwhile\n")
        print("| rate limit | HTTP 500 | statuses | /healthz p50 ms | /healthz p99 ms | /healthz polls |\n|---|---|---|---|---|---|")
        for label, rate in (("default 200/second per client", "200/second"), ("off (100000/second)", "100000/second")):
            with serving(model, tmp / f"store-{len(label)}", args=("--rate-limit", rate)) as (url, _):
                counts, lat = malformed(url, args.malformed, args.clients)
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
            print(f"| {label} | {counts.get(500, 0)} | {statuses} | {statistics.median(lat):.1f} | {p99:.1f} | {len(lat)} |", flush=True)
        print(f"\n## {args.corrections} corrections in a row (--keep-versions 5 --keep-in-memory 2 --max-store-gb 0.02)\n")
        store = tmp / "store-corrections"
        bounded = ("--keep-versions", "5", "--keep-in-memory", "2", "--max-store-gb", "0.02", "--rate-limit", "100000/second")
        with serving(model, store, args=bounded) as (url, proc):
            rows = corrections(url, proc.pid, store, args.corrections, args.max_seconds)
        print("\n| corrections | server RSS MB | model files in the store | store MB |\n|---|---|---|---|")
        for i, rss, files, size in rows:
            print(f"| {i} | {rss:.0f} | {files} | {size:.1f} |")


if __name__ == "__main__":
    main()
