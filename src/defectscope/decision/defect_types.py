"""Defect types from a few labelled examples: one prototype per type; the nearest names a region.

An example is an image in ``DIR/<type>/`` with its mask ``<stem>_mask.png`` beside it
(or, without one, the largest region the model's own map finds above its threshold).
Its signature is the mean backbone feature inside the defect minus the mean outside it
(the part's own background, so lighting and texture of that part cancel), L2-normalised;
a type's prototype is the normalised mean of its examples' signatures. A region of a new
image is named by the prototype of highest cosine similarity, and "unknown" when that
similarity is below the lowest leave-one-out similarity of an example to its own type:
the examples, not a tuned constant, say how close is close.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.components.features import fuse_stages
from defectscope.data.datasets import Record, Sample, load_sample
from defectscope.data.images import IMAGE_SUFFIXES, Preprocess
from defectscope.decision.explain import Finding, region_level
from defectscope.decision.scoring import score_samples
from defectscope.detectors.base import Detector
from defectscope.errors import ConfigError, DataError

log = logging.getLogger("defectscope")
UNKNOWN = "unknown"
INSIDE_SHARE = 0.25  # a feature cell is inside the defect when this share of its pixels is


def features(detector: Detector, image: torch.Tensor) -> torch.Tensor:
    """The model's fused backbone features of one image, D x h x w."""
    backbone = getattr(detector, "backbone", None)
    if backbone is None:
        raise ConfigError(f"Naming defect types needs the model's backbone features; {detector.name} models have none (use the .dscope model file).")
    with torch.inference_mode():
        return fuse_stages(backbone(image[None]))[0]  # D x h x w


def signature(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Normalised (mean of ``feats`` inside ``mask`` - mean outside) at the feature grid;
    None for an empty mask."""
    share = F.interpolate(mask[None, None].float(), size=feats.shape[-2:], mode="area")[0, 0]
    if share.max() <= 0:
        return None
    inside = share >= min(INSIDE_SHARE, float(share.max()))
    outside = share == 0
    flat = feats.flatten(1)
    background = flat[:, outside.flatten()].mean(1) if outside.any() else flat.mean(1)
    sig = flat[:, inside.flatten()].mean(1) - background
    return sig / sig.norm().clamp(min=1e-12)


@dataclass
class DefectTypes:
    """Prototypes (K x D, normalised) of the named types and the similarity a match needs."""

    names: list[str]
    prototypes: torch.Tensor
    accept: float

    @classmethod
    def from_signatures(cls, signatures: dict[str, list[torch.Tensor]]) -> DefectTypes:
        names = sorted(k for k, v in signatures.items() if v)
        if not names:
            raise DataError("No usable defect examples (every mask was empty or no image was found).")
        protos = torch.stack([F.normalize(torch.stack(signatures[n]).mean(0), dim=0) for n in names])
        loo = []
        for n in names:
            sigs = signatures[n]
            for i in range(len(sigs)):
                rest = [s for j, s in enumerate(sigs) if j != i]
                if rest:
                    loo.append(float(F.normalize(torch.stack(rest).mean(0), dim=0) @ sigs[i]))
        accept = min(loo) if loo else 0.0  # one example per type: nothing says how close is close
        return cls(names, protos, accept)

    @classmethod
    def from_folder(cls, detector: Detector, folder: str | Path, threshold: float | None) -> DefectTypes:
        """Prototypes from ``folder/<type>/<image>`` (+ ``<stem>_mask.png``; see module docstring)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"Defect examples folder not found: {folder}. It needs one sub-folder per defect type.")
        signatures: dict[str, list[torch.Tensor]] = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
            found = {p: example_signature(detector, p, threshold) for p in images}
            empty = [p.name for p, sig in found.items() if sig is None]
            signatures[sub.name] = [sig for sig in found.values() if sig is not None]
            if not signatures[sub.name]:
                raise DataError(
                    f"Defect type {sub.name!r} ({sub}) has no usable example: "
                    + (f"the masks of {', '.join(empty)} are empty and the model finds no region there" if empty else "no images")
                    + ". Draw the defect in <stem>_mask.png, or remove the folder."
                )
            if empty:
                log.warning("Defect type %r: %d of %d examples have an empty mask and no region above the threshold (%s); left out.",
                            sub.name, len(empty), len(images), ", ".join(empty))
        if not signatures:
            raise DataError(f"{folder} has no sub-folders; put each defect type's examples in DIR/<type>/.")
        return cls.from_signatures(signatures)

    def name(self, sig: torch.Tensor) -> tuple[str, float]:
        """The nearest type and its cosine similarity ("unknown" below ``accept``)."""
        sims = self.prototypes @ sig
        best = int(sims.argmax())
        sim = float(sims[best])
        return (self.names[best] if sim >= self.accept else UNKNOWN), sim

    def label(self, detector: Detector, sample: Sample, amap: np.ndarray, finding: Finding) -> Finding:
        """``finding`` with each region named (the region's pixels of the map, at network size)."""
        if not finding.regions:
            return finding
        level = region_level(amap, finding.threshold)
        feats = features(detector, sample.image)  # one backbone pass for all regions
        named = []
        for r in finding.regions:
            mask = np.zeros(amap.shape, bool)
            box = (slice(r.y, r.y + r.height), slice(r.x, r.x + r.width))
            mask[box] = amap[box] >= level
            sig = signature(feats, sample_mask(mask, sample))
            kind, sim = (UNKNOWN, 0.0) if sig is None else self.name(sig)
            named.append(replace(r, kind=kind, kind_similarity=sim))
        return replace(finding, regions=named)


def sample_mask(mask: np.ndarray, sample: Sample) -> torch.Tensor:
    """A mask in original pixels brought to the sample's network input."""
    return Preprocess.mask(mask, sample.geometry)


def example_signature(detector: Detector, path: Path, threshold: float | None) -> torch.Tensor | None:
    """One example's signature: its mask, or else the model's largest region above threshold."""
    mask_path = path.with_name(f"{path.stem}_mask.png")
    sample = load_sample(Record(path, label=1, mask_path=mask_path if mask_path.is_file() else None), detector.preprocess)
    if sample.mask is None:
        if threshold is None:
            raise DataError(f"{path} has no mask ({mask_path.name}) and the model has no threshold to find the defect itself.")
        amap = next(score_samples(detector, iter([sample]), score_refused=True)).original_map()
        level = region_level(amap, threshold)
        sample.mask = sample_mask(amap >= level, sample)
    return signature(features(detector, sample.image), sample.mask)

