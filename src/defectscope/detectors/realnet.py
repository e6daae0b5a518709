"""RealNet (Zhang et al., CVPR 2024): reconstruct normal features, segment the residuals.

Frozen backbone stages l (default: EfficientNet-Lite0 stages 1-4, strides 4-32, as the
paper's WideResNet-50 layers 1-4). Training items are the normal images I and, with
probability 1/2 (the official mix), a copy A with a synthetic anomaly of exact mask M:
SDAS (perturbed diffusion samples, `defectscope.components.diffusion`), Perlin-masked noise or
texture (DRAEM-style), CutPaste, or a mix of them.

- AFS (anomaly-aware feature selection): per stage and channel c, the residual
  (f_c(A) - f_c(I))^2, min-max normalised over each batch of AFS images, is compared with M
  (nearest-resized) by MSE, summed over the batches; the ``afs_ratio`` x C channels with the
  smallest error are kept (the official ``init_idxs``). Computed from training images only.
  ``afs_ratio`` is one fraction or one per stage; the default is the official configuration's
  (WideResNet-50: 256/256, 512/512, 512/1,024, 256/2,048 channels = 1, 1, 1/2, 1/8).
- Reconstruction: per stage a small UNet g_l (the official SimpleUnet: two conv stages with
  average pooling, a residual stack, two transposed convolutions) maps the selected features
  of A to those of I: L_rec = sum_l MSE(g_l(f_l(A)), f_l(I)).
- Residuals R_l = (f_l(A) - g_l(f_l(A)))^2, upsampled to the finest stage and concatenated.
- RRS (reconstruction residual selection): channels of the batch-normalised residuals are
  ranked per image by global max pooling and by global average pooling; the top
  ``rrs_ratio`` x channels of each are kept (paper: 256 + 256 of 1,536).
- Head (official decoder): residual stack, convs to 128 / 32 / 8 channels, 2x upsampling,
  convs to 4 / 2, bilinear to the input size; the map is softmax's anomalous channel.
  L = CE(logits, M) + L_rec; Adam, betas 0.9 / 0.999 (official lr 1e-4 over 1,000 epochs
  at batch 16; here lr 1e-3 at batch 8, for a budget of minutes on a CPU).
- Image score: the map's maximum after 16 x 16 average pooling (the official evaluator).

On a CPU the backbone pass dominates, and the backbone is frozen: each normal image gets
``pool`` synthetic copies up front, and the features of all of them are computed once and
kept (float16); training then draws its batches from them. The official code synthesises
anew every step on a GPU for 1,000 epochs; here the budget is ``steps`` (or ``epochs``
over the normal images).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.data.datasets import Record, Sample, batches, load_folder
from defectscope.data.images import load_image_uint8
from defectscope.detectors.base import (
    CNNDetector,
    NormalScores,
    Prediction,
    Progress,
    check_ratio,
    holdout_scored,
    register,
)
from defectscope.errors import ConfigError
from defectscope.synthesis.generators import synthesize

log = logging.getLogger("defectscope")

SOURCES = ("sdas", "perlin", "texture", "cutpaste", "scar", "noise")
SDAS_STRENGTHS = (0.1, 0.2)  # the official code draws s uniformly from this range
SCORE_POOL = 16  # avg-pool window of the image score
AFS_BATCH = 16  # images per min-max normalisation in AFS (the official batch)
HOLDOUT = 0.2  # share of normal images fit_scored keeps out of training, to score them unseen


class Residual(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the residual unit of both official networks."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def residual_stack(channels: int, hidden: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[Residual(channels, hidden) for _ in range(n)], nn.ReLU())


def _conv_norm(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU()]


class SimpleUNet(nn.Module):
    """The per-stage reconstruction network (official ``SimpleUnet``): C -> 2C (/2) -> 4C (/4),
    a residual stack, then two transposed convolutions back with skip connections."""

    def __init__(self, c: int, n_residual: int = 2) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_norm(c, c), *_conv_norm(c, 2 * c))
        self.block2 = nn.Sequential(*_conv_norm(2 * c, 2 * c), *_conv_norm(2 * c, 4 * c))
        self.middle = residual_stack(4 * c, 2 * c, n_residual)
        self.up1 = nn.ConvTranspose2d(8 * c, 2 * c, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(4 * c, c, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = F.avg_pool2d(self.block1(x), 2)
        b2 = F.avg_pool2d(self.block2(b1), 2)
        x = F.relu(self.up1(torch.cat([self.middle(b2), b2], 1)))
        return self.up2(torch.cat([x, b1], 1))


class ResidualHead(nn.Module):
    """RRS and the segmentation decoder: residuals N x C x h x w -> logits N x 2 x 2h x 2w."""

    def __init__(self, channels: int, k_max: int, k_mean: int, n_residual: int = 2) -> None:
        super().__init__()
        self.k_max, self.k_mean = k_max, k_mean
        k = k_max + k_mean
        self.rank_norm = nn.BatchNorm2d(channels, momentum=0.9, affine=False)
        self.decoder1 = nn.Sequential(residual_stack(k, k, n_residual), nn.Conv2d(k, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
        self.decoder3 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def select(self, residual: torch.Tensor) -> torch.Tensor:
        """RRS: per image the top k_max channels by global max and top k_mean by global mean."""
        with torch.no_grad():
            ranked = self.rank_norm(residual).flatten(2)
            idx = torch.cat([ranked.amax(2).topk(self.k_max, 1).indices, ranked.mean(2).topk(self.k_mean, 1).indices], 1)
        return torch.gather(residual, 1, idx[:, :, None, None].expand(-1, -1, *residual.shape[-2:]))

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        x = self.decoder2(self.decoder1(self.select(residual)))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.decoder3(x)


class RealNetNetwork(nn.Module):
    """The trained part: one SimpleUNet per stage and the residual head."""

    def __init__(self, channels: Sequence[int], rrs_ratio: float) -> None:
        super().__init__()
        self.recon = nn.ModuleList([SimpleUNet(c) for c in channels])
        total = sum(channels)
        k = max(1, round(rrs_ratio * total))
        self.head = ResidualHead(total, k, k)
        self.to(memory_format=torch.channels_last)

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(reconstructed features per stage, logits N x 2 x H x W at ``size``). Channels-last
        memory: the small-channel convolutions' backward pass runs ~2x faster on CPUs."""
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        recon = [g(f) for g, f in zip(self.recon, feats, strict=True)]
        grid = feats[0].shape[-2:]
        residual = torch.cat(
            [F.interpolate((f - r) ** 2, size=grid, mode="bilinear", align_corners=True) if f.shape[-2:] != grid else (f - r) ** 2
             for f, r in zip(feats, recon, strict=True)], 1)
        logits = F.interpolate(self.head(residual), size=size, mode="bilinear", align_corners=True)
        return recon, logits


def afs_errors(anomalous: torch.Tensor, normal: torch.Tensor, masks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Per channel, the summed MSE between the batch-normalised squared residual and the mask.

    anomalous, normal: N x C x h x w features of the same images with and without a synthetic
    anomaly; masks N x H x W. Lower = the channel's residual marks the anomaly better."""
    total = torch.zeros(anomalous.shape[1], dtype=torch.float64)
    for s in range(0, anomalous.shape[0], batch_size):
        r = (anomalous[s : s + batch_size].float() - normal[s : s + batch_size].float()) ** 2
        label = F.interpolate(masks[s : s + batch_size, None].float(), size=r.shape[-2:], mode="nearest")
        flat = r.transpose(0, 1).flatten(1)
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        flat = (flat - lo) / (hi - lo + 1e-4)
        total += ((flat - label.transpose(0, 1).flatten(1)) ** 2).mean(1).double()
    return total


def afs_select(errors: torch.Tensor, ratio: float) -> torch.Tensor:
    """The round(ratio x C) channels (at least one) of smallest AFS error, in ascending order."""
    k = max(1, round(ratio * errors.numel()))
    return errors.topk(k, largest=False).indices.sort().values


@register
class RealNet(CNNDetector):
    """RealNet trained on synthetic anomalies of the normal images (module docstring)."""

    name = "realnet"
    tiling_refusal: ClassVar[str | None] = "it trains on synthetic defects placed on whole network inputs; tiled training is not built"

    def __init__(
        self,
        *,
        synthesis: str = "sdas",
        ddpm: str | None = None,
        textures: str | None = None,
        afs_ratio: float | Sequence[float] = (1.0, 1.0, 0.5, 0.125),
        rrs_ratio: float = 1 / 6,
        pool: int = 2,
        sdas_samples: int = 128,
        afs_images: int = 512,
        steps: int = 2000,
        epochs: int | None = None,
        batch_size: int = 8,
        lr: float = 1e-3,
        seed: int = 0,
        stages: tuple[int, ...] = (1, 2, 3, 4),
        preprocess: dict[str, Any] | None = None,
        **cnn: Any,
    ) -> None:
        super().__init__(stages=stages, preprocess={"resize": "squash", **(preprocess or {})}, **cnn)
        if self.preprocess.resize == "aspect" or self.preprocess.size % 128:
            raise ConfigError(
                f"RealNet needs square inputs of a multiple of 128 px (its reconstruction halves the coarsest grid twice); "
                f"got size {self.preprocess.size}, resize {self.preprocess.resize}. Use e.g. --size 256 --resize squash."
            )
        self.kinds = tuple(k.strip() for k in synthesis.split("+"))
        bad = [k for k in self.kinds if k not in SOURCES]
        if bad:
            raise ConfigError(f"Unknown RealNet synthesis {', '.join(bad)}; choose from {', '.join(SOURCES)} or a mix like sdas+perlin.")
        if "sdas" in self.kinds and ddpm is None:
            raise ConfigError(
                "RealNet's synthesis is SDAS by default, which samples a diffusion model of the normal images: train one with "
                "`defectscope train-ddpm DATA -o ddpm.dscope` and pass --set ddpm=ddpm.dscope, or choose another source, "
                "e.g. --set synthesis=perlin (or cutpaste, texture with textures=DIR, or a mix like perlin+cutpaste)."
            )
        if "texture" in self.kinds and textures is None:
            raise ConfigError("RealNet synthesis 'texture' needs a folder of texture images: --set textures=DIR (e.g. DTD).")
        if min(steps, batch_size, pool, sdas_samples, afs_images) < 1 or (epochs is not None and epochs < 1):
            raise ConfigError("RealNet's steps, epochs, batch_size, pool, sdas_samples and afs_images must be at least 1.")
        self.synthesis, self.ddpm, self.textures = synthesis, ddpm, textures
        ratios = [afs_ratio] * len(self.stages) if isinstance(afs_ratio, int | float) else list(afs_ratio)
        if len(ratios) != len(self.stages):
            raise ConfigError(f"afs_ratio needs one fraction or one per stage ({len(self.stages)}), got {afs_ratio!r}.")
        self.afs_ratio = [check_ratio("afs_ratio", float(r)) for r in ratios]
        self.rrs_ratio = check_ratio("rrs_ratio", rrs_ratio)
        self.pool, self.sdas_samples, self.afs_images = pool, sdas_samples, afs_images
        self.steps, self.epochs, self.batch_size, self.lr, self.seed = steps, epochs, batch_size, lr, seed
        self.channels: list[torch.Tensor] = []
        self.network: RealNetNetwork | None = None
        self.losses: list[float] = []
        self.timings: dict[str, float] = {}

    def config(self) -> dict[str, Any]:
        return {
            **self.base_config(), "synthesis": self.synthesis, "ddpm": self.ddpm, "textures": self.textures,
            "afs_ratio": self.afs_ratio, "rrs_ratio": self.rrs_ratio, "pool": self.pool, "sdas_samples": self.sdas_samples,
            "afs_images": self.afs_images, "steps": self.steps, "epochs": self.epochs, "batch_size": self.batch_size,
            "lr": self.lr, "seed": self.seed,
        }

    def _network(self) -> RealNetNetwork:
        if self.network is None:
            raise ConfigError("This RealNet model is not fitted; run fit first.")
        return self.network

    def state(self) -> dict[str, torch.Tensor]:
        net = {f"net.{k}": v for k, v in self._network().state_dict().items()}
        afs = {f"afs.{i}": c for i, c in enumerate(self.channels)}
        return {**net, **afs, "losses": torch.tensor(self.losses, dtype=torch.float32)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.channels = [state[f"afs.{i}"].long() for i in range(len(self.stages))]
        self.network = RealNetNetwork([len(c) for c in self.channels], self.rrs_ratio)
        self.network.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")}, strict=True)
        self.network.eval()
        self.losses = state["losses"].tolist()

    @property
    def info(self) -> dict[str, Any]:
        kept = [len(c) for c in self.channels]
        return {**super().info, "afs_channels": kept, "train_steps": len(self.losses), **self.timings}

    def training_curve(self) -> tuple[list[float], str] | None:
        return self.losses, f"RealNet: loss per step (CE + feature MSE; synthesis {self.synthesis})"

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's stage maps (a frozen pass; plain tensors, so they can enter training)."""
        return [f.clone() for f in self.backbone(x)]

    def _sources(self, progress: Progress | None) -> dict[str, list[np.ndarray]]:
        """Anomaly sources the kinds need: perturbed diffusion samples, texture images."""
        out: dict[str, list[np.ndarray]] = {"generated": [], "textures": []}
        if "sdas" in self.kinds:
            from defectscope.components.diffusion import DDPM

            ddpm = DDPM.load(self.ddpm)
            rng = np.random.default_rng(self.seed)
            per = 16
            for b in range(math.ceil(self.sdas_samples / per)):
                s = float(rng.uniform(*SDAS_STRENGTHS))
                out["generated"].extend(ddpm.sample(min(per, self.sdas_samples - b * per), strength=s, seed=self.seed + b))
                if progress:
                    progress("sdas samples", len(out["generated"]), self.sdas_samples)
        if "texture" in self.kinds:
            out["textures"] = [load_image_uint8(r.path) for r in load_folder(self.textures)]
        return out

    def _pool(self, images: Iterable[Sample], progress: Progress | None) -> dict[str, Any]:
        """Normal features per stage (n x C x h x w), and ``pool`` synthetic copies per image:
        their features per stage (pool x n x C x h x w) and masks (pool x n x H x W)."""
        sources = self._sources(progress)
        rng = np.random.default_rng(self.seed)
        stages = range(len(self.stages))
        normal: list[list[torch.Tensor]] = [[] for _ in stages]
        anomalous: list[list[list[torch.Tensor]]] = [[[] for _ in stages] for _ in range(self.pool)]
        masks: list[list[torch.Tensor]] = [[] for _ in range(self.pool)]
        size: tuple[int, int] | None = None
        n = 0
        for batch in batches(iter(images), self.batch_size):
            x = torch.stack([s.image for s in batch])
            size = tuple(x.shape[-2:])
            for i, f in enumerate(self.features(x)):
                normal[i].append(f.half())
            bases = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for copy in range(self.pool):
                made = []
                for j, base in enumerate(bases):
                    kind = self.kinds[(n + j + copy) % len(self.kinds)]
                    made.append(synthesize(base, kind, rng, textures=sources["textures"], generated=sources["generated"]))
                xa = torch.from_numpy(np.stack([m[0] for m in made])).permute(0, 3, 1, 2).float() / 255
                for i, f in enumerate(self.features(xa)):
                    anomalous[copy][i].append(f.half())
                masks[copy].append(torch.from_numpy(np.stack([m[1] for m in made])))
            n += len(batch)
            if progress:
                progress("synthesise + features", n, 0)
        if n == 0:
            raise ConfigError("RealNet got no training images.")
        return {
            "n": n,
            "size": size,
            "normal": [torch.cat(normal[i]) for i in stages],
            "anomalous": [torch.stack([torch.cat(anomalous[c][i]) for c in range(self.pool)]) for i in stages],
            "masks": torch.stack([torch.cat(m) for m in masks]),
        }

    def _afs(self, pool: dict[str, Any]) -> list[torch.Tensor]:
        n = pool["n"]
        take = min(self.afs_images, n * self.pool)
        pick = torch.from_numpy(np.random.default_rng(self.seed).permutation(n * self.pool)[:take])
        copy, image = pick // n, pick % n
        masks = pool["masks"][copy, image]
        return [
            afs_select(afs_errors(pool["anomalous"][s][copy, image], pool["normal"][s][image], masks, AFS_BATCH), self.afs_ratio[s])
            for s in range(len(self.stages))
        ]

    def _select(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [f.index_select(1, c).float() for f, c in zip(feats, self.channels, strict=True)]

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if images is None:
            raise ConfigError("RealNet needs normal training images.")
        t0 = time.perf_counter()
        pool = self._pool(images, progress)
        t1 = time.perf_counter()
        self.channels = self._afs(pool)
        torch.manual_seed(self.seed)
        net = RealNetNetwork([len(c) for c in self.channels], self.rrs_ratio)
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.9, 0.999))
        n, size, g = pool["n"], pool["size"], torch.Generator().manual_seed(self.seed)
        steps = self.steps if self.epochs is None else self.epochs * math.ceil(n / self.batch_size)
        normal = [f[:, c] for f, c in zip(pool["normal"], self.channels, strict=True)]
        anomalous = [f[:, :, c] for f, c in zip(pool["anomalous"], self.channels, strict=True)]
        masks = pool["masks"]
        del pool  # the unselected channels are not needed any more
        self.losses = []
        net.train()
        t2 = time.perf_counter()
        for step in range(steps):
            idx = torch.randint(n, (self.batch_size,), generator=g)
            copy = torch.randint(self.pool, (self.batch_size,), generator=g)
            is_anomalous = torch.rand(self.batch_size, generator=g) < 0.5
            target = [f[idx].float() for f in normal]
            chosen = is_anomalous[:, None, None, None]
            inputs = [torch.where(chosen, a[copy, idx].float(), t) for a, t in zip(anomalous, target, strict=True)]
            mask = masks[copy, idx] & is_anomalous[:, None, None]
            recon, logits = net(inputs, size)
            feature_loss = sum(F.mse_loss(r, t) for r, t in zip(recon, target, strict=True))
            loss = F.cross_entropy(logits, mask.long()) + feature_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.losses.append(loss.item())
            if progress:
                progress(f"train loss {self.losses[-1]:.4f}", step + 1, steps)
        self.network = net.eval()
        t3 = time.perf_counter()
        self.timings = {"pool_s": round(t1 - t0, 1), "train_s": round(t3 - t2, 1), "fit_s": round(t3 - t0, 1), "images": float(n)}
        return self

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> Prediction:
        net = self._network()
        _, logits = net(self._select(self.features(batch)), tuple(batch.shape[-2:]))
        maps = logits.softmax(1)[:, 1]
        return Prediction(self.score_map(maps), maps)

    def score_map(self, amap: torch.Tensor) -> torch.Tensor:
        """Max of the SCORE_POOL x SCORE_POOL average-pooled map (per image for N x H x W)."""
        m = amap if amap.dim() == 3 else amap[None]
        k = min(SCORE_POOL, *m.shape[-2:])
        pooled = F.avg_pool2d(m[:, None], k, stride=1).flatten(1).amax(1)
        return pooled if amap.dim() == 3 else pooled[0]

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 5, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Train once on all but HOLDOUT of the normal images and score those unseen (a network
        is too costly to cross-fit five times); the model keeps the images it trained on."""
        return holdout_scored(self, records, HOLDOUT, seed, progress)
