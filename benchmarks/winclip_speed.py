"""WinCLIP ms/image per scale on this CPU, with the paper's architecture (ViT-B-16-plus-240).

Timing does not depend on the weights' values, so with no real weights installed this
runs the real architecture with random weights (stated in the output). Scales: the image
pass (global embedding + patch tokens), then all 2x2 and all 3x3 windows, each computed as
one batch of masked token sets (not one transformer pass per window).

    python benchmarks/winclip_speed.py [--images 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from defectscope.backbones.clip import CLIPBackbone
from defectscope.errors import WeightsError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16-plus-240")
    ap.add_argument("--pretrained", default="laion400m_e31")
    ap.add_argument("--images", type=int, default=5)
    args = ap.parse_args()
    try:
        clip, weights = CLIPBackbone(args.model, args.pretrained), args.pretrained
    except WeightsError:
        clip, weights = CLIPBackbone(args.model, "random"), "random (no real weights here; timing only)"
    x = torch.rand(1, 3, clip.image_size, clip.image_size)
    steps = {
        "image + patch tokens": lambda: clip.encode(x),
        "2x2 windows": lambda: clip.window_embeddings(x, 2),
        "3x3 windows": lambda: clip.window_embeddings(x, 3),
    }
    print(f"WinCLIP on {args.model} ({weights}), {clip.image_size} px, {clip.grid}x{clip.grid} patches, {torch.get_num_threads()} threads\n")
    print("| scale | windows | ms/image |")
    print("|---|---|---|")
    total = 0.0
    for name, fn in steps.items():
        fn()
        t = time.perf_counter()
        for _ in range(args.images):
            fn()
        ms = 1000 * (time.perf_counter() - t) / args.images
        total += ms
        k = {"2x2 windows": 2, "3x3 windows": 3}.get(name)
        print(f"| {name} | {(clip.grid - k + 1) ** 2 if k else 1} | {ms:.0f} |")
    print(f"| total | | {total:.0f} |")


if __name__ == "__main__":
    main()
