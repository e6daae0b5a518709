"""Frozen pretrained backbones and where their weights come from."""

from defectscope.backbones.cnn import CNNBackbone, get_backbone

__all__ = ["CNNBackbone", "get_backbone"]
