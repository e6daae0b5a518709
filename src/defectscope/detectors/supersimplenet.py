"""SuperSimpleNet (Rolih et al., ICPR 2024; mixed supervision: J. Intell. Manuf. 2025).

One discriminative model for every supervision regime: normal images alone, normal images
plus defects with an image label, or defects with a mask, mixed freely.

- Features: the frozen backbone's stages, bilinearly upscaled (align_corners, as the
  official FeatureExtractor) to ``upscale`` x the finest stage's grid and averaged over
  p x p neighbourhoods (PatchCore's aggregation): F, N x C x h x w.
- Adaptor: one 1 x 1 convolution C -> C (Xavier-normal init) on the standardized
  features: A = adapt((F - mu) / sd), mu and sd each channel's mean and deviation over the
  normal training images (``standardize``; not in the paper, see below).
- Anomalies in feature space, training only: the batch is duplicated; Gaussian noise
  N(0, ``noise_std``^2) is added to A inside a binarised Perlin mask (2^0..2^5 cells per axis,
  threshold ``perlin_thr``), and with probability 0.5 a copy gets none ("empty"). Real
  defects keep their masks (downsampled bilinearly, binarised at 0.5, as DestSeg and the
  official code; with ``keep_small``, ours, each outlined region also keeps the cell it
  covers most, see `feature_mask`); the mask becomes M' = [M + P > 0] and the label y' = [y or any(M')]. ``bad``: noise is also
  added on defective images; ``overlap``: also inside their masks.
- Segmentation head: conv1x1 C -> 1024, BN, LeakyReLU(0.2), conv1x1 -> 1 (no bias): the
  map m (logits). Classification head: conv5x5 on [A', m] -> 128, BN, ReLU; global max and
  mean of that and of m -> linear -> the score s (a logit). ``stop_grad`` detaches m where
  it feeds the classifier.
- Loss: focal(sigmoid(m), M') + focal(sigmoid(s), y') (gamma 4) + truncated L1 on m
  (normal pixels pushed below -0.5, anomalous above +0.5). Images with an image label
  only (no mask) contribute the classification loss alone.
- AdamW: lr 1e-4 adaptor, 2e-4 both heads (weight decay 1e-5); the lr x 0.4 at 80% and
  90% of training.
- Inference: m upsampled bilinearly to the input and smoothed (sigma 4); the image score
  is s. Both are logits, given here through softplus, log(1 + e^x): the same order, and
  positive, as the verdict rule needs of every score; and unlike sigmoid probabilities,
  which saturate at the top and lose the ranking a threshold needs, softplus keeps the
  logit's resolution there (softplus(x) ~ x) and float precision below (~ e^x).

The official configurations differ per regime, so the defaults do too (``None``): without
defects ``perlin_thr`` 0.2, ``stop_grad`` on, no gradient clipping, ``overlap`` on (the
MVTec unsupervised setup); with defects 0.6, off, clipping at norm 1, ``overlap`` off
(the supervised setup). Both use ``bad`` on.

The noise's scale is the trap. The paper's 0.015 is in the raw units of WideResNet-50's
post-ReLU features; EfficientNet-Lite's stages end in a linear projection whose channels
spread about 3, so 0.015 there is invisible: the unsupervised map ranked bsdata's pitting
*below* chance (pixel AUROC 0.19), and even at 0.015-0.15 of a channel's spread the training
loss stayed flat (1.10 -> 1.06-1.09 over 300 steps on bsdata). So features are
standardized per channel and ``noise_std`` is in units of each channel's spread: 0.5, the
smallest of 0.015 / 0.05 / 0.15 / 0.5 at which the
training loss halves within 300 steps on bsdata (a rule on the training loss alone;
the larger values were not tried), whatever the backbone.

CPU-first: the backbone is frozen, so every training image's features are computed once
and kept (float16) and the heads train on that cache. Departures from the official
training, for a CPU and for a line's few defects: ``steps`` (and an optional time budget
``budget_s``) of batch 8 instead of 300 epochs of batch 32 (the lr steps at 80%/90% of
whichever ends first; 0.7 s per step on 2 cores at 256 px); at most ``defect_share`` of
each batch are labelled defects, drawn with replacement, so ten defects among 600 normal
images are seen in every batch (the official loader draws uniformly); ``upscale`` 1 by
default (the paper's 2 quadruples the heads' cost).

The threshold stays a stated false-alarm rate on normal images only: `fit_scored` trains
on all labelled defects and all but a held-out share of the normal images and scores those
unseen (cross-fitting a network five times is too costly), so no labelled defect enters it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats
from torch import nn

from defectscope.components.features import flatten_patches, local_aggregate
from defectscope.components.memory import Index
from defectscope.data.datasets import Record, Sample, batches, iter_samples
from defectscope.detectors.base import (
    CNNDetector,
    NormalScores,
    Prediction,
    Progress,
    ScoreGraph,
    check_ratio,
    holdout_scored,
    patch_scores_to_maps,
    register,
)
from defectscope.errors import ConfigError
from defectscope.synthesis.masks import perlin_noise

log = logging.getLogger("defectscope")

PERLIN_SCALES = 6  # 2^0 .. 2^5 lattice cells per axis, as the official generator
REGIMES = {  # the official configurations: unsupervised (MVTec) and supervised (KSDD2)
    False: {"perlin_thr": 0.2, "stop_grad": True, "clip_grad": False, "overlap": True},
    True: {"perlin_thr": 0.6, "stop_grad": False, "clip_grad": True, "overlap": False},
}
HOLDOUT = 0.2  # share of normal images `fit_scored` keeps out of training, to score them unseen


def focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """Focal loss on probabilities (the official, from DeSTSeg): BCE x (1 - p_t)^gamma, mean."""
    ce = F.binary_cross_entropy(p, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (ce * (1 - p_t) ** gamma).mean()


class Heads(nn.Module):
    """Adaptor, segmentation head and classification head (module docstring)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, channels, 1, 1))
        self.register_buffer("scale", torch.ones(1, channels, 1, 1))
        self.adaptor = nn.Conv2d(channels, channels, 1)
        self.seg = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1, bias=False)
        )
        self.dec = nn.Sequential(nn.Conv2d(channels + 1, 128, 5, padding=2), nn.BatchNorm2d(128), nn.ReLU())
        self.fc = nn.Linear(128 * 2 + 2, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)

    def standardize_on(self, feats: torch.Tensor) -> None:
        """Centre and scale each channel by the normal features' own mean and deviation."""
        std, mean = torch.std_mean(feats.float(), dim=(0, 2, 3))
        self.center.copy_(mean.view_as(self.center))
        self.scale.copy_(std.clamp(min=1e-6).view_as(self.scale))

    def adapt(self, feats: torch.Tensor) -> torch.Tensor:
        """A = adapt((F - mean) / std)."""
        return self.adaptor((feats.float() - self.center) / self.scale)

    def discriminate(self, adapted: torch.Tensor, stop_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(map logits N x h x w, score logits N) from adapted (possibly perturbed) features."""
        m = self.seg(adapted)
        m_in = m.detach() if stop_grad else m
        d = self.dec(torch.cat([adapted, m_in], 1))
        pooled = torch.cat([d.amax((2, 3)), d.mean((2, 3)), m_in.amax((2, 3)), m_in.mean((2, 3))], 1)
        return m[:, 0], self.fc(pooled)[:, 0]


def perlin_masks(n: int, h: int, w: int, threshold: float, rng: np.random.Generator) -> torch.Tensor:
    """n binarised Perlin masks n x h x w (made at the next powers of two, resized), half of
    them emptied (the official "no_anomaly": "empty")."""
    ph, pw = 1 << (h - 1).bit_length(), 1 << (w - 1).bit_length()
    out = torch.zeros(n, h, w)
    for i in range(n):
        if rng.random() > 0.5:
            continue
        res = (2 ** int(rng.integers(0, PERLIN_SCALES)), 2 ** int(rng.integers(0, PERLIN_SCALES)))
        noise = torch.from_numpy(perlin_noise((ph, pw), res, rng)).float()
        out[i] = (F.interpolate(noise[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > threshold).float()
    return out


LOOKS_NORMAL_ROWS = 50_000  # normal patches a labelled defect is compared with (`warn_if_normal`)
LOOKS_NORMAL_QUANTILE = 0.9  # of normal images' most unusual patch distances, at or below which a "defect" looks normal
LOOKS_NORMAL_AUROC = 0.7  # the labelled set ranks above normal images with at most this AUROC: a warning


def most_unusual(index: Index, feats: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image, its patches' largest distance to the nearest normal patch, over the whole
    image and inside its mask (the whole image where the mask is empty: none was drawn)."""
    whole, inside = [], []
    for f, m in zip(feats, masks, strict=True):
        d = index.nearest_distances(flatten_patches(f[None].float())).reshape(m.shape)
        whole.append(float(d.max()))
        inside.append(float(d[m > 0].max()) if m.any() else whole[-1])
    return np.array(whole), np.array(inside)


def warn_if_normal(normal: dict[str, torch.Tensor], bad: dict[str, torch.Tensor], records: Sequence[Record], seed: int) -> list[str]:
    """Call out labelled defects that look like normal parts. Each image's most unusual
    patch is measured against half of the normal images, as the other half's are. A
    warning when the labelled set as a whole does not rank above those normal images
    (AUROC at most 0.7: a folder of good parts passed as defects ranks about 0.5; real
    defects ranked 0.85-0.97 on battery_weld, magnetic_tile and bsdata). An info line names
    the images no more unusual than 90% of normal ones (subtle defects do that one by one:
    7 of 10 in one battery_weld draw), and those whose outline misses their most unusual part.
    Returns the paths of the images that look normal."""
    feats = normal["feats"]
    order = np.random.default_rng(seed).permutation(len(feats))
    half = max(1, len(feats) // 2)
    bank, held = torch.from_numpy(order[half:] if len(feats) > 1 else order), torch.from_numpy(order[:half])
    rows = flatten_patches(feats[bank].float())
    index = Index(rows[torch.from_numpy(np.random.default_rng(seed).permutation(len(rows))[:LOOKS_NORMAL_ROWS])])
    normal_scores, _ = most_unusual(index, feats[held], normal["masks"][held])
    limit = np.quantile(normal_scores, LOOKS_NORMAL_QUANTILE)
    whole, outlined = most_unusual(index, bad["feats"], bad["masks"])
    auroc = float(stats.mannwhitneyu(whole, normal_scores).statistic) / (len(whole) * len(normal_scores))
    alike = [str(r.path) for r, v in zip(records, whole, strict=True) if v <= limit]
    missed = [str(r.path) for r, v, o in zip(records, whole, outlined, strict=True) if v > limit >= o]
    if auroc <= LOOKS_NORMAL_AUROC:
        log.warning(
            "The %d labelled defects (%s%s) are hardly more unusual than normal parts: they rank above normal images with AUROC %.2f, "
            "where real defects usually rank above 0.85. Check that they are defects.",
            len(records), ", ".join(str(r.path) for r in records[:3]), ", ..." if len(records) > 3 else "", auroc,
        )
    for names, what in ((alike, "look like normal parts (no patch farther from normal images than 90% of normal images' are)"),
                        (missed, "have their most unusual part outside the outline; check <name>_mask.png")):
        if names:
            log.info("%d of %d labelled defects %s: %s%s", len(names), len(records), what, ", ".join(names[:5]), ", ..." if len(names) > 5 else "")
    return alike


def feature_mask(mask: torch.Tensor | None, size: tuple[int, int], keep_small: bool = True) -> torch.Tensor:
    """A defect's mask on the feature grid: bilinear downsampling, binarised at 0.5 (DestSeg,
    the official rule). That rule erases an outlined region smaller than about half a cell,
    and the defect's pixels then train as normal ones (at 256 px, on the 32 x 32 grid, 30 of
    magnetic_tile's 388 outlines and 46 of bsdata's 167 vanished); with ``keep_small`` each region
    (8-connected) also keeps the cell it covers most."""
    if mask is None:
        return torch.zeros(size)
    small = F.interpolate(mask.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    out = (small >= 0.5).float()
    if keep_small:
        regions, n = ndimage.label(mask.numpy() > 0.5, structure=np.ones((3, 3), bool))
        if n:
            (hh, ww), (h, w) = regions.shape, size
            cell = (np.arange(hh) * h // hh)[:, None] * w + (np.arange(ww) * w // ww)[None, :]
            inside = regions > 0
            counts = np.bincount((regions[inside] - 1) * h * w + cell[inside], minlength=n * h * w).reshape(n, h * w)
            out.view(-1)[torch.from_numpy(counts.argmax(1))] = 1.0
    return out


@register
class SuperSimpleNet(CNNDetector):
    """SuperSimpleNet on cached frozen features, unsupervised or with labelled defects."""

    name = "supersimplenet"
    learns_from_defects = True
    tiling_refusal: ClassVar[str | None] = "it trains on whole network inputs; tiled training is not built"

    def __init__(
        self,
        *,
        upscale: int = 1,
        patch_size: int = 3,
        hidden: int = 1024,
        noise_std: float = 0.5,
        perlin_thr: float | None = None,
        stop_grad: bool | None = None,
        clip_grad: bool | None = None,
        overlap: bool | None = None,
        bad: bool = True,
        keep_small: bool = True,
        standardize: bool = True,
        steps: int = 1500,
        budget_s: float | None = None,
        batch_size: int = 8,
        defect_share: float = 0.25,
        adapt_lr: float = 1e-4,
        head_lr: float = 2e-4,
        gamma: float = 0.4,
        margin: float = 0.5,
        seed: int = 0,
        preprocess: dict[str, Any] | None = None,
        **cnn: Any,
    ) -> None:
        super().__init__(preprocess={"resize": "squash", **(preprocess or {})}, **cnn)
        if self.preprocess.resize == "aspect":
            raise ConfigError("SuperSimpleNet trains on batches of one input size: use --resize squash (default) or letterbox.")
        if min(upscale, patch_size, hidden, steps, batch_size) < 1 or (budget_s is not None and budget_s <= 0):
            raise ConfigError("SuperSimpleNet's upscale, patch_size, hidden, steps, batch_size and budget_s must be positive.")
        self.upscale, self.patch_size, self.hidden, self.noise_std = upscale, patch_size, hidden, noise_std
        self.perlin_thr, self.stop_grad, self.clip_grad, self.overlap, self.bad = perlin_thr, stop_grad, clip_grad, overlap, bad
        self.standardize, self.keep_small = standardize, keep_small
        self.steps, self.budget_s, self.batch_size = steps, budget_s, batch_size
        self.defect_share = check_ratio("defect_share", defect_share)
        self.adapt_lr, self.head_lr, self.gamma, self.margin, self.seed = adapt_lr, head_lr, gamma, margin, seed
        self.defects: list[Record] = []
        self.heads: Heads | None = None
        self.losses: list[float] = []
        self.regime: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    def config(self) -> dict[str, Any]:
        keys = (
            "upscale", "patch_size", "hidden", "noise_std", "perlin_thr", "stop_grad", "clip_grad", "overlap", "bad", "keep_small", "standardize", "steps",
            "budget_s", "batch_size", "defect_share", "adapt_lr", "head_lr", "gamma", "margin", "seed",
        )
        return {**self.base_config(), **{k: getattr(self, k) for k in keys}}

    def use_defects(self, records: Sequence[Record]) -> None:
        """Train on these defective images too (``mask_path`` where an outline exists)."""
        self.defects = [Record(r.path, 1, r.defect, r.mask_path) for r in records]

    def resolved(self, supervised: bool) -> dict[str, Any]:
        """The regime's settings: the official configuration's, under the user's own."""
        given = {k: getattr(self, k) for k in REGIMES[supervised]}
        return {k: REGIMES[supervised][k] if v is None else v for k, v in given.items()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F: the stages upscaled to ``upscale`` x the finest grid, p x p averaged."""
        maps = self.backbone(x)
        h, w = maps[0].shape[-2:]
        size = (h * self.upscale, w * self.upscale)
        fused = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps], 1)
        return local_aggregate(fused, self.patch_size)

    def _cache(self, samples: Iterable[Sample], label: int, progress: Progress | None, stage: str) -> dict[str, torch.Tensor]:
        """Features (float16), masks on the feature grid, whether each mask is known, labels."""
        feats, masks, known, n = [], [], [], 0
        for batch in batches(iter(samples), self.batch_size):
            with torch.no_grad():
                f = self.features(torch.stack([s.image for s in batch]))
            feats.append(f.half())
            masks.extend(feature_mask(s.mask, tuple(f.shape[-2:]), self.keep_small) for s in batch)
            known.extend(label == 0 or s.mask is not None for s in batch)
            n += len(batch)
            if progress:
                progress(stage, n, 0)
        if not feats:
            return {}
        return {
            "feats": torch.cat(feats), "masks": torch.stack(masks), "known": torch.tensor(known),
            "labels": torch.full((n,), float(label)),
        }

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("SuperSimpleNet needs normal training images.")
        t0 = time.perf_counter()
        normal = self._cache(images, 0, progress, "features")
        if not normal:
            raise ConfigError("SuperSimpleNet got no training images; check the training folder.")
        bad = self._cache(iter_samples(self.defects, self.preprocess), 1, progress, "defect features") if self.defects else {}
        if bad and bad["feats"].shape[-2:] != normal["feats"].shape[-2:]:
            raise ConfigError("The labelled defects reached another network input size than the normal images; fit with --resize squash.")
        self.regime = self.resolved(bool(bad))
        if bad:
            warn_if_normal(normal, bad, self.defects, self.seed)
        t1 = time.perf_counter()
        self._train(normal, bad, progress)
        self.timings = {
            "features_s": round(t1 - t0, 1), "train_s": round(time.perf_counter() - t1, 1),
            "images": float(len(normal["feats"])), "defects": float(len(bad.get("feats", []))),
            "defects_with_masks": float(bad["known"].sum()) if bad else 0.0,
        }
        return self

    def _batch(self, normal: dict[str, torch.Tensor], bad: dict[str, torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
        """(features, masks, mask known, labels) of one training batch."""
        n_bad = min(round(self.batch_size * self.defect_share), self.batch_size - 1) if bad else 0
        picks = [(normal, torch.randint(len(normal["feats"]), (self.batch_size - n_bad,), generator=g))]
        if n_bad:
            picks.append((bad, torch.randint(len(bad["feats"]), (n_bad,), generator=g)))
        return [torch.cat([src[key][idx] for src, idx in picks]) for key in ("feats", "masks", "known", "labels")]

    def _train(self, normal: dict[str, torch.Tensor], bad: dict[str, torch.Tensor], progress: Progress | None) -> None:
        torch.manual_seed(self.seed)
        g, rng = torch.Generator().manual_seed(self.seed), np.random.default_rng(self.seed)
        heads = Heads(normal["feats"].shape[1], self.hidden)
        if self.standardize:
            heads.standardize_on(normal["feats"])
        optimizer = torch.optim.AdamW([
            {"params": heads.adaptor.parameters(), "lr": self.adapt_lr},
            {"params": heads.seg.parameters(), "lr": self.head_lr, "weight_decay": 1e-5},
            {"params": [*heads.dec.parameters(), *heads.fc.parameters()], "lr": self.head_lr, "weight_decay": 1e-5},
        ])
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        r = self.regime
        self.losses = []
        heads.train()
        start = time.perf_counter()
        for step in range(self.steps):
            done = max(step / self.steps, (time.perf_counter() - start) / self.budget_s if self.budget_s else 0.0)
            if done >= 1:
                break
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * self.gamma ** ((done >= 0.8) + (done >= 0.9))
            loss = self._loss(heads, *self._batch(normal, bad, g), rng, r)
            optimizer.zero_grad()
            loss.backward()
            if r["clip_grad"]:
                nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            optimizer.step()
            self.losses.append(loss.item())
            if progress:
                progress(f"train loss {self.losses[-1]:.4f}", step + 1, self.steps)
        self.heads = heads.eval()

    def _loss(
        self, heads: Heads, feats: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, labels: torch.Tensor,
        rng: np.random.Generator, r: dict[str, Any],
    ) -> torch.Tensor:
        """The duplicated batch with feature-space anomalies, and the three losses."""
        adapted = heads.adapt(torch.cat([feats, feats]))
        masks, known, labels = torch.cat([masks, masks]), torch.cat([known, known]), torch.cat([labels, labels])
        b, _, h, w = adapted.shape
        where = perlin_masks(b, h, w, r["perlin_thr"], rng)
        if not self.bad:
            where = where * (1 - labels)[:, None, None]
        if not r["overlap"]:
            where = where * (1 - masks)
        noise = torch.randn(adapted.shape) * self.noise_std
        perturbed = adapted + noise * where[:, None]
        masks = ((masks + where) > 0).float()
        labels = ((labels + masks.flatten(1).amax(1)) > 0).float()
        amap, score = heads.discriminate(perturbed, r["stop_grad"])
        loss = focal_loss(torch.sigmoid(score), labels)
        if known.any():
            m, t = amap[known], masks[known]
            normal_px, anomalous_px = m[t == 0], m[t > 0]
            if normal_px.numel():
                loss = loss + (normal_px + self.margin).clamp(min=0).mean()
            if anomalous_px.numel():
                loss = loss + (-anomalous_px + self.margin).clamp(min=0).mean()
            loss = loss + focal_loss(torch.sigmoid(m), t)
        return loss

    def _heads(self) -> Heads:
        if self.heads is None:
            raise ConfigError("This SuperSimpleNet model is not fitted; run fit first.")
        return self.heads

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> Prediction:
        heads = self._heads()
        amap, score = heads.discriminate(heads.adapt(self.features(batch)), stop_grad=False)
        return Prediction(F.softplus(score), F.softplus(patch_scores_to_maps(amap, tuple(batch.shape[-2:]), self.sigma)))

    def export_graph(self) -> ScoreGraph:
        """One graph: backbone, feature upscaling and aggregation, adaptor, both heads and the
        softplus, exactly `predict` (the heads are in eval mode, so batch norm is fixed)."""
        self._heads()
        return ScoreGraph(self.predict, self.backbone)

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 5, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Train once on the labelled defects and all but HOLDOUT of the normal images, and
        score those unseen: the threshold comes from normal images the model never saw."""
        return holdout_scored(self, records, HOLDOUT, seed, progress)

    def state(self) -> dict[str, torch.Tensor]:
        heads = {f"heads.{k}": v for k, v in self._heads().state_dict().items()}
        regime = torch.tensor([float(self.regime[k]) for k in REGIMES[False]])
        return {**heads, "losses": torch.tensor(self.losses, dtype=torch.float32), "regime": regime}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        channels = state["heads.adaptor.weight"].shape[0]
        self.heads = Heads(channels, state["heads.seg.0.weight"].shape[0])
        given = {k[6:]: v for k, v in state.items() if k.startswith("heads.")}
        if "center" not in given:  # a model file from before standardization: identity
            self.standardize = False
            given = {**{k: v for k, v in self.heads.state_dict().items() if k in ("center", "scale")}, **given}
        self.heads.load_state_dict(given, strict=True)
        self.heads.eval()
        self.losses = state["losses"].tolist()
        values = state["regime"].tolist()
        self.regime = {k: (v if k == "perlin_thr" else bool(v)) for k, v in zip(REGIMES[False], values, strict=True)}

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "train_steps": len(self.losses), "regime": self.regime, **self.timings}

    def training_curve(self) -> tuple[list[float], str] | None:
        supervised = "with labelled defects" if self.timings.get("defects") else "unsupervised"
        return self.losses, f"SuperSimpleNet ({supervised}): loss per step (focal map + focal score + truncated L1)"

