"""PatchCore (Roth et al., CVPR 2022): memory bank of locally aware patch features.

Fit: patch features of all normal images form the bank M; greedy k-center selection keeps
a coreset M_C (``coreset_ratio`` of M). Predict: each test patch's score is its distance
to the nearest bank entry; the map is upsampled and smoothed (sigma 4). Image score
(``image_score="paper"``, eq. 7), with m_test* the most anomalous patch, m* its nearest
bank entry and N_b(m*) the b nearest bank entries of m*:

    s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * ||m_test* - m*||

``image_score="max"`` is the reference code's plain maximum of the patch scores.

``whole_image`` (weight w, default 0 = off): a whole-image branch for anomalies no patch
shows (`components.whole_image`: a Gaussian of pooled stage statistics, its exceedance e
over the normal images' held-out range). It is added to the image score, in the patch
scores' own unit u (the median over up to 64 training images of their largest patch
distance to the bank without their own entries):

    s' = s + w * u * e(x)

so w = 1 lifts an image at the whole-image 95th percentile of normal by one typical normal
patch score. The threshold's held-out scores carry the term too, so the stated false-alarm
rate still holds. The map stays the patch map: a term shared by every pixel of an image
would say nothing about *where*, and shifting whole maps by different amounts cost pixel
AUROC across images (0.877 to 0.698 on battery_weld). So a part flagged by this branch alone
can show no region above the threshold. Not with tiles (a tile has no whole-image
statistics).

``index``: "flat" (exact search, the default) or an approximate faiss index ("hnsw",
"ivfpq"; `defectscope.components.ann`) built at fit time over the coreset and saved in the model
file, with ``index_params`` (e.g. ``{"ef_search": 64}``). The leave-one-image-out normal
scores behind the threshold are always exact (see benchmarks/ann_search.py for how close
approximate search comes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar, Self

import numpy as np
import torch

from defectscope.components.ann import AnnIndex, check_params
from defectscope.components.features import flatten_patches, patch_features
from defectscope.components.memory import Index, covering_radius, greedy_coreset
from defectscope.components.whole_image import FOLDS as WI_FOLDS
from defectscope.components.whole_image import WholeImageGaussian, pooled_stats
from defectscope.data.datasets import Record, Sample, batches
from defectscope.data.fewshot import fold_of
from defectscope.data.tiles import boxes, training_samples
from defectscope.detectors.base import (
    CNNDetector,
    NormalScores,
    Prediction,
    Progress,
    ScoreGraph,
    check_ratio,
    patch_scores_to_maps,
    register,
)
from defectscope.errors import ConfigError

CROSS_FIT_THREADS = 2  # folds whose coresets are selected at once (the selection loop is single-threaded)
RADIUS_SAMPLE = 16384  # training patches on which the coreset's covering radius is measured
UNIT_IMAGES = 64  # training images whose held-out patch scores set the whole-image branch's unit
# How the training images' own scores (behind the threshold) are made with a coreset:
# "cross-fit" re-selects the coreset per fold; "leave-one-out" drops the image's entries
# from the coreset selected with it (faster, and pessimistic: see `fit_scored`).
NORMAL_SCORES = ("cross-fit", "leave-one-out")


@dataclass(frozen=True)
class _Grid:
    """One training sample's place in the bank: its image, feature grid and input size
    (and the scaled image's size, which differs for tiles)."""

    image: int
    h: int
    w: int
    size: tuple[int, int]
    image_size: tuple[int, int]


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
        index: str = "flat",
        index_params: dict[str, Any] | None = None,
        seed: int = 0,
        batch_size: int = 8,
        normal_scores: str = "cross-fit",
        whole_image: float = 0.0,
        **cnn: Any,
    ) -> None:
        super().__init__(**cnn)
        if not (isinstance(whole_image, int | float) and math.isfinite(whole_image) and whole_image >= 0):
            raise ConfigError(f"whole_image is the whole-image branch's weight, a number >= 0 (0: off); got {whole_image!r}.")
        if whole_image and self.preprocess.tile is not None:
            raise ConfigError("whole_image needs whole images (a tile has no whole-image statistics): drop --tile or set whole_image=0.")
        self.whole_image = float(whole_image)
        self.wi: WholeImageGaussian | None = None
        self.wi_unit = 0.0  # the patch scores' unit u of the whole-image term
        self._wi_held: np.ndarray | None = None  # their whole-image scores, each held out of its Gaussian
        if image_score not in ("paper", "max"):
            raise ConfigError(f"image_score must be 'paper' or 'max', got {image_score!r}.")
        if normal_scores not in NORMAL_SCORES:
            raise ConfigError(f"normal_scores must be one of {', '.join(NORMAL_SCORES)}, got {normal_scores!r}.")
        self.normal_scores = normal_scores
        self.coreset_ratio = check_ratio("coreset_ratio", coreset_ratio)
        self.proj_dim, self.patch_size, self.dim = proj_dim, patch_size, dim
        self.num_neighbors, self.image_score = num_neighbors, image_score
        self.knn_backend, self.seed, self.batch_size = knn_backend, seed, batch_size
        self.index_kind, self.index_params = index, check_params(index, index_params)
        self.bank = torch.empty(0)
        self.radius: float | None = None  # covering radius of the coreset over the training patches
        self._index: Index | AnnIndex | None = None
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
            "index": self.index_kind,
            "index_params": self.index_params,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "normal_scores": self.normal_scores,
            "whole_image": self.whole_image,
        }

    def state(self) -> dict[str, torch.Tensor]:
        out = {"bank": self.bank}
        if self.radius is not None:
            out["radius"] = torch.tensor([self.radius])
        if isinstance(self._index, AnnIndex):  # built whenever index != flat; never build an exact one to save
            out["ann_index"] = self._index.to_tensor()
        if self.wi is not None:
            out.update(self.wi.state(), wi_unit=torch.tensor([self.wi_unit]))
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.bank, self._index = state["bank"].float(), None
        self.radius = float(state["radius"][0]) if "radius" in state else None
        self.wi = WholeImageGaussian.from_state(state)
        self.wi_unit = float(state["wi_unit"][0]) if "wi_unit" in state else 0.0
        if self.whole_image and self.wi is None:
            raise ConfigError("This PatchCore model asks for whole_image but holds no whole-image branch; refit it.")
        if self.index_kind != "flat":
            if "ann_index" not in state:
                raise ConfigError(f"This PatchCore model asks for index={self.index_kind} but holds none; refit it.")
            self._index = AnnIndex.from_tensor(state["ann_index"], self.bank, self.index_kind, self.index_params)

    def _set_bank(self, bank: torch.Tensor) -> None:
        """Install ``bank``; an approximate index is built over it now (fit time), an exact one on first use."""
        self.bank = bank.contiguous()
        self._index = None if self.index_kind == "flat" else AnnIndex.build(self.bank, self.index_kind, self.index_params, seed=self.seed)

    @property
    def index(self) -> Index | AnnIndex:
        """Nearest-neighbour index over the bank (exact: built on first use)."""
        if self._index is None:
            self._index = Index(self.bank, self.knn_backend)
        return self._index

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "bank_size": int(self.bank.shape[0]), "feature_dim": int(self.bank.shape[-1])}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features N x D x h x w."""
        return self.features(x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch features N x D x h x w and, with the whole-image branch, pooled stage
        statistics N x D' (one backbone pass for both)."""
        stages = self.backbone(x)
        return patch_features(stages, self.patch_size, self.dim), pooled_stats(stages) if self.whole_image else None

    def _collect(
        self, images: Iterable[Sample], progress: Progress | None
    ) -> tuple[torch.Tensor, torch.Tensor, list[_Grid], torch.Tensor | None]:
        """All patch features (rows), the training image each row came from (tiles of one
        image share its index), per sample its feature grid, and with the whole-image
        branch each image's pooled statistics (else None)."""
        feats, owners, grids, pooled = [], [], [], []
        path, image = None, -1
        for batch in batches(iter(images), self.batch_size):
            x = torch.stack([s.image for s in batch])
            fmap, stats = self.features(x)
            if stats is not None:
                pooled.append(stats)
            h, w = fmap.shape[-2:]
            feats.append(flatten_patches(fmap))
            for s in batch:
                image += s.path != path
                path = s.path
                grids.append(_Grid(image, h, w, tuple(x.shape[-2:]), s.geometry.input))
            owners.append(torch.tensor([g.image for g in grids[-len(batch) :]]).repeat_interleave(h * w))
            if progress:
                progress("features", len(grids), 0)
        if not feats:
            raise ConfigError("PatchCore got no training images; check the training folder.")
        return torch.cat(feats), torch.cat(owners), grids, torch.cat(pooled) if pooled else None

    def _select(self, bank: torch.Tensor, progress: Progress | None) -> torch.Tensor:
        """Greedy coreset of the bank; installs it and returns the kept rows' indices."""
        n = max(1, math.ceil(self.coreset_ratio * bank.shape[0]))
        report = (lambda i, total: progress("coreset", i, total)) if progress else None
        keep = greedy_coreset(bank, n, proj_dim=self.proj_dim, seed=self.seed, progress=report)
        t0 = time.perf_counter()
        self._set_bank(bank[keep])
        self.timings["index_s"] = time.perf_counter() - t0
        full = keep.numel() == bank.shape[0]
        self.radius = 0.0 if full else covering_radius(bank, keep, max_rows=RADIUS_SAMPLE, seed=self.seed)
        return keep

    def _fit_bank(self, images: Iterable[Sample], progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor, list[_Grid], torch.Tensor]:
        """Build the bank; return the full patch features, their owners, grids and kept rows."""
        t0 = time.perf_counter()
        bank, owner, grids, pooled = self._collect(images, progress)
        t1 = time.perf_counter()
        self.timings = {}
        keep = self._select(bank, progress)
        self._fit_whole_image(pooled, bank, owner, keep, grids)
        self.timings.update({
            "features_s": t1 - t0,
            "coreset_s": time.perf_counter() - t1 - self.timings["index_s"],
            "patches": float(bank.shape[0]),
            "images": float(grids[-1].image + 1),
            "tiles": float(len(grids)),
        })
        return bank, owner, grids, keep

    def _fit_whole_image(
        self, pooled: torch.Tensor | None, bank: torch.Tensor, owner: torch.Tensor, keep: torch.Tensor, grids: list[_Grid]
    ) -> None:
        """Fit the whole-image Gaussian on the pooled statistics and set its unit u (module
        docstring); keeps the branch's held-out scores for `fit_scored`."""
        self.wi, self.wi_unit, self._wi_held = None, 0.0, None
        if pooled is None:
            return
        self.wi, self._wi_held = WholeImageGaussian.fit(pooled, seed=self.seed)
        n_images = grids[-1].image + 1
        kept_owner = owner[keep]
        largest = []
        for i in np.random.default_rng(self.seed).permutation(n_images)[:UNIT_IMAGES].tolist():
            if (without := self._bank_without(kept_owner, i)) is not None:
                largest.append(without[1].nearest_distances(bank[owner == i]).max())
        self.wi_unit = float(torch.stack(largest).median()) if largest else 0.0

    def _bank_without(self, kept_owner: torch.Tensor, image: int) -> tuple[torch.Tensor, Index] | None:
        """The fitted bank without training image ``image``'s entries (``kept_owner``: each
        entry's image) and an exact index over it; None when every entry is that image's."""
        others = kept_owner != image
        if not others.any():
            return None
        sub = self.bank[others]
        return sub, Index(sub, self.knn_backend)

    def _whole_image_term(self, distance: torch.Tensor | np.ndarray) -> torch.Tensor:
        """w * u * e for whole-image distances g."""
        return self.whole_image * self.wi_unit * self.wi.exceedance(distance)

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("PatchCore needs normal training images (at least one).")
        self._fit_bank(images, progress)
        return self

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 10, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Fit, then score every training image with a bank that never saw it, as a test
        image is scored (with tiling, its tile maps stitched as at predict time). No second
        backbone pass: the features of the fit are reused.

        - Whole bank kept (few-shot, ``coreset_ratio=1``): exact leave-one-image-out, the
          bank without the image's own entries.
        - With a coreset: ``folds``-fold cross-fitting, each fold's coreset *selected
          again* from the other folds' patches, as many entries as the fitted one (the
          coverage of the part's appearance a coreset gives rests on its size). Leaving an image's
          entries out of a coreset selected with it is pessimistic: greedy k-center takes
          that image's own patches as centres wherever nothing else covers them, and
          removing them leaves holes no test image meets; the threshold then sits above
          where test scores of normal parts fall (0 false alarms where 1% was stated, and
          the recall given away with them). 10 folds: with 5 (80% of the patches per
          fold) the stated 2% came out at 0.3% on magnetic_tile; with 10 every stated
          rate from 1% to 10% lies in the 95% interval of the realized one on
          magnetic_tile and bsdata (benchmarks/thresholds.py). Costs ``folds`` extra
          coreset selections.
        """
        bank, owner, grids, keep = self._fit_bank(training_samples(records, self.preprocess), progress)
        n_images = grids[-1].image + 1
        if n_images < 2:
            return None
        t0 = time.perf_counter()
        starts = [0]
        for g in grids:
            starts.append(starts[-1] + g.h * g.w)
        by_image = {i: list(group) for i, group in groupby(range(len(grids)), key=lambda k: grids[k].image)}
        parts, order = [], []
        full = keep.numel() == bank.shape[0]
        if full or self.normal_scores == "leave-one-out":
            how = "leave-one-image-out" + ("" if full else " of the fitted coreset")
            kept_owner = owner[keep]
            for i, mine in by_image.items():
                if (without := self._bank_without(kept_owner, i)) is None:
                    continue  # every bank entry came from this image: nothing to compare it with
                parts.append(self._held_out(mine, *without, bank, starts, grids))
                order.append(i)
                if progress:
                    progress("normal scores", i + 1, n_images)
        else:
            k = min(folds, n_images)
            how = f"{k}-fold cross-fitting, coreset selected again per fold"
            fold = torch.as_tensor(fold_of(n_images, k, seed))
            row_fold = fold[owner]

            def cross_fit(f: int) -> list[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
                rows = bank[row_fold != f]
                chosen = greedy_coreset(rows, min(keep.numel(), rows.shape[0]), proj_dim=self.proj_dim, seed=self.seed)
                sub = rows[chosen]
                index = Index(sub, self.knn_backend)
                return [(i, self._held_out(by_image[i], sub, index, bank, starts, grids)) for i in torch.nonzero(fold == f).flatten().tolist()]

            # The folds are independent and the coreset's loop holds one core: two at a time on two cores.
            with ThreadPoolExecutor(max_workers=max(1, min(k, os.cpu_count() or 1, CROSS_FIT_THREADS))) as pool:
                for f, scored in enumerate(pool.map(cross_fit, range(k))):
                    for i, part in scored:
                        parts.append(part)
                        order.append(i)
                    if progress:
                        progress("cross-fit", f + 1, k)
        self.timings["normal_scores_s"] = time.perf_counter() - t0
        if self.wi is not None:
            term = self._whole_image_term(self._wi_held).numpy()
            parts = [(part[0] + term[i], *part[1:]) for part, i in zip(parts, order, strict=True)]
            how += f", whole-image branch held out in {WI_FOLDS} folds"
        return NormalScores.collect(parts, order, how) if len(order) >= 2 else None

    def _held_out(
        self, mine: list[int], sub: torch.Tensor, index: Index, bank: torch.Tensor, starts: list[int], grids: list[_Grid]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One training image (its samples ``mine``) scored against ``sub``, a bank without it."""
        query = bank[starts[mine[0]] : starts[mine[-1] + 1]]
        dist = index.nearest_distances(query)
        g = grids[mine[0]]
        maps = patch_scores_to_maps(dist.view(len(mine), g.h, g.w), g.size, self.sigma)
        if self.preprocess.tile is None:
            pred = Prediction(self._image_scores(query[None], dist[None], sub, index), maps)
        else:
            pred = self.stitched(maps, boxes(*g.image_size, self.preprocess), g.image_size)
        return NormalScores.summarize(pred)

    def add_normals(self, images: Iterable[Sample]) -> dict[str, Any]:
        """Append the new normal images' patch features that lie farther from the bank than
        its covering radius: the bank grows only where it was missing something (with the
        whole bank kept, radius 0, every new patch not already in it). An image none of
        whose patches lies that far adds its farthest patch, so every image taught as normal
        scores lower afterwards (a false alarm an inspector corrects is never ignored). The
        whole-image branch's Gaussian is fitted again with the new images in it."""
        if self.radius is None:
            raise ConfigError("This PatchCore model file predates adding normal images (no covering radius); refit it.")
        before, added, pooled = self.bank.shape[0], [], []
        for batch in batches(iter(images), self.batch_size):
            fmap, stats = self.features(torch.stack([s.image for s in batch]))
            feats = flatten_patches(fmap)
            if stats is not None:
                pooled.append(stats)
            dist = self.index.nearest_distances(feats).view(len(batch), -1)
            far = dist > self.radius
            far[torch.arange(len(batch)), dist.argmax(1)] = True
            added.append(feats[far.flatten()])
        new = torch.cat(added) if added else torch.empty(0, self.bank.shape[1])
        self._set_bank(torch.cat([self.bank, new]))
        if self.wi is not None and pooled:
            self.wi, _ = WholeImageGaussian.fit(torch.cat([self.wi.pooled, *pooled]), seed=self.seed)
        return {"added_patches": int(new.shape[0]), "bank_before": before, "bank_after": int(self.bank.shape[0]), "radius": self.radius}

    def predict(self, batch: torch.Tensor) -> Prediction:
        t0 = time.perf_counter()
        fmap, pooled = self.features(batch)
        t1 = time.perf_counter()
        pred = self.score_features(fmap, tuple(batch.shape[-2:]), pooled=pooled)
        self.timings["backbone_s"] = self.timings.get("backbone_s", 0.0) + t1 - t0
        self.timings["scoring_s"] = self.timings.get("scoring_s", 0.0) + time.perf_counter() - t1
        return pred

    def score_features(
        self, fmap: torch.Tensor, size: tuple[int, int], index: Index | AnnIndex | None = None, pooled: torch.Tensor | None = None
    ) -> Prediction:
        """Scores and maps (at input ``size``) from patch features N x D x h x w (and the
        pooled statistics of the whole-image branch): the search part of `predict`, in the
        model's own index unless another is given."""
        index = self.index if index is None else index
        n, _, h, w = fmap.shape
        query = flatten_patches(fmap)
        dist = index.nearest_distances(query)
        maps = patch_scores_to_maps(dist.view(n, h, w), size, self.sigma)
        scores = self._image_scores(query.view(n, h * w, -1), dist.view(n, -1), self.bank, index)
        if self.wi is not None and pooled is not None:
            scores = scores + self._whole_image_term(self.wi.distance(pooled))
        return Prediction(scores, maps)

    def export_graph(self) -> ScoreGraph:
        """Exact search as matrix products over the bank in 1024-row tiles (`memory.Index`
        with the torch backend, whatever ``knn_backend`` says: faiss is not a graph op).
        An approximate index is refused: exporting it as exact search would change scores."""
        if self.index_kind != "flat":
            raise ConfigError(
                f"This PatchCore model searches an approximate {self.index_kind} index, which an ONNX/OpenVINO graph "
                "cannot hold; exporting exact search instead would change its scores. Refit with --set index=flat to export."
            )
        exact = Index(self.bank, "torch")

        def score(x: torch.Tensor) -> Prediction:
            fmap, pooled = self.features(x)
            return self.score_features(fmap, tuple(x.shape[-2:]), exact, pooled)

        return ScoreGraph(score, self.backbone)

    def _image_scores(self, query: torch.Tensor, dist: torch.Tensor, bank: torch.Tensor, index: Index | AnnIndex) -> torch.Tensor:
        """Eq. 7 re-weighting of the largest patch distance (or the plain max), against ``bank``.
        m* is found again for the N most anomalous patches only (an N-row search), so the
        search over all patches needs no indices."""
        s_star, j = dist.max(dim=1)
        if self.image_score == "max" or bank.shape[0] < 2:
            return s_star
        rows = torch.arange(query.shape[0])
        m_test = query[rows, j]
        _, nearest = index.search(m_test, 1)
        m_star = bank[nearest[:, 0]]
        _, support = index.search(m_star, self.num_neighbors)
        d_support = (m_test[:, None, :] - bank[support]).norm(dim=2)
        weight = 1.0 - torch.softmax(d_support, dim=1)[:, 0]
        return weight * s_star
