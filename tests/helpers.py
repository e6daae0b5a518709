"""Test helpers: paste a real defect crop into a real normal image; seeded dataset subsets."""

from __future__ import annotations

import numpy as np
import torch

from defectscope.data.datasets import Dataset


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


def seeded_subset(ds: Dataset, per_defect: int, good: int, train: int | None = None, seed: int = 0) -> Dataset:
    """A seeded subset: ``train`` training images (all if None), and of the test split
    ``good`` good images and ``per_defect`` of each defect type. Accuracy floors in the
    suite are measured on such subsets; the full runs are in benchmarks/."""
    rng = np.random.default_rng(seed)
    test = []
    for kind in ["good", *ds.defects]:
        group = [r for r in ds.test if r.defect == kind]
        n = min(len(group), good if kind == "good" else per_defect)
        test += [group[i] for i in sorted(rng.choice(len(group), n, replace=False))]
    fit = ds.train if train is None or train >= len(ds.train) else [ds.train[i] for i in sorted(rng.choice(len(ds.train), train, replace=False))]
    return Dataset(ds.root, fit, test)
