"""Dataset layouts on real data, and the errors a user meets with broken folders."""

from __future__ import annotations

import csv
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from defectscope.data.datasets import batches, iter_samples, load_dataset, load_folder
from defectscope.data.images import Preprocess
from defectscope.errors import DataError


def test_battery_weld_layout_and_orphan_masks(battery: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        ds = load_dataset(battery)
    assert len(ds.train) == 45 and len(ds.test) == 112
    assert ds.defects == ["defective"]
    assert all(r.mask_path is not None and r.mask_path.name == r.path.name for r in ds.test if r.label)
    assert "40 masks" in caplog.text  # orphans are reported, not a crash


def test_magnetic_tile_masks_with_suffix_and_sizes(magnetic: Path) -> None:
    ds = load_dataset(magnetic)
    assert len(ds.train) == 666 and len(ds.test) == 678
    assert set(ds.defects) == {"blowhole", "break", "crack", "fray", "uneven"}
    assert all(r.mask_path.name == f"{r.path.stem}_mask.png" for r in ds.test if r.label)
    pre = Preprocess(256, "aspect")
    samples = list(iter_samples(ds.test[:40], pre))
    assert len({s.image.shape for s in samples}) > 1  # sizes vary; none squashed
    for s in samples:
        assert s.mask is not None and s.mask.shape == s.image.shape[1:]
    assert all(len({x.image.shape for x in b}) == 1 for b in batches(iter(samples), 8))


def test_category_subfolder(battery: Path) -> None:
    ds = load_dataset(battery.parent, category="battery_weld", validate=False)
    assert len(ds.train) == 45


def test_missing_mask_names_image_and_fix(small_mvtec: Path) -> None:
    victim = sorted((small_mvtec / "ground_truth/defective").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=f"No mask for defective image .*{re.escape(victim.name)}.*--no-masks"):
        load_dataset(small_mvtec)
    ds = load_dataset(small_mvtec, require_masks=False)
    assert sum(r.mask_path is None for r in ds.test if r.label) == 1


def test_mask_of_wrong_size_is_refused_before_work(small_mvtec: Path) -> None:
    mask = sorted((small_mvtec / "ground_truth/defective").iterdir())[0]
    Image.open(mask).resize((50, 50)).save(mask)
    with pytest.raises(DataError, match=f"{re.escape(mask.name)}.*50x50"):
        load_dataset(small_mvtec)


def test_unreadable_image_in_dataset_is_refused_before_work(small_mvtec: Path) -> None:
    bad = small_mvtec / "train/good/broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(small_mvtec)


def test_not_a_dataset_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a dataset folder"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="No images in"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing")


def test_visa_csv_layout(tmp_path: Path, battery: Path) -> None:
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    rows = []
    for sub, split, label in (("train/good", "train", "normal"), ("test/good", "test", "normal"), ("test/defective", "test", "anomaly")):
        for p in sorted((battery / sub).iterdir())[:3]:
            dest = root / "pcb1" / sub / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
            mask = ""
            if label == "anomaly":
                m = root / "pcb1/masks" / p.name
                m.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(battery / "ground_truth/defective" / p.name, m)
                mask = str(m.relative_to(root))
            rows.append({"object": "pcb1", "split": split, "label": label, "image": str(dest.relative_to(root)), "mask": mask})
    rows.append({**rows[0], "object": "pcb2"})
    with (root / "split_csv/1cls.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="several objects"):
        load_dataset(root)
    ds = load_dataset(root, category="pcb1")
    assert len(ds.train) == 3 and len(ds.test) == 6
    sample = next(iter_samples([r for r in ds.test if r.label], Preprocess()))
    assert sample.mask is not None and bool(sample.mask.any())
    assert isinstance(sample.image, torch.Tensor)


def test_visa_anomalous_train_rows_never_train(tmp_path: Path, battery: Path) -> None:
    """A few-shot split file lists anomalous images under `train`; they must not be fitted on."""
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    rows = []
    for sub, split, label in (("train/good", "train", "normal"), ("test/defective", "train", "anomaly"), ("test/good", "test", "normal")):
        for p in sorted((battery / sub).iterdir())[:3]:
            dest = root / sub / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
            rows.append({"object": "weld", "split": split, "label": label, "image": str(dest.relative_to(root)), "mask": ""})
    for name in ("0_fewshot.csv", "1cls.csv"):  # 0_fewshot sorts first, so it is the default choice
        with (root / "split_csv" / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for split_file in (None, "1cls.csv"):
        ds = load_dataset(root, split_file=split_file, require_masks=False)
        assert len(ds.train) == 3 and all(r.label == 0 and "train/good" in str(r.path) for r in ds.train)
    from defectscope.data.fewshot import sample_shots

    assert all(r.label == 0 for seed in range(5) for r in sample_shots(ds.train, 3, seed))
    with pytest.raises(DataError, match="No split file 'x.csv'"):
        load_dataset(root, split_file="x.csv")
