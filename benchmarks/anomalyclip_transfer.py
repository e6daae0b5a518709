"""AnomalyCLIP's protocol (learn on one dataset, test zero-shot on another) with the tiny
random CLIP, on synthetic splits of real images: does prompt learning learn, and transfer?

For magnetic_tile and battery_weld a synthetic split is made from train/good (`defectscope
synth`: Perlin, CutPaste and Poisson defects with exact masks). Prompts are learned on one
split's test images and evaluated on the other split's test images, against the untrained
initial prompts (same seed). Prints image AUROC, pixel AUROC, AUPRO, training seconds and
the first/last loss; writes each loss curve next to its prompts file.

What this shows and does not: with random CLIP weights the features carry no semantics,
so the numbers say nothing about the real method's accuracy; they show that the loss,
the gradients through the learned tokens and the prompt placement work end to end.
`--clip defectscope-dinov2 --pretrained dinov2` puts real image features under the same
loop (DINOv2 ViT-S/14 blocks 1-8, random text tower): then learned prompts can find a
defect direction in real features, and the cross-product rows test whether it carries to
another product. It is still not CLIP: no image-text alignment, so the untrained prompts
are a random direction, not CLIP's zero-shot words.

    python benchmarks/anomalyclip_transfer.py [--n 40] [--epochs 15] [--image-size 224] [--clip defectscope-dinov2 --pretrained dinov2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectscope.detectors.anomalyclip import AnomalyCLIP
from defectscope.detectors.anomalyclip_training import train_prompts
from defectscope.evaluation.evaluate import evaluate
from defectscope.synthesis.split import make_synthetic_split

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/defectscope_anomalyclip_transfer"))
    ap.add_argument("--n", type=int, default=40, help="synthetic defects per kind")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=111)
    ap.add_argument("--clip", default="defectscope-small", help="a test architecture (backbones/clip.py TEST_CONFIGS)")
    ap.add_argument("--pretrained", default="random", help="'random', or 'dinov2' with --clip defectscope-dinov2 (real image tower, random text tower)")
    ap.add_argument("--in-sample", action="store_true", help="also score the split the prompts were learned on")
    ap.add_argument("--real", action="store_true", help="also score the other product's real test images (real defects, real masks)")
    args = ap.parse_args()
    options = {"clip_model": args.clip, "clip_pretrained": args.pretrained, "image_size": args.image_size, "depth": 3}
    splits = {}
    for name in ("magnetic_tile", "battery_weld"):
        splits[name] = args.work / f"{name}_synth"
        if not splits[name].exists():
            make_synthetic_split(DATASETS / name, splits[name], kinds=("perlin", "cutpaste", "poisson"), n=args.n, seed=0)
    print("| learned on | tested on | prompts | image AUROC | pixel AUROC | AUPRO | train s | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    for source, target in (("magnetic_tile", "battery_weld"), ("battery_weld", "magnetic_tile")):
        out = args.work / f"prompts_{args.clip}_{args.pretrained}_{source}_s{args.seed}_e{args.epochs}.dscope"
        summary = train_prompts([splits[source]], out, options=options, epochs=args.epochs, seed=args.seed, overwrite=True)
        tests = [(f"{target} synth", splits[target])]
        tests += [(f"{source} synth (in sample)", splits[source])] if args.in_sample else []
        tests += [(f"{target} real test", DATASETS / target)] if args.real else []
        for where, data in tests:
            for label, prompts in (("untrained", "untrained"), ("learned", str(out))):
                det = AnomalyCLIP(**options, prompts=prompts, seed=args.seed)
                row = evaluate(det, data).overall
                train = f"{summary['train_seconds']:.0f}" if label == "learned" else "-"
                loss = f"{summary['loss_first']:.3f} -> {summary['loss_last']:.3f}" if label == "learned" else "-"
                print(f"| {source} synth | {where} | {label} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} | {train} | {loss} |")
        print(f"loss curve: {summary['loss_curve']}")


if __name__ == "__main__":
    main()
