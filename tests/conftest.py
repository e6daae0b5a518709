"""Shared fixtures: the real datasets in ../shared/datasets (read-only) and small copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Backbone graphs for the fast runtime are traced once per machine; the suite keeps its own
# cache beside the repository (clean in CI, reused between local runs), never the user's.
os.environ.setdefault("DEFECTSCOPE_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "defectscope-graphs"))

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BATTERY = DATASETS / "battery_weld"
MAGNETIC = DATASETS / "magnetic_tile"
BSDATA = DATASETS / "bsdata"


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.fail(f"Real dataset missing: {path}. CI runs with ../shared beside the clone.")
    return path


@pytest.fixture(scope="session")
def battery() -> Path:
    return require(BATTERY)


@pytest.fixture(scope="session")
def magnetic() -> Path:
    return require(MAGNETIC)


@pytest.fixture(scope="session")
def bsdata() -> Path:
    return require(BSDATA)


@pytest.fixture()
def small_mvtec(tmp_path: Path, battery: Path) -> Path:
    """A writable MVTec-layout copy: 12 train/good, 4 test/good, 4 defective with masks."""
    root = tmp_path / "weld"
    for sub, n in (("train/good", 12), ("test/good", 4), ("test/defective", 4)):
        (root / sub).mkdir(parents=True)
        for p in sorted((battery / sub).iterdir())[:n]:
            shutil.copy(p, root / sub / p.name)
            if sub == "test/defective":
                (root / "ground_truth/defective").mkdir(parents=True, exist_ok=True)
                shutil.copy(battery / "ground_truth/defective" / p.name, root / "ground_truth/defective" / p.name)
    return root
