"""Write a synthetic MVTec-layout dataset from normal images (`defectscope synth`).

The normal images are split with the seed: half stay untouched as ``train/good`` (to fit
on), the other half is the pool for ``test/good`` (untouched copies) and for the bases of
the synthetic defects in ``test/<kind>/`` with exact masks in ``ground_truth/<kind>/``.
So a detector fitted on ``train/good`` never saw the images it is tested on.

With a diffusion model (``ddpm``, `defectscope.components.diffusion`), kind ``sdas`` blends its
samples drawn at ``strength`` into the pool images (RealNet's SDAS), and kind ``normal``
writes ``n`` plain samples (s = 0) to ``generated/good/``, at the model's own size: extra
normal images, kept apart from the real ones so nobody fits on them unknowingly.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.components.charts import contact_sheet
from defectscope.components.diffusion import DDPM
from defectscope.components.progress import Progress
from defectscope.data.datasets import load_folder, training_records
from defectscope.data.images import load_image_uint8
from defectscope.errors import ConfigError, DataError
from defectscope.synthesis.generators import KINDS, synthesize
from defectscope.synthesis.masks import otsu_foreground


@dataclass
class SynthSummary:
    out: Path
    train: int
    good: int
    per_kind: dict[str, int] = field(default_factory=dict)
    preview: Path | None = None


def make_synthetic_split(
    data: str | Path,
    out: str | Path,
    *,
    kinds: Sequence[str] = ("perlin", "cutpaste", "poisson"),
    n: int = 100,
    seed: int = 0,
    textures: str | Path | None = None,
    foreground: bool = False,
    preview: str | Path | None = None,
    ddpm: str | Path | None = None,
    strength: float = 0.15,
    progress: Progress | None = None,
) -> SynthSummary:
    """Build the split described in the module docstring; refuses a non-empty ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; choose a new --out folder (nothing is overwritten).")
    unknown = [k for k in kinds if k not in (*KINDS, "normal")]
    if unknown:
        raise ConfigError(f"Unknown kind {', '.join(unknown)}; choose from {', '.join((*KINDS, 'normal'))}.")
    diffusion = None
    if {"sdas", "normal"} & set(kinds):
        if ddpm is None:
            raise ConfigError("Kinds sdas and normal sample a diffusion model: train one with `defectscope train-ddpm DATA -o DDPM` and pass --ddpm DDPM.")
        diffusion = DDPM.load(ddpm)
    records = training_records(data)
    if len(records) < 4:
        raise DataError(f"{data} has {len(records)} normal images; synthesis needs at least 4 (half are kept for fitting).")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    pool = [records[i].path for i in order[: len(records) // 2]]
    train = [records[i].path for i in order[len(records) // 2 :]]
    texture_arrays = [load_image_uint8(r.path) for r in load_folder(textures)] if textures else []
    for sub, paths in (("train/good", train), ("test/good", pool[:n])):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, out / sub / p.name)
    summary = SynthSummary(out, len(train), min(n, len(pool)))
    examples: list[list[np.ndarray]] = []
    labels: list[str] = []
    done, total = 0, n * len(kinds)
    if "normal" in kinds:
        (out / "generated" / "good").mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(diffusion.sample(n, strength=0.0, seed=seed)):
            Image.fromarray(image).save(out / "generated" / "good" / f"gen_{j:03d}.png")
        summary.per_kind["normal"] = n
        done += n
        if progress:
            progress("synth", done, total)
    for kind in (k for k in kinds if k != "normal"):
        generated = list(diffusion.sample(n, strength=strength, seed=seed + 1)) if kind == "sdas" else []
        (out / "test" / kind).mkdir(parents=True, exist_ok=True)
        (out / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            base_idx = int(rng.integers(len(pool)))
            base = load_image_uint8(pool[base_idx])
            donors = [load_image_uint8(pool[(base_idx + d) % len(pool)]) for d in (1, 2)] if kind == "poisson" else []
            fg = otsu_foreground(base) if foreground else None
            sources = generated[j : j + 1]
            image, mask = synthesize(base, kind, rng, foreground=fg, textures=texture_arrays, donors=donors, generated=sources)
            Image.fromarray(image).save(out / "test" / kind / f"{j:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "ground_truth" / kind / f"{j:03d}_mask.png")
            if j < 3:
                examples.append([base, image, mask])
                labels.append(f"{kind} #{j} ({pool[base_idx].name})")
            done += 1
            if progress:
                progress("synth", done, total)
        summary.per_kind[kind] = n
    if preview is not None:
        summary.preview = contact_sheet(examples, Path(preview), labels=labels)
    return summary
