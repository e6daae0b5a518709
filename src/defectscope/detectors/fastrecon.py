"""FastRecon (Fang et al., ICCV 2023): training-free few-shot feature reconstruction.

Features are PatchCore's (locally aware, stages at strides 8 and 16; D = 152 for
EfficientNet-Lite0). From the k normal support images:
  S  in R^{R x D}: a greedy k-center coreset of all support patch features;
  mu in R^{P x D}: the mean support feature at each of the P grid positions.
For a query's patch features Q in R^{P x D} we solve, for W in R^{P x R},

    min_W ||W S - Q||_F^2 + lambda ||W S - mu||_F^2 + rho ||W||_F^2

The first term reconstructs the query from normal features, the second (the distribution
regularisation) pulls the reconstruction towards the normal features expected at that
position, so an anomalous region cannot simply be copied; rho is a small ridge
(rho = ridge * trace(S S^T) / R) that keeps the R x R system well posed when S S^T is
singular (duplicated patches). Setting the gradient to zero:

    W = (Q + lambda mu) S^T ((1 + lambda) S S^T + rho I)^-1,
    Q_hat = W S = (Q + lambda mu) M,   M = S^T ((1 + lambda) S S^T + rho I)^-1 S   (D x D).

M depends only on the support set, so it is computed once at fit (solved in float64 with
a Cholesky factorisation, not inverted) and each query costs one P x D x D product.
Anomaly map: ||Q - Q_hat|| per patch, upsampled and smoothed; image score: max of the map.

Defaults: lambda = 2 (the official code's). R = 64: R must stay well below D (152),
otherwise the span of S is all of R^D, M -> I / (1 + lambda) and the "reconstruction" is a
blend of the query with mu that reproduces defects too. mu needs roughly aligned images;
when support or query grids differ in size, mu is resized bilinearly to the query's grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

import torch
import torch.nn.functional as F

from defectscope.components.features import flatten_patches, patch_features
from defectscope.components.memory import greedy_coreset
from defectscope.data.datasets import Sample
from defectscope.detectors.base import CNNDetector, Prediction, Progress, ScoreGraph, patch_scores_to_maps, register
from defectscope.errors import ConfigError


@register
class FastRecon(CNNDetector):
    """Few-shot reconstruction with a distribution-regularised closed-form regression."""

    name = "fastrecon"

    def __init__(
        self,
        *,
        lam: float = 2.0,
        coreset_size: int = 64,
        ridge: float = 1e-4,
        patch_size: int = 3,
        seed: int = 0,
        **cnn: Any,
    ) -> None:
        super().__init__(**cnn)
        if lam < 0 or coreset_size < 1 or ridge < 0:
            raise ConfigError("FastRecon needs lam >= 0, coreset_size >= 1 and ridge >= 0.")
        self.lam, self.coreset_size, self.ridge = lam, coreset_size, ridge
        self.patch_size, self.seed = patch_size, seed
        self.support = torch.empty(0)
        self.mu = torch.empty(0)
        self.projector = torch.empty(0)
        self.n_support: int | None = None  # support images behind mu (None: a file from before it was kept)

    def config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            "lam": self.lam,
            "coreset_size": self.coreset_size,
            "ridge": self.ridge,
            "patch_size": self.patch_size,
            "seed": self.seed,
        }

    def state(self) -> dict[str, torch.Tensor]:
        out = {"support": self.support, "mu": self.mu}
        if self.n_support is not None:
            out["n_support"] = torch.tensor([self.n_support])
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.support, self.mu = state["support"].float(), state["mu"].float()
        self.n_support = int(state["n_support"][0]) if "n_support" in state else None
        self.projector = self._projector(self.support)

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "coreset_size": int(self.support.shape[0]), "feature_dim": int(self.support.shape[-1])}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return patch_features(self.backbone(x), self.patch_size)

    def _projector(self, s: torch.Tensor) -> torch.Tensor:
        """M = S^T ((1 + lambda) S S^T + rho I)^-1 S, solved in float64."""
        s64 = s.double()
        gram = s64 @ s64.T
        rho = self.ridge * float(torch.trace(gram)) / max(1, s.shape[0])
        a = (1 + self.lam) * gram + rho * torch.eye(s.shape[0], dtype=torch.float64)
        return (s64.T @ torch.cholesky_solve(s64, torch.linalg.cholesky(a))).float()

    def _support_maps(self, images: Iterable[Sample], progress: Progress | None = None) -> list[torch.Tensor]:
        """Patch feature maps (1 x D x h x w) of each support image."""
        maps = []
        for i, s in enumerate(images):
            maps.append(self.embed(s.image[None]))
            if progress:
                progress("features", i + 1, 0)
        return maps

    def _install(self, patches: torch.Tensor, mu_sum: torch.Tensor, n: int) -> None:
        """mu = mean map of the n support images; S = k-center coreset of ``patches``."""
        self.mu, self.n_support = mu_sum / n, n
        keep = greedy_coreset(patches, min(self.coreset_size, len(patches)), seed=self.seed)
        self.support = patches[keep].contiguous()
        self.projector = self._projector(self.support)

    @staticmethod
    def _on_grid(maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Sum of the support maps, each resized to ``grid``."""
        return torch.cat([F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]).sum(0)

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("FastRecon needs at least one normal support image.")
        maps = self._support_maps(images, progress)
        if not maps:
            raise ConfigError("FastRecon got no support images.")
        patches = torch.cat([flatten_patches(m) for m in maps])
        self._install(patches, self._on_grid(maps, tuple(maps[0].shape[-2:])), len(maps))
        return self

    def add_normals(self, images: Iterable[Sample]) -> dict[str, Any]:
        """Add support images: mu becomes the mean over old and new images, and S the
        coreset of the old support patches and the new images' patches."""
        if self.n_support is None:
            raise ConfigError("This FastRecon model file predates adding normal images (no support count); refit it.")
        maps = self._support_maps(images)
        if not maps:
            return {"added_images": 0, "support_images": self.n_support}
        patches = torch.cat([self.support, *[flatten_patches(m) for m in maps]])
        mu_sum = self.mu * self.n_support + self._on_grid(maps, tuple(self.mu.shape[-2:]))
        self._install(patches, mu_sum, self.n_support + len(maps))
        return {"added_images": len(maps), "support_images": self.n_support}

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        """Q_hat = (Q + lambda mu) M for N x D x h x w features (mu resized to h x w)."""
        mu = self.mu[None]
        if mu.shape[-2:] != feats.shape[-2:]:
            mu = F.interpolate(mu, size=feats.shape[-2:], mode="bilinear", align_corners=False)
        target = (feats + self.lam * mu).permute(0, 2, 3, 1)
        return (target @ self.projector).permute(0, 3, 1, 2)

    def predict(self, batch: torch.Tensor) -> Prediction:
        feats = self.embed(batch)
        residual = (feats - self.reconstruct(feats)).norm(dim=1)
        maps = patch_scores_to_maps(residual, tuple(batch.shape[-2:]), self.sigma)
        return Prediction(maps.flatten(1).max(1).values, maps)

    def export_graph(self) -> ScoreGraph:
        return ScoreGraph(self.predict, self.backbone)
