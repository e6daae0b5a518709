"""MuSc (Li et al., ICLR 2024): zero-shot mutual scoring of a batch of unlabeled images.

No training images, no text model. Defects are rare, so a normal patch finds close
matches in the *other* images of the batch and a defective one does not:

1. Patch features (PatchCore's stages) aggregated over neighbourhoods r in ``radii``
   (r = 1 keeps small defects sharp, larger r lets large defects stand out).
2. For image i, patch p and another image j: d_j(p) = min_q ||f_i(p) - f_j(q)||. The
   patch score is the mean of the smallest ``fraction`` (30%) of {d_j(p)}_j, which stays
   low for normal patches even when some other images are defective too. Scores are
   averaged over r. Each image is compared with a seeded random subset of ``max_refs``
   other images (all of them when the batch is smaller), so the cost is
   O(N * M * P^2 * D) for N images of P patches and M references: linear in N.
3. Image score: mean of the top ``topk`` fraction of patch scores; then optionally
   re-scored with the image-level neighbourhood (``rescore``): each score is replaced by
   the similarity-weighted mean over the image and its ``neighbours`` most similar images
   by global feature (a simplified form of the paper's RsCIN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Self

import torch

from defectscope.components.features import fuse_stages, local_aggregate
from defectscope.data.datasets import Sample
from defectscope.detectors.base import CNNDetector, Prediction, Progress, patch_scores_to_maps, register
from defectscope.errors import ConfigError


@register
class MuSc(CNNDetector):
    """Transductive: `predict_samples` scores a whole batch of unlabeled images at once."""

    name = "musc"
    export_refusal: ClassVar[str] = "it scores the test images against each other (transductive), so no single image has a score a graph could compute"
    needs_training_images: ClassVar[bool] = False
    tiling_refusal: ClassVar[str | None] = "it scores whole images against each other (transductive)"

    def __init__(
        self,
        *,
        radii: tuple[int, ...] = (1, 3, 5),
        fraction: float = 0.3,
        max_refs: int = 16,
        topk: float = 0.01,
        rescore: bool = True,
        neighbours: int = 5,
        seed: int = 0,
        refs_per_step: int = 8,
        **cnn: Any,
    ) -> None:
        super().__init__(**cnn)
        if not 0 < fraction <= 1 or not 0 < topk <= 1 or max_refs < 1:
            raise ConfigError("MuSc needs 0 < fraction <= 1, 0 < topk <= 1 and max_refs >= 1.")
        self.radii, self.fraction, self.max_refs = tuple(radii), fraction, max_refs
        self.topk, self.rescore, self.neighbours = topk, rescore, neighbours
        self.seed, self.refs_per_step = seed, refs_per_step

    def config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            "radii": list(self.radii),
            "fraction": self.fraction,
            "max_refs": self.max_refs,
            "topk": self.topk,
            "rescore": self.rescore,
            "neighbours": self.neighbours,
            "seed": self.seed,
            "refs_per_step": self.refs_per_step,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        return None

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        """Nothing to learn: MuSc only looks at the batch it scores."""
        return self

    def predict(self, batch: torch.Tensor) -> Prediction:
        if batch.shape[0] < 2:
            raise ConfigError("MuSc scores images against each other: give it at least two images.")
        return self._score([batch[i] for i in range(batch.shape[0])])

    def predict_samples(self, samples: Iterable[Sample], batch_size: int = 8) -> Iterator[tuple[list[Sample], Prediction]]:
        items = list(samples)
        if len(items) < 2:
            raise ConfigError("MuSc scores images against each other: give it at least two images.")
        pred = self._score([s.image for s in items])
        for i, s in enumerate(items):
            size = s.image.shape[-2:]
            yield [s], Prediction(pred.scores[i : i + 1], pred.maps[i, : size[0], : size[1]][None])

    def _features(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Per radius a padded N x Pmax x D tensor, a validity mask N x Pmax, global features, grids."""
        per_r: list[list[torch.Tensor]] = [[] for _ in self.radii]
        globals_, grids = [], []
        for img in images:
            fmaps = self.backbone(img[None])
            globals_.append(torch.cat([f.mean(dim=(2, 3)) for f in fmaps], 1)[0])
            for i, r in enumerate(self.radii):
                fused = fuse_stages([local_aggregate(f, r) for f in fmaps])[0]
                per_r[i].append(fused.flatten(1).T)
            grids.append(tuple(fmaps[0].shape[-2:]))
        pmax = max(g[0] * g[1] for g in grids)
        valid = torch.zeros(len(images), pmax, dtype=torch.bool)
        for n, (h, w) in enumerate(grids):
            valid[n, : h * w] = True
        padded = []
        for feats in per_r:
            t = torch.zeros(len(images), pmax, feats[0].shape[1])
            for n, f in enumerate(feats):
                t[n, : f.shape[0]] = f
            padded.append(t)
        return padded, valid, torch.stack(globals_), grids

    def _references(self, n: int) -> torch.Tensor:
        """N x M indices of the other images each image is compared with (seeded subset)."""
        m = min(self.max_refs, n - 1)
        g = torch.Generator().manual_seed(self.seed)
        others = torch.stack([torch.randperm(n - 1, generator=g) for _ in range(n)])[:, :m]
        return others + (others >= torch.arange(n)[:, None]).long()  # skip the image itself

    def _mutual(self, feats: torch.Tensor, valid: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """N x Pmax patch scores: mean of the smallest `fraction` of per-image nearest distances."""
        n, pmax, _ = feats.shape
        sq = (feats * feats).sum(-1)
        keep = max(1, math.ceil(self.fraction * refs.shape[1]))
        scores = torch.zeros(n, pmax)
        for i in range(n):  # one image at a time; its references are processed in groups
            q, dists = feats[i], []
            for s in range(0, refs.shape[1], self.refs_per_step):
                r = refs[i, s : s + self.refs_per_step]
                d = torch.baddbmm(sq[r][:, None, :], q.expand(len(r), -1, -1), feats[r].transpose(1, 2), alpha=-2.0)
                d.masked_fill_(~valid[r][:, None, :], float("inf"))
                dists.append(d.min(dim=2).values)  # len(r) x Pmax
            per_ref = (torch.cat(dists) + sq[i][None]).clamp_(min=0).sqrt_()
            scores[i] = per_ref.topk(keep, dim=0, largest=False).values.mean(0)
        return scores

    def _score(self, images: list[torch.Tensor]) -> Prediction:
        """Scores and maps (padded to the largest image) for a batch of images of any sizes."""
        padded, valid, globals_, grids = self._features(images)
        refs = self._references(len(images))
        patch = torch.stack([self._mutual(f, valid, refs) for f in padded]).mean(0)
        size = (max(im.shape[-2] for im in images), max(im.shape[-1] for im in images))
        maps = torch.zeros(len(images), *size)
        image_scores = torch.zeros(len(images))
        for n, ((h, w), img) in enumerate(zip(grids, images, strict=True)):
            p = patch[n, : h * w]
            k = max(1, math.ceil(self.topk * p.numel()))
            image_scores[n] = p.topk(k).values.mean()
            maps[n, : img.shape[-2], : img.shape[-1]] = patch_scores_to_maps(p.view(1, h, w), tuple(img.shape[-2:]), self.sigma)[0]
        if self.rescore:
            image_scores = self._rescore(image_scores, globals_)
        return Prediction(image_scores, maps)

    def _rescore(self, scores: torch.Tensor, globals_: torch.Tensor) -> torch.Tensor:
        """Similarity-weighted mean of each image's score with its nearest images' scores."""
        g = torch.nn.functional.normalize(globals_, dim=1)
        sim = g @ g.T
        k = min(self.neighbours + 1, len(scores))
        top, idx = sim.topk(k, dim=1)  # includes the image itself (similarity 1)
        w = top.clamp(min=0)
        return (w * scores[idx]).sum(1) / w.sum(1)
