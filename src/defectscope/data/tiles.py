"""Tiles: large images seen by a detector as overlapping tiles, maps stitched back.

A defect a few dozen pixels wide in a 5-25 megapixel image disappears when the whole
image is resized to the network's usual 256 px. With tiling (`Preprocess.tile`), an image
is scaled by ``Preprocess.scale`` (1 = the camera's pixels) and cut into ``tile`` x
``tile`` tiles whose starts are spread evenly so that neighbours share at least
``overlap`` of their side and the last tile ends at the border. Fitting sees every tile of
every normal image as a training sample (`training_samples`, a stream: one image's tiles
at a time). Scoring runs the detector on the tiles and blends their maps into one map at
the scaled image size (`stitch`): each tile's map is weighted by a ramp that falls from 1
in the tile's middle towards its edges inside the overlap, where a CNN's zero padding
makes features least like the whole image's; the weights never reach 0, so image borders
(covered by one tile) keep their values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from defectscope.data.datasets import Record, Sample, iter_samples
from defectscope.data.images import Preprocess

MIN_WEIGHT = 1e-3  # a tile's weight at its very edge (relative to its middle)


@dataclass(frozen=True)
class Box:
    """A tile's place in the scaled image: top, left, height, width in pixels."""

    top: int
    left: int
    height: int
    width: int


def starts(length: int, tile: int, overlap: float) -> list[int]:
    """Evenly spread starts of tiles of ``tile`` px over ``length`` px: neighbours share at
    least ``overlap`` x ``tile`` px, the first starts at 0 and the last ends at ``length``."""
    if length <= tile:
        return [0]
    stride = max(1, math.floor(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def boxes(height: int, width: int, pre: Preprocess) -> list[Box]:
    """The tiles covering a ``height`` x ``width`` scaled image, row by row. A side shorter
    than the tile gives tiles of that side's length."""
    tile = pre.tile
    if tile is None:
        return [Box(0, 0, height, width)]
    th, tw = min(tile, height), min(tile, width)
    return [Box(t, left, th, tw) for t in starts(height, tile, pre.overlap) for left in starts(width, tile, pre.overlap)]


def cut(image: torch.Tensor, tiles: Sequence[Box]) -> torch.Tensor:
    """3 x H x W -> T x 3 x th x tw (all tiles of one image have one size)."""
    return torch.stack([image[:, b.top : b.top + b.height, b.left : b.left + b.width] for b in tiles])


@lru_cache(maxsize=32)
def _ramp(length: int, ramp: int) -> torch.Tensor:
    """1 in the middle, falling linearly to MIN_WEIGHT over ``ramp`` px at both ends."""
    if ramp <= 0:
        return torch.ones(length)
    edge = torch.minimum(torch.arange(length), torch.arange(length).flip(0)).float()
    return ((edge + 0.5) / ramp).clamp(MIN_WEIGHT, 1.0)


def weights(height: int, width: int, pre: Preprocess) -> torch.Tensor:
    """A tile's blending weight, th x tw: separable ramps over the overlap width."""
    ramp = 0 if pre.tile is None else round(pre.overlap * pre.tile)
    return _ramp(height, ramp)[:, None] * _ramp(width, ramp)[None, :]


def stitch(maps: torch.Tensor, tiles: Sequence[Box], size: tuple[int, int], pre: Preprocess) -> torch.Tensor:
    """Blend tile maps T x th x tw into one H x W map (weighted mean where tiles overlap)."""
    out = torch.zeros(size)
    total = torch.zeros(size)
    w = weights(maps.shape[-2], maps.shape[-1], pre)
    for m, b in zip(maps, tiles, strict=True):
        out[b.top : b.top + b.height, b.left : b.left + b.width] += w * m
        total[b.top : b.top + b.height, b.left : b.left + b.width] += w
    return out / total


def tile_samples(sample: Sample, pre: Preprocess) -> Iterator[Sample]:
    """One scaled image's tiles as samples (same path, label and defect; the mask cut alike)."""
    h, w = sample.image.shape[-2:]
    for b in boxes(h, w, pre):
        rows, cols = slice(b.top, b.top + b.height), slice(b.left, b.left + b.width)
        mask = None if sample.mask is None else sample.mask[rows, cols]
        yield replace(sample, image=sample.image[:, rows, cols], mask=mask)


def training_samples(records: Sequence[Record], pre: Preprocess) -> Iterator[Sample]:
    """What a detector fits on: the decoded images, or with tiling their tiles (streamed:
    the tiles of one image at a time, so memory holds features, never all tiles)."""
    for sample in iter_samples(records, pre):
        if pre.tile is None:
            yield sample
        else:
            yield from tile_samples(sample, pre)
