"""AnomalyCLIP cost on this CPU with the paper's architecture, ViT-L-14-336-quickgelu (random weights:
the timing does not depend on them; they are seeded, no download).

Prints per input size (336 = CLIP's own, 518 = the paper's): predict ms/image (DPAM
encoder + maps, batch 1), one training step at batch 8 with the frozen embeddings cached
(text encoder forward/backward through the learned tokens, loss, Adam) and without the
cache (plus 8 image encodings), and the process's peak RSS. The paper trains and tests
on one NVIDIA RTX 3090 (24 GB); its timing table could not be retrieved here, so no GPU
figure is printed beside ours.

Time it alone: two processes using both cores slow each other several-fold.

    python benchmarks/anomalyclip_speed.py [--sizes 336,518] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from defectscope.detectors.anomalyclip import AnomalyCLIP
from defectscope.detectors.anomalyclip_training import anomalyclip_loss


def _timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(size: int, repeats: int, batch: int) -> dict[str, float]:
    """Predict seconds/image, cached and uncached training seconds/step, at one input size."""
    det = AnomalyCLIP(clip_pretrained="random", image_size=size, prompts="untrained").fit(None)  # the paper's model by default
    x = torch.rand(1, 3, size, size)
    predict = _timed(lambda: det.predict(x), repeats)
    grid = size // det.clip.patch
    dim = det.text.shape[-1]
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    patches = [F.normalize(torch.randn(batch, grid * grid, dim, generator=g), dim=-1) for _ in det.layers]
    masks = (torch.rand(batch, size, size, generator=g) > 0.9).float()
    labels = torch.arange(batch) % 2
    optimizer = torch.optim.Adam(det.learner.parameters(), lr=1e-3, betas=(0.5, 0.999))

    def step() -> None:
        loss, _ = anomalyclip_loss(det.learner(det.clip), image, patches, masks, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    cached = _timed(step, repeats)
    encode = _timed(lambda: det.encode(torch.rand(batch, 3, size, size)), 1)
    return {"grid": grid, "predict": predict, "cached": cached, "uncached": cached + encode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="336,518")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"| input px | grid | predict ms/image | train s/step, cached (batch {args.batch}) | train s/step, uncached | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        m = measure(size, args.repeats, args.batch)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {size} | {m['grid']}x{m['grid']} | {m['predict'] * 1000:.0f} | {m['cached']:.2f} | {m['uncached']:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
