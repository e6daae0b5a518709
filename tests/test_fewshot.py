"""The k-shot protocol and FastRecon on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import defect_crop, paste_defect

from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.data.fewshot import sample_shots
from defectscope.detectors import make_detector
from defectscope.detectors.base import training_options
from defectscope.errors import ConfigError
from defectscope.evaluation.evaluate import evaluate, evaluate_fewshot


@pytest.fixture(scope="module")
def tiles(magnetic: Path):
    return load_dataset(magnetic)


def test_same_seed_same_shots_other_seed_other_shots(tiles) -> None:
    a = sample_shots(tiles.train, 4, seed=0)
    assert a == sample_shots(tiles.train, 4, seed=0)
    assert a != sample_shots(tiles.train, 4, seed=1)
    assert len({r.path for r in a}) == 4
    with pytest.raises(ConfigError):
        sample_shots(tiles.train, 0, seed=0)


def test_protocol_is_reproducible_and_reports_mean_std(small_mvtec: Path) -> None:
    first = evaluate_fewshot("fastrecon", small_mvtec, shots=[1, 2], seeds=[0, 1])
    again = evaluate_fewshot("fastrecon", small_mvtec, shots=[1, 2], seeds=[0, 1])
    for k in (1, 2):
        assert [r["image_auroc"] for r in first.runs[k]] == [r["image_auroc"] for r in again.runs[k]]
    summary = first.summary()
    mean, std = summary[2]["image_auroc"]
    vals = [r["image_auroc"] for r in first.runs[2]]
    assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals, ddof=1))
    assert "± " in first.to_markdown()


def test_few_images_get_few_shot_settings_unless_the_user_says_otherwise(small_mvtec: Path) -> None:
    ds = load_dataset(small_mvtec)
    few = evaluate("patchcore", ds, train=ds.train[:2])
    assert few.config["coreset_ratio"] == 1.0  # PatchCore keeps its whole bank
    assert evaluate("patchcore", ds).config["coreset_ratio"] == 0.01  # 12 images: full-shot default
    mine = evaluate("patchcore", ds, train=ds.train[:2], config={"coreset_ratio": 0.5})
    assert mine.config["coreset_ratio"] == 0.5
    protocol = evaluate_fewshot("patchcore", ds, shots=[1], seeds=[0])
    assert protocol.runs[1][0]["image_auroc"] == pytest.approx(
        evaluate("patchcore", ds, config={"coreset_ratio": 1.0}, train=sample_shots(ds.train, 1, 0)).overall["image_auroc"]
    )
    assert training_options("fastrecon", 1, {"lam": 3.0}) == {"lam": 3.0}


def test_whole_bank_keeps_every_patch(small_mvtec: Path) -> None:
    det = make_detector("patchcore", **training_options("patchcore", 1))
    det.fit(iter_samples(load_dataset(small_mvtec).train[:1], det.preprocess))
    assert det.bank.shape[0] == det.timings["patches"]


def test_closed_form_equals_direct_regression(tiles) -> None:
    """Q_hat from the precomputed projector equals W S with W from the normal equations."""
    det = make_detector("fastrecon", coreset_size=32)
    det.fit(iter_samples(tiles.train[:2], det.preprocess))
    s = next(iter_samples(tiles.test[:1], det.preprocess))
    feats = det.embed(s.image[None])
    q = feats[0].flatten(1).T.double()  # P x D
    mu = torch.nn.functional.interpolate(det.mu[None], size=feats.shape[-2:], mode="bilinear")[0].flatten(1).T.double()
    S = det.support.double()
    gram = S @ S.T
    rho = det.ridge * float(torch.trace(gram)) / S.shape[0]
    # minimise ||W S - Q||^2 + lam ||W S - mu||^2 + rho ||W||^2 by stacking it as one least-squares problem
    W = torch.linalg.solve((1 + det.lam) * gram + rho * torch.eye(S.shape[0], dtype=torch.float64), S @ (q + det.lam * mu).T).T
    direct = W @ S
    ours = det.reconstruct(feats)[0].flatten(1).T.double()
    assert torch.allclose(ours, direct, rtol=1e-3, atol=1e-3 * float(direct.abs().max()))


def test_normal_image_reconstructs_better_than_with_pasted_defect(tiles) -> None:
    det = make_detector("fastrecon")
    det.fit(iter_samples(tiles.train[:4], det.preprocess))
    donor = defect_crop(list(iter_samples([r for r in tiles.test if r.defect == "blowhole"][:10], det.preprocess)))
    wins = 0
    normals = [r for r in tiles.test if r.label == 0][:6]
    for i, s in enumerate(iter_samples(normals, det.preprocess)):
        pasted, mask = paste_defect(s.image, donor, seed=i)
        clean_map = det.predict(s.image[None]).maps[0]
        bad_map = det.predict(pasted[None]).maps[0]
        wins += int(bad_map[mask].mean() > clean_map[mask].mean() and bad_map.max() > clean_map.max())
    assert wins >= 5
