"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompts learned once, zero-shot on new products.

Text: two prompts without a class name, g_n = "[V_1]..[V_E] object." and g_a = "[W_1]..[W_E]
damaged object." (E = 12 learned token embeddings each). Textual refinement: T = 4 learned
tokens replace positions 1..T of the sequence before each text block 1..depth-1 (depth 9).
Image: the frozen CLIP image encoder with DPAM (`CLIPBackbone.dpam_encode`: a V-V attention
path from block ``dpam_from`` on, default 6 of 24 = the official DPAM_layer 20); patch
tokens are read after blocks ``layers`` (default 6, 12, 18, 24) through ln_post and the
projection; the global embedding f is CLIP's own. With tau = 0.07:

    image score   s = softmax([<f, g_n>, <f, g_a>] / tau)_a      (the text probability only)
    anomaly map   M = G_sigma * sum_l Up( softmax([<p_l, g_n>, <p_l, g_a>] / tau)_a )

(the official map (P_a + 1 - P_n) / 2 equals P_a, as P_n + P_a = 1). The prompts are learned
by `defectscope.detectors.anomalyclip_training` on auxiliary images with masks and stored in a prompts file
(format ``defectscope-prompts``) that holds only the learned tensors, the CLIP model's name
and the CLIP weights' hash: loading it with other weights is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import nn

from defectscope import __version__
from defectscope.backbones.clip import CLIPBackbone, get_clip
from defectscope.data.datasets import Record, Sample, iter_samples
from defectscope.data.tensorfile import NOUNS, read_tensors, write_tensors
from defectscope.detectors.base import (
    Detector,
    NormalScores,
    Prediction,
    Progress,
    patch_scores_to_maps,
    register,
    square_input,
)
from defectscope.errors import ConfigError, ModelFileError

TEMPERATURE = 0.07
PROMPTS_FORMAT = "defectscope-prompts"
PROMPTS_VERSION = 1
RETRAIN = "learn prompts with `defectscope train-prompts AUX_DATA -o prompts.dscope`"
UNTRAINED = "untrained"  # prompts=untrained: the seeded initial prompts (a baseline, not the method)
# The paper's set-up; a prompts file supplies its own (None below = from the file, else these).
PAPER = {"clip_model": "ViT-L-14-336-quickgelu", "clip_pretrained": "openai", "image_size": 518, "n_ctx": 12, "depth": 9, "n_deep": 4}
LEARNED = ("normal", "anomalous", "deep")
NOUNS[PROMPTS_FORMAT] = "prompts"


def default_layers(blocks: int) -> tuple[int, ...]:
    """The blocks (1-based) whose patch tokens make maps: the quarters, 6/12/18/24 of 24."""
    return tuple(sorted({max(1, round(blocks * q / 4)) for q in range(1, 5)}))


class AgnosticPrompts(nn.Module):
    """The learned tensors: E normal and E anomalous context embeddings and (depth - 1) x T
    deep text tokens, initialised N(0, 0.02) from ``seed``; CLIP is only read."""

    def __init__(self, clip: CLIPBackbone, n_ctx: int, depth: int, n_deep: int, seed: int) -> None:
        super().__init__()
        width = clip.text_tower.ln_final.weight.shape[0]
        if not 1 <= depth <= len(clip.text_tower.transformer.resblocks):
            raise ConfigError(f"depth must be in 1..{len(clip.text_tower.transformer.resblocks)} (the text encoder's blocks), got {depth}.")
        if getattr(clip.text_tower, "text_pool_type", "argmax") != "argmax":
            raise ConfigError(f"AnomalyCLIP needs a CLIP whose text embedding is read at the end-of-text token; {clip.model_name} pools otherwise.")
        g = torch.Generator().manual_seed(seed)
        self.normal = nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.02)
        self.anomalous = nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.02)
        self.deep = nn.Parameter(torch.randn(depth - 1, n_deep, width, generator=g) * 0.02)
        placeholder = " ".join(["X"] * n_ctx)
        ids = clip.tokenizer([f"{placeholder} object.", f"{placeholder} damaged object."])
        if not bool((ids[:, 1 : 1 + n_ctx] == ids[0, 1]).all()):
            raise ConfigError(f"{clip.model_name}'s tokenizer does not give one token per placeholder; AnomalyCLIP cannot place its learned tokens.")
        with torch.no_grad():
            frame = clip.text_tower.token_embedding(ids)
        self.register_buffer("frame", frame, persistent=False)
        self.register_buffer("eot", ids.argmax(dim=-1), persistent=False)
        self.n_ctx = n_ctx

    def forward(self, clip: CLIPBackbone) -> torch.Tensor:
        """2 x D normalised text embeddings [g_n, g_a] (``clip`` is passed, not held, so the
        module's parameters are only the learned tensors)."""
        ctx = torch.stack([self.normal, self.anomalous]).to(self.frame.dtype)
        embeds = torch.cat([self.frame[:, :1], ctx, self.frame[:, 1 + self.n_ctx :]], dim=1)
        return F.normalize(clip.encode_learned_text(embeds, self.eot, self.deep.to(self.frame.dtype)), dim=-1)

    def learned(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().clone() for k in LEARNED}

    def load_learned(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        for k in LEARNED:
            if k not in tensors or tensors[k].shape != getattr(self, k).shape:
                got = None if k not in tensors else tuple(tensors[k].shape)
                raise ModelFileError(f"{source}: learned tensor {k!r} is {got}, expected {tuple(getattr(self, k).shape)}; {RETRAIN}.")
            getattr(self, k).data.copy_(tensors[k].float())


def read_prompts(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, learned tensors) of a prompts file; missing, foreign or modified files are refused."""
    return read_tensors(path, PROMPTS_FORMAT, PROMPTS_VERSION, RETRAIN)


def write_prompts(path: str | Path, detector: AnomalyCLIP, training: dict[str, Any], *, overwrite: bool = False) -> Path:
    """A prompts file: the learned tensors, the CLIP model and weight hash, and how they were learned."""
    core = {
        "format": PROMPTS_FORMAT,
        "format_version": PROMPTS_VERSION,
        "clip_model": detector.clip_model,
        "clip_pretrained": detector.clip_pretrained,
        "clip_weights_hash": detector.clip.weights_hash,
        "setup": {k: getattr(detector, k) for k in ("image_size", "n_ctx", "depth", "n_deep", "layers", "dpam_from")},
        "training": training,
        "defectscope_version": __version__,
    }
    return write_tensors(path, detector.learner.learned(), core, overwrite=overwrite)


@register
class AnomalyCLIP(Detector):
    """AnomalyCLIP zero-shot scoring with prompts from a prompts file (``prompts=FILE``)."""

    name = "anomalyclip"
    needs_training_images: ClassVar[bool] = False
    tiling_refusal: ClassVar[str | None] = "its image score is the global embedding's text probability, which no tile has"
    export_refusal: ClassVar[str] = "its CLIP text and image towers are not part of the graph export yet"

    def __init__(
        self,
        *,
        prompts: str | None = None,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        image_size: int | None = None,
        n_ctx: int | None = None,
        depth: int | None = None,
        n_deep: int | None = None,
        layers: tuple[int, ...] | None = None,
        dpam_from: int | None = None,
        sigma: float = 4.0,
        resize: str = "squash",
        batch_size: int = 4,
        seed: int = 111,
        preprocess: dict[str, Any] | None = None,
    ) -> None:
        """Options left None come from the prompts file, else from the paper (`PAPER`)."""
        self.prompts, self.sigma, self.batch_size, self.seed = prompts, sigma, batch_size, seed
        self._manifest: dict[str, Any] = {}
        self._learned: dict[str, torch.Tensor] = {}  # the prompts file's tensors, read (and checked) once
        if prompts not in (None, UNTRAINED):
            self._manifest, self._learned = read_prompts(prompts)
        given = {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "image_size": image_size, "n_ctx": n_ctx, "depth": depth, "n_deep": n_deep}
        from_file = {k: self._manifest[k] for k in ("clip_model", "clip_pretrained") if k in self._manifest} | self._manifest.get("setup", {})
        for key, value in given.items():
            setattr(self, key, value if value is not None else from_file.get(key, PAPER[key]))
        self.clip = get_clip(self.clip_model, self.clip_pretrained)
        resblocks = self.clip.clip.visual.transformer.resblocks
        if not isinstance(resblocks[0].attn, nn.MultiheadAttention) or not self.clip.clip.visual.transformer.batch_first:
            raise ConfigError(f"AnomalyCLIP's DPAM needs a plain open_clip ViT (standard attention blocks); {self.clip_model} is not one.")
        blocks = len(resblocks)
        file_layers = from_file.get("layers")
        self.layers = tuple(layers if layers is not None else file_layers or default_layers(blocks))
        self.dpam_from = int(dpam_from if dpam_from is not None else from_file.get("dpam_from") or self.layers[0])
        if not all(1 <= i <= blocks for i in self.layers) or not 1 <= self.dpam_from <= blocks:
            raise ConfigError(f"layers and dpam_from must be blocks 1..{blocks} of {self.clip_model}'s image encoder.")
        if self.image_size % self.clip.patch:
            raise ConfigError(f"image_size must be a multiple of {self.clip_model}'s patch size {self.clip.patch}, got {self.image_size}.")
        self.preprocess = square_input(self, self.image_size, resize, preprocess)
        self.resize = self.preprocess.resize
        self.learner = AgnosticPrompts(self.clip, self.n_ctx, self.depth, self.n_deep, seed)
        self.source = ""
        self.text = torch.empty(0)

    def config(self) -> dict[str, Any]:
        """Resolved options; ``prompts`` is not kept (the learned tensors are the state)."""
        keys = ("clip_model", "clip_pretrained", "image_size", "n_ctx", "depth", "n_deep", "dpam_from", "sigma", "resize", "batch_size", "seed")
        return {**{k: getattr(self, k) for k in keys}, "layers": list(self.layers)}

    def state(self) -> dict[str, torch.Tensor]:
        return self.learner.learned()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.learner.load_learned(state, "model file")
        self.source = "model file"
        self.refresh_text()

    @property
    def info(self) -> dict[str, Any]:
        return {"weights_hash": self.clip.weights_hash, "clip": f"{self.clip_model}/{self.clip_pretrained}", "prompts": self.source}

    def refresh_text(self) -> None:
        """Encode the current prompts once: predict reuses [g_n, g_a]."""
        with torch.no_grad():
            self.text = self.learner(self.clip)

    def fit(self, images: Iterable[Sample] | None, *, progress: Progress | None = None) -> Self:
        """Install the prompts: from the prompts file, or the seeded initial ones
        (``prompts=untrained``). Normal images are not used (zero-shot)."""
        if self.prompts is None:
            raise ConfigError(f"AnomalyCLIP needs learned prompts: --set prompts=prompts.dscope ({RETRAIN}), or --set prompts={UNTRAINED} for the untrained initial prompts (a baseline only).")
        if self.prompts != UNTRAINED:
            learned_on = self._manifest.get("clip_weights_hash")
            if learned_on != self.clip.weights_hash:
                raise ModelFileError(
                    f"{self.prompts} was learned on CLIP {self._manifest.get('clip_model')} weights {learned_on}, "
                    f"but {self.clip_model}/{self.clip_pretrained} hashes to {self.clip.weights_hash}; load the same weights "
                    "(--set clip_pretrained=FILE) or re-learn the prompts on these."
                )
            self.learner.load_learned(self._learned, str(self.prompts))
        self.source = str(self.prompts)
        self.refresh_text()
        return self

    def fit_scored(
        self, records: Sequence[Record], *, folds: int = 5, seed: int = 0, progress: Progress | None = None
    ) -> NormalScores | None:
        """Install the prompts and score the normal images: the prompts never saw them, so
        each score is already out of sample (no cross-fitting needed)."""
        self.fit(None)
        parts = [NormalScores.summarize(pred) for _, pred in self.predict_samples(iter_samples(records, self.preprocess), self.batch_size)]
        return NormalScores.collect(parts, range(len(records)), "zero-shot (the prompts never saw them)") if parts else None

    def encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised global embeddings N x D and per layer normalised patch embeddings N x G*G x D."""
        image, patches = self.clip.dpam_encode(batch, self.layers, self.dpam_from)
        return F.normalize(image, dim=-1), [F.normalize(p, dim=-1) for p in patches]

    @staticmethod
    def probabilities(emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """softmax over [normal, anomalous] of cosine similarity / tau (last dim 2)."""
        return torch.softmax(emb @ text.T / TEMPERATURE, dim=-1)

    def predict(self, batch: torch.Tensor) -> Prediction:
        if self.text.numel() == 0:
            raise ConfigError("AnomalyCLIP has no prompts yet: call fit(None) with prompts=FILE.")
        with torch.inference_mode():
            image, patches = self.encode(batch)
            scores = self.probabilities(image, self.text)[:, 1]
            grid = batch.shape[-1] // self.clip.patch
            total = sum(self.probabilities(p, self.text)[..., 1] for p in patches)
            maps = patch_scores_to_maps(total.view(-1, grid, grid), tuple(batch.shape[-2:]), self.sigma)
        return Prediction(scores, maps)
