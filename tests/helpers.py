"""Test helpers: paste a real defect crop into a real normal image; seeded dataset subsets."""

from __future__ import annotations

from pathlib import Path

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


def cached_clip_weights(model: str, tag: str, env: str | None = None) -> Path | None:
    """The open_clip checkpoint for ``model``/``tag``: the file named by the environment
    variable ``env`` if set, else one in open_clip's caches (no network), else None."""
    import os

    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if env and os.environ.get(env):
        return Path(os.environ[env])
    cfg = open_clip.get_pretrained_cfg(model, tag)
    repo = cfg.get("hf_hub", "").rstrip("/")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name) if repo else None
        if isinstance(found, str):
            return Path(found)
    url_file = Path.home() / ".cache" / "clip" / Path(cfg.get("url", "none")).name
    return url_file if url_file.is_file() else None
