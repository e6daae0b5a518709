"""The detector contract, the registry, and what every patch-scoring method shares.

A method is one file in this package that subclasses `Detector` and is decorated with
`@register`; the CLI, `evaluate` and the model file code only ever talk to this contract.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones import default_stages, get_backbone
from defectscope.backbones.runtime import check_runtime
from defectscope.components.progress import Progress
from defectscope.data.datasets import Record, Sample, batches, iter_samples
from defectscope.data.fewshot import fold_of
from defectscope.data.images import Preprocess
from defectscope.data.tiles import Box, boxes, cut, stitch, training_samples
from defectscope.errors import ConfigError

log = logging.getLogger("defectscope")



@dataclass
class Prediction:
    """Image scores (N) and anomaly maps (N x H x W at the network input size); higher = worse."""

    scores: torch.Tensor
    maps: torch.Tensor


@dataclass
class NormalScores:
    """Every training image's score from a model that did not see it, and its maps' range.

    ``how`` names the scheme (leave-one-image-out, or k-fold cross-fitting); thresholds
    set from these scores use all normal images instead of holding some out.
    """

    scores: np.ndarray
    how: str
    map_low: float  # median of the images' median map values
    map_high: float  # largest map value
    medians: np.ndarray | None = None  # each image's median map value, in record order ("not the part")

    @staticmethod
    def summarize(pred: Prediction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, per-image median map value, per-image max map value) of one batch."""
        flat = pred.maps.flatten(1)
        return pred.scores.numpy(), flat.median(1).values.numpy(), flat.max(1).values.numpy()

    @classmethod
    def collect(cls, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], order: Sequence[int], how: str) -> NormalScores:
        """From `summarize`d batches whose images are ``order`` (indices into the records); the
        scores come back in record order."""
        back = np.argsort(np.asarray(order), kind="stable")
        scores = np.concatenate([p[0] for p in parts])[back]
        medians = np.concatenate([p[1] for p in parts])[back]
        return cls(scores, how, float(np.median(medians)), float(max(p[2].max() for p in parts)), medians)


class Detector(ABC):
    """What every method provides. Scores: higher = more anomalous."""

    name: ClassVar[str]
    needs_training_images: ClassVar[bool] = True
    # Options the k-shot protocol applies under the user's own (e.g. PatchCore keeps its whole bank).
    fewshot_config: ClassVar[dict[str, Any]] = {}
    preprocess: Preprocess

    @abstractmethod
    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        """Build the method's state from normal images (or nothing, for zero-shot methods)."""

    @abstractmethod
    def predict(self, batch: torch.Tensor) -> Prediction:
        """Score a batch N x 3 x H x W in [0, 1]; maps come back at H x W."""

    def predict_samples(self, samples: Iterable[Sample], batch_size: int = 8) -> Iterator[tuple[list[Sample], Prediction]]:
        """Score many samples: yields (samples, their Prediction) group by group.

        Inductive methods score equal-size batches independently; transductive methods
        (which score images against each other, e.g. MuSc) override this to see them all.
        """
        if self.preprocess.tile is not None:
            for s in samples:
                yield [s], self.predict_tiled(s.image, batch_size)
            return
        for b in batches(iter(samples), batch_size):
            yield b, self.predict(torch.stack([s.image for s in b]))

    def predict_tiled(self, image: torch.Tensor, batch_size: int = 8) -> Prediction:
        """Score one scaled image 3 x H x W through its tiles: the tile maps are stitched
        into one H x W map and the image score is `score_map` of that map."""
        tiles = boxes(image.shape[-2], image.shape[-1], self.preprocess)
        maps = torch.cat([self.predict(x).maps for x in cut(image, tiles).split(batch_size)])
        return self.stitched(maps, tiles, tuple(image.shape[-2:]))

    def stitched(self, maps: torch.Tensor, tiles: Sequence[Box], size: tuple[int, int]) -> Prediction:
        """A Prediction for one image from its tiles' maps."""
        full = stitch(maps, tiles, size, self.preprocess)
        return Prediction(self.score_map(full)[None], full[None])

    def score_map(self, amap: torch.Tensor) -> torch.Tensor:
        """An image's score from its stitched map (tiled models): the map's maximum, as the
        patch methods' own image scores are. Methods with another rule override this."""
        return amap.max()

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 5, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Fit on all ``records`` and score each of them with a model that did not see it.

        Default: k-fold cross-fitting (an unfitted twin is fitted on the other folds and
        scores the held-out fold), then the fit on all images. Methods that can leave one
        image out of a fitted model (memory banks) override this at a fraction of the cost.
        None for fewer than two images.
        """
        n = len(records)
        if n < 2:
            self.fit(training_samples(records, self.preprocess), progress=progress)
            return None
        k = min(folds, n)
        fold = fold_of(n, k, seed)
        parts, order = [], []
        for f in range(k):
            inside = [r for r, g in zip(records, fold, strict=True) if g != f]
            out = np.nonzero(fold == f)[0]
            twin = type(self)(**self.config()).fit(training_samples(inside, self.preprocess))
            for _, pred in twin.predict_samples(iter_samples([records[i] for i in out], self.preprocess)):
                parts.append(NormalScores.summarize(pred))
            order.extend(out.tolist())
            if progress:
                progress("cross-fit", f + 1, k)
        self.fit(training_samples(records, self.preprocess), progress=progress)
        return NormalScores.collect(parts, order, f"{k}-fold cross-fitting")

    # Whether the method learns from labelled defective images too (`use_defects`).
    learns_from_defects: ClassVar[bool] = False

    def use_defects(self, records: Sequence[Record]) -> None:
        """Train on these defective images as well (``mask_path`` where an outline exists);
        methods that learn from normal images only refuse."""
        raise ConfigError(f"{self.name} learns from normal images only; labelled defects need a method that uses them (supersimplenet).")

    def add_normals(self, images: Iterable[Sample]) -> dict[str, Any]:
        """Learn from more normal images without refitting (an inspector's "good part");
        returns what changed. Methods that cannot say so clearly."""
        raise ConfigError(f"{self.name} cannot add normal images to a fitted model; refit it with them.")

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able hyper-parameters: ``type(self)(**config)`` rebuilds an unfitted twin."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor fit() produced."""

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Self:
        """Rebuild a fitted detector from its config and state (no code is unpickled)."""
        det = cls(**config)
        det.load_state(state)
        return det

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Install tensors produced by ``state()``."""

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the fitted model worth recording (weights hash, sizes, timings)."""
        return {}

    def training_curve(self) -> tuple[list[float], str] | None:
        """(loss per step, title) for a method that trains a network: `defectscope fit` draws
        it as a PNG next to the model file. None for methods that do not train."""
        return None

    @property
    def scores_jointly(self) -> bool:
        """True for transductive methods (they override `predict_samples` to score images
        against each other): an image's score depends on which images share its batch, so
        engines that split the stream (Ray, the station's micro-batches) refuse them."""
        return type(self).predict_samples is not Detector.predict_samples

    def use_runtime(self, runtime: str | None) -> None:
        """Run the frozen backbone in ``runtime`` (`backbones.runtime`); methods without
        one run in torch and refuse any other."""
        if runtime not in (None, "auto", "torch"):
            raise ConfigError(f"{self.name} has no backbone that runs outside torch; drop --runtime {check_runtime(runtime)}.")

    # Why a method cannot score through tiles (None: it can; see `predict_tiled`).
    tiling_refusal: ClassVar[str | None] = None

    # Why `export_graph` refuses, for methods that do not override it.
    export_refusal: ClassVar[str] = "its scoring has not been written as a single tensor graph"

    def export_graph(self) -> nn.Module:
        """This fitted model as a module: images N x 3 x H x W in [0, 1] -> (scores N, maps
        N x H x W), made of the method's own scoring code, for `defectscope.modelfiles.export`."""
        raise ConfigError(f"{self.name} models cannot be exported: {self.export_refusal}.")


class ScoreGraph(nn.Module):
    """A fitted detector's scoring function as a module returning (scores, maps), for export.

    ``backbone`` is registered so its weights become the graph's parameters."""

    def __init__(self, score: Callable[[torch.Tensor], Prediction], backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self._score = score

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self._score(x)
        return pred.scores, pred.maps


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Detector]:
    """The registered detector class for ``name`` (a clear error for an unknown name)."""
    import defectscope.detectors  # noqa: F401 - importing the package registers every method

    if name not in REGISTRY:
        raise ConfigError(f"Unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]


FEW_SHOT_MAX = 8  # up to this many normal images, a fit is few-shot (the papers' k <= 8)


def fewshot_options(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's few-shot settings with the user's own options on top."""
    return {**method_class(name).fewshot_config, **(config or {})}


def training_options(name: str, n_images: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Options for fitting ``name`` on ``n_images`` normal images: few-shot settings when
    there are at most FEW_SHOT_MAX (a 1% coreset of two images would keep ten patches)."""
    config = dict(config or {})
    if n_images > FEW_SHOT_MAX:
        return config
    options = fewshot_options(name, config)
    if options != config:
        log.warning("Only %d normal images: %s uses its few-shot settings %s.", n_images, name, method_class(name).fewshot_config)
    return options


def make_detector(name: str, **config: Any) -> Detector:
    """Instantiate a registered method by name with the given hyper-parameters."""
    cls = method_class(name)
    try:
        return cls(**config)
    except TypeError as exc:
        raise ConfigError(f"Bad option for {name}: {exc}.") from exc


@lru_cache(maxsize=128)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """n x n matrix of a 1-D Gaussian (radius 4 sigma, clamped to n - 1) with reflect padding."""
    radius = min(max(1, math.ceil(4 * sigma)), n - 1)
    if sigma <= 0 or radius < 1:
        return torch.eye(n)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    eye = torch.eye(n, dtype=torch.float64)[:, None, :]  # each row a unit signal
    return F.conv1d(F.pad(eye, (radius, radius), mode="reflect"), k)[:, 0, :].T.float().contiguous()


@lru_cache(maxsize=128)
def _upsample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """n_out x n_in matrix of 1-D linear interpolation (align_corners=False), as F.interpolate does."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.float().contiguous()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of N x H x W maps (radius 4 sigma, reflect padding)."""
    h, w = maps.shape[-2:]
    return _blur_matrix(h, sigma) @ maps.float() @ _blur_matrix(w, sigma).T


def patch_scores_to_maps(scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """N x h x w patch scores -> N x H x W: bilinear upsampling, then Gaussian smoothing.

    Both steps are linear and separable, so they are applied as one (H x h) and one
    (w x W) matrix product: exact, and ~20x faster than interpolating then convolving.
    """
    h, w = scores.shape[-2:]
    rows = _blur_matrix(size[0], sigma) @ _upsample_matrix(h, size[0])
    cols = _blur_matrix(size[1], sigma) @ _upsample_matrix(w, size[1])
    return rows @ scores.float() @ cols.T


class CNNDetector(Detector):
    """Base for methods built on a frozen timm CNN: holds the backbone and input settings."""

    def __init__(
        self,
        *,
        backbone: str = "tf_efficientnet_lite0",
        stages: Sequence[int] | None = None,
        weights: str = "auto",
        preprocess: dict[str, Any] | None = None,
        sigma: float = 4.0,
        runtime: str | None = None,
    ) -> None:
        """``runtime``: where the backbone runs (auto, openvino, onnxruntime, torch; default the
        process's, `backbones.runtime`); not part of the model: a file records nothing of it."""
        self.backbone_name, self.weights = backbone, weights
        self.stages = default_stages(backbone) if stages is None else tuple(stages)
        self.preprocess = Preprocess(**(preprocess or {}))
        refuse_tiling(self, self.preprocess.tile)
        self.sigma = sigma
        self._backbone: nn.Module | None = None
        self.use_runtime(runtime)

    def use_runtime(self, runtime: str | None) -> None:
        """Run the backbone in ``runtime`` from now on (None: the process's default)."""
        self.runtime = None if runtime is None else check_runtime(runtime)
        self._backbone = None

    @property
    def backbone(self) -> nn.Module:
        if self._backbone is None:
            self._backbone = get_backbone(self.backbone_name, self.stages, self.weights, self.runtime)
        return self._backbone

    def base_config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "stages": list(self.stages),
            "weights": self.weights,
            "preprocess": self.preprocess.to_dict(),
            "sigma": self.sigma,
        }

    @property
    def info(self) -> dict[str, Any]:
        return {"weights_hash": self.backbone.weights_hash}


def refuse_tiling(detector: Detector, tile: int | None) -> None:
    """A `ConfigError` with the method's reason when tiles are asked of a method that refuses them."""
    if tile is not None and detector.tiling_refusal is not None:
        raise ConfigError(f"{detector.name} cannot tile images: {detector.tiling_refusal}. Drop --tile.")


def square_input(detector: Detector, size: int, resize: str, preprocess: dict[str, Any] | None) -> Preprocess:
    """The input of a method that runs at one square size of its own (CLIP methods): of the
    user's ``preprocess`` only ``resize`` is taken; tiling is refused with the method's reason."""
    given = preprocess or {}
    refuse_tiling(detector, given.get("tile"))
    resize = given.get("resize") or resize
    if resize not in ("letterbox", "squash"):
        raise ConfigError("CLIP takes square inputs: resize must be letterbox (keeps the shape) or squash.")
    return Preprocess(size, resize)


def check_ratio(name: str, value: float) -> float:
    """Validate a fraction in (0, 1]."""
    if not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value}.")
    return value


def holdout_scored(detector: Detector, records: Sequence[Record], share: float, seed: int, progress: Progress | None) -> NormalScores | None:
    """Fit on all but ``share`` of the normal ``records`` (seeded) and score those unseen:
    the threshold's normal scores for trained networks, too costly to cross-fit. The model
    keeps what it trained on; None (after fitting on all) for fewer than five images."""
    n = len(records)
    if n < 5:
        detector.fit(iter_samples(records, detector.preprocess), progress=progress)
        return None
    kept, held = holdout_split(n, share, seed)
    detector.fit(iter_samples([records[i] for i in kept], detector.preprocess), progress=progress)
    unseen = iter_samples([records[i] for i in held], detector.preprocess)
    parts = [NormalScores.summarize(pred) for _, pred in detector.predict_samples(unseen)]
    return NormalScores.collect(parts, held, f"{len(held)} held-out images ({share:.0%})")


def holdout_split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of ``n`` images to train on (in order) and the seeded ``share`` held out."""
    order = np.random.default_rng(seed).permutation(n)
    held = order[: max(1, round(share * n))].tolist()
    return sorted(set(order.tolist()) - set(held)), held
