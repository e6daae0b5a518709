"""A frozen open_clip model exposing what WinCLIP needs: image, patch and window embeddings.

Window embeddings: the class-token embedding computed from only the patch tokens inside a
k x k window of the patch grid (the other patch tokens dropped; the class token and every
kept token keep their positional embeddings). All windows of one size have the same
number of tokens, so they run through the transformer as one batch, not one pass each.

Weights: ``pretrained`` is an open_clip tag (read from open_clip's cache, downloaded when
online), a path to a weight file, or "random" (tests only). A missing file is a
`WeightsError` saying which file to put where.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.errors import WeightsError


def _open_clip():  # noqa: ANN202 - the module
    try:
        import open_clip
    except ImportError as exc:
        raise WeightsError("CLIP methods need open_clip: `pip install open_clip_torch`.") from exc
    return open_clip


def register_tiny_config() -> str:
    """A tiny randomly initialised CLIP architecture ("defectscope-tiny") for fast tests."""
    oc = _open_clip()
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS["defectscope-tiny"] = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 96, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    del oc
    return "defectscope-tiny"


class CLIPBackbone(nn.Module):
    """Frozen open_clip model with batched window embeddings."""

    def __init__(self, model: str = "ViT-B-16-plus-240", pretrained: str = "laion400m_e31") -> None:
        super().__init__()
        oc = _open_clip()
        if model == "defectscope-tiny":
            register_tiny_config()
        if model not in oc.list_models():
            raise WeightsError(f"Unknown CLIP model {model!r}; see open_clip.list_models().")
        self.model_name, self.pretrained = model, pretrained
        try:
            if pretrained == "random":
                clip = oc.create_model(model, pretrained=None)
            elif Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors") or Path(pretrained).exists():
                if not Path(pretrained).is_file():
                    raise WeightsError(f"CLIP weight file not found: {pretrained}.")
                clip = oc.create_model(model, pretrained=pretrained)
            else:
                clip = oc.create_model(model, pretrained=pretrained)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub, network and format errors all mean "weights unavailable"
            raise WeightsError(
                f"Could not load CLIP weights {model}/{pretrained} ({type(exc).__name__}: {exc}). Offline, put the "
                f"checkpoint (e.g. open_clip_pytorch_model.bin of laion/CLIP-{model}-{pretrained}) in a local file "
                "and pass its path as clip_pretrained=/path/file.bin (CLI: --set clip_pretrained=PATH), or fill "
                "open_clip's cache (~/.cache/huggingface/hub) on a machine that is online."
            ) from exc
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = oc.get_tokenizer(model)
        visual = self.clip.visual
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size)
        self.grid = self.image_size // int(visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input tokens (class + patches, positional embeddings added, ln_pre applied)."""
        x = (x - self.mean) / self.std
        return self.clip.visual._embeds(x)

    def _head(self, cls: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        out = visual.ln_post(cls)
        return out @ visual.proj if visual.proj is not None else out

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings N x D, patch embeddings N x G*G x D), both projected, not normalised."""
        tokens = self.clip.visual.transformer(self._tokens(x))
        out = self._head(tokens)
        return out[:, 0], out[:, 1:]

    @staticmethod
    def window_index(grid: int, k: int) -> torch.Tensor:
        """(grid - k + 1)^2 x k^2 patch indices of every k x k window (stride 1), row-major."""
        starts = torch.arange(grid - k + 1)
        offs = torch.arange(k)
        rows = (starts[:, None, None, None] + offs[None, None, :, None]).expand(-1, len(starts), k, k)
        cols = (starts[None, :, None, None] + offs[None, None, None, :]).expand(len(starts), -1, k, k)
        return (rows * grid + cols).reshape(-1, k * k)

    @torch.inference_mode()
    def window_embeddings(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """N x W x D class-token embeddings of every k x k window, computed as one batch."""
        tokens = self._tokens(x)  # N x (1 + G*G) x C
        n, _, c = tokens.shape
        idx = self.window_index(self.grid, k)  # W x k^2
        patches = tokens[:, 1:][:, idx]  # N x W x k^2 x C
        cls = tokens[:, :1, None, :].expand(n, idx.shape[0], 1, c)
        seq = torch.cat([cls, patches], dim=2).reshape(n * idx.shape[0], 1 + idx.shape[1], c)
        out = self.clip.visual.transformer(seq)[:, 0]
        return self._head(out).reshape(n, idx.shape[0], -1)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, one per string."""
        return F.normalize(self.clip.encode_text(self.tokenizer(texts)), dim=-1)


@lru_cache(maxsize=2)
def get_clip(model: str, pretrained: str) -> CLIPBackbone:
    """A shared, cached CLIP backbone (building one reads weights from disk)."""
    return CLIPBackbone(model, pretrained)
