"""SDAS's diffusion model: a small DDPM of the normal images, and RealNet's perturbed sampling.

Training (Ho et al. 2020), on the normal images squashed to ``size`` x ``size`` in [-1, 1]:
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e with a_t the cumulative product of 1 - beta (linear
betas 1e-4 .. 0.02 over T = 1000, diffusers' DDPMScheduler), and the loss
||e - e_theta(x_t, t)||^2 for a diffusers UNet2DModel; AdamW, an exponential moving average
of the weights is what is saved.

Sampling (RealNet, Zhang et al. CVPR 2024, SDAS): the reverse process on ``steps`` evenly
spaced timesteps with the fixed posterior variance,

    x_{t-1} = mu_theta(x_t, t) + sqrt(1 + s) * sigma_t * z,

mu_theta being the posterior mean given the predicted (clipped) x_0. s = 0 is plain DDPM
sampling: images like the normal ones (extra normal images). s > 0 widens every step's
noise, so the chain drifts off the normal images' manifold: the larger s, the less normal
the sample (the official code draws s from [0.1, 0.2]). Its class-guidance term only picks
one of several categories; one model per dataset has nothing to pick, so it is left out.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectscope import __version__
from defectscope.components.charts import contact_sheet, loss_curve_png
from defectscope.components.progress import Progress
from defectscope.data.datasets import SkipLog, iter_samples, training_records
from defectscope.data.images import Preprocess
from defectscope.data.tensorfile import NOUNS, read_tensors, write_tensors
from defectscope.errors import ConfigError, DataError

log = logging.getLogger("defectscope")

DDPM_FORMAT = "defectscope-ddpm"
DDPM_VERSION = 1
NOUNS[DDPM_FORMAT] = "defectscope diffusion model"
RETRAIN = "re-create it with `defectscope train-ddpm DATA -o DDPM`"
TRAIN_STEPS = 1000  # T
BETAS = (1e-4, 0.02)
PREVIEW_STRENGTHS = (0.0, 0.2, 0.5)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise ConfigError("The diffusion model needs diffusers: pip install 'defectscope[diffusion]' (make install does).") from exc
    return diffusers


def unet_config(size: int, channels: tuple[int, ...] = (16, 32, 64, 128)) -> dict[str, Any]:
    """A small UNet2DModel for CPUs: one ResNet block per level, attention at the coarsest.

    At 64 px and batch 16 a training step takes ~0.5 s on two cores (2.7 M parameters)."""
    levels = len(channels)
    if size % 2 ** (levels - 1):
        raise ConfigError(f"The diffusion model's size must be a multiple of {2 ** (levels - 1)}, got {size}.")
    return {
        "sample_size": size,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": list(channels),
        "down_block_types": ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1),
        "norm_num_groups": 8,
    }


def _scheduler() -> Any:
    return _diffusers().DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_start=BETAS[0], beta_end=BETAS[1], beta_schedule="linear")


class DDPM:
    """A trained diffusion model of one dataset's normal images (see the module docstring)."""

    def __init__(self, unet: torch.nn.Module, manifest: dict[str, Any]) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.manifest = manifest
        self.size = int(manifest["unet"]["sample_size"])
        self.alphas_cumprod = _scheduler().alphas_cumprod.double()

    @classmethod
    def load(cls, path: str | Path) -> DDPM:
        """Read a file written by `train_ddpm`; a missing, foreign or modified file is refused."""
        manifest, state = read_tensors(Path(path), DDPM_FORMAT, DDPM_VERSION, RETRAIN)
        unet = _diffusers().UNet2DModel(**manifest["unet"])
        unet.load_state_dict(state, strict=True)
        return cls(unet, {**manifest, "path": str(path)})

    def _respaced(self, steps: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Kept timesteps (descending) and the cumulative alphas at each and at its successor."""
        if not 1 <= steps <= TRAIN_STEPS:
            raise ConfigError(f"Sampling steps must be in 1..{TRAIN_STEPS}, got {steps}.")
        kept = np.unique(np.linspace(0, TRAIN_STEPS - 1, steps).round().astype(int))[::-1].tolist()
        a = self.alphas_cumprod[kept]
        a_prev = torch.cat([self.alphas_cumprod[kept[1:]], torch.ones(1, dtype=torch.float64)])
        return kept, a, a_prev

    @torch.no_grad()
    def sample(
        self, n: int, *, strength: float = 0.0, steps: int = 50, seed: int = 0, batch_size: int = 16, progress: Progress | None = None
    ) -> np.ndarray:
        """``n`` images as uint8 n x size x size x 3: perturbed reverse process with s = ``strength``."""
        if strength < 0:
            raise ConfigError(f"SDAS strength must be >= 0 (0 = normal images), got {strength}.")
        kept, a, a_prev = self._respaced(steps)
        g = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            x = torch.randn(m, 3, self.size, self.size, generator=g, dtype=torch.float64)
            for i, t in enumerate(kept):
                eps = self.unet(x.float(), torch.full((m,), t)).sample.double()
                x0 = ((x - (1 - a[i]).sqrt() * eps) / a[i].sqrt()).clamp(-1, 1)
                beta = 1 - a[i] / a_prev[i]
                mean = (a_prev[i].sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev[i]) * x) / (1 - a[i])
                x = mean
                if i < len(kept) - 1:
                    sigma = (beta * (1 - a_prev[i]) / (1 - a[i])).sqrt()
                    x = mean + (1 + strength) ** 0.5 * sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
            if progress:
                progress("sample", start + m, n)
        return np.concatenate(out)


def _load_normals(data: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """The dataset's normal images squashed to size x size, in [-1, 1]; unreadable ones skipped."""
    records = training_records(data)
    skip = SkipLog()
    images = [s.image for s in iter_samples(records, Preprocess(size, "squash"), on_error=skip)]
    if len(images) < 2:
        raise DataError(f"{data}: {len(images)} readable normal images; a diffusion model needs at least 2.")
    return torch.stack(images) * 2 - 1, sorted(skip.skipped)


def train_ddpm(
    data: str | Path,
    out: str | Path,
    *,
    size: int = 64,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 2e-4,
    ema: float = 0.995,
    seed: int = 0,
    hflip: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the DDPM on ``data``'s normal images and write ``out`` (safetensors), its loss
    curve (suffix .loss.png) and a contact sheet of samples at PREVIEW_STRENGTHS
    (suffix .samples.png); returns the training summary. Same seed, same weights."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another name or pass --overwrite.")
    images, skipped = _load_normals(data, size)
    torch.manual_seed(seed)
    config = unet_config(size)
    unet = _diffusers().UNet2DModel(**config)
    averaged = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema))
    scheduler = _scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    unet.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x0 = images[idx]
        if hflip:
            flip = torch.rand(batch_size, generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(TRAIN_STEPS, (batch_size,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averaged.update_parameters(unet)
        losses.append(loss.item())
        if progress:
            progress(f"train loss {losses[-1]:.4f}", step + 1, steps)
    seconds = time.perf_counter() - start
    summary = {
        "data": str(data), "images": len(images), "skipped": skipped, "size": size, "steps": steps,
        "batch_size": batch_size, "lr": lr, "ema": ema, "seed": seed, "hflip": hflip,
        "train_seconds": round(seconds, 1), "loss_first": losses[0], "loss_last": float(np.mean(losses[-50:])),
    }
    core = {"format": DDPM_FORMAT, "format_version": DDPM_VERSION, "unet": config, "betas": list(BETAS),
            "train_steps": TRAIN_STEPS, "training": summary, "defectscope_version": __version__}
    write_tensors(out, averaged.module.state_dict(), core, overwrite=overwrite)
    curve = loss_curve_png(losses, out.with_suffix(".loss.png"), f"DDPM: loss per step ({len(images)} images, {size} px)")
    sheet = preview_sheet(DDPM(averaged.module, core), out.with_suffix(".samples.png"), seed=seed, progress=progress)
    return {**summary, "ddpm": str(out), "loss_curve": str(curve), "samples": str(sheet)}


def preview_sheet(
    ddpm: DDPM, path: Path, *, strengths: tuple[float, ...] = PREVIEW_STRENGTHS, per_row: int = 6, seed: int = 0, progress: Progress | None = None
) -> Path:
    """A contact sheet: one row of samples per strength, all rows from the same noise."""
    rows, labels = [], []
    for s in strengths:
        rows.append(list(ddpm.sample(per_row, strength=s, seed=seed, progress=progress)))
        labels.append(f"strength s = {s:g}" + (" (normal)" if s == 0 else ""))
    return contact_sheet(rows, path, cell=128, labels=labels)
