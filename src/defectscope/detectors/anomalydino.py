"""AnomalyDINO (Damm et al., WACV 2025): patch nearest neighbours on DINOv2 features, few-shot.

Memory M: the L2-normalised patch tokens of the k normal shots, each shot also rotated by
``rotations`` degrees (the paper: 0, 45, ..., 315; reflected borders). A test patch p
scores its cosine distance to the nearest memory patch,

    d(p) = min_{m in M} (1 - <p, m>),   (= ||p - m||^2 / 2 for unit vectors)

the map is d upsampled to the input size and smoothed (sigma 4), and the image score is
the mean of the top 1% of the image's patch distances (``top_fraction``). Optional
zero-shot masking (``masking=True``, for objects on a background, not textures): the
first principal component of an image's own patch tokens splits object from background;
the side holding the image's centre is the object, and background patches score 0 and
are left out of the image score. Features: DINOv2 ViT-S/14 (`backbones.vit`), block
``stages`` (default 6; blocks 11-12 of this network are no longer DINOv2's, see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F

from defectscope.backbones.vit import NAME as VIT_NAME
from defectscope.components.memory import Index
from defectscope.data.datasets import Sample, batches
from defectscope.detectors.base import CNNDetector, Prediction, Progress, check_ratio, patch_scores_to_maps, register
from defectscope.errors import ConfigError

PAPER_ROTATIONS = (0, 45, 90, 135, 180, 225, 270, 315)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate images N x C x H x W about their centre, borders reflected (as the paper's cv2 default)."""
    if degrees % 360 == 0:
        return x
    n, _, h, w = x.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid works in normalised coordinates: correct the aspect ratio so the rotation is rigid
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def foreground(tokens: torch.Tensor) -> torch.Tensor:
    """N x h x w bool: per image, the side of its first principal component that holds the centre."""
    n, _, h, w = tokens.shape
    out = torch.empty(n, h, w, dtype=torch.bool)
    for i in range(n):
        x = tokens[i].flatten(1).T
        x = x - x.mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        pc = (x @ v[0]).view(h, w)
        centre = pc[h // 4 : h - h // 4, w // 4 : w - w // 4]
        out[i] = pc > 0 if (centre > 0).float().mean() >= 0.5 else pc < 0
    return out


@register
class AnomalyDINO(CNNDetector):
    """AnomalyDINO on the wheel's DINOv2 ViT-S/14 (see module docstring)."""

    name = "anomalydino"
    export_refusal: ClassVar[str] = "its rotation-augmented cosine search is not written as a graph yet"

    def __init__(
        self,
        *,
        rotations: tuple[float, ...] | list[float] = PAPER_ROTATIONS,
        masking: bool = False,
        top_fraction: float = 0.01,
        batch_size: int = 8,
        backbone: str = VIT_NAME,
        preprocess: dict[str, Any] | None = None,
        **cnn: Any,
    ) -> None:
        super().__init__(backbone=backbone, preprocess={"size": 448, **(preprocess or {})}, **cnn)
        if backbone != VIT_NAME:
            raise ConfigError(f"anomalydino runs on the ViT ({VIT_NAME}); for a CNN use patchcore with coreset_ratio=1.")
        self.rotations = tuple(float(r) for r in rotations) or (0.0,)
        self.masking, self.batch_size = bool(masking), batch_size
        self.top_fraction = check_ratio("top_fraction", top_fraction)
        self.memory = torch.empty(0)
        self._index: Index | None = None

    def config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            "rotations": list(self.rotations),
            "masking": self.masking,
            "top_fraction": self.top_fraction,
            "batch_size": self.batch_size,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"memory": self.memory}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory, self._index = state["memory"].float(), None

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "memory_patches": int(self.memory.shape[0])}

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = Index(self.memory)
        return self._index

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length patch tokens N x D x h x w (the chosen blocks concatenated)."""
        return F.normalize(torch.cat(self.backbone(x), 1), dim=1)

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("AnomalyDINO needs at least one normal image (its shots).")
        rows, done = [], 0
        for batch in batches(iter(images), self.batch_size):
            x = torch.stack([s.image for s in batch])
            for angle in self.rotations:
                t = self.tokens(rotate(x, angle))
                if self.masking:
                    keep = foreground(t)
                    rows += [t[i].flatten(1).T[keep[i].flatten()] for i in range(len(batch))]
                else:
                    rows.append(t.flatten(2).transpose(1, 2).reshape(-1, t.shape[1]))
            done += len(batch)
            if progress:
                progress("features", done, 0)
        if not rows:
            raise ConfigError("AnomalyDINO got no training images; check the training folder.")
        self.memory, self._index = torch.cat(rows).contiguous(), None
        return self

    def predict(self, batch: torch.Tensor) -> Prediction:
        t = self.tokens(batch)
        n, d, h, w = t.shape
        dist, _ = self.index.search(t.flatten(2).transpose(1, 2).reshape(-1, d), 1)
        patch = (dist[:, 0] ** 2 / 2).view(n, h, w)
        if self.masking:
            patch = patch * foreground(t)
        return Prediction(self._top_mean(patch.flatten(1)), patch_scores_to_maps(patch, tuple(batch.shape[-2:]), self.sigma))

    def _top_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of the top ``top_fraction`` of each row (at least one value)."""
        top = max(1, math.ceil(self.top_fraction * values.shape[1]))
        return values.topk(top, dim=1).values.mean(1)

    def score_map(self, amap: torch.Tensor) -> torch.Tensor:
        """Tiled images: the mean of the top ``top_fraction`` of the stitched map's pixels."""
        return self._top_mean(amap.flatten()[None])[0]
