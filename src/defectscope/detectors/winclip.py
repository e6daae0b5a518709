"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): zero-/few-shot anomaly detection with CLIP.

Text: the compositional prompt ensemble (`prompts.py`) is encoded, normalised and averaged
per state into t_n and t_a. Language score of an embedding v (cosine similarities,
temperature tau = 0.07):

    s(v) = exp(<v, t_a> / tau) / (exp(<v, t_n> / tau) + exp(<v, t_a> / tau))

Image score (zero-shot): s(global image embedding) -- not the max of the map.
Zero-shot map: window embeddings at k x k windows (k in ``window_sizes``, default 2 and
3) plus the patch tokens; each window's score goes to every patch it covers and the
scores covering a patch merge by harmonic mean, n / sum_w 1/s_w; the scales merge by
harmonic mean; the G x G map is upsampled and smoothed.
WinCLIP+ (``fit`` with k normal images): a memory of their window and patch embeddings
per scale; a query window/patch scores min over the memory of (1 - cos) / 2, assigned to
patches as above, and the scales are averaged. Pixel map = mean of the zero-shot and
visual maps; image score = mean of the language score and the max of the visual map.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F

from defectscope.backbones.clip import CLIPBackbone, get_clip
from defectscope.components.prompts import prompts
from defectscope.data.datasets import Sample
from defectscope.detectors.base import Detector, Prediction, Progress, patch_scores_to_maps, register, square_input
from defectscope.errors import ConfigError

TEMPERATURE = 0.07


@register
class WinCLIP(Detector):
    """WinCLIP (zero-shot, ``fit(None)``) and WinCLIP+ (``fit`` with a few normal images)."""

    name = "winclip"
    export_refusal: ClassVar[str] = "its CLIP text and image towers are not part of the graph export yet"
    needs_training_images: ClassVar[bool] = False
    tiling_refusal: ClassVar[str | None] = "its windows and image score come from one CLIP input of the model's own size"

    def __init__(
        self,
        *,
        class_name: str = "object",
        clip_model: str = "ViT-B-16-plus-240",
        clip_pretrained: str = "laion400m_e31",
        window_sizes: tuple[int, ...] = (2, 3),
        resize: str = "letterbox",
        sigma: float = 4.0,
        batch_size: int = 4,
        preprocess: dict[str, Any] | None = None,
    ) -> None:
        """``preprocess`` may only choose ``resize``: the input size is the CLIP model's own."""
        self.class_name, self.clip_model, self.clip_pretrained = class_name, clip_model, clip_pretrained
        self.window_sizes, self.sigma, self.batch_size = tuple(window_sizes), sigma, batch_size
        self._clip: CLIPBackbone | None = None
        self.preprocess = square_input(self, self.clip.image_size, resize, preprocess)
        self.resize = self.preprocess.resize
        self.text = torch.empty(0)
        self.memory: dict[str, torch.Tensor] = {}

    @property
    def clip(self) -> CLIPBackbone:
        if self._clip is None:
            self._clip = get_clip(self.clip_model, self.clip_pretrained)
        return self._clip

    def config(self) -> dict[str, Any]:
        return {
            "class_name": self.class_name,
            "clip_model": self.clip_model,
            "clip_pretrained": self.clip_pretrained,
            "window_sizes": list(self.window_sizes),
            "resize": self.resize,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"text": self.text, **{f"memory_{k}": v for k, v in self.memory.items()}}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.text = state["text"].float()
        self.memory = {k.removeprefix("memory_"): v.float() for k, v in state.items() if k.startswith("memory_")}

    @property
    def info(self) -> dict[str, Any]:
        return {"clip": f"{self.clip_model}/{self.clip_pretrained}", "shots_memory": {k: int(v.shape[0]) for k, v in self.memory.items()}}

    def text_embeddings(self) -> torch.Tensor:
        """2 x D: the averaged, renormalised normal and anomalous prompt embeddings."""
        normal, anomalous = prompts(self.class_name)
        return torch.stack([F.normalize(self.clip.encode_text(p).mean(0), dim=0) for p in (normal, anomalous)])

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised image embeddings N x D and per scale N x units x D (windows or patches)."""
        image, patches = self.clip.encode(x)
        scales = {"patch": F.normalize(patches, dim=-1)}
        for k in self.window_sizes:
            scales[f"win{k}"] = F.normalize(self.clip.window_embeddings(x, k), dim=-1)
        return F.normalize(image, dim=-1), scales

    def _cover(self, scale: str) -> torch.Tensor:
        """units x G*G 0/1 matrix: which patches each window (or patch) covers."""
        g = self.clip.grid
        if scale == "patch":
            return torch.eye(g * g)
        idx = CLIPBackbone.window_index(g, int(scale.removeprefix("win")))
        return torch.zeros(idx.shape[0], g * g).scatter_(1, idx, 1.0)

    def _to_patches(self, unit_scores: torch.Tensor, scale: str) -> torch.Tensor:
        """N x units scores -> N x G*G by harmonic averaging over the units covering each patch."""
        cover = self._cover(scale)
        return cover.sum(0) / ((1.0 / unit_scores.clamp(min=1e-6)) @ cover)

    def language_score(self, emb: torch.Tensor) -> torch.Tensor:
        """P(anomalous) from the softmax over cosine similarities with t_n and t_a."""
        return torch.softmax(emb @ self.text.T / TEMPERATURE, dim=-1)[..., 1]

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        if not self.class_name:
            raise ConfigError("WinCLIP needs the product's name: class_name=... (CLI: --set class_name=bottle).")
        self.text = self.text_embeddings()
        self.memory = {}
        if images is None:
            return self
        feats: dict[str, list[torch.Tensor]] = {}
        for i, s in enumerate(images):
            _, scales = self._scales(s.image[None])
            for name, v in scales.items():
                feats.setdefault(name, []).append(v[0])
            if progress:
                progress("features", i + 1, 0)
        self.memory = {name: torch.cat(v) for name, v in feats.items()}
        return self

    def predict(self, batch: torch.Tensor) -> Prediction:
        if self.text.numel() == 0:
            raise ConfigError("WinCLIP is not fitted: call fit(None) (zero-shot) or fit(images) (few-shot).")
        image, scales = self._scales(batch)
        zero = {name: self._to_patches(self.language_score(v), name) for name, v in scales.items()}
        zero_map = len(zero) / sum(1.0 / m.clamp(min=1e-6) for m in zero.values())
        text_score = self.language_score(image)
        g = self.clip.grid
        if self.memory:
            visual = [self._to_patches(self._visual_scores(v, self.memory[name]), name) for name, v in scales.items()]
            visual_map = torch.stack(visual).mean(0)
            patch_map = (zero_map + visual_map) / 2
            scores = (text_score + visual_map.max(dim=1).values) / 2
        else:
            patch_map, scores = zero_map, text_score
        maps = patch_scores_to_maps(patch_map.view(-1, g, g), tuple(batch.shape[-2:]), self.sigma)
        return Prediction(scores, maps)

    @staticmethod
    def _visual_scores(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """N x units: min over memory of (1 - cos) / 2 (both sides normalised)."""
        return ((1.0 - query @ memory.T) / 2).min(dim=-1).values.clamp(min=1e-6)
