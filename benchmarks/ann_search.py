"""Exact against approximate nearest-neighbour search for PatchCore's bank (faiss HNSW, IVF-PQ).

On one dataset (default magnetic_tile), for coresets of 1% and 10%: PatchCore is fitted
once (exact); the test images' patch features are computed once (backbone ms/image); then
the same bank is searched with each index (flat = today's exact search, hnsw, ivfpq at
their defaults, `defectscope.components.ann`). Per index: recall@1 of the test patches against exact
search, image AUROC, pixel AUROC, AUPRO, scoring ms/image (search + image score + map, at
batch 8, as `predict` runs), scoring/backbone ratio, index build seconds, and bytes per
million bank rows (flat: the rows; hnsw: rows + graph; ivfpq: codes + lists, while the
model file still keeps the rows for re-ranking and adding normal images).

    python benchmarks/ann_search.py [--data ../shared/datasets/magnetic_tile] [--ratios 0.01,0.1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from defectscope.components.ann import check_params
from defectscope.components.features import flatten_patches
from defectscope.components.memory import Index
from defectscope.data.datasets import batches, iter_samples, load_dataset
from defectscope.data.images import crop_content
from defectscope.detectors import make_detector
from defectscope.evaluation.evaluate import Scored, metric_rows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "magnetic_tile"
SETTINGS = (  # (index, parameters): the defaults, and a faster and a slower setting of each
    ("flat", {}),
    ("hnsw", {"ef_search": 16}),
    ("hnsw", {}),
    ("hnsw", {"ef_search": 64}),
    ("ivfpq", {"nprobe": 4}),
    ("ivfpq", {}),
    ("ivfpq", {"nprobe": 16, "rerank": 32}),
)
RECALL_IMAGES = 100  # test images whose patches measure recall@1


def features(det, test):
    """Per batch of 8: (samples, patch features, input size); and backbone seconds."""
    out, t = [], 0.0
    for batch in batches(iter_samples(test, det.preprocess), 8):
        x = torch.stack([s.image for s in batch])
        t0 = time.perf_counter()
        fmap = det.embed(x)
        t += time.perf_counter() - t0
        out.append((batch, fmap, tuple(x.shape[-2:])))
    return out, t


def run_index(det, kind: str, params: dict, feats, test, exact_nn: torch.Tensor, queries: torch.Tensor, n_images: int) -> dict:
    t0 = time.perf_counter()
    det.index_kind, det.index_params = kind, check_params(kind, params)
    det._set_bank(det.bank)
    build = time.perf_counter() - t0
    index = det.index
    _, nn = index.search(queries, 1)
    recall = float((nn[:, 0] == exact_nn).float().mean())
    scores, labels, maps, masks = [], [], [], []
    t_score = 0.0
    for batch, fmap, size in feats:
        t1 = time.perf_counter()
        pred = det.score_features(fmap, size)
        t_score += time.perf_counter() - t1
        for s, score, amap in zip(batch, pred.scores, pred.maps, strict=True):
            scores.append(float(score))
            labels.append(s.label)
            maps.append(crop_content(amap, s.geometry).numpy())
            masks.append(None if s.mask is None else crop_content(s.mask, s.geometry).numpy())
    scored = Scored(test, np.array(scores), np.array(labels), maps, masks)
    overall = metric_rows(scored, [])[-1]
    rows = det.bank.shape[0]
    nbytes = rows * det.bank.shape[1] * 4 if isinstance(index, Index) else index.nbytes()
    return {
        "index": kind,
        "recall@1": recall,
        "image_auroc": overall["image_auroc"],
        "pixel_auroc": overall.get("pixel_auroc", float("nan")),
        "aupro": overall.get("aupro", float("nan")),
        "scoring_ms": 1000 * t_score / n_images,
        "build_s": build,
        "mb_per_m_rows": nbytes / rows * 1e6 / 2**20,
        "t_score": t_score,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--ratios", default="0.01,0.1")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    print(f"# {Path(args.data).name}: {len(ds.train)} train, {len(ds.test)} test images; torch threads {torch.get_num_threads()}\n")
    print("| coreset | bank rows | index | recall@1 | image AUROC | pixel AUROC | AUPRO | scoring ms/img | scoring/backbone | build s | MB per M rows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ratio in (float(r) for r in args.ratios.split(",")):
        det = make_detector("patchcore", coreset_ratio=ratio)
        t0 = time.perf_counter()
        det.fit(iter_samples(ds.train, det.preprocess))
        fit_s = time.perf_counter() - t0
        feats, t_backbone = features(det, ds.test)
        n = len(ds.test)
        queries = torch.cat([flatten_patches(f) for _, f, _ in feats[: RECALL_IMAGES // 8]])
        exact_nn = Index(det.bank).search(queries, 1)[1][:, 0]
        for kind, params in SETTINGS:
            r = run_index(det, kind, params, feats, ds.test, exact_nn, queries, n)
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            print(
                f"| {ratio:.0%} | {det.bank.shape[0]} | {kind} ({shown}) | {r['recall@1']:.4f} | {r['image_auroc']:.4f} | "
                f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['scoring_ms']:.1f} | {r['t_score'] / t_backbone:.2f} | "
                f"{r['build_s']:.1f} | {r['mb_per_m_rows']:.0f} |",
                flush=True,
            )
        print(f"<!-- {ratio:.0%}: fit {fit_s:.0f} s, backbone {1000 * t_backbone / n:.1f} ms/img -->", flush=True)


if __name__ == "__main__":
    main()
