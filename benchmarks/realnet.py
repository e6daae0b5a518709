"""RealNet next to PatchCore (full-shot) on magnetic_tile and battery_weld, and an ablation.

Main table, per dataset: PatchCore with its defaults, and RealNet with its defaults (SDAS
from a DDPM of that dataset's train/good, trained first with `train_ddpm` unless a file
is given or already in the work folder). Columns: image AUROC, pixel AUROC, AUPRO,
training minutes (RealNet: synthesis, features and training; the DDPM's own minutes in
their column), predict ms/image, model file size.

Ablation on magnetic_tile: synthesis source (SDAS, Perlin noise, CutPaste) x AFS on (the
default per-stage ratios) / off (every channel), at ``--ablation-steps`` training steps.

Run it alone: two processes on two cores slow each other several-fold.

    python benchmarks/realnet.py [--steps 2000] [--afs-off] [--ablation-steps 500] [--ablation-pool 1] [--ablation-synthesis sdas,perlin,cutpaste] [--skip-ablation] [--skip-main]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from defectscope.components.diffusion import train_ddpm
from defectscope.detectors.base import make_detector
from defectscope.evaluation.evaluate import evaluate
from defectscope.modelfiles.artifacts import save_detector

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def ddpm_for(name: str, folder: Path, steps: int) -> tuple[Path, str]:
    """(the dataset's DDPM file, its training minutes as text), training it when missing."""
    path = folder / f"{name}.dscope"
    if path.exists():
        from defectscope.components.diffusion import DDPM

        seconds = DDPM.load(path).manifest["training"]["train_seconds"]
        return path, f"{seconds / 60:.1f}"
    summary = train_ddpm(DATASETS / name, path, steps=steps)
    print(f"DDPM {name}: {summary['images']} images, {steps} steps, {summary['train_seconds'] / 60:.1f} min; samples {summary['samples']}")
    return path, f"{summary['train_seconds'] / 60:.1f}"


def row(method: str, name: str, work: Path, options: dict[str, Any]) -> dict[str, Any]:
    det = make_detector(method, **options)
    start = time.perf_counter()
    result = evaluate(det, DATASETS / name)
    model = save_detector(det, work / f"{method}_{name}_{int(start)}.dscope", overwrite=True)
    overall = result.overall
    return {**overall, "fit_min": result.cost["fit_s"] / 60, "predict_ms": result.cost["predict_ms_per_image"],
            "size_mb": model.stat().st_size / 2**20, "info": det.info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/defectscope_realnet"))
    ap.add_argument("--ddpm-dir", type=Path, default=None, help="folder with <dataset>.dscope DDPMs (default: WORK/ddpm)")
    ap.add_argument("--ddpm-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=None, help="RealNet training steps (default: its own default)")
    ap.add_argument("--afs-off", action="store_true", help="main rows: RealNet keeps every channel (afs_ratio=1)")
    ap.add_argument("--ablation-steps", type=int, default=500)
    ap.add_argument("--ablation-pool", type=int, default=None, help="synthetic copies per image in the ablation (default: RealNet's)")
    ap.add_argument("--ablation-synthesis", default="sdas,perlin,cutpaste", help="synthesis sources of the ablation's rows")
    ap.add_argument("--datasets", default="magnetic_tile,battery_weld")
    ap.add_argument("--skip-main", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ddpm_dir = args.ddpm_dir or args.work / "ddpm"
    ddpm_dir.mkdir(parents=True, exist_ok=True)
    realnet_options = ({} if args.steps is None else {"steps": args.steps}) | ({"afs_ratio": 1.0} if args.afs_off else {})
    names = args.datasets.split(",")
    ddpms = {n: ddpm_for(n, ddpm_dir, args.ddpm_steps) for n in names}
    if not args.skip_main:
        print("| dataset | method | image AUROC | pixel AUROC | AUPRO | training min | DDPM min | predict ms/img | model MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in names:
            for method, options, ddpm_min in (("patchcore", {}, "-"), ("realnet", {"ddpm": str(ddpms[name][0]), **realnet_options}, ddpms[name][1])):
                r = row(method, name, args.work, options)
                print(f"| {name} | {method} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
                      f"{r['fit_min']:.1f} | {ddpm_min} | {r['predict_ms']:.0f} | {r['size_mb']:.1f} |", flush=True)
    if not args.skip_ablation:
        name = "magnetic_tile"
        ddpm = ddpms.get(name) or ddpm_for(name, ddpm_dir, args.ddpm_steps)
        pool = {} if args.ablation_pool is None else {"pool": args.ablation_pool}
        print(f"\nAblation on {name}, {args.ablation_steps} steps each" + (f", pool {args.ablation_pool}" if pool else ""))
        print("| synthesis | AFS | channels kept | image AUROC | pixel AUROC | AUPRO | training min |")
        print("|---|---|---|---|---|---|---|")
        for synthesis in args.ablation_synthesis.split(","):
            for afs, ratio in (("on", {}), ("off", {"afs_ratio": 1.0})):
                options = {"synthesis": synthesis, "steps": args.ablation_steps, **pool, **ratio, **({"ddpm": str(ddpm[0])} if synthesis == "sdas" else {})}
                r = row("realnet", name, args.work, options)
                print(f"| {synthesis} | {afs} | {r['info']['afs_channels']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                      f"{r['aupro']:.3f} | {r['fit_min']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
