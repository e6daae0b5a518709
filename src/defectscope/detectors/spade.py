"""SPADE (Cohen & Hoshen, 2020): k-NN over images, then over pixels of the nearest images.

Image level: f(x) = global average of the last stage's map; score = mean distance to the
K nearest training images' f (K = 50, capped by the training set size).
Pixel level: the gallery is the feature maps of those K nearest training images; each
test position's score at stage s is the mean distance to its kappa nearest gallery
features (any position); per-stage scores are upsampled to the input size and summed, then
smoothed (sigma 4). Nearest neighbours come from the shared `memory.knn`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F

from defectscope.components.features import flatten_patches
from defectscope.components.memory import knn
from defectscope.data.datasets import Record, Sample, batches, iter_samples
from defectscope.detectors.base import CNNDetector, NormalScores, Prediction, Progress, gaussian_blur, register
from defectscope.errors import ConfigError


@register
class SPADE(CNNDetector):
    """SPADE; ``stages``' last entry gives the global feature, ``pixel_stages`` the galleries."""

    name = "spade"
    export_refusal: ClassVar[str] = "its image-level k-NN picks a per-image gallery subset, which is not written as a graph yet"

    def __init__(
        self,
        *,
        k: int = 50,
        kappa: int = 1,
        pixel_stages: tuple[int, ...] = (1, 2, 3),
        storage: str = "float16",
        batch_size: int = 8,
        stages: tuple[int, ...] = (1, 2, 3, 4),
        **cnn: Any,
    ) -> None:
        super().__init__(stages=stages, **cnn)
        if not set(pixel_stages) <= set(self.stages):
            raise ConfigError(f"pixel_stages {pixel_stages} must be among stages {self.stages}.")
        if storage not in ("float32", "float16"):
            raise ConfigError(f"storage must be float32 or float16, got {storage!r}.")
        self.k, self.kappa, self.pixel_stages = k, kappa, tuple(pixel_stages)
        self.storage, self.batch_size = storage, batch_size
        self.global_feats = torch.empty(0)
        self.patches: list[torch.Tensor] = []  # per pixel stage: all training positions x C
        self.owner: list[torch.Tensor] = []  # per pixel stage: training image index of each row

    def config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            "k": self.k,
            "kappa": self.kappa,
            "pixel_stages": list(self.pixel_stages),
            "storage": self.storage,
            "batch_size": self.batch_size,
        }

    def state(self) -> dict[str, torch.Tensor]:
        out = {"global": self.global_feats}
        for i, (p, o) in enumerate(zip(self.patches, self.owner, strict=True)):
            out[f"patches{i}"], out[f"owner{i}"] = p.to(getattr(torch, self.storage)), o
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.global_feats = state["global"].float()
        n = len(self.pixel_stages)
        self.patches = [state[f"patches{i}"] for i in range(n)]
        self.owner = [state[f"owner{i}"].long() for i in range(n)]

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "train_images": int(self.global_feats.shape[0])}

    def _split(self, fmaps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pos = {s: i for i, s in enumerate(self.stages)}
        return fmaps[-1].mean(dim=(2, 3)), [fmaps[pos[s]] for s in self.pixel_stages]

    def _extract(self, images: Iterable[Sample], first: int, progress: Progress | None = None) -> int:
        """Append the images' global features and per-stage patches (owners numbered from
        ``first``) to the gallery; returns how many images were added."""
        globals_, per_stage, owners = [], [[] for _ in self.pixel_stages], [[] for _ in self.pixel_stages]
        done = first
        for batch in batches(iter(images), self.batch_size):
            g, maps = self._split(self.backbone(torch.stack([s.image for s in batch])))
            globals_.append(g)
            for i, m in enumerate(maps):
                per_stage[i].append(flatten_patches(m).to(getattr(torch, self.storage)))
                owners[i].append(torch.arange(done, done + len(batch)).repeat_interleave(m.shape[2] * m.shape[3]))
            done += len(batch)
            if progress:
                progress("features", done, 0)
        if globals_:
            self.global_feats = torch.cat([self.global_feats, *globals_]) if first else torch.cat(globals_)
            self.patches = [torch.cat([*self.patches[i : i + 1], *p]) if first else torch.cat(p) for i, p in enumerate(per_stage)]
            self.owner = [torch.cat([*self.owner[i : i + 1], *o]) if first else torch.cat(o) for i, o in enumerate(owners)]
        return done - first

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("SPADE needs normal training images.")
        if self._extract(images, 0, progress) == 0:
            raise ConfigError("SPADE got no training images.")
        return self

    def add_normals(self, images: Iterable[Sample]) -> dict[str, Any]:
        """Add the images to the k-NN gallery (global features and pixel galleries)."""
        added = self._extract(images, int(self.global_feats.shape[0]))
        return {"added_images": added, "gallery_images": int(self.global_feats.shape[0])}

    def predict(self, batch: torch.Tensor) -> Prediction:
        return self._score(batch)

    def _neighbours(self, g: torch.Tensor, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The K nearest training images of each global feature, without image ``exclude[n]``."""
        if exclude is None:
            return knn(g, self.global_feats, self.k)
        k = min(self.k, self.global_feats.shape[0] - 1)
        dist, idx = knn(g, self.global_feats, k + 1)
        own = (idx == exclude[:, None]).to(torch.int8)
        pick = torch.argsort(own, dim=1, stable=True)[:, :k]  # the first k that are not the image itself
        return dist.gather(1, pick), idx.gather(1, pick)

    def _score(self, batch: torch.Tensor, exclude: torch.Tensor | None = None) -> Prediction:
        g, maps = self._split(self.backbone(batch))
        dist, nearest = self._neighbours(g, exclude)
        scores = dist.mean(1)
        size = tuple(batch.shape[-2:])
        out = torch.zeros(batch.shape[0], *size)
        for i, fmap in enumerate(maps):
            for n in range(batch.shape[0]):  # one gallery per test image: its K nearest images
                keep = torch.isin(self.owner[i], nearest[n])
                gallery = self.patches[i][keep].float()
                d, _ = knn(flatten_patches(fmap[n : n + 1]), gallery, self.kappa)
                grid = d.mean(1).view(1, 1, *fmap.shape[-2:])
                out[n] += F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
        return Prediction(scores, gaussian_blur(out, self.sigma))

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 5, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Fit, then score each training image leaving it out of its own K nearest images
        (and so of its pixel gallery): exact leave-one-out, one more pass over the images."""
        if self.preprocess.tile is not None:  # leaving one tile out would leave its overlapping neighbours in
            return super().fit_scored(records, folds=folds, seed=seed, progress=progress)
        self.fit(iter_samples(records, self.preprocess), progress=progress)
        if len(records) < 2:
            return None
        parts, done = [], 0
        for batch in batches(iter_samples(records, self.preprocess), self.batch_size):
            exclude = torch.arange(done, done + len(batch))
            parts.append(NormalScores.summarize(self._score(torch.stack([s.image for s in batch]), exclude)))
            done += len(batch)
            if progress:
                progress("normal scores", done, len(records))
        return NormalScores.collect(parts, list(range(done)), "leave-one-image-out")
