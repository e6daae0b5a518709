"""Seeded k-shot sampling of normal training images (the papers' few-shot protocol)."""

from __future__ import annotations

import numpy as np

from defectscope.data.datasets import Record
from defectscope.errors import ConfigError


def sample_shots(records: list[Record], k: int, seed: int) -> list[Record]:
    """k distinct training records chosen by ``seed``; the same (records, k, seed) -> the same shots."""
    if not 1 <= k <= len(records):
        raise ConfigError(f"Cannot take {k} shots from {len(records)} training images.")
    picked = np.random.default_rng(seed).choice(len(records), size=k, replace=False)
    return [records[i] for i in sorted(picked.tolist())]
