"""The package's layers import one way only: each package from the layers below it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "defectscope"
# lowest first; a package may import from its own layer and those before it
LAYERS = [
    {"errors", "data"},
    {"backbones", "components"},
    {"synthesis"},
    {"detectors"},
    {"decision"},
    {"modelfiles"},
    {"evaluation", "pipeline"},
    {"engines", "serve", "api", "demo", "cli", "__init__"},
]


def unit(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def level(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_imports_run_one_way() -> None:
    wrong = []
    for path in ROOT.rglob("*.py"):
        here = unit(path)
        for target in re.findall(r"^\s*(?:from|import) defectscope\.(\w+)", path.read_text(encoding="utf-8"), re.M):
            if level(target) > level(here):
                wrong.append(f"{path.relative_to(ROOT)} imports defectscope.{target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_has_a_layer() -> None:
    units = {unit(p) for p in ROOT.rglob("*.py")}
    assert all(any(u in layer for layer in LAYERS) for u in units), units
