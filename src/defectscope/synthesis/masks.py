"""Where a synthetic defect goes: Perlin blobs, ellipses, scratches, inside the foreground.

Every function takes a NumPy ``Generator`` so the same seed gives the same mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1] with ``res`` lattice cells per axis, vectorised."""
    h, w = shape
    ry, rx = res
    gy, gx = np.meshgrid(np.linspace(0, ry, h, endpoint=False), np.linspace(0, rx, w, endpoint=False), indexing="ij")
    iy, ix = gy.astype(int), gx.astype(int)
    fy, fx = gy - iy, gx - ix
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grad[iy + oy, ix + ox]
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return np.sqrt(2) * (top * (1 - uy) + bottom * uy)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5, max_scale: int = 6) -> np.ndarray:
    """Thresholded Perlin noise at a random scale (2^0..2^max_scale cells) and rotation (DRAEM-style)."""
    res = (2 ** int(rng.integers(0, max_scale)), 2 ** int(rng.integers(0, max_scale)))
    noise = perlin_noise(shape, res, rng)
    noise = ndimage.rotate(noise, float(rng.uniform(-90, 90)), reshape=False, order=1, mode="reflect")
    return noise > threshold


def ellipse_mask(shape: tuple[int, int], rng: np.random.Generator, max_frac: float = 0.2) -> np.ndarray:
    """A filled, randomly rotated ellipse up to ``max_frac`` of the image's short side across."""
    h, w = shape
    m = min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    a, b = rng.uniform(0.03, max_frac) * m, rng.uniform(0.02, max_frac / 2) * m
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def scratch_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A thin curved stroke: a quadratic Bezier curve 1-4 px wide."""
    h, w = shape
    pts = rng.uniform([0, 0], [w, h], size=(3, 2))
    t = np.linspace(0, 1, 200)[:, None]
    curve = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in curve], fill=255, width=int(rng.integers(1, 5)), joint="curve")
    return np.asarray(canvas) > 0


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """Foreground estimate: Otsu's threshold on luminance; the side of it holding fewer border
    pixels is the object. Returns bool H x W."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    hist, edges = np.histogram(grey, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    thr = centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))]
    fg = grey > thr
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    return ~fg if border.mean() > 0.5 else fg


def mask_of_kind(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A non-empty region mask: 'perlin', 'ellipse' or 'scratch'."""
    makers = {"perlin": perlin_mask, "ellipse": ellipse_mask, "scratch": scratch_mask}
    for _ in range(50):
        m = makers[kind](shape, rng)
        if m.any():
            return m
    raise RuntimeError(f"could not draw a non-empty {kind} mask for shape {shape}")
