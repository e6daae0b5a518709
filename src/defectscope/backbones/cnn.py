"""Frozen CNN feature extractor over any timm model (``features_only``) and chosen stages."""

from __future__ import annotations

from functools import lru_cache

import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from defectscope.backbones.weights import PACKAGED, load_weights
from defectscope.errors import WeightsError

# The EfficientNet-Lite weights were trained on inputs scaled with mean = std = 0.5.
_LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# (conv, batch norm that reads its output) attribute pairs of timm's EfficientNet-family
# modules (EfficientNet, EfficientNet-Lite, MobileNetV2/V3, MixNet, ...).
_CONV_BN = {
    "EfficientNetFeatures": (("conv_stem", "bn1"),),
    "MobileNetV3Features": (("conv_stem", "bn1"),),
    "ConvBnAct": (("conv", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
}


def fold_batch_norms(body: nn.Module) -> int:
    """Fold each frozen batch norm into the convolution before it, in place: w' = w γ/σ,
    b' = (b - μ) γ/σ + β, the norm replaced by its activation. The same function of the
    input (to float rounding; tests/test_backbone.py), minus a pass over every feature
    map: about a sixth of the backbone's CPU time. Only the module types in ``_CONV_BN``,
    whose forward applies the pair in that order; returns how many pairs were folded."""
    folded = 0
    for module in body.modules():
        for conv_name, bn_name in _CONV_BN.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            conv.weight, conv.bias = nn.Parameter(weight, requires_grad=False), nn.Parameter(bias, requires_grad=False)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, nn.Sequential(*after) if after else nn.Identity())
            folded += 1
    return folded


class CNNBackbone(nn.Module):
    """Pretrained timm CNN returning the feature maps of the chosen stages.

    ``stages`` index timm's ``feature_info`` (for EfficientNet-Lite: 0..4 at strides
    2, 4, 8, 16, 32). Inputs are 3 x H x W in [0, 1]; normalisation is done here.
    """

    def __init__(self, name: str = "tf_efficientnet_lite0", stages: tuple[int, ...] = (2, 3), weights: str = "auto"):
        super().__init__()
        try:
            full = timm.create_model(name, pretrained=False)
        except Exception as exc:  # noqa: BLE001 - timm raises several types for unknown names
            raise WeightsError(f"Unknown backbone {name!r}: {exc}. Use a timm model name.") from exc
        self.weights_hash = load_weights(full, name, weights)
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(stages))
        source = full.state_dict()
        self.body.load_state_dict({k: source[k] for k in self.body.state_dict()})
        self.body.eval().requires_grad_(False)
        fold_batch_norms(self.body)
        self.body.to(memory_format=torch.channels_last)
        self.name, self.stages = name, tuple(stages)
        mean, std = _LITE_NORM if name in PACKAGED else (
            full.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)),
            full.pretrained_cfg.get("std", (0.229, 0.224, 0.225)),
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    @property
    def channels(self) -> list[int]:
        return self.body.feature_info.channels()

    @property
    def strides(self) -> list[int]:
        return self.body.feature_info.reduction()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last))


@lru_cache(maxsize=4)
def get_cnn(name: str, stages: tuple[int, ...], weights: str) -> CNNBackbone:
    """A shared, cached backbone instance (building one reads weights from disk)."""
    return CNNBackbone(name, stages, weights)
