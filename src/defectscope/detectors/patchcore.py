"""PatchCore (Roth et al., CVPR 2022): memory bank of locally aware patch features.

Fit: patch features of all normal images form the bank M; greedy k-center selection keeps
a coreset M_C (``coreset_ratio`` of M). Predict: each test patch's score is its distance
to the nearest bank entry; the map is upsampled and smoothed (sigma 4). Image score
(``image_score="paper"``, eq. 7), with m_test* the most anomalous patch, m* its nearest
bank entry and N_b(m*) the b nearest bank entries of m*:

    s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * ||m_test* - m*||

``image_score="max"`` is the reference code's plain maximum of the patch scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Self

import torch

from defectscope.data.datasets import Sample, batches
from defectscope.detectors.base import (
    CNNDetector,
    Prediction,
    Progress,
    check_ratio,
    patch_scores_to_maps,
    register,
)
from defectscope.errors import ConfigError
from defectscope.features import flatten_patches, patch_features
from defectscope.memory import Index, greedy_coreset


@register
class PatchCore(CNNDetector):
    """PatchCore; full-shot with a 1% coreset by default, few-shot with ``coreset_ratio=1``."""

    name = "patchcore"
    # A few images give a few thousand patches: keep them all (no coreset) in the k-shot protocol.
    fewshot_config: ClassVar[dict[str, Any]] = {"coreset_ratio": 1.0}

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.01,
        proj_dim: int | None = 128,
        patch_size: int = 3,
        dim: int | None = None,
        num_neighbors: int = 9,
        image_score: str = "paper",
        knn_backend: str = "torch",
        seed: int = 0,
        batch_size: int = 8,
        **cnn: Any,
    ) -> None:
        super().__init__(**cnn)
        if image_score not in ("paper", "max"):
            raise ConfigError(f"image_score must be 'paper' or 'max', got {image_score!r}.")
        self.coreset_ratio = check_ratio("coreset_ratio", coreset_ratio)
        self.proj_dim, self.patch_size, self.dim = proj_dim, patch_size, dim
        self.num_neighbors, self.image_score = num_neighbors, image_score
        self.knn_backend, self.seed, self.batch_size = knn_backend, seed, batch_size
        self.bank = torch.empty(0)
        self._index: Index | None = None
        self.timings: dict[str, float] = {}

    def config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            "coreset_ratio": self.coreset_ratio,
            "proj_dim": self.proj_dim,
            "patch_size": self.patch_size,
            "dim": self.dim,
            "num_neighbors": self.num_neighbors,
            "image_score": self.image_score,
            "knn_backend": self.knn_backend,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.bank, self._index = state["bank"].float(), None

    @property
    def index(self) -> Index:
        """Nearest-neighbour index over the bank, built on first use."""
        if self._index is None:
            self._index = Index(self.bank, self.knn_backend)
        return self._index

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "bank_size": int(self.bank.shape[0]), "feature_dim": int(self.bank.shape[-1])}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features N x D x h x w."""
        return patch_features(self.backbone(x), self.patch_size, self.dim)

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("PatchCore needs normal training images (at least one).")
        t0 = time.perf_counter()
        feats, done = [], 0
        for batch in batches(iter(images), self.batch_size):
            feats.append(flatten_patches(self.embed(torch.stack([s.image for s in batch]))))
            done += len(batch)
            if progress:
                progress("features", done, 0)
        if not feats:
            raise ConfigError("PatchCore got no training images; check the training folder.")
        bank = torch.cat(feats)
        t1 = time.perf_counter()
        n = max(1, math.ceil(self.coreset_ratio * bank.shape[0]))
        report = (lambda i, total: progress("coreset", i, total)) if progress else None
        keep = greedy_coreset(bank, n, proj_dim=self.proj_dim, seed=self.seed, progress=report)
        self.bank, self._index = bank[keep].contiguous(), None
        self.timings = {
            "features_s": t1 - t0,
            "coreset_s": time.perf_counter() - t1,
            "patches": float(bank.shape[0]),
            "images": float(done),
        }
        return self

    def predict(self, batch: torch.Tensor) -> Prediction:
        t0 = time.perf_counter()
        fmap = self.embed(batch)
        t1 = time.perf_counter()
        n, _, h, w = fmap.shape
        query = flatten_patches(fmap)
        dist, nn_idx = self.index.search(query, 1)
        patch = dist[:, 0].view(n, h, w)
        maps = patch_scores_to_maps(patch, tuple(batch.shape[-2:]), self.sigma)
        scores = self._image_scores(query.view(n, h * w, -1), dist[:, 0].view(n, -1), nn_idx[:, 0].view(n, -1))
        self.timings["backbone_s"] = self.timings.get("backbone_s", 0.0) + t1 - t0
        self.timings["scoring_s"] = self.timings.get("scoring_s", 0.0) + time.perf_counter() - t1
        return Prediction(scores, maps)

    def _image_scores(self, query: torch.Tensor, dist: torch.Tensor, nn_idx: torch.Tensor) -> torch.Tensor:
        """Eq. 7 re-weighting of the largest patch distance (or the plain max)."""
        s_star, j = dist.max(dim=1)
        if self.image_score == "max" or self.bank.shape[0] < 2:
            return s_star
        rows = torch.arange(query.shape[0])
        m_test = query[rows, j]
        m_star = self.bank[nn_idx[rows, j]]
        _, support = self.index.search(m_star, self.num_neighbors)
        d_support = (m_test[:, None, :] - self.bank[support]).norm(dim=2)
        weight = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
        return weight * s_star
