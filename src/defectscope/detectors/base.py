"""The detector contract, the registry, and what every patch-scoring method shares.

A method is one file in this package that subclasses `Detector` and is decorated with
`@register`; the CLI, `evaluate` and the model file code only ever talk to this contract.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F

from defectscope.backbones.cnn import CNNBackbone, get_backbone
from defectscope.data.datasets import Sample, batches
from defectscope.data.images import Preprocess
from defectscope.errors import ConfigError

Progress = Callable[[str, int, int], None]  # (stage, done, total; 0 = unknown)


@dataclass
class Prediction:
    """Image scores (N) and anomaly maps (N x H x W at the network input size); higher = worse."""

    scores: torch.Tensor
    maps: torch.Tensor

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        """Join predictions of equal map size (used when batches share a size)."""
        return Prediction(torch.cat([p.scores for p in parts]), torch.cat([p.maps for p in parts]))


class Detector(ABC):
    """What every method provides. Scores: higher = more anomalous."""

    name: ClassVar[str]
    needs_training_images: ClassVar[bool] = True
    preprocess: Preprocess

    @abstractmethod
    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        """Build the method's state from normal images (or nothing, for zero-shot methods)."""

    @abstractmethod
    def predict(self, batch: torch.Tensor) -> Prediction:
        """Score a batch N x 3 x H x W in [0, 1]; maps come back at H x W."""

    def predict_samples(self, samples: Iterable[Sample], batch_size: int = 8) -> list[Prediction]:
        """Score many samples (grouped into equal-size batches); one Prediction per batch."""
        return [self.predict(torch.stack([s.image for s in b])) for b in batches(iter(samples), batch_size)]

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able hyper-parameters: ``type(self)(**config)`` rebuilds an unfitted twin."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor fit() produced."""

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Self:
        """Rebuild a fitted detector from its config and state (no code is unpickled)."""
        det = cls(**config)
        det.load_state(state)
        return det

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Install tensors produced by ``state()``."""

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the fitted model worth recording (weights hash, sizes, timings)."""
        return {}


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def make_detector(name: str, **config: Any) -> Detector:
    """Instantiate a registered method by name with the given hyper-parameters."""
    import defectscope.detectors  # noqa: F401 - importing the package registers every method

    if name not in REGISTRY:
        raise ConfigError(f"Unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}.")
    try:
        return REGISTRY[name](**config)
    except TypeError as exc:
        raise ConfigError(f"Bad option for {name}: {exc}.") from exc


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of N x H x W maps (kernel radius 4 sigma, reflect padding)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    if radius < 1:
        return maps
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def patch_scores_to_maps(scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """N x h x w patch scores -> N x H x W: bilinear upsampling, then Gaussian smoothing."""
    up = F.interpolate(scores[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)


class CNNDetector(Detector):
    """Base for methods built on a frozen timm CNN: holds the backbone and input settings."""

    def __init__(
        self,
        *,
        backbone: str = "tf_efficientnet_lite0",
        stages: Sequence[int] = (2, 3),
        weights: str = "auto",
        preprocess: dict[str, Any] | None = None,
        sigma: float = 4.0,
    ) -> None:
        self.backbone_name, self.stages, self.weights = backbone, tuple(stages), weights
        self.preprocess = Preprocess(**(preprocess or {}))
        self.sigma = sigma
        self._backbone: CNNBackbone | None = None

    @property
    def backbone(self) -> CNNBackbone:
        if self._backbone is None:
            self._backbone = get_backbone(self.backbone_name, self.stages, self.weights)
        return self._backbone

    def base_config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "stages": list(self.stages),
            "weights": self.weights,
            "preprocess": self.preprocess.to_dict(),
            "sigma": self.sigma,
        }

    @property
    def info(self) -> dict[str, Any]:
        return {"weights_hash": self.backbone.weights_hash}


def check_ratio(name: str, value: float) -> float:
    """Validate a fraction in (0, 1]."""
    if not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value}.")
    return value
