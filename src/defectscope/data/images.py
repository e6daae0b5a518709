"""Robust image and mask decoding, and the geometry of resizing them for a backbone.

Factory images come as greyscale, RGB, RGBA, palette, 16-bit or EXIF-rotated files of
varying sizes. `load_image` turns all of them into one float RGB array; `Preprocess`
decides how an image is brought to the network's size *without* squashing it out of
shape unless the user asks for that (`resize="squash"`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from defectscope.errors import DataError

log = logging.getLogger("defectscope")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 32  # the smallest side a CNN with stride 32 still gives a feature map for
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (a 20000 x 20000 header is a bomb)
FORMATS = "PNG, JPEG, BMP, TIFF or WebP"
ResizeMode = Literal["aspect", "letterbox", "squash"]


def decode_problem(exc: BaseException) -> str:
    """What went wrong decoding a file, in words (no Python object reprs)."""
    if isinstance(exc, UnidentifiedImageError):
        return f"it is not an image in a format that can be read ({FORMATS})"
    if isinstance(exc, Image.DecompressionBombError):
        return "its header declares far more pixels than a camera image has (a decompression bomb)"
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", str(exc)) or type(exc).__name__
    if "truncated" in text or isinstance(exc, EOFError):
        return f"the file is truncated ({text})"
    return f"it is damaged ({type(exc).__name__}: {text})"


def check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS, before decoding it."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise DataError(
            f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f} MP limit; "
            "send a camera image (or scale it down first)."
        )


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; any failure is a `DataError` naming the file and the fix."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}. Check the path, or remove the entry that names it.")
    try:
        img = Image.open(path)
        check_pixels(img.size, f"{what} {path}")
        img.load()
        return ImageOps.exif_transpose(img)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for a damaged file; each is this file's fault
        raise DataError(
            f"Cannot read {what} {path}: {decode_problem(exc)}. Replace it with a {FORMATS} file or move it out of the folder."
        ) from exc


def _to_float_array(img: Image.Image) -> np.ndarray:
    """Decode any PIL mode into float32 H x W x C in [0, 1] (C = 1 or 3)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0):
            scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
            arr = arr / scale
        else:
            finite = np.isfinite(arr)
            arr = np.where(finite, arr, np.nan)  # NaN and inf stay NaN: the frame checks refuse them
            lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
            arr = (arr - lo) / (hi - lo) if hi > lo else np.where(finite, 0.0, np.nan).astype(np.float32)
        return np.clip(arr, 0.0, 1.0)[..., None]
    if mode in ("1", "L", "LA"):
        return (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[..., None]
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 H x W x 3 in [0, 1]; greyscale is replicated to 3 channels."""
    arr = _to_float_array(_open(Path(path), "image"))
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def image_array(image: Image.Image | np.ndarray, name: str) -> np.ndarray:
    """An image handed over in memory (a PIL image, or a numpy array H x W grey or H x W x 3
    / x 4 colour; uint8, uint16, bool, or float in [0, 1]) as float32 H x W x 3 in [0, 1].
    NaN stays NaN (the frame checks refuse it); anything else a camera would not produce is
    a DataError that says how to convert it."""
    if isinstance(image, Image.Image):
        check_pixels(image.size, name)
        arr = _to_float_array(image)
    elif isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] in (1, 3, 4):
            image = image[..., :3] if image.shape[2] == 4 else image
        elif image.ndim != 2:
            raise DataError(f"{name}: an array of shape {image.shape}; pass H x W (grey) or H x W x 3 (RGB).")
        check_pixels((image.shape[1], image.shape[0]), name)
        if image.dtype == np.uint8:
            arr = image.astype(np.float32) / 255.0
        elif image.dtype == np.uint16:
            arr = image.astype(np.float32) / 65535.0
        elif image.dtype == bool:
            arr = image.astype(np.float32)
        elif np.issubdtype(image.dtype, np.floating):
            arr = image.astype(np.float32)
            finite = arr[np.isfinite(arr)]
            if finite.size and (finite.min() < 0 or finite.max() > 1):
                raise DataError(f"{name}: float pixels from {finite.min():.3g} to {finite.max():.3g}; scale them to [0, 1] (e.g. divide by 255).")
        else:
            raise DataError(f"{name}: pixels of type {image.dtype}; pass uint8, uint16 or float in [0, 1].")
        arr = arr[..., None] if arr.ndim == 2 else arr
    else:
        raise DataError(f"{name}: a {type(image).__name__}; pass a file path, a PIL image or a numpy array.")
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def load_image_uint8(path: str | Path) -> np.ndarray:
    """Read an image as uint8 in its own colour mode: H x W for greyscale, H x W x 3 otherwise."""
    arr = _to_float_array(_open(Path(path), "image"))
    arr = arr[..., 0] if arr.shape[2] == 1 else arr
    return np.rint(arr * 255.0).astype(np.uint8)


LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


def _mask_values(img: Image.Image) -> np.ndarray:
    """The mask's own values as float64 H x W, in the file's scale (no min-max scaling).

    Colour masks count their brightest channel; a mask drawn only in the alpha channel
    (colour channels constant) is read from the alpha channel.
    """
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("I")
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 2:
        return arr
    has_alpha = img.mode in ("RGBA", "LA")
    colour = arr[..., :-1] if has_alpha else arr
    if has_alpha and np.ptp(colour) == 0 and np.ptp(arr[..., -1]) > 0:
        return arr[..., -1]
    return colour.max(axis=2)


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """Defective where a value lies above half the mask's value range (its min to its max).

    ``> 0`` would grow a JPEG-compressed mask by its ringing; the midpoint keeps 0/1,
    0/255 and 0/65535 masks exact. A constant mask is all-defective if non-zero, else empty.
    """
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.full(values.shape, hi > 0)
    return values > (lo + hi) / 2


def load_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool H x W (see `binarize_mask`); warn when it looks lossy."""
    path = Path(path)
    values = _mask_values(_open(path, "mask"))
    levels = np.unique(values).size
    if levels > 2 or path.suffix.lower() in LOSSY_SUFFIXES:
        _warn_lossy(path, levels)
    return binarize_mask(values)


_LOSSY_FOLDERS: set[Path] = set()


def _warn_lossy(path: Path, levels: int) -> None:
    """Once per folder: masks with grey levels are probably JPEG-compressed or anti-aliased."""
    if path.parent in _LOSSY_FOLDERS:
        return
    _LOSSY_FOLDERS.add(path.parent)
    log.warning(
        "Mask %s has %d grey levels (lossy compression or anti-aliasing?); binarised at half its "
        "value range. Store masks as 0/255 PNG for exact pixel metrics.",
        path,
        levels,
    )


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, reading only the header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"File not found: {path}. Check the path.")
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - as in _open
        raise DataError(f"Cannot read {path}: {decode_problem(exc)}. Replace it with a {FORMATS} file or remove it.") from exc
    check_pixels((w, h), str(path))
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


@dataclass(frozen=True)
class Geometry:
    """Where an original image sits inside the network input: its size and content box."""

    original: tuple[int, int]
    content: tuple[int, int, int, int]  # top, left, height, width inside the network input
    input: tuple[int, int]


@dataclass(frozen=True)
class Preprocess:
    """How images are brought to the network's size.

    - ``aspect`` (default): the long side becomes ``size``, the short side keeps the aspect
      ratio; nothing is padded or distorted. Crops of different heights from one camera
      keep one pixel scale (scaling the *short* side would not: a thin crop would be
      magnified several times and look foreign to the memory bank).
    - ``letterbox``: as ``aspect``, then padded to ``size x size`` (for methods that need
      one input size, such as PaDiM).
    - ``squash``: resized to ``size x size`` regardless of shape (the user's choice only).

    Tiling (``tile`` set): ``size`` and ``resize`` do not apply. The image is scaled by
    ``scale`` (1 = the camera's own pixels) and the detector sees it as ``tile`` x ``tile``
    tiles that share at least ``overlap`` of their side with their neighbours
    (`defectscope.data.tiles`); maps are stitched back at the scaled size.
    """

    size: int = 256
    resize: ResizeMode = "aspect"
    tile: int | None = None
    overlap: float = 0.25
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.resize not in ("aspect", "letterbox", "squash"):
            raise DataError(f"Unknown resize mode {self.resize!r}; use aspect, letterbox or squash.")
        if self.size < 32:
            raise DataError(f"Image size {self.size} is too small; use at least 32 pixels.")
        if self.tile is not None and self.tile < MIN_SIDE:
            raise DataError(f"Tile size {self.tile} is too small; use at least {MIN_SIDE} pixels.")
        if not 0 <= self.overlap <= 0.75:
            raise DataError(f"Tile overlap {self.overlap} must lie in 0..0.75 (a fraction of the tile side).")
        if not 0 < self.scale <= 4:
            raise DataError(f"Scale {self.scale} must lie in (0, 4] (1 = the image's own pixels).")
        if self.tile is None and self.scale != 1:
            raise DataError("--scale applies to tiled models only; add --tile SIZE (or use --size for whole images).")

    def to_dict(self) -> dict:
        return asdict(self)

    def geometry(self, h: int, w: int) -> Geometry:
        """Compute the content box and input size for an h x w image."""
        if self.tile is not None:
            sh, sw = max(MIN_SIDE, round(h * self.scale)), max(MIN_SIDE, round(w * self.scale))
            return Geometry((h, w), (0, 0, sh, sw), (sh, sw))
        s = self.size
        if self.resize == "squash":
            return Geometry((h, w), (0, 0, s, s), (s, s))
        scale = s / max(h, w)
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        if self.resize == "letterbox":
            top, left = (s - ch) // 2, (s - cw) // 2
            return Geometry((h, w), (top, left, ch, cw), (s, s))
        ch, cw = max(ch, MIN_SIDE), max(cw, MIN_SIDE)
        return Geometry((h, w), (0, 0, ch, cw), (ch, cw))

    def image(self, arr: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        """H x W x 3 float array -> 3 x H' x W' tensor at network size, and its geometry."""
        geo = self.geometry(arr.shape[0], arr.shape[1])
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
        top, left, ch, cw = geo.content
        t = F.interpolate(t, size=(ch, cw), mode="bilinear", align_corners=False, antialias=True)
        out = torch.zeros((1, 3, *geo.input), dtype=torch.float32)
        out[:, :, top : top + ch, left : left + cw] = t.clamp(0, 1)
        return out[0], geo

    @staticmethod
    def mask(mask: np.ndarray, geo: Geometry) -> torch.Tensor:
        """Bring a bool mask to network size with centre-aligned nearest-neighbour resizing.

        ``nearest-exact`` samples each output pixel at its centre, as the image's bilinear
        resize does; torch's ``nearest`` takes the top-left source pixel and would shift
        the mask by half a source pixel up and left.
        """
        top, left, ch, cw = geo.content
        t = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
        t = F.interpolate(t, size=(ch, cw), mode="nearest-exact")
        out = torch.zeros(geo.input, dtype=torch.bool)
        out[top : top + ch, left : left + cw] = t[0, 0] > 0.5
        return out


def to_original(anomaly_map: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Crop a map at network size to the content box and resize it to the original image size."""
    top, left, ch, cw = geo.content
    crop = anomaly_map[top : top + ch, left : left + cw][None, None]
    return F.interpolate(crop, size=geo.original, mode="bilinear", align_corners=False)[0, 0]


def crop_content(x: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """The part of a network-size map or mask that shows the image (drops letterbox padding)."""
    top, left, ch, cw = geo.content
    return x[..., top : top + ch, left : left + cw]
