"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position.

Embedding x_ij: three backbone stages upsampled to the finest grid and concatenated, then
a seeded random subset of d channels. Fit: per position (i, j) the mean mu_ij and
covariance Sigma_ij = cov + eps * I of the training embeddings, accumulated by streaming
(Chan's pairwise update of mean and scatter matrix, float32), so memory does not grow with
the number of images. Score (eq. 2): M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij)),
batched over positions; map upsampled and smoothed; image score = max of the map.

Like the paper, PaDiM assumes *aligned* images: position (i, j) must show the same part of
the product in every image, so all inputs share one size (default: letterbox).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Self

import torch

from defectscope.components.features import fuse_stages
from defectscope.data.datasets import Record, Sample, batches, iter_samples
from defectscope.detectors.base import (
    CNNDetector,
    NormalScores,
    Prediction,
    Progress,
    ScoreGraph,
    patch_scores_to_maps,
    register,
)
from defectscope.errors import ConfigError, DataError


@register
class PaDiM(CNNDetector):
    """PaDiM with running-sum fitting and optional float16 storage of the inverse covariances."""

    name = "padim"

    def __init__(
        self,
        *,
        d: int = 100,
        eps: float = 0.01,
        storage: str = "float32",
        seed: int = 0,
        batch_size: int = 8,
        stages: tuple[int, ...] = (1, 2, 3),
        preprocess: dict[str, Any] | None = None,
        **cnn: Any,
    ) -> None:
        super().__init__(stages=stages, preprocess={"resize": "letterbox", **(preprocess or {})}, **cnn)
        if self.preprocess.resize == "aspect":
            raise ConfigError("PaDiM needs one input size for all images: use resize 'letterbox' or 'squash'.")
        if storage not in ("float32", "float16"):
            raise ConfigError(f"storage must be float32 or float16, got {storage!r}.")
        self.d, self.eps, self.storage, self.seed, self.batch_size = d, eps, storage, seed, batch_size
        self.channels = torch.empty(0, dtype=torch.long)
        self.mean = torch.empty(0)
        self.inv_cov = torch.empty(0)
        self.n_images: int | None = None  # images behind mean and covariance (None: an older file)
        self.timings: dict[str, float] = {}

    def config(self) -> dict[str, Any]:
        return {**self.base_config(), "d": self.d, "eps": self.eps, "storage": self.storage, "seed": self.seed, "batch_size": self.batch_size}

    def state(self) -> dict[str, torch.Tensor]:
        out = {"channels": self.channels, "mean": self.mean, "inv_cov": self.inv_cov.to(getattr(torch, self.storage))}
        if self.n_images is not None:
            out["n_images"] = torch.tensor([self.n_images])
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.channels, self.mean, self.inv_cov = state["channels"].long(), state["mean"].float(), state["inv_cov"]
        self.n_images = int(state["n_images"][0]) if "n_images" in state else None

    @property
    def info(self) -> dict[str, Any]:
        nbytes = self.inv_cov.numel() * (2 if self.storage == "float16" else 4)
        return {**super().info, "grid": list(self.mean.shape[:2]), "d": int(self.mean.shape[-1]) if self.mean.numel() else 0, "covariance_mb": nbytes / 2**20}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """N x h x w x d embeddings (the random channel subset of the fused stages)."""
        fused = fuse_stages(self.backbone(x))
        if self.channels.numel() == 0:
            total = fused.shape[1]
            if self.d > total:
                raise ConfigError(f"d={self.d} exceeds the {total} channels of the chosen stages.")
            g = torch.Generator().manual_seed(self.seed)
            self.channels = torch.randperm(total, generator=g)[: self.d].sort().values
        return fused[:, self.channels].permute(0, 2, 3, 1).contiguous()

    def _one_size_hint(self) -> str:
        """What to change when inputs differ in size (PaDiM models each position)."""
        if self.preprocess.tile is not None:
            return f"PaDiM needs tiles of one size: every image must be at least {self.preprocess.tile} px on each side at scale {self.preprocess.scale:g} (use a smaller --tile)"
        return "PaDiM needs aligned images of one size (resize letterbox or squash)"

    def _accumulate(
        self, images: Iterable[Sample], n: int, mean: torch.Tensor | None, scatter: torch.Tensor | None, progress: Progress | None = None
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """Chan's pairwise update of (count, mean, scatter matrix) with the images' embeddings."""
        for batch in batches(iter(images), self.batch_size):
            e = self.embed(torch.stack([s.image for s in batch]))
            if mean is not None and e.shape[1:3] != mean.shape[:2]:
                raise DataError(f"{batch[0].path} has input size {tuple(batch[0].image.shape[1:])}, unlike the others; {self._one_size_hint()}.")
            nb = e.shape[0]
            mb = e.mean(0)
            centred = e - mb
            sb = torch.einsum("nhwi,nhwj->hwij", centred, centred)
            if mean is None:
                n, mean, scatter = nb, mb, sb
            else:
                delta = mb - mean
                total = n + nb
                mean = mean + delta * (nb / total)
                scatter += sb + torch.einsum("hwi,hwj->hwij", delta, delta) * (n * nb / total)  # in place: 160 MB at 64 x 64 x 100²
                n = total
            if progress:
                progress("features", n, 0)
        return n, mean, scatter

    def _install(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        # One image (1-shot) has no spread: the covariance is then eps * I alone.
        cov = scatter / max(n - 1, 1) + self.eps * torch.eye(self.d)
        self.mean, self.n_images = mean, n
        self.inv_cov = torch.cholesky_inverse(torch.linalg.cholesky(cov)).contiguous()

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("PaDiM needs normal training images.")
        t0 = time.perf_counter()
        n, mean, scatter = self._accumulate(images, 0, None, None, progress)
        if mean is None:
            raise ConfigError("PaDiM got no training images.")
        self._install(n, mean, scatter)
        self.timings = {"fit_s": time.perf_counter() - t0, "images": float(n)}
        return self

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 5, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Fit, then score every training image with the Gaussians of the other n - 1, exactly
        and without refitting. With u = x_i - mu, S the scatter matrix, B = S / (n - 2) + eps I
        and q = u^T B^-1 u, leaving x_i out gives mu_-i = mu - u / (n - 1) and
        Sigma_-i + eps I = B - a u u^T with a = n / ((n - 1)(n - 2)); Sherman-Morrison then
        gives the squared distance (n / (n - 1))^2 q / (1 - a q). One more inversion per
        position and one more backbone pass; cross-fitting on 4/5 of the images instead
        overestimates held-out distances (a covariance from fewer images)."""
        if self.preprocess.tile is not None:  # leaving one tile out would leave its overlapping neighbours in
            return super().fit_scored(records, folds=folds, seed=seed, progress=progress)
        n, mean, scatter = self._accumulate(iter_samples(records, self.preprocess), 0, None, None, progress)
        if mean is None:
            raise ConfigError("PaDiM got no training images.")
        self._install(n, mean, scatter)
        if n < 3:
            return None
        eye = torch.eye(self.d, dtype=torch.float64)
        b_inv = torch.cholesky_inverse(torch.linalg.cholesky(scatter.double() / (n - 2) + self.eps * eye))
        a, scale = n / ((n - 1) * (n - 2)), (n / (n - 1)) ** 2
        parts, done = [], 0
        for batch in batches(iter_samples(records, self.preprocess), self.batch_size):
            x = torch.stack([s.image for s in batch])
            u = (self.embed(x) - self.mean).double()
            q = torch.einsum("nhwi,hwij,nhwj->nhw", u, b_inv, u)  # float64: 1 - a q cancels when n < d
            dist = (scale * q / (1 - a * q).clamp(min=1e-12)).clamp_(min=0).sqrt_().float()
            maps = patch_scores_to_maps(dist, tuple(x.shape[-2:]), self.sigma)
            parts.append(NormalScores.summarize(Prediction(maps.flatten(1).max(1).values, maps)))
            done += len(batch)
            if progress:
                progress("normal scores", done, n)
        return NormalScores.collect(parts, list(range(done)), "leave-one-image-out")

    def add_normals(self, images: Iterable[Sample]) -> dict[str, Any]:
        """Update the running mean and covariance with more normal images. The scatter matrix
        is recovered from the stored inverse covariance (in float64; with float16 storage
        it carries that storage's rounding)."""
        if self.n_images is None:
            raise ConfigError("This PaDiM model file predates adding normal images (no image count); refit it.")
        cov = torch.linalg.inv(self.inv_cov.double()) - self.eps * torch.eye(self.d, dtype=torch.float64)
        scatter = (cov * max(self.n_images - 1, 1)).float()
        before = self.n_images
        n, mean, scatter = self._accumulate(images, before, self.mean, scatter)
        self._install(n, mean, scatter)
        return {"added_images": n - before, "images": n}

    def predict(self, batch: torch.Tensor) -> Prediction:
        e = self.embed(batch)
        if e.shape[1:3] != self.mean.shape[:2]:
            raise DataError(f"Input size {tuple(batch.shape[-2:])} differs from the training size; {self._one_size_hint()}.")
        diff = (e - self.mean).permute(1, 2, 0, 3)  # h x w x n x d: one batched product per position
        inv = self.inv_cov.float()
        dist = ((diff @ inv) * diff).sum(-1).permute(2, 0, 1).clamp(min=0).sqrt()
        maps = patch_scores_to_maps(dist, tuple(batch.shape[-2:]), self.sigma)
        return Prediction(maps.flatten(1).max(1).values, maps)

    def export_graph(self) -> ScoreGraph:
        return ScoreGraph(self.predict, self.backbone)
