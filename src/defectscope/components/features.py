"""PatchCore's locally aware patch features, shared by every embedding method.

For each chosen stage the map is averaged over a p x p neighbourhood (stride 1), the
coarser maps are upsampled bilinearly to the finest grid and the channels concatenated.
Optionally each patch vector is reduced to ``dim`` channels by adaptive average pooling
over channels, as the PatchCore reference code does (useful for wide backbones; for
EfficientNet-Lite0's 40 + 112 = 152 channels it is not needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_aggregate(fmap: torch.Tensor, p: int) -> torch.Tensor:
    """Average each position over its p x p neighbourhood (PatchCore eq. 2), same size out.

    Zero padding counts in the average at the border, as in the reference code's unfold:
    border patches then stay distinguishable from interior ones and match the bank's
    border patches. (Averaging over valid neighbours only cost 7 points of image AUROC on
    battery_weld: 0.857 against 0.930.)
    """
    if p <= 1:
        return fmap
    return F.avg_pool2d(fmap, kernel_size=p, stride=1, padding=p // 2, count_include_pad=True)


def fuse_stages(fmaps: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Upsample every map to ``size`` (default: the finest map's grid) and concatenate channels."""
    size = size or tuple(fmaps[0].shape[-2:])
    out = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in fmaps]
    return torch.cat(out, dim=1)


def reduce_channels(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """N x C x h x w -> N x dim x h x w by adaptive average pooling over channels."""
    if dim is None or dim == x.shape[1]:
        return x
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(n, h, w, dim).permute(0, 3, 1, 2)


def patch_features(fmaps: list[torch.Tensor], p: int = 3, dim: int | None = None) -> torch.Tensor:
    """Locally aware patch features: N x D x h x w on the finest chosen stage's grid."""
    return reduce_channels(fuse_stages([local_aggregate(f, p) for f in fmaps]), dim)


def flatten_patches(x: torch.Tensor) -> torch.Tensor:
    """N x D x h x w -> (N*h*w) x D, row order image-major then row-major."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
