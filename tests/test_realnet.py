"""RealNet and SDAS on real images: repeatable training, AFS ratios, round trips, a pasted
real defect, the diffusion model and its synthesis kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import defect_crop, paste_defect
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.components.diffusion import DDPM, train_ddpm
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.detectors.base import make_detector
from defectscope.detectors.realnet import afs_errors, afs_select
from defectscope.errors import ConfigError, ModelFileError
from defectscope.modelfiles.artifacts import load_detector, read_manifest, save_detector

FAST = {"preprocess": {"size": 128}, "steps": 6, "pool": 1, "afs_images": 16, "synthesis": "perlin+cutpaste"}


@pytest.fixture(scope="module")
def weld(battery: Path):
    return load_dataset(battery)


def _fit(weld, n: int = 10, **options):
    det = make_detector("realnet", **{**FAST, **options})
    return det.fit(iter_samples(weld.train[:n], det.preprocess))


def _batch(weld, det, n: int = 4) -> torch.Tensor:
    return torch.stack([s.image for s in iter_samples(weld.test[:n], det.preprocess)])


def test_same_seed_same_weights_and_scores(weld) -> None:
    a, b, c = _fit(weld), _fit(weld), _fit(weld, seed=1)
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = _batch(weld, a)
    pa, pb, pc = a.predict(x), b.predict(x), c.predict(x)
    assert torch.equal(pa.scores, pb.scores) and torch.equal(pa.maps, pb.maps)
    assert not torch.equal(pa.maps, pc.maps)
    assert len(a.losses) == FAST["steps"] and all(np.isfinite(a.losses))


def test_save_load_predict_identical(weld, tmp_path: Path) -> None:
    det = _fit(weld)
    path = save_detector(det, tmp_path / "realnet.dscope")
    back = load_detector(path)
    x = _batch(weld, det)
    p, q = det.predict(x), back.predict(x)
    assert torch.equal(p.scores, q.scores) and torch.equal(p.maps, q.maps)
    assert back.losses == det.losses and [c.tolist() for c in back.channels] == [c.tolist() for c in det.channels]
    assert p.maps.shape == (4, 128, 128) and float(p.maps.min()) >= 0 and float(p.maps.max()) <= 1


def test_afs_keeps_exactly_the_requested_ratio(weld) -> None:
    ratios = [0.5, 0.25, 0.3, 0.1]
    det = _fit(weld, afs_ratio=ratios)
    full = det.backbone.channels
    assert [len(c) for c in det.channels] == [max(1, round(r * c)) for r, c in zip(ratios, full, strict=True)]
    assert all(torch.equal(c, c.unique()) for c in det.channels)  # sorted, no repeats
    assert det.info["afs_channels"] == [len(c) for c in det.channels]


def test_afs_ranks_the_channel_whose_residual_is_the_mask_first() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 10:24] = True
    normal = torch.rand(6, 4, 16, 16, generator=g)
    anomalous = normal + 0.3 * torch.rand(6, 4, 16, 16, generator=g)  # noise everywhere ...
    anomalous[:, 2] = normal[:, 2] + masks[:, ::2, ::2].float()  # ... channel 2 changes exactly on the mask
    errors = afs_errors(anomalous, normal, masks)
    assert int(errors.argmin()) == 2
    assert afs_select(errors, 0.5).tolist() == sorted(errors.argsort()[:2].tolist())


def test_a_briefly_trained_model_scores_a_pasted_real_defect_above_the_normals(weld) -> None:
    """Trained for 80 steps on 16 real normal images; a real defect crop pasted into five
    unseen normal images must score above all five of them untouched."""
    det = _fit(weld, n=16, steps=80, pool=2, synthesis="cutpaste+perlin")
    crop = defect_crop(list(iter_samples([r for r in weld.test if r.label][:10], det.preprocess)))
    normals = torch.stack([s.image for s in iter_samples(weld.train[20:25], det.preprocess)])
    pasted = torch.stack([paste_defect(img, crop, seed=i)[0] for i, img in enumerate(normals)])
    clean, bad = det.predict(normals).scores, det.predict(pasted).scores
    assert float(bad.min()) > float(clean.max()), (clean.tolist(), bad.tolist())


def test_options_are_checked_before_any_training() -> None:
    with pytest.raises(ConfigError, match="train-ddpm"):
        make_detector("realnet")  # SDAS by default: it needs a diffusion model
    with pytest.raises(ConfigError, match="multiple of 128"):
        make_detector("realnet", synthesis="perlin", preprocess={"size": 200})
    with pytest.raises(ConfigError, match="square"):
        make_detector("realnet", synthesis="perlin", preprocess={"resize": "aspect"})
    with pytest.raises(ConfigError, match="cannot tile"):
        make_detector("realnet", synthesis="perlin", preprocess={"tile": 256})
    with pytest.raises(ConfigError, match="Unknown RealNet synthesis"):
        make_detector("realnet", synthesis="perlin+dtd")
    with pytest.raises(ConfigError, match="one per stage"):
        make_detector("realnet", synthesis="perlin", afs_ratio=[0.5, 0.5])
    with pytest.raises(ConfigError, match="textures=DIR"):
        make_detector("realnet", synthesis="texture")


@pytest.fixture(scope="module")
def ddpm(battery: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddpm") / "weld.ddpm"
    summary = train_ddpm(battery, out, size=32, steps=4, batch_size=4)
    assert summary["images"] == 45 and Path(summary["loss_curve"]).is_file() and Path(summary["samples"]).is_file()
    return out


def test_ddpm_is_repeatable_and_strength_changes_the_samples(battery: Path, ddpm: Path, tmp_path: Path) -> None:
    again = train_ddpm(battery, tmp_path / "again.ddpm", size=32, steps=4, batch_size=4)
    a, b = DDPM.load(ddpm), DDPM.load(again["ddpm"])
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True))
    plain, plain2, strong = a.sample(3, steps=8, seed=5), a.sample(3, steps=8, seed=5), a.sample(3, strength=0.5, steps=8, seed=5)
    assert plain.shape == (3, 32, 32, 3) and plain.dtype == np.uint8
    assert np.array_equal(plain, plain2) and not np.array_equal(plain, strong)
    with pytest.raises(ConfigError, match="strength"):
        a.sample(1, strength=-0.1)


def test_a_modified_ddpm_file_is_refused(ddpm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ddpm"
    data = bytearray(ddpm.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="train-ddpm"):
        DDPM.load(bad)


def test_synth_sdas_and_normal_kinds_through_the_cli(small_mvtec: Path, ddpm: Path, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["synth", str(small_mvtec), "--out", str(out), "--kinds", "sdas,normal", "--n", "3",
                                      "--ddpm", str(ddpm), "--strength", "0.2"])
    assert result.exit_code == 0, result.output
    generated = sorted((out / "generated" / "good").iterdir())
    assert len(generated) == 3 and Image.open(generated[0]).size == (32, 32)
    for j in range(3):
        image = np.asarray(Image.open(out / "test" / "sdas" / f"{j:03d}.png"))
        mask = np.asarray(Image.open(out / "ground_truth" / "sdas" / f"{j:03d}_mask.png")) > 0
        assert mask.any() and mask.shape == image.shape[:2]
    missing = CliRunner().invoke(app, ["synth", str(small_mvtec), "--out", str(tmp_path / "x"), "--kinds", "sdas"])
    assert missing.exit_code == 2 and "--ddpm" in missing.output


def test_realnet_trains_on_sdas_and_fit_writes_its_loss_curve(small_mvtec: Path, ddpm: Path, tmp_path: Path) -> None:
    model = tmp_path / "rn.dscope"
    result = CliRunner().invoke(app, ["fit", str(small_mvtec), "-m", "realnet", "-o", str(model), "--size", "128",
                                      "--set", f"ddpm={ddpm}", "--set", "steps=3", "--set", "sdas_samples=4", "--set", "pool=1"])
    assert result.exit_code == 0, result.output
    assert model.is_file() and model.with_suffix(".loss.png").is_file()
    det = load_detector(model)
    assert det.config()["synthesis"] == "sdas" and len(det.losses) == 3
    thr = read_manifest(model)["extra"]["threshold"]  # set, from images the network never trained on
    assert thr is not None and "held-out" in thr["source"] and f"threshold {thr['value']:.4g}" in result.output
