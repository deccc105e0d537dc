"""Small training options the common DreamBooth trainers (diffusers, kohya sd-scripts, OneTrainer)
have, as pure pieces for minidb.dreambooth.train to call; each is off unless its config field turns it on.

- min-SNR loss weighting (Hang et al. 2023, arXiv:2303.09556): timesteps with little noise have a
  high signal-to-noise ratio and an easy, dominating loss; for epsilon-prediction each example's
  MSE is weighted by min(SNR(t), gamma) / SNR(t), gamma = 5 in the paper (v-prediction:
  min(SNR(t), gamma) / (SNR(t) + 1)).
- offset noise (Guttenberg 2023, "Diffusion with offset noise"): noise + strength · a per-channel
  constant, so the model can learn to change an image's mean brightness (plain noise never moves
  it at high t); kohya's noise_offset, typically 0.05-0.1.
- EMA: an exponential moving average of the trained weights, in fp32 (in fp16, 0.9999 · w rounds
  back to w and the average never moves), optionally on the CPU to spare GPU memory.
- per-image captions (kohya's convention): photo.png + photo.txt -> the text replaces the
  instance prompt for that image.
- learning rate scaled with the effective batch (diffusers' --scale_lr).
"""
from pathlib import Path

import torch

from minidb.errors import DataError
from minidb.files import read_text


def min_snr_weights(snr: torch.Tensor, gamma: float, parameterization: str = "eps") -> torch.Tensor:
    """Per-example loss weights (fp32) for snr [B] = NoiseSchedule.snr(t). The paper weights the MSE
    of the implied x0 by min(SNR, gamma); the epsilon MSE is SNR times that one, the v MSE SNR + 1
    times, so the weights are min(SNR, gamma) / SNR for "eps" and min(SNR, gamma) / (SNR + 1) for
    "v" (as diffusers' train scripts)."""
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    if parameterization not in ("eps", "v"):
        raise ValueError(f"parameterization must be eps or v, got {parameterization!r}")
    return (snr.clamp(max=gamma) / (snr if parameterization == "eps" else snr + 1)).float()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over examples of weight · per-example MSE; with weights None, plain MSE."""
    per_example = (pred.float() - target.float()).square().flatten(1).mean(1)  # (B,)
    if weights is None:
        return per_example.mean()
    return (weights.to(per_example.device) * per_example).mean()


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """noise [B, C, h, w] + strength · N(0, 1) drawn once per example and channel. Drawn after the
    example's other draws from its generator, so strength 0 (no draw) leaves every other draw as it was."""
    if strength == 0:
        return noise
    offset = torch.randn(noise.shape[:2] + (1, 1), generator=generator, dtype=noise.dtype)
    return noise + strength * offset.to(noise.device)  # (B, C, 1, 1) broadcast over h, w


class EMA:
    """shadow <- decay · shadow + (1 - decay) · weight after each optimizer step, in fp32, on `device`
    (the weights' own by default; "cpu" keeps GPU memory free at the cost of one copy per update).
    warmup: the n-th update uses min(decay, (1 + n) / (10 + n)), the usual warm-up for training from
    scratch (minidb.world.pretrain), whose first weights are noise a fixed decay would keep for thousands of
    steps; fine-tuning (minidb.dreambooth.train) starts from good weights and uses the fixed decay.

        ema = EMA(named_parameters, decay=0.9999)
        ... optimizer step ...; ema.update(named_parameters)
        ema.shadow                                   # {name: fp32 average}: exported instead of the raw weights
    """

    def __init__(self, named_parameters, decay: float = 0.9999, device=None, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {name: p.detach().to(device or p.device, torch.float32, copy=True)
                       for name, p in named_parameters}

    @torch.no_grad()
    def update(self, named_parameters):
        self.updates += 1
        n = self.updates
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        for name, p in named_parameters:
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict):
        if set(state["shadow"]) != set(self.shadow):
            missing, extra = set(self.shadow) - set(state["shadow"]), set(state["shadow"]) - set(self.shadow)
            raise ValueError(f"EMA state does not match the trained parameters: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        self.decay, self.updates = state["decay"], state.get("updates", 0)  # the warm-up's position
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)


def caption_file_of(image: Path) -> Path | None:
    """The caption file beside `image`: photo.png -> photo.txt, or photo.TXT (any case), or None."""
    image = Path(image)
    exact = image.with_suffix(".txt")
    if exact.is_file():
        return exact
    found = sorted(p for p in image.parent.glob(glob_escape(image.stem) + ".*")
                   if p.stem == image.stem and p.suffix.lower() == ".txt" and p.is_file())
    return found[0] if found else None


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)  # glob.escape, for a file name's stem


def caption_for(image: Path, default: str) -> str:
    """The text of the caption file beside `image` (photo.png -> photo.txt), else `default`.
    UTF-8, a byte-order mark dropped; another encoding is a DataError naming the file."""
    caption_file = caption_file_of(image)
    if caption_file is None:
        return default
    text = " ".join(read_text(caption_file, DataError).split())
    if not text:
        raise DataError(f"{caption_file}: empty caption file; write the caption, or delete it to use the "
                        "instance prompt")
    return text


def scaled_lr(lr: float, batch_size: int, grad_accum: int, world_size: int) -> float:
    """lr · effective batch (per-GPU batch · accumulation steps · GPUs), as diffusers' --scale_lr."""
    return lr * batch_size * grad_accum * world_size
