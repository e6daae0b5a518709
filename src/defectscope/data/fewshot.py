"""Seeded draws of normal training images: k-shot samples (the papers' few-shot protocol)
and cross-fitting folds."""

from __future__ import annotations

import numpy as np

from defectscope.data.datasets import Record
from defectscope.errors import ConfigError


def fold_of(n: int, k: int, seed: int) -> np.ndarray:
    """The cross-fitting fold (0..k-1) of each of ``n`` images: seeded, sizes within one."""
    return np.random.default_rng(seed).permutation(n) % k


def sample_shots(records: list[Record], k: int, seed: int) -> list[Record]:
    """k distinct training records chosen by ``seed``; the same (records, k, seed) -> the same shots."""
    if not 1 <= k <= len(records):
        raise ConfigError(f"Cannot take {k} shots from {len(records)} training images.")
    picked = np.random.default_rng(seed).choice(len(records), size=k, replace=False)
    return [records[i] for i in sorted(picked.tolist())]
