"""Frozen pretrained backbones and where their weights come from.

`get_backbone` gives either a timm CNN (`cnn.CNNBackbone`, stages = timm feature stages)
or the DINOv2 ViT-S/14 (`vit.ViTBackbone`, backbone ``dinov2_vits14``, stages = block
numbers); both return a list of N x C x h x w feature maps, so every patch method can use
either. ``stages=None`` takes the backbone's default.
"""

from __future__ import annotations

from torch import nn

from defectscope.backbones.cnn import CNNBackbone, get_cnn
from defectscope.backbones.vit import DEFAULT_BLOCKS, ViTBackbone, get_vit
from defectscope.backbones.vit import NAME as VIT_NAME

DEFAULT_STAGES = {VIT_NAME: DEFAULT_BLOCKS}
CNN_STAGES = (2, 3)


def default_stages(name: str) -> tuple[int, ...]:
    return DEFAULT_STAGES.get(name, CNN_STAGES)


def get_backbone(name: str, stages: tuple[int, ...] | None, weights: str) -> nn.Module:
    """A shared, cached backbone instance (building one reads weights from disk)."""
    stages = default_stages(name) if stages is None else tuple(stages)
    return get_vit(stages, weights) if name == VIT_NAME else get_cnn(name, stages, weights)


__all__ = ["CNNBackbone", "ViTBackbone", "default_stages", "get_backbone"]
