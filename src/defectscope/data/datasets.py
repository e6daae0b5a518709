"""Datasets on disk: MVTec AD layout (also MPDD, BTAD), VisA's split csv, and plain folders.

A dataset is first *indexed* (paths, labels, mask paths) and checked as a whole, so a
missing mask or unreadable file is reported before any work starts; samples are then
decoded lazily, one at a time.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from defectscope.data.images import (
    IMAGE_SUFFIXES,
    Geometry,
    Preprocess,
    image_size,
    load_image,
    load_mask,
)
from defectscope.errors import DataError

log = logging.getLogger("defectscope")
GOOD = "good"


@dataclass(frozen=True)
class Record:
    """One image on disk: where it is, whether it is defective, and where its mask is."""

    path: Path
    label: int = 0
    defect: str = GOOD
    mask_path: Path | None = None


@dataclass
class Sample:
    """A decoded image ready for a backbone: 3 x H x W float in [0, 1], mask H x W bool."""

    image: torch.Tensor
    geometry: Geometry
    path: str
    label: int = 0
    defect: str = GOOD
    mask: torch.Tensor | None = None


@dataclass
class Dataset:
    """An indexed dataset: train records (normal only) and test records."""

    root: Path
    train: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)

    @property
    def defects(self) -> list[str]:
        return sorted({r.defect for r in self.test if r.label == 1})


def list_images(folder: str | Path) -> list[Path]:
    """All image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Folder not found: {folder}. Check the path.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"No images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}). Point to the folder that holds them."
        )
    return files


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = gt_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _index_mvtec(root: Path, require_masks: bool) -> Dataset:
    ds = Dataset(root, train=[Record(p) for p in list_images(root / "train" / GOOD)])
    test_dir = root / "test"
    if not test_dir.is_dir():
        return ds
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        images = list_images(defect_dir)
        if defect == GOOD:
            ds.test += [Record(p) for p in images]
            continue
        gt_dir = root / "ground_truth" / defect
        used: set[Path] = set()
        for p in images:
            mask = _find_mask(gt_dir, p.stem)
            if mask is None and require_masks:
                raise DataError(
                    f"No mask for defective image {p}: expected {gt_dir / (p.stem + '_mask.png')} "
                    f"or {gt_dir / (p.stem + '.png')}. Add the mask, or load with require_masks=False "
                    "(CLI: --no-masks) to score images without pixel metrics."
                )
            if mask is not None:
                used.add(mask)
            ds.test.append(Record(p, 1, defect, mask))
        if gt_dir.is_dir():
            orphans = [m for m in gt_dir.iterdir() if m.is_file() and m not in used]
            if orphans:
                log.warning("%d masks in %s have no image in %s; ignored.", len(orphans), gt_dir, defect_dir)
    return ds


def _index_visa(root: Path, csv_path: Path, category: str | None) -> Dataset:
    ds = Dataset(root)
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"object", "split", "label", "image"}
    if not rows or not needed <= set(rows[0]):
        raise DataError(f"{csv_path} is not a VisA split file: it needs columns {sorted(needed)} (and 'mask').")
    objects = sorted({r["object"] for r in rows})
    if category is None and len(objects) > 1:
        raise DataError(f"{csv_path} holds several objects {objects}; name one with category=... (CLI: --category).")
    if category is not None and category not in objects:
        raise DataError(f"Category {category!r} is not in {csv_path}; it holds {objects}.")
    dropped = 0
    for r in rows:
        if category is not None and r["object"] != category:
            continue
        label = 1 if r["label"].strip().lower() in ("anomaly", "1", "bad", "defective") else 0
        mask = root / r["mask"] if label and r.get("mask") else None
        rec = Record(root / r["image"], label, "anomaly" if label else GOOD, mask)
        if r["split"].strip().lower() != "train":
            ds.test.append(rec)
        elif label:
            dropped += 1  # e.g. 2cls_fewshot.csv: a model is fitted (and shots drawn) on normal images only
        else:
            ds.train.append(rec)
    if dropped:
        log.warning("%s: %d anomalous rows in the train split are not used for fitting.", csv_path, dropped)
    return ds


def _validate(ds: Dataset) -> None:
    """Open every file header once so a bad file fails now, not half-way through a run."""
    for rec in [*ds.train, *ds.test]:
        size = image_size(rec.path)
        if rec.mask_path is not None:
            msize = image_size(rec.mask_path)
            if msize != size:
                raise DataError(
                    f"Mask {rec.mask_path} is {msize[1]}x{msize[0]} but its image {rec.path} is "
                    f"{size[1]}x{size[0]}; masks must have the image's size. Fix or remove the mask."
                )


def load_dataset(
    root: str | Path,
    *,
    category: str | None = None,
    require_masks: bool = True,
    validate: bool = True,
    split_file: str | None = None,
) -> Dataset:
    """Index a dataset folder.

    Accepted layouts: MVTec AD (``train/good``, ``test/<defect>``, ``ground_truth/<defect>``
    with masks named ``<stem>_mask.png`` or ``<stem>.png``; also MPDD and BTAD), a MVTec
    category inside ``root/category``, and VisA (``split_csv/<split_file>``, by default the
    first csv by name, e.g. ``1cls.csv``). Anomalous rows are never training images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder not found: {root}. Check the path.")
    csvs = sorted((root / "split_csv").glob("*.csv")) if (root / "split_csv").is_dir() else []
    if not csvs and category is not None and (root / category / "train").is_dir():
        root, category = root / category, None
    if split_file is not None:
        chosen = [c for c in csvs if c.name == split_file]
        if not chosen:
            raise DataError(f"No split file {split_file!r} in {root / 'split_csv'}; it holds {[c.name for c in csvs]}.")
        csvs = chosen
    if csvs:
        ds = _index_visa(root, csvs[0], category)
    elif (root / "train" / GOOD).is_dir():
        ds = _index_mvtec(root, require_masks)
    else:
        raise DataError(
            f"{root} is not a dataset folder: expected train/good/ (MVTec layout) or split_csv/*.csv "
            "(VisA layout). For a plain folder of normal images use it directly with `fit`."
        )
    if validate:
        _validate(ds)
    return ds


def load_folder(folder: str | Path) -> list[Record]:
    """Records for a plain folder of images (labels unknown, treated as normal)."""
    return [Record(p) for p in list_images(folder)]


MASK_SUFFIX = "_mask"  # a labelled defect's outline beside it: <stem>_mask.png


def defect_records(folder: str | Path) -> list[Record]:
    """Labelled defective images in ``folder``: each image with its outline ``<stem>_mask.png``
    beside it where one was drawn, else an image-level label only. The mask files
    themselves are not images to learn from."""
    images = [p for p in list_images(folder) if not p.stem.endswith(MASK_SUFFIX)]
    if not images:
        raise DataError(f"{folder} has no defect images; put the defective images there (outlines as <name>{MASK_SUFFIX}.png).")
    out = []
    for p in images:
        mask = p.with_name(f"{p.stem}{MASK_SUFFIX}.png")
        out.append(Record(p, 1, "labelled", mask if mask.is_file() else None))
    return out


def training_records(data: str | Path) -> list[Record]:
    """Normal training images: ``train/good`` of a dataset folder, or a plain image folder."""
    data = Path(data)
    if (data / "train" / GOOD).is_dir() or (data / "split_csv").is_dir():
        return load_dataset(data).train
    return load_folder(data)


def load_sample(rec: Record, pre: Preprocess) -> Sample:
    """Decode one record into a Sample at network size."""
    image, geo = pre.image(load_image(rec.path))
    mask = None
    if rec.mask_path is not None:
        raw = load_mask(rec.mask_path)
        if raw.shape != geo.original:
            raise DataError(
                f"Mask {rec.mask_path} has size {raw.shape[1]}x{raw.shape[0]}, its image {rec.path} "
                f"{geo.original[1]}x{geo.original[0]}. Masks must match their image."
            )
        mask = pre.mask(raw, geo)
    elif rec.label == 0:
        mask = torch.zeros(geo.input, dtype=torch.bool)
    return Sample(image, geo, str(rec.path), rec.label, rec.defect, mask)


def iter_samples(
    records: Sequence[Record], pre: Preprocess, *, on_error: Callable[[Record, DataError], None] | None = None
) -> Iterator[Sample]:
    """Decode records one by one (lazily, so a large folder never sits in memory).

    ``on_error``: called with a record that cannot be decoded, which is then skipped
    (a batch run goes on); without it the DataError is raised."""
    for rec in records:
        try:
            sample = load_sample(rec, pre)
        except DataError as exc:
            if on_error is None:
                raise
            on_error(rec, exc)
            continue
        yield sample


class SkipLog:
    """An ``on_error`` for `iter_samples` in training: warns once per unreadable file (named)
    and remembers it, so the run goes on and its summary can list what was left out."""

    def __init__(self) -> None:
        self.skipped: set[str] = set()

    def __call__(self, rec: Record, exc: DataError) -> None:
        if str(rec.path) not in self.skipped:
            log.warning("skipped %s: %s", rec.path, exc)
        self.skipped.add(str(rec.path))


def batches(samples: Iterator[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Group consecutive samples of equal input size into batches of at most ``batch_size``."""
    batch: list[Sample] = []
    for s in samples:
        if batch and (len(batch) >= batch_size or batch[0].image.shape != s.image.shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch
