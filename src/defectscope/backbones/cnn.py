"""Frozen CNN feature extractor over any timm model (``features_only``) and chosen stages."""

from __future__ import annotations

from functools import lru_cache

import timm
import torch
from torch import nn

from defectscope.backbones.weights import PACKAGED, load_weights
from defectscope.errors import WeightsError

# The EfficientNet-Lite weights were trained on inputs scaled with mean = std = 0.5.
_LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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
