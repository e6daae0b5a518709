"""The backbone's runtime: torch against auto (OpenVINO here) in every path, each row alone.

Per dataset row and runtime, in a fresh process (so nothing is shared between rows):
PatchCore fitted with its threshold (the default 10-fold cross-fit at a 1% coreset),
`evaluate` on the test split (image AUROC, pixel AUROC, AUPRO, predict ms/image), the
station (`defectscope serve` in its own process) under 16 clients posting test images,
and Ray with 2 workers scoring the same images (Ray started before the clock). Graphs
are built before the clock (a 3-image evaluate), as on a line that has run before.

Rows: magnetic_tile, battery_weld and bsdata at the default input (long side 256), and
bsdata tiled at the camera's scale (scale 1, tile 512) on a seeded subset (``--tiled-train``
training images, ``--tiled-test`` test images) because a full tiled fit takes tens of
minutes per runtime. Optional INT8 (``--int8``; needs ``pip install nncf``): the backbone's
OpenVINO graph quantised with NNCF on 64 training images, features timed and the model's
metrics measured. It is a measurement, not a model option: see the closing note of the
fast-runtime issue and docs/benchmarks.md for why it is not offered.

The coreset at 10% on magnetic_tile's 497k rows (``--coreset``): seconds and covering
radius (also in benchmarks/coreset.py's terms).

Time it alone: two processes using both cores slow each other several-fold.

    python benchmarks/runtime.py [--rows magnetic_tile,battery_weld,bsdata,bsdata_tiled] [--runtimes torch,auto] [--int8] [--coreset]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = {
    "magnetic_tile": ("magnetic_tile", {}),
    "battery_weld": ("battery_weld", {}),
    "bsdata": ("bsdata", {}),
    "bsdata_tiled": ("bsdata", {"preprocess": {"tile": 512, "scale": 1.0}}),
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def dataset_for(row: str, args: argparse.Namespace):
    from defectscope.data.datasets import Dataset, load_dataset

    ds = load_dataset(DATASETS / ROWS[row][0])
    if row != "bsdata_tiled":
        return ds
    rng = random.Random(0)
    return Dataset(ds.root, rng.sample(ds.train, args.tiled_train), rng.sample(ds.test, args.tiled_test))


def station_rate(model: Path, images: list[Path], requests: int) -> float:
    from serve_load import load
    from test_station_live import serving

    with tempfile.TemporaryDirectory() as tmp, serving(model, Path(tmp) / "store") as (url, _):
        load(url, images, 2, 4, 120)  # warm: the station loads the model's graphs on first use
        return load(url, images, 16, requests, 900)["images_s"]


def ray_rate(model: Path, images: list[Path]) -> float:
    import ray

    from defectscope.backbones.runtime import runtime_env_vars
    from defectscope.engines.local import predict_folder
    from defectscope.engines.ray_engine import ray_scorer
    from defectscope.modelfiles.artifacts import load_detector

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": runtime_env_vars()})
    try:
        scorer = ray_scorer(model.read_bytes(), workers=2)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            predict_folder(load_detector(model), images, Path(tmp), overlays=False, scorer=scorer)
            return len(images) / (time.perf_counter() - t0)
    finally:
        ray.shutdown()


def run_row(row: str, runtime: str, args: argparse.Namespace) -> dict:
    from defectscope.backbones.runtime import set_default_runtime
    from defectscope.data.datasets import Dataset
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate
    from defectscope.modelfiles.artifacts import save_detector

    set_default_runtime(runtime)
    ds = dataset_for(row, args)
    options = ROWS[row][1]
    first = time.perf_counter()
    tiny = Dataset(ds.root, ds.train[:3], [r for r in ds.test if r.label == 0][:2] + [r for r in ds.test if r.label == 1][:2])
    evaluate(make_detector("patchcore", **options), tiny)  # graphs built (or read from the cache) before the clock
    warm_s = time.perf_counter() - first
    detector = make_detector("patchcore", **options)
    result = evaluate(detector, ds, false_alarm_rate=0.01, metric_size=640 if "tile" in options.get("preprocess", {}) else None)
    out = {**{k: result.overall[k] for k in METRICS}, **result.cost, "warm_s": warm_s}
    out["runtimes"] = sorted(set(getattr(detector.backbone, "runtimes", dict)().values())) or ["torch"]
    with tempfile.TemporaryDirectory() as tmp:
        model = save_detector(detector, Path(tmp) / "m.dscope", extra={"threshold": result.threshold})
        images = [r.path for r in ds.test][: args.serve_images]
        out["station_images_s"] = station_rate(model, images, args.requests)
        out["ray_images_s"] = ray_rate(model, images)
    return out


def int8_row(row: str, args: argparse.Namespace) -> dict:
    """PatchCore with its backbone's OpenVINO graph quantised to INT8 (NNCF, 64 training
    images at the model's input), against the same in float32."""
    import nncf
    import numpy as np
    import openvino as ov

    from defectscope.backbones import runtime as rt
    from defectscope.data.datasets import iter_samples
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate

    ds = dataset_for(row, args)
    detector = make_detector("patchcore", runtime="openvino", **ROWS[row][1])
    samples = list(iter_samples(ds.train[:64], detector.preprocess))
    sizes = {tuple(s.image.shape[-2:]) for s in samples}
    if len(sizes) != 1:
        raise SystemExit(f"{row}: INT8 calibration here needs one input size, got {sizes}")
    size = sizes.pop()
    backbone = detector.backbone
    model = ov.Core().read_model(str(rt.onnx_graph(backbone.module, size)))
    calib = [np.stack([s.image.numpy() for s in samples[i : i + 8]]) for i in range(0, len(samples), 8)]
    quantized = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(samples))
    compiled = {name: ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for name, m in (("fp32", model), ("int8", quantized))}
    x = calib[0]
    speed = {}
    for name, c in compiled.items():
        request = c.create_infer_request()
        for _ in range(3):
            request.infer({0: x})
        t0 = time.perf_counter()
        for _ in range(10):
            request.infer({0: x})
        speed[name] = 1000 * (time.perf_counter() - t0) / (10 * len(x))
    request = compiled["int8"].create_infer_request()

    def int8(batch: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: batch})
        return [np.array(result[o]) for o in compiled["int8"].outputs]

    reference = evaluate(make_detector("patchcore", runtime="openvino", **ROWS[row][1]), ds, false_alarm_rate=None)
    backbone._runs[size] = ("openvino-int8", int8)  # the shared backbone: every later detector uses INT8
    result = evaluate(detector, ds, false_alarm_rate=None)
    return {
        "fp32_ms": speed["fp32"], "int8_ms": speed["int8"],
        **{f"int8_{k}": result.overall[k] for k in METRICS}, **{f"fp32_{k}": reference.overall[k] for k in METRICS},
    }


def coreset_row() -> dict:
    import torch

    from defectscope.components.features import flatten_patches
    from defectscope.components.memory import covering_radius, greedy_coreset
    from defectscope.data.datasets import iter_samples, load_dataset
    from defectscope.detectors import make_detector

    det = make_detector("patchcore")
    ds = load_dataset(DATASETS / "magnetic_tile")
    bank = torch.cat([flatten_patches(det.embed(s.image[None])) for s in iter_samples(ds.train, det.preprocess)])
    n = int(0.1 * bank.shape[0])
    t0 = time.perf_counter()
    keep = greedy_coreset(bank, n, proj_dim=det.proj_dim, seed=0)
    return {"rows": bank.shape[0], "n": n, "s": time.perf_counter() - t0, "radius": covering_radius(bank, keep, max_rows=16384, seed=0)}


def in_fresh_process(args: argparse.Namespace, job: list) -> dict:
    cmd = [sys.executable, __file__, "--_one", json.dumps(job), "--tiled-train", str(args.tiled_train), "--tiled-test", str(args.tiled_test),
           "--requests", str(args.requests), "--serve-images", str(args.serve_images)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
    if out.returncode != 0:
        raise SystemExit(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--runtimes", default="torch,auto")
    ap.add_argument("--tiled-train", type=int, default=100)
    ap.add_argument("--tiled-test", type=int, default=80)
    ap.add_argument("--requests", type=int, default=160, help="station requests per row (16 clients)")
    ap.add_argument("--serve-images", type=int, default=96, help="test images posted to the station and scored by Ray")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--coreset", action="store_true")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one is not None:
        kind, *rest = json.loads(args._one)
        result = run_row(*rest, args) if kind == "row" else int8_row(*rest, args) if kind == "int8" else coreset_row()
        print(json.dumps(result))
        return
    rows, runtimes = args.rows.split(","), [r for r in args.runtimes.split(",") if r]
    if args.coreset:
        c = in_fresh_process(args, ["coreset"])
        print(f"coreset 10% of magnetic_tile's {c['rows']:,} rows ({c['n']:,} centres): {c['s']:.1f} s, covering radius {c['radius']:.4f}\n")
    if runtimes:
        print("| data | runtime | ran in | fit s (with threshold) | predict ms/img | station img/s (16 clients) | Ray 2 workers img/s | image AUROC | pixel AUROC | AUPRO | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for runtime in runtimes:
            r = in_fresh_process(args, ["row", row, runtime])
            print(f"| {row} | {runtime} | {'+'.join(r['runtimes'])} | {r['fit_s']:.1f} | {r['predict_ms_per_image']:.1f} | {r['station_images_s']:.1f} | "
                  f"{r['ray_images_s']:.1f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['peak_rss_mb']:.0f} |", flush=True)
    if args.int8:
        print("\n| data | OpenVINO fp32 ms/img (backbone) | INT8 ms/img | speed-up | image AUROC fp32 -> int8 | pixel AUROC | AUPRO |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            r = in_fresh_process(args, ["int8", row])
            print(f"| {row} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['fp32_ms'] / r['int8_ms']:.2f}x | "
                  + " | ".join(f"{r[f'fp32_{k}']:.4f} -> {r[f'int8_{k}']:.4f}" for k in METRICS) + " |", flush=True)


if __name__ == "__main__":
    main()
