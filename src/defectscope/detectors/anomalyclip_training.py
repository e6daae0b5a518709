"""Learning AnomalyCLIP's object-agnostic prompts on auxiliary images with masks.

CLIP stays frozen; only the prompts' tensors (`AgnosticPrompts`) train. Per batch, with
text embeddings G = [g_n, g_a] from the current prompts, global embeddings f and, per
layer l, the 2-class patch probabilities P_l = softmax(<p_l, G> / tau) upsampled
(bilinear) to the input size:

    L = CE(softmax(<f, G> / tau), label) + 4 * sum_l [ Focal(P_l, mask) + Dice(P_l[a], mask) + Dice(P_l[n], 1 - mask) ]

Focal (gamma 2, one-hot clamped to [1e-5, 1 - 1e-5], p_t + 1e-5) and Dice (smooth 1,
mean over the batch) as in the official code; Adam (lr 1e-3, betas 0.5 / 0.999), batch
8, 15 epochs, seed 111. As CLIP is frozen and the paper uses no augmentation, each
image's embeddings are computed once and reused every epoch when they fit in
``cache_gb``; otherwise they are recomputed per batch (same result, slower).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.components.charts import loss_curve_png
from defectscope.data.datasets import Record, Sample, SkipLog, iter_samples, load_dataset
from defectscope.detectors.anomalyclip import TEMPERATURE, UNTRAINED, AnomalyCLIP, write_prompts
from defectscope.detectors.base import Progress
from defectscope.errors import ConfigError, DataError

log = logging.getLogger("defectscope")

LOCAL_WEIGHT = 4.0  # lambda in front of the local losses


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Mean focal loss of class probabilities N x C x H x W against integer classes N x H x W."""
    c = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, c)
    onehot = F.one_hot(mask.reshape(-1).long(), c).to(p.dtype).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * p).sum(-1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over the batch of (2 |P T| + s) / (|P| + |T| + s); pred, target N x H x W."""
    p, t = pred.flatten(1), target.flatten(1).to(pred.dtype)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def anomalyclip_loss(
    text: torch.Tensor, image: torch.Tensor, patches: Sequence[torch.Tensor], masks: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the module docstring: (total, its global and local parts as floats).

    text 2 x D, image N x D, each of ``patches`` N x G*G x D (all normalised), masks N x H x W
    in {0, 1}, labels N."""
    size = masks.shape[-2:]
    image_loss = F.cross_entropy(image @ text.T / TEMPERATURE, labels.long())
    local = image_loss.new_zeros(())
    for p in patches:
        grid = math.isqrt(p.shape[1])
        probs = AnomalyCLIP.probabilities(p, text).transpose(1, 2).reshape(p.shape[0], 2, grid, grid)
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        local = local + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks) + dice_loss(probs[:, 0], 1 - masks)
    total = image_loss + LOCAL_WEIGHT * local
    return total, {"global": image_loss.item(), "local": local.item()}


def auxiliary_records(datasets: Sequence[str | Path]) -> list[Record]:
    """Every test image of the auxiliary datasets (MVTec layout, e.g. from `defectscope synth`):
    defective ones need masks, good ones count as all-normal."""
    records: list[Record] = []
    for root in datasets:
        records.extend(load_dataset(root, require_masks=True).test)
    if not records or not any(r.label for r in records):
        raise DataError(f"{', '.join(map(str, datasets))}: no defective test images with masks; AnomalyCLIP learns from them (make some with `defectscope synth DATA -o AUX`).")
    return records


@dataclass
class Embedded:
    """One batch's frozen CLIP outputs and targets."""

    image: torch.Tensor
    patches: list[torch.Tensor]
    masks: torch.Tensor
    labels: torch.Tensor


def _targets(batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    masks = torch.stack([s.mask if s.mask is not None else torch.zeros(s.image.shape[-2:], dtype=torch.bool) for s in batch])
    return masks.float(), torch.tensor([s.label for s in batch])


def _embed(detector: AnomalyCLIP, batch: list[Sample], device: torch.device, dtype: torch.dtype) -> Embedded:
    with torch.no_grad():
        image, patches = detector.encode(torch.stack([s.image for s in batch]).to(device))
    masks, labels = _targets(batch)
    return Embedded(image.to(dtype), [p.to(dtype) for p in patches], masks.to(device), labels.to(device))


def cache_bytes(detector: AnomalyCLIP, n_images: int) -> int:
    """Bytes to keep every image's embeddings in float16 (``detector`` fitted: its text sets D)."""
    grid = detector.image_size // detector.clip.patch
    return n_images * (1 + len(detector.layers) * grid * grid) * int(detector.text.shape[-1]) * 2


def train_prompts(
    datasets: Sequence[str | Path],
    out: str | Path,
    *,
    options: dict[str, Any] | None = None,
    epochs: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 111,
    device: str = "cpu",
    cache_gb: float = 4.0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Learn the prompts on the auxiliary ``datasets`` and write the prompts file ``out`` plus
    its loss curve (``out`` with suffix .loss.png); returns the training summary.

    ``options``: AnomalyCLIP's (clip_model, clip_pretrained, image_size, n_ctx, depth,
    n_deep, layers, dpam_from); unset ones are the paper's."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another name or pass --overwrite.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU here; drop --device to train on the CPU.")
    records = auxiliary_records(datasets)
    torch.manual_seed(seed)
    detector = AnomalyCLIP(**{**(options or {}), "prompts": UNTRAINED, "seed": seed}).fit(None)
    dev = torch.device(device)
    detector.clip.to(dev)
    detector.learner.to(dev)
    cached = cache_bytes(detector, len(records)) <= cache_gb * 2**30
    log.info("AnomalyCLIP: %d auxiliary images; embeddings %s", len(records), "cached" if cached else "recomputed per batch (over --cache-gb)")
    skip = SkipLog()
    cache: list[Embedded] = []
    if cached:
        kept = []
        for i, rec in enumerate(records):
            for sample in iter_samples([rec], detector.preprocess, on_error=skip):
                cache.append(_embed(detector, [sample], dev, torch.float16))
                kept.append(rec)
            if progress:
                progress("embed", i + 1, len(records))
        records = kept
    if not records:
        raise DataError(f"No auxiliary image of {', '.join(map(str, datasets))} could be read; see the warnings above.")
    optimizer = torch.optim.Adam(detector.learner.parameters(), lr=lr, betas=(0.5, 0.999))
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(records) / batch_size)
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        for step, idx in enumerate(np.array_split(rng.permutation(len(records)), steps_per_epoch)):
            if cached:
                part = _collate([cache[i] for i in idx])
            else:
                batch = list(iter_samples([records[i] for i in idx], detector.preprocess, on_error=skip))
                if not batch:
                    continue
                part = _embed(detector, batch, dev, torch.float32)
            loss, _ = anomalyclip_loss(detector.learner(detector.clip), part.image.float(), [p.float() for p in part.patches], part.masks, part.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress:
                progress(f"train loss {losses[-1]:.4f}", epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch)
    seconds = time.perf_counter() - start
    detector.clip.to("cpu")
    detector.learner.to("cpu")
    summary = {
        "datasets": [str(d) for d in datasets],
        "images": len(records),
        "defective": sum(r.label for r in records),
        "epochs": epochs,
        "steps": len(losses),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": device,
        "embeddings_cached": cached,
        "skipped": sorted(skip.skipped),
        "train_seconds": round(seconds, 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    write_prompts(out, detector, summary, overwrite=overwrite)
    curve = loss_curve_png(losses, out.with_suffix(".loss.png"), f"AnomalyCLIP prompts: loss per step ({len(records)} images, {epochs} epochs)")
    return {**summary, "prompts": str(out), "loss_curve": str(curve), "losses": losses}


def _collate(items: list[Embedded]) -> Embedded:
    return Embedded(
        torch.cat([e.image for e in items]),
        [torch.cat(parts) for parts in zip(*(e.patches for e in items), strict=True)],
        torch.cat([e.masks for e in items]),
        torch.cat([e.labels for e in items]),
    )
