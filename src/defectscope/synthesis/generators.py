"""Defect generators: each returns ``(image, mask)`` with the mask exactly where pixels changed.

Images are uint8 arrays, H x W (greyscale) or H x W x 3, and keep their mode. Blending
follows DRAEM / RealNet: A = (1 - M) * I + (1 - delta) * (M * I) + delta * (M * P), with
opacity delta and source P: another region of the same image (CutPaste and its scar
variant), a texture image, a colour or noise patch, or, for ``poisson``, another normal
image cloned in seamlessly (NSA), or, for ``sdas``, a sample of a diffusion model of the
normal images drawn with a perturbed reverse process (RealNet's SDAS, `defectscope.components.diffusion`),
placed through a Perlin mask with opacity in [0.5, 1] as the official code does. The returned mask is computed from the written pixels,
so it is exact after quantisation to uint8.

The *whole-image* kinds (`GLOBAL_KINDS`) change the image as a whole, where every patch
may still look like some normal patch: ``rotate`` (the texture's direction or the part's
orientation turned by 90 degrees, resized back to the frame), ``rescale`` (zoomed in by
1.25-1.6, the wrong distance or the wrong size of part), ``colour`` (a colour cast of
per-channel gains, or for greyscale a gamma of 0.6-0.8 or 1.25-1.6) and ``remove`` (a
component gone: a large region, 5-20% of the frame, filled with the heavily blurred
surroundings). Their masks are the changed pixels, so nearly the whole frame for the
first three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import sparse
from scipy.sparse.linalg import splu

from defectscope.errors import ConfigError
from defectscope.synthesis.masks import mask_of_kind

GLOBAL_KINDS = ("rotate", "rescale", "colour", "remove")
KINDS = ("perlin", "cutpaste", "scar", "scratch", "texture", "noise", "poisson", "sdas", *GLOBAL_KINDS)


def _as3(image: np.ndarray) -> np.ndarray:
    return image[..., None].astype(np.float64) if image.ndim == 2 else image.astype(np.float64)


def _finish(original: np.ndarray, blended: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out = out[..., 0] if original.ndim == 2 else out
    changed = out != original
    return out, changed if changed.ndim == 2 else changed.any(axis=2)


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, opacity: float) -> tuple[np.ndarray, np.ndarray]:
    """A = (1 - M) I + (1 - delta) M I + delta M P; returns (uint8 image, exact changed mask)."""
    i, p = _as3(image), _as3(source)
    m = mask.astype(np.float64)[..., None]
    return _finish(image, (1 - m) * i + (1 - opacity) * m * i + opacity * m * p)


def _shifted(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image moved by a random offset (reflected at the borders): 'another region of itself'."""
    h, w = image.shape[:2]
    dy, dx = int(rng.integers(-h // 2, h // 2 + 1)), int(rng.integers(-w // 2, w // 2 + 1))
    ys = np.abs((np.arange(h) + dy) % (2 * h) - h + 0.5).astype(int).clip(0, h - 1)
    xs = np.abs((np.arange(w) + dx) % (2 * w) - w + 0.5).astype(int).clip(0, w - 1)
    return image[ys][:, xs]


def _rect_mask(shape: tuple[int, int], rng: np.random.Generator, area: tuple[float, float], aspect: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    h, w = shape
    a = rng.uniform(*area) * h * w
    r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    ph, pw = np.sqrt(a * r), np.sqrt(a / r)
    cy, cx = rng.uniform(ph / 2, max(ph / 2 + 1, h - ph / 2)), rng.uniform(pw / 2, max(pw / 2 + 1, w - pw / 2))
    corners = np.array([[-pw, -ph], [pw, -ph], [pw, ph], [-pw, ph]]) / 2
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = corners @ rot.T + [cx, cy]
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas) > 0


def _texture_source(shape: tuple[int, ...], textures: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    tex = textures[int(rng.integers(len(textures)))]
    img = Image.fromarray(tex).convert("L" if len(shape) == 2 else "RGB").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(img)


def _noise_source(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(0, 255, size=(1, 1, 3 if len(shape) == 3 else 1))
    noise = rng.normal(0, rng.uniform(5, 40), size=(*shape[:2], colour.shape[2]))
    out = np.clip(colour + noise, 0, 255)
    return out[..., 0] if len(shape) == 2 else out


def poisson_clone(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seamless cloning (Perez et al. 2003): inside the mask, solve the Poisson equation
    Laplace(f) = Laplace(source) with f = target on the mask's border (sparse LU, scipy)."""
    m = mask.copy()
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = False
    h, w = m.shape
    idx = -np.ones((h, w), dtype=np.int64)
    ys, xs = np.nonzero(m)
    n = ys.size
    if n == 0:
        return target.copy(), np.zeros_like(mask)
    idx[ys, xs] = np.arange(n)
    t, s = _as3(target), _as3(source)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.full(n, 4.0)]
    rhs = 4 * s[ys, xs]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        rhs -= s[ny, nx]
        inside = idx[ny, nx] >= 0
        rows.append(np.nonzero(inside)[0])
        cols.append(idx[ny, nx][inside])
        vals.append(-np.ones(int(inside.sum())))
        rhs[~inside] += t[ny[~inside], nx[~inside]]
    a = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solution = splu(a).solve(rhs)
    out = t.copy()
    out[ys, xs] = solution
    return _finish(target, out)


def synthesize(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    textures: Sequence[np.ndarray] = (),
    donors: Sequence[np.ndarray] = (),
    generated: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect of ``kind`` on a uint8 image; returns (image, exact mask).

    ``foreground`` restricts the region; ``textures`` feed ``texture`` (and ``perlin``
    when given); ``donors`` (other normal images) feed ``poisson``; ``generated``
    (perturbed diffusion samples) feed ``sdas``.
    """
    if kind not in KINDS:
        raise ConfigError(f"Unknown defect kind {kind!r}; choose from {', '.join(KINDS)}.")
    shape = image.shape[:2]
    for _ in range(20):
        out, mask = _draw(image, kind, rng, shape, textures, donors, generated, foreground)
        if mask.any():
            return out, mask
    raise ConfigError(f"Could not place a visible {kind} defect on an image of size {shape} (foreground too small?).")


def _resized(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((shape[1], shape[0]), Image.BICUBIC))


def _whole_image(image: np.ndarray, kind: str, rng: np.random.Generator, foreground: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One of `GLOBAL_KINDS` (see module docstring); ``foreground`` bounds only ``remove``
    (the others change the whole frame by definition)."""
    shape = image.shape[:2]
    if kind == "rotate":
        return _finish(image, _as3(_resized(np.ascontiguousarray(np.rot90(image, k=int(rng.choice([1, 3])))), shape)))
    if kind == "rescale":
        f = float(rng.uniform(1.25, 1.6))
        h, w = shape
        ch, cw = max(1, round(h / f)), max(1, round(w / f))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return _finish(image, _as3(_resized(image[y : y + ch, x : x + cw], shape)))
    if kind == "colour":
        if image.ndim == 2 or _is_grey(image):
            gamma = float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.6)]))
            return _finish(image, 255.0 * (_as3(image) / 255.0) ** gamma)
        gains = np.ones(3)
        while np.abs(gains - 1).max() < 0.1:
            gains = rng.uniform(0.8, 1.2, size=3)
        return _finish(image, _as3(image) * gains)
    region = _rect_mask(shape, rng, (0.05, 0.2), (0.5, 2.0))
    region = region if foreground is None else region & foreground
    radius = max(shape) / 8
    fill = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    return blend(image, fill, region, 1.0)


def _is_grey(image: np.ndarray) -> bool:
    """An RGB array whose three channels are equal (a greyscale camera saved as RGB)."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def _draw(image, kind, rng, shape, textures, donors, generated, foreground) -> tuple[np.ndarray, np.ndarray]:
    if kind in GLOBAL_KINDS:
        return _whole_image(image, kind, rng, foreground)
    if kind in ("cutpaste", "scar"):
        if kind == "cutpaste":
            region = _rect_mask(shape, rng, (0.02, 0.15), (0.3, 3.3))
        else:
            region = _rect_mask(shape, rng, (0.002, 0.01), (8.0, 20.0), angle=float(rng.uniform(-np.pi / 4, np.pi / 4)))
        source, opacity = _shifted(image, rng), 1.0
    elif kind == "scratch":
        region = mask_of_kind("scratch", shape, rng)
        level = 0.0 if image.mean() > 127 else 255.0
        source, opacity = np.full(image.shape, level), float(rng.uniform(0.5, 0.9))
    elif kind == "poisson":
        if not donors:
            raise ConfigError("Poisson blending needs donor images (other normal images).")
        region = mask_of_kind("ellipse", shape, rng)
        donor = _texture_source(image.shape, donors, rng)
        region = region if foreground is None else region & foreground
        return poisson_clone(image, _shifted(donor, rng), region)
    else:
        region = mask_of_kind("perlin", shape, rng)
        if kind == "sdas":
            if not generated:
                raise ConfigError("The sdas kind needs samples of a diffusion model (train one with `defectscope train-ddpm`, pass --ddpm).")
            source = _texture_source(image.shape, generated, rng)
        elif kind == "texture" or (kind == "perlin" and textures):
            if not textures:
                raise ConfigError("The texture kind needs a folder of texture images (--textures).")
            source = _texture_source(image.shape, textures, rng)
        else:
            source = _noise_source(image.shape, rng)
        opacity = float(rng.uniform(0.5, 1.0))
    if foreground is not None:
        region = region & foreground
    return blend(image, source, region, opacity)
