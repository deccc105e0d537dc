"""Text to image: encode the prompts, denoise latents with classifier-free guidance, decode.

    images = generate(sd, ["a photo of a cat"], steps=50, guidance=7.5, seed=42)

Guidance runs the UNet ONCE per step on the batch [unconditional; conditional] (CompVis
txt2img), eps = eps_u + guidance * (eps_c - eps_u); guidance 1.0 drops the unconditional half.
A negative prompt takes the place of the empty prompt in the unconditional half.

Reproducibility: image i starts from torch.randn drawn on the CPU by its own generator seeded
seed + i (or seeds[i]); DDIM's eta noise comes from the same generator. So an image's noise
depends on its seed only, not on the batch it is in nor on the device, and matches diffusers given
`generator=[torch.Generator().manual_seed(s) for s in seeds]`. The image itself is equal up to
rounding: another batch size, thread count or device sums the matrix products in another order,
so in fp32 the final latents agree to ~1e-6 relative error and the images to 1/255.
"""
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image

from minidb.config import check, eta_problem, guidance_problem, steps_problem
from minidb.errors import MinidbError
from minidb.samplers import SAMPLERS


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than CLIP's 77 tokens (75 plus start and end): the rest is ignored."""


def check_size(config, height: int, width: int) -> tuple[int, int]:
    """The latent size for an image size, or a MinidbError saying which multiple is needed: the
    VAE downsamples by f = 2**(levels-1), and the UNet by 2**(levels-1) more, without padding."""
    f, multiple = config.latent_factor, config.size_multiple
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size <= 0 or size % 8:
            raise MinidbError(f"{name} must be a positive multiple of 8, got {size!r}")
        if size % multiple:
            raise MinidbError(f"{name} must be a multiple of {multiple} for this model "
                              f"(its VAE downsamples by {f}, its UNet by {multiple // f} more), got {size}")
    return height // f, width // f


def memory_floor(config, height: int, width: int, batch: int = 1, itemsize: int = 4, guided: bool = True) -> int:
    """A lower bound on the bytes of activations that drawing `batch` images of height x width takes,
    the weights aside: the larger of
    - the VAE decoder at full resolution (decode: one image at a time), where the first ResnetBlock
      holds its input and that input normalized, the channels the last upsampling brought up;
    - the UNet's first level for the whole batch (twice it with guidance), whose outputs are all kept
      for the skip connections: model_channels, then num_res_blocks maps of model_channels * channel_mult[0].
    Real use is several times this: it serves to refuse sizes that cannot fit, never one that could."""
    v = config.vae
    vae = 2 * v.ch * v.ch_mult[min(1, len(v.ch_mult) - 1)] * height * width
    u, f = config.unet, config.latent_factor
    unet = (u.model_channels * (1 + u.num_res_blocks * u.channel_mult[0]) * (height // f) * (width // f)
            * batch * (2 if guided else 1))
    return max(vae, unet) * itemsize


def machine_memory(device=None) -> tuple[int, str] | None:
    """(bytes, what they are) of the memory `device` computes in: a CUDA device's own, else this
    machine's RAM (None: the CPU); None where it cannot be told."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"memory on {device}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def check_memory(config, height: int, width: int, batch: int = 1, itemsize: int = 4, guided: bool = True,
                 device=None) -> None:
    """A MinidbError when even memory_floor's lower bound exceeds all the memory of the device:
    a size that cannot fit fails in one line now, not in an allocation minutes later."""
    need, have = memory_floor(config, height, width, batch, itemsize, guided), machine_memory(device)
    if have is not None and need > have[0]:
        what = f"{width}x{height}" + (f" x {batch} images" if batch > 1 else "")
        raise MinidbError(f"{what} needs at least {_bytes(need)} of memory for its activations alone, more than "
                          f"the {_bytes(have[0])} of {have[1]} here: choose a smaller size"
                          + (" or fewer images at once" if batch > 1 else ""))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def truncated_prompts(tokenizer, prompts: list[str]) -> list[str]:
    return [p for p in prompts if tokenizer.num_tokens(p) > 75]


def _as_list(prompts, what) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise MinidbError(f"{what} must be a string or a non-empty list of strings")
    return prompts


@torch.no_grad()
def encode_prompts(sd, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings [B, 77, width] in the text encoder's dtype, on its device."""
    for p in truncated_prompts(sd.tokenizer, prompts):
        warnings.warn(f"prompt is longer than 77 tokens and will be truncated: {p[:60]!r}...",
                      PromptTruncatedWarning, stacklevel=3)
    return sd.text_encoder(sd.tokenizer(prompts).to(sd.device))


def make_generators(seed, n: int) -> list[torch.Generator]:
    """One CPU generator per image: seed + i for an int, seeds[i] for a list, random for None."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - n, ()).item())  # follows torch.manual_seed
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(n)]
    if len(seeds) != n:
        raise MinidbError(f"{len(seeds)} seeds for {n} images")
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_latents(sd, prompts, negative_prompts=None, steps: int = 50, guidance: float | None = None,
                   eta: float = 0.0, sampler: str = "ddim", height: int | None = None, width: int | None = None,
                   seed=None, latents=None, progress: bool = True) -> torch.Tensor:
    """Final (scaled) latents [B, 4, height/f, width/f], float32, before the VAE.
    height, width: None = the model's own image size (sd.config.image_size, 512 for SD v1).
    guidance: None = the model's own scale (sd.config.guidance, 7.5 for SD v1)."""
    prompts = _as_list(prompts, "prompts")
    guidance = sd.config.guidance_or(guidance)
    b = len(prompts)
    if sampler not in SAMPLERS:
        raise MinidbError(f"unknown sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    check(steps_problem("steps", steps, sd.config.timesteps), guidance_problem("guidance", guidance),
          eta_problem("eta", eta, sampler))
    size = sd.config.image_size
    height, width = size if height is None else height, size if width is None else width
    h, w = check_size(sd.config, height, width)
    guided = guidance != 1.0
    check_memory(sd.config, height, width, b, sd.dtype.itemsize, guided, sd.device)
    if negative_prompts is not None:
        negative_prompts = _as_list(negative_prompts, "negative_prompts")
        negative_prompts = negative_prompts * b if len(negative_prompts) == 1 else negative_prompts
        if len(negative_prompts) != b:
            raise MinidbError(f"{len(negative_prompts)} negative prompts for {b} prompts")

    unet, device, dtype = sd.unet, sd.device, sd.dtype
    generators = make_generators(seed, b)
    if latents is None:  # drawn on the CPU so that every device starts from the same noise
        latents = torch.stack([torch.randn((sd.config.unet.in_channels, h, w), generator=g) for g in generators])
    elif tuple(latents.shape) != (b, sd.config.unet.in_channels, h, w):
        raise MinidbError(f"latents must have shape {(b, sd.config.unet.in_channels, h, w)}, "
                          f"got {tuple(latents.shape)}")
    x = latents.to(device=device, dtype=torch.float32)  # the running latents stay float32

    context = encode_prompts(sd, prompts)
    if guided:
        uncond = encode_prompts(sd, negative_prompts or [""] * b)
        context = torch.cat([uncond, context])  # [2B, 77, width]: unconditional first, as CompVis
    context = context.to(dtype)

    schedule = sd.schedule

    def eps_fn(x, t: int):
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
        out = unet(x_in.to(dtype), t_in, context).float()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        # a v-model's output, guided as CompVis guides it (before the conversion, which is affine in it)
        return schedule.eps_from_v(x, out, t) if sd.config.parameterization == "v" else out

    return SAMPLERS[sampler](eps_fn, x, schedule, steps, eta=eta, generators=generators, progress=progress)


@torch.no_grad()
def decode(sd, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images, one image at a time: the VAE decoder's activations at full
    resolution dominate memory (GBs at 512x512), so a batch would need one decoder's worth each."""
    images = []
    for z in latents:
        x = sd.vae.decode((z[None] / sd.config.scale_factor).to(device=sd.device, dtype=sd.dtype))  # [1, 3, H, W]
        x = (x.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray((x * 255).round().astype(np.uint8)))
    return images


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size in rows of `columns`, left to right, top to bottom, on white."""
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * math.ceil(len(images) / columns)), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def generate(sd, prompts, negative_prompts=None, steps: int = 50, guidance: float | None = None, eta: float = 0.0,
             sampler: str = "ddim", height: int | None = None, width: int | None = None, seed=None, latents=None,
             progress: bool = True) -> list[Image.Image]:
    """Images for `prompts` (a string or a list, one image each).

    height, width: None = the model's own image size (sd.config.image_size, 512 for SD v1).
    guidance: None = the model's own classifier-free guidance scale (sd.config.guidance, 7.5 for SD v1).
    negative_prompts: None (the empty prompt), a string for all, or one per prompt.
    sampler: "ddim" (CompVis' steps, eta), "plms" (CompVis' --plms) or "dpm++2m" (~20 steps suffice).
    seed: int (image i uses seed + i), a list (one per image) or None (random).
    latents: the starting noise [B, 4, height/8, width/8] instead of the seeded draw."""
    z = sample_latents(sd, prompts, negative_prompts, steps, guidance, eta, sampler, height, width,
                       seed, latents, progress)
    return decode(sd, z)
