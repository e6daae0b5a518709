"""Test helpers: paste a real defect crop into a real normal image."""

from __future__ import annotations

import torch


def paste_defect(image: torch.Tensor, patch: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a real defect crop at a seeded position into a normal image; return image and mask."""
    g = torch.Generator().manual_seed(seed)
    h, w = image.shape[1:]
    ph, pw = min(patch.shape[1], h - 1), min(patch.shape[2], w - 1)
    y = int(torch.randint(0, h - ph, (1,), generator=g))
    x = int(torch.randint(0, w - pw, (1,), generator=g))
    out = image.clone()
    out[:, y : y + ph, x : x + pw] = patch[:, :ph, :pw]
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y : y + ph, x : x + pw] = True
    return out, mask


def defect_crop(samples) -> torch.Tensor:
    """The bounding box of the largest ground-truth region among real defective samples."""
    best = max(samples, key=lambda s: int(s.mask.sum()))
    ys, xs = torch.nonzero(best.mask, as_tuple=True)
    return best.image[:, int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1]
