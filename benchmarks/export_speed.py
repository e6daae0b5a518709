"""Torch against its exported graphs (ONNX Runtime, OpenVINO) on the same real images.

For each method (PatchCore, PaDiM, FastRecon) a model is fitted on the dataset's normal
images and exported with `defectscope.modelfiles.export`; each runtime then scores the same test
images (already decoded and resized: decoding is the same for all three) in batches of 8.
Printed per method and runtime: ms/image end to end, ms/image of the backbone alone (a
graph of the method's feature extraction, exported the same way) and the rest (scoring:
search, re-weighting, maps), the scoring/backbone ratio, the exported file size, the
largest relative score difference to torch and whether every verdict at the model's
threshold is the same. Run it alone: two CPU-heavy processes slow each other several-fold.

    python benchmarks/export_speed.py [--data ../shared/datasets/magnetic_tile] [--images 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectscope import pipeline
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors.base import make_detector
from defectscope.modelfiles.artifacts import load_detector, save_detector
from defectscope.modelfiles.export import export_model, trace_onnx
from defectscope.modelfiles.runtimes import ExportedModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "magnetic_tile"
BATCH = 8
# letterbox: magnetic_tile's crops come in many shapes, an exported graph takes one.
METHODS = {
    "patchcore": ({"preprocess": {"resize": "letterbox"}}, None),
    "padim": ({}, None),
    "fastrecon": ({"preprocess": {"resize": "letterbox"}}, 8),  # few-shot: 8 support images
}


class Features(torch.nn.Module):
    """The method's feature extraction alone (backbone + aggregation), to split the time."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.backbone, self._det = detector.backbone, detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._det.embed(x)
        return f.flatten(1).sum(1), f  # two outputs, named as the scoring graph's


def timed(fn, batches: list[torch.Tensor]) -> tuple[float, list]:
    """ms per image over all batches after one warm-up batch, and the outputs."""
    fn(batches[0])
    outs, t0 = [], time.perf_counter()
    for b in batches:
        outs.append(fn(b))
    return (time.perf_counter() - t0) * 1000 / sum(len(b) for b in batches), outs


def onnx_features(detector, size: tuple[int, int], path: Path) -> Path:
    import onnx

    onnx.save_model(trace_onnx(Features(detector), size), str(path))
    return path


def ov_features(onnx_path: Path):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda b: request.infer({"image": b.numpy()})


def ort_features(onnx_path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return lambda b: session.run(None, {"image": b.numpy()})


def bench(method: str, data: Path, n_images: int, tmp: Path) -> list[dict]:
    options, support = METHODS[method]
    ds = load_dataset(data)
    train = ds.train if support is None else ds.train[:support]
    fitted = pipeline.fit(make_detector(method, **options), train)
    model = save_detector(fitted.detector, tmp / f"{method}.dscope", extra=fitted.extra())
    det = load_detector(model)
    threshold = fitted.threshold.value
    step = max(1, len(ds.test) // n_images)
    samples = list(iter_samples(ds.test[::step][:n_images], det.preprocess))
    images = torch.stack([s.image for s in samples])
    batches = list(images.split(BATCH))
    size = tuple(images.shape[-2:])
    onnx_file = export_model(model, tmp / f"{method}.onnx", "onnx")[0]
    xml = export_model(model, tmp / f"{method}.xml", "openvino")[0]
    feats_onnx = onnx_features(det, size, tmp / f"{method}_features.onnx")

    runs = {
        "torch": (lambda b: det.predict(b).scores, lambda b: det.embed(b), [model]),
        "onnxruntime": (ExportedModel(onnx_file).predict, ort_features(feats_onnx), [onnx_file]),
        "openvino": (ExportedModel(xml).predict, ov_features(feats_onnx), [xml, xml.with_suffix(".bin")]),
    }
    rows, ref = [], None
    with torch.inference_mode():
        for name, (score_fn, feat_fn, files) in runs.items():
            total, outs = timed(score_fn, batches)
            scores = torch.cat([o if isinstance(o, torch.Tensor) else o.scores for o in outs]).numpy()
            backbone, _ = timed(feat_fn, batches)
            ref = scores if ref is None else ref
            rows.append({
                "method": method, "runtime": name, "ms_img": total, "backbone_ms": backbone, "scoring_ms": total - backbone,
                "ratio": (total - backbone) / backbone, "mb": sum(f.stat().st_size for f in files) / 2**20,
                "max_rel_diff": float(np.max(np.abs(scores - ref) / np.abs(ref))),
                "same_verdicts": bool(((scores >= threshold) == (ref >= threshold)).all()),
                "flagged": int((scores >= threshold).sum()), "n": len(scores),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; {args.data.name}, {args.images} test images, batches of {BATCH}")
    header = f"{'method':<10} {'runtime':<12} {'ms/img':>7} {'backbone':>8} {'scoring':>8} {'scor/bb':>7} {'speed-up':>8} {'MB':>7} {'max rel diff':>12} {'verdicts':>9}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows = bench(method, args.data, args.images, Path(tmp))
            base = rows[0]["ms_img"]
            for r in rows:
                same = "same" if r["same_verdicts"] else "DIFFER"
                print(
                    f"{r['method']:<10} {r['runtime']:<12} {r['ms_img']:7.1f} {r['backbone_ms']:8.1f} {r['scoring_ms']:8.1f} "
                    f"{r['ratio']:7.2f} {base / r['ms_img']:7.2f}x {r['mb']:7.1f} {r['max_rel_diff']:12.2e} {same:>5} {r['flagged']}/{r['n']}"
                )


if __name__ == "__main__":
    main()
