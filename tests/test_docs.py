"""The documentation: the site builds with --strict (broken links and references fail), and
every Python example on its pages runs, page by page, on the shared datasets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.rglob("*.md") if PYTHON_BLOCK.search(p.read_text(encoding="utf-8")))


def test_site_builds_strict(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "--false-alarm-rate" in cli and "--keep-days" in cli  # the CLI reference came from the typer app
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "predict_folder" in api and "Result" in api  # the API reference came from the docstrings


def test_every_page_with_python_has_some() -> None:
    names = {p.name for p in PAGES}
    assert {"quickstart.md", "tutorial.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_python_examples_run(page: Path, tmp_path: Path, battery: Path) -> None:
    """The page's blocks run in order in one namespace, in a fresh folder where the
    shared datasets are `data/` (as the pages say)."""
    (tmp_path / "data").symlink_to(battery.parent, target_is_directory=True)
    code = "\n\n".join(m.group(1) for m in PYTHON_BLOCK.finditer(page.read_text(encoding="utf-8")))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{page.name}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
