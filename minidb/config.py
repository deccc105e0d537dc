"""Model configs: frozen dataclasses whose field names and defaults are those of CompVis'
`configs/stable-diffusion/v1-inference.yaml`, so SD v1 is `SDConfig()` and anything smaller
(tests, the miniature world) is the same code with other numbers.

Also the names every layer shares (no torch needed to read them): the samplers, and the
precisions with the torch dtype each stands for (`getattr(torch, DTYPES["fp16"])`)."""
import math
import numbers
from dataclasses import dataclass, field

from minidb.errors import MinidbError

SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "dpm++2m": "DPM++ 2M"}  # name -> as A1111's "Sampler:" writes it
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # precision -> torch dtype name
# Seeds: numpy's generators take 32 bits, and each process or image adds its index to the seed.
SEED_MAX = 2 ** 31 - 1


# ---- the sampling arguments: each checked by one rule, wherever it enters (generate(), the samplers,
# the command lines, a training config); `name` is how the caller spells it ("--scale", "prior.guidance")

def check(*problems: str | None) -> None:
    """Raise the first problem that is not None, as bad input (one line on the command line)."""
    for problem in problems:
        if problem:
            raise MinidbError(problem)


def seed_problem(name: str, seed) -> str | None:
    """What is wrong with a seed, or None: every seed minidb takes is checked by this one rule."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        return f"{name} must be an integer from 0 to {SEED_MAX}, got {seed}"
    return None


def steps_problem(name: str, steps, timesteps: int | None = None) -> str | None:
    """What is wrong with a sampling step count, or None. timesteps: the model's, the upper bound;
    None before the model is read (only the lower bound is checked then)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        return f"{name} must be an integer, got {steps!r}"
    if timesteps is not None and not 1 <= steps <= timesteps:
        return f"{name} must be an integer from 1 to {timesteps} (the model's timesteps), got {steps!r}"
    if steps < 1:
        return f"{name} must be at least 1, got {steps}"
    return None


def guidance_problem(name: str, guidance) -> str | None:
    """What is wrong with a classifier-free guidance scale, or None. The samplers take any finite
    scale; a negative one steers away from the prompt, which a negative prompt does properly."""
    if isinstance(guidance, numbers.Real) and math.isfinite(guidance) and guidance >= 0:
        return None
    problem = f"{name} must be a number >= 0 (1 = no guidance, 0 = unconditional), got {guidance}"
    if isinstance(guidance, numbers.Real) and guidance < 0:
        problem += ": a negative scale steers away from the prompt; to avoid something, put it in a negative prompt"
    return problem


def eta_problem(name: str, eta, sampler: str) -> str | None:
    """What is wrong with DDIM's eta, or None: finite, >= 0, and 0 for the deterministic samplers."""
    if not (isinstance(eta, numbers.Real) and math.isfinite(eta) and eta >= 0) or (eta > 0 and sampler != "ddim"):
        return f"{name} must be >= 0, and 0 for the deterministic samplers (all but ddim): got {eta} for {sampler}"
    return None


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get attention
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups); tiny widths need fewer

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)  # every level but the last halves the size


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)  # every level but the last halves the size


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    scale_factor: float = 0.18215  # latents are scaled by this before the UNet sees them
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    parameterization: str = "eps"  # what the UNet predicts: "eps" (the noise, SD v1) or "v" (CompVis' v-models)
    image_size: int = 512  # the resolution the model was trained at: the default for sampling and fine-tuning
    guidance: float = 7.5  # the classifier-free guidance scale the model samples best at: the default for sampling

    def guidance_or(self, scale: float | None) -> float:
        """A caller's guidance scale, None = this model's own (the one rule every sampler follows)."""
        return self.guidance if scale is None else scale

    def __post_init__(self):
        if self.parameterization not in ("eps", "v"):
            raise ValueError(f'parameterization must be "eps" or "v", got {self.parameterization!r}')

    @property
    def latent_factor(self) -> int:
        """Pixels per latent, each way (8 for SD v1)."""
        return self.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (64 for SD v1): the UNet downsamples the latents further."""
        return self.latent_factor * self.unet.downsample_factor


def tiny_config() -> SDConfig:
    """SD v1's structure at 3M parameters (half of them CLIP's token embeddings): for tests and CPU demos.
    Two UNet levels (one with attention, one without), two VAE levels, a 2-layer text encoder;
    32x32 images by default (latents of 16x16), where SD v1's 512 would take minutes per image."""
    return SDConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(1,), num_heads=2, context_dim=32),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        clip=CLIPTextConfig(width=32, layers=2, heads=2),
        image_size=32,
    )
