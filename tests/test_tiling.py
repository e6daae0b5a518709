"""Tiling on real bsdata images: geometry, stitching against whole-image scoring, a small
pasted defect found with tiles, model files that record the tiling."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import paste_defect

from defectscope import pipeline
from defectscope.data.datasets import Dataset, iter_samples, load_dataset
from defectscope.data.images import Preprocess
from defectscope.data.tiles import boxes, starts, stitch, training_samples
from defectscope.decision.scoring import score_samples
from defectscope.detectors import make_detector
from defectscope.errors import ConfigError, DataError
from defectscope.modelfiles.artifacts import load_detector, save_detector
from defectscope.modelfiles.export import export_model
from defectscope.modelfiles.runtimes import ExportedModel


@pytest.mark.parametrize("length,tile,overlap", [(1130, 256, 0.25), (460, 256, 0.5), (257, 256, 0.0), (200, 256, 0.25), (544, 224, 0.25)])
def test_tiles_cover_the_side_and_overlap_at_least_as_asked(length: int, tile: int, overlap: float) -> None:
    s = starts(length, tile, overlap)
    assert s[0] == 0 and s == sorted(set(s))
    assert s[-1] + min(tile, length) == length
    assert all(b - a <= tile * (1 - overlap) for a, b in pairwise(s))


def test_stitching_crops_of_one_map_gives_it_back() -> None:
    pre = Preprocess(tile=96, overlap=0.4)
    truth = torch.rand(230, 301)
    tiles = boxes(230, 301, pre)
    maps = torch.stack([truth[b.top : b.top + b.height, b.left : b.left + b.width] for b in tiles])
    assert torch.allclose(stitch(maps, tiles, (230, 301), pre), truth, atol=1e-5)


@pytest.fixture(scope="module")
def bs(bsdata: Path) -> Dataset:
    return load_dataset(bsdata)


def test_stitched_map_equals_whole_image_map_away_from_tile_seams(bs: Dataset) -> None:
    """PatchCore is translation-equivariant in steps of the CNN's stride (32 px): on an
    image of 224 x 544 px (multiples of 32) with tiles starting at 0, 160, 320, the
    stitched map equals the whole image's map where one tile's interior alone covers the
    image, and differs a little near the seams, where a tile's zero padding changes its
    features within the receptive field and the blend weights those edges down."""
    det = make_detector("patchcore", preprocess={"tile": 224, "scale": 0.5}, coreset_ratio=0.1)
    det.fit(training_samples(bs.train[:4], det.preprocess))
    image = next(iter_samples([bs.test[-1]], det.preprocess)).image[:, :224, :544]
    assert [b.left for b in boxes(224, 544, det.preprocess)] == [0, 160, 320]
    tiled, whole = det.predict_tiled(image).maps[0], det.predict(image[None]).maps[0]
    rel = (tiled - whole).abs() / whole.mean()
    assert rel[:, :64].max() < 1e-3  # tile 0 alone, 160 px from its inner edge
    assert rel[:, -64:].max() < 1e-3
    assert rel.median() < 0.02
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.98


def _small_defect(bs: Dataset, side: int = 36) -> torch.Tensor:
    """A side x side crop of a real pitting defect at the camera's pixels (centred on the
    largest ground-truth region's centre)."""
    native = Preprocess(tile=256)
    best = max(iter_samples([r for r in bs.test if r.label][:12], native), key=lambda s: int(s.mask.sum()))
    ys, xs = torch.nonzero(best.mask, as_tuple=True)
    cy, cx = int(ys.float().mean()), int(xs.float().mean())
    top, left = max(0, cy - side // 2), max(0, cx - side // 2)
    return best.image[:, top : top + side, left : left + side]


def test_small_pasted_defect_is_found_at_its_place_with_tiles_and_weaker_without(bs: Dataset) -> None:
    crop = _small_defect(bs)
    goods = [r for r in bs.test if r.label == 0][:4]
    native = [s.image for s in iter_samples(goods, Preprocess(tile=256))]
    pasted, mask = paste_defect(native[0], crop, seed=3)
    margins = {}
    for name, pre in (("whole", {}), ("tiled", {"tile": 512})):
        det = make_detector("patchcore", preprocess=pre, coreset_ratio=0.02)
        det.fit(training_samples(bs.train[:5], det.preprocess))
        images = [det.preprocess.image(x.permute(1, 2, 0).numpy())[0] for x in [pasted, *native[1:]]]
        preds = [det.predict_tiled(x) if name == "tiled" else det.predict(x[None]) for x in images]
        scores = torch.stack([p.scores[0] for p in preds])
        margins[name] = float(scores[0] / scores[1:].max())
        if name == "tiled":
            amap = preds[0].maps[0]
            y, x = divmod(int(amap.argmax()), amap.shape[1])
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert int(ys.min()) - 8 <= y <= int(ys.max()) + 8 and int(xs.min()) - 8 <= x <= int(xs.max()) + 8
    assert margins["tiled"] > 1.0, margins  # the pasted image scores above every normal one
    assert margins["tiled"] > margins["whole"], margins


def test_tiled_model_file_records_the_tiling_and_scores_alike(bs: Dataset, tmp_path: Path) -> None:
    det = make_detector("patchcore", preprocess={"tile": 192, "scale": 0.4, "overlap": 0.3})
    normal = det.fit_scored(bs.train[:5])
    assert normal is not None and len(normal.scores) == 5 and (normal.scores > 0).all()
    save_detector(det, tmp_path / "m.dscope")
    back = load_detector(tmp_path / "m.dscope")
    assert back.preprocess == Preprocess(tile=192, scale=0.4, overlap=0.3)
    sample = next(iter_samples(bs.test[:1], back.preprocess))
    assert sample.image.shape[-2:] == (round(460 * 0.4), round(1130 * 0.4))
    (_, a), (_, b) = next(det.predict_samples([sample])), next(back.predict_samples([sample]))
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    assert a.maps.shape[-2:] == sample.image.shape[-2:]


def test_exported_tiled_model_scores_as_torch(bs: Dataset, tmp_path: Path) -> None:
    """The graph takes one tile; the runtime cuts and stitches through the same code."""
    fitted = pipeline.fit(make_detector("patchcore", preprocess={"tile": 128, "scale": 0.3}, coreset_ratio=0.1), bs.train[:4])
    model = save_detector(fitted.detector, tmp_path / "tiled.dscope", extra=fitted.extra())
    onnx_file = export_model(model, tmp_path / "tiled.onnx", "onnx")[0]
    records = [bs.test[0], bs.test[-1]]
    ref = [(j.score, j.original_map()) for j in score_samples(load_detector(model), iter_samples(records, fitted.detector.preprocess))]
    runtime = ExportedModel(onnx_file)
    got = [(j.score, j.original_map()) for j in score_samples(runtime, iter_samples(records, runtime.preprocess))]
    for (s_ref, m_ref), (s_got, m_got) in zip(ref, got, strict=True):
        assert abs(s_got - s_ref) <= 1e-4 * abs(s_ref)
        assert np.abs(m_got - m_ref).max() <= 1e-3 * (m_ref.max() - m_ref.min())
    with pytest.raises(ConfigError, match="one tile"):
        export_model(model, tmp_path / "again.onnx", "onnx", input_size=(128, 128))


def test_tiling_refusals() -> None:
    with pytest.raises(DataError, match="--tile"):
        Preprocess(scale=0.5)
    with pytest.raises(DataError, match="overlap"):
        Preprocess(tile=128, overlap=0.9)
    with pytest.raises(ConfigError, match="cannot tile"):
        make_detector("musc", preprocess={"tile": 256})
