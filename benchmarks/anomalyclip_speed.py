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

import torch
import torch.nn.functional as F

from defectscope.detectors.anomalyclip import AnomalyCLIP
from defectscope.prompt_learning import anomalyclip_loss


def _timed(fn, repeats: int) -> float:  # noqa: ANN001 - any callable
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="336,518")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print("| input px | grid | predict ms/image | train s/step, cached (batch %d) | train s/step, uncached | peak RSS MB |" % args.batch)
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        det = AnomalyCLIP(clip_pretrained="random", image_size=size, prompts="untrained").fit(None)  # the paper's model by default
        x = torch.rand(1, 3, size, size)
        predict = _timed(lambda: det.predict(x), args.repeats)
        grid = size // det.clip.patch
        dim = det.text.shape[-1]
        g = torch.Generator().manual_seed(0)
        image = F.normalize(torch.randn(args.batch, dim, generator=g), dim=-1)
        patches = [F.normalize(torch.randn(args.batch, grid * grid, dim, generator=g), dim=-1) for _ in det.layers]
        masks = (torch.rand(args.batch, size, size, generator=g) > 0.9).float()
        labels = torch.arange(args.batch) % 2
        optimizer = torch.optim.Adam(det.learner.parameters(), lr=1e-3, betas=(0.5, 0.999))

        def step() -> None:
            loss, _ = anomalyclip_loss(det.learner(det.clip), image, patches, masks, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        cached = _timed(step, args.repeats)
        encode = _timed(lambda: det.encode(torch.rand(args.batch, 3, size, size)), 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {size} | {grid}x{grid} | {predict * 1000:.0f} | {cached:.2f} | {cached + encode:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
