"""The original Stable Diffusion v1 checkpoint layout: CompVis' `LatentDiffusion.state_dict()`.

Our module paths equal the checkpoint's, so loading is a split by prefix and a strict load:

    model.diffusion_model.*          -> UNetModel       (686 tensors at SD v1 size)
    first_stage_model.*              -> AutoencoderKL   (248)
    cond_stage_model.transformer.*   -> CLIPTextModel   (196)

and the only other keys are the few small buffers in EXTRA_KEYS, kept as they are so that saving
writes them back, plus the EMA copy of the UNet (`model_ema.*`), used when asked for.
"""
import dataclasses
import math
import os
import typing

import torch
from tqdm import tqdm

from minidb.config import SDConfig
from minidb.errors import CheckpointError
from minidb.weights.files import CheckpointFile, write_tensors

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
LABELS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}

# The DDPM noise schedule, registered as buffers on LatentDiffusion itself
# (ldm/models/diffusion/ddpm.py, DDPM.register_schedule); minidb recomputes it from the config.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
EXTRA_KEYS = frozenset({
    *SCHEDULE_BUFFERS,
    "logvar",                                 # per-timestep loss weights, when learnt
    "model_ema.decay", "model_ema.num_updates",  # LitEma's bookkeeping
    # transformers' CLIP kept arange(77) as a buffer; our text encoder computes it.
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
})
EMA_PREFIX = "model_ema."
CONFIG_HINT = "If the file was made for another config, pass that config (SDConfig() is SD v1)"


def ema_key(unet_key: str) -> str:
    """LitEma stores each UNet weight under its full name with the dots removed:
    input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def identify(shapes: dict) -> str | None:
    """What a file that is not an SD v1 checkpoint is, in a few words; None if it looks like one."""
    keys = list(shapes)
    has = lambda test: any(test(k) for k in keys)  # noqa: E731
    if has(lambda k: k.startswith("conditioner.embedders.")):
        return "an SDXL checkpoint"
    if has(lambda k: k.startswith("cond_stage_model.model.")):
        return "an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*)"
    to_k = shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and to_k[0][-1] == 1024:
        return "an SD 2.x checkpoint (cross-attention context 1024)"
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in[0]) == 4 and conv_in[0][1] in (8, 9):
        return {9: "an inpainting UNet (9 input channels: latents, mask, masked image)",
                8: "an InstructPix2Pix UNet (8 input channels: latents, image)"}[conv_in[0][1]]
    if has(lambda k: k.startswith(PREFIXES["unet"])):
        return None
    if has(lambda k: "lora" in k.lower()):
        return "a LoRA file (low-rank changes to apply to a model, not a model)"
    if has(lambda k: k in ("emb_params", "string_to_param") or k.startswith("string_to_param.")):
        return "a textual-inversion embedding, not a model"
    if has(lambda k: "down_blocks." in k or k.startswith(("mid_block.", "conv_in."))):
        return ("a diffusers-format state dict (keys like down_blocks.0.resnets.0.conv1.weight); "
                "minidb reads the original CompVis layout (model.diffusion_model.input_blocks...), "
                "which diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py writes")
    if has(lambda k: k.startswith(("encoder.down.", "decoder.up.", "quant_conv."))):
        return "a standalone VAE (first_stage_model.* without its prefix), not a full SD checkpoint"
    if has(lambda k: k.startswith("text_model.")):
        return "a standalone CLIP text encoder, not a full SD checkpoint"
    return (f"not a Stable Diffusion checkpoint: none of its {len(keys)} tensors is under "
            f"model.diffusion_model. (it has {_listing(keys, 4)})")


def _listing(items, limit: int = 5, sep: str = ", ") -> str:
    items = sorted(items)
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... and {len(items) - limit} more" if len(items) > limit else "")


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("s" if n != 1 else "")


def plan_load(ckpt: CheckpointFile, models: dict, ema: bool = False) -> dict:
    """{model name: {model key: file key}} for `models` ({"unet": ..., "vae": ..., "text_encoder": ...},
    possibly on the meta device). Checks everything that can be checked without reading a tensor:
    model family, EMA presence, missing and unexpected keys, shapes. Raises CheckpointError."""
    what = identify(ckpt.shapes)
    if what:
        raise CheckpointError(f"{ckpt.path}: is {what}; minidb loads Stable Diffusion 1.x checkpoints")
    ema_weights = [k for k in ckpt.shapes if k.startswith(EMA_PREFIX) and k not in EXTRA_KEYS]
    if ema and not ema_weights:
        raise CheckpointError(f"{ckpt.path}: has no EMA weights (model_ema.*) to load; it is probably "
                              "an EMA-only export already: load it with ema=False")

    plan, expected = {}, {}
    for name, model in models.items():
        to_file = ema_key if ema and name == "unet" else (lambda k, prefix=PREFIXES[name]: prefix + k)
        plan[name] = {k: to_file(k) for k in model.state_dict()}
        expected.update({to_file(k): (name, t.shape, t.dtype) for k, t in model.state_dict().items()})

    problems = []
    for name in models:
        missing = [k for k in plan[name].values() if k not in ckpt.shapes]
        if len(missing) == len(plan[name]):
            where = "model_ema.*" if ema and name == "unet" else PREFIXES[name] + "*"
            problems.append(f"has no {LABELS[name]} weights ({where})")
        elif missing:
            problems.append(f"lacks {_tensors(len(missing))} of the {LABELS[name]}: {_listing(missing)}")
    unused = {PREFIXES[name] for name in PREFIXES if name not in models}  # parts not asked for
    unused.add(PREFIXES["unet"] if ema else EMA_PREFIX)  # the UNet weights not chosen
    unexpected = [k for k in ckpt.shapes
                  if k not in expected and k not in EXTRA_KEYS and not k.startswith(tuple(unused))]
    if unexpected:
        problems.append(f"has {_tensors(len(unexpected))} that SD v1 does not: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: " + "; ".join(problems) + ". " + CONFIG_HINT)

    mismatched = [f"{k} is {list(ckpt.shapes[k][0])} in the file, {list(shape)} in the model"
                  for k, (name, shape, _) in expected.items() if ckpt.shapes[k][0] != shape]
    if mismatched:
        raise CheckpointError(
            f"{ckpt.path}: {_tensors(len(mismatched))} do not fit the config: "
            f"{_listing(mismatched, 3, '; ')}. " + CONFIG_HINT)
    # A weight stored as integers or booleans would be converted silently and break a convolution,
    # or requires_grad, long after this point: the file is damaged or not what it claims.
    wrong_dtype = [f"{k} is {_dtype_name(ckpt.shapes[k][1])}" for k, (_, _, dtype) in expected.items()
                   if ckpt.shapes[k][1].is_floating_point != dtype.is_floating_point]
    if wrong_dtype:
        raise CheckpointError(
            f"{ckpt.path}: {_tensors(len(wrong_dtype))} of the wrong dtype: {_listing(wrong_dtype, 3, '; ')}; "
            "model weights are floating point (float16, bfloat16 or float32)")
    return plan


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_models(ckpt: CheckpointFile, models: dict, dtype: torch.dtype | None = None,
                device="cpu", ema: bool = False) -> dict:
    """Load the checkpoint into `models` (built on the meta device, so that nothing is allocated
    twice), one tensor at a time, converting floating-point tensors to `dtype`. Returns the
    extras (EXTRA_KEYS found in the file), to hand back to save_model."""
    plan = plan_load(ckpt, models, ema)
    nbytes = sum(ckpt.shapes[k][0].numel() * ckpt.shapes[k][1].itemsize
                 for keys in plan.values() for k in keys.values())
    finite = []  # (file key, 0-d bool tensor): read back once at the end, not one device sync per tensor
    with tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"loading {os.path.basename(ckpt.path)}",
              disable=None, leave=False) as bar:
        for name, model in models.items():
            state = {}
            for key, file_key in plan[name].items():
                stored = ckpt.shapes[file_key][1]
                state[key] = ckpt.get(file_key, dtype if stored.is_floating_point else None).to(device)
                if state[key].is_floating_point():  # through a sum: torch.isfinite makes a float and a bool copy
                    finite.append((file_key, torch.isfinite(state[key].sum(dtype=torch.float32))))
                bar.update(state[key].numel() * stored.itemsize)
            model.load_state_dict(state, strict=True, assign=True)
            del state
            still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            if still_meta:  # a non-persistent buffer: the model must compute it, not keep it
                raise RuntimeError(f"{LABELS[name]}: {_listing(still_meta)} not in its state dict")
    flags = torch.stack([ok for _, ok in finite]).tolist() if finite else []
    # a sum is inf/NaN when an element is, and also when finite weights overflow it: those are read again
    suspects = [k for (k, _), ok in zip(finite, flags) if not ok]
    check_finite(ckpt, [k for k in suspects if not torch.isfinite(ckpt.get(k, dtype)).all()], dtype)
    loaded = {k for keys in plan.values() for k in keys.values()}
    return {k: ckpt.get(k) for k in ckpt.shapes if k in EXTRA_KEYS and k not in loaded}


def check_finite(ckpt: CheckpointFile, bad: list, dtype: torch.dtype | None):
    """NaN or inf in a weight gives black or noise images and NaN losses with no word of why: name the
    tensors (`bad`, file keys), and say whether it is the file or the conversion to `dtype` (a float32
    value beyond float16's range becomes inf)."""
    if not bad:
        return
    overflow = dtype is not None and all(ckpt.shapes[k][1] != dtype and torch.isfinite(ckpt.get(k)).all() for k in bad)
    raise CheckpointError(
        f"{ckpt.path}: NaN or infinite values in {_tensors(len(bad))}: {_listing(bad, 3)}; "
        + (f"they are finite in the file but exceed {_dtype_name(dtype)}'s range: load it in float32"
           if overflow else "the file is damaged, or was saved from a training run that diverged"))


def save_model(path, *, unet: dict, vae: dict, text_encoder: dict, extras: dict | None = None,
                    config: SDConfig | None = None, dtype: torch.dtype | None = None):
    """Write the three models' state dicts (plus extras) in the original SD v1 layout, to a
    .safetensors or .ckpt file, atomically. `config` is stored in the file's metadata so that
    a model of any size reloads without being told its config. dtype: convert floating-point
    tensors (None keeps each tensor's own)."""
    tensors = dict(extras or {})
    for name, state in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        tensors.update({PREFIXES[name] + k: t for k, t in state.items()})
    write_tensors(path, tensors, dataclasses.asdict(config) if config else None, dtype)


# The ranges a stored config's fields must be in (ints not named here: 1 to WIDTH). The upper bounds are
# far beyond any SD-family model: they only keep a damaged or hand-edited file from building millions of
# modules or allocating terabytes before the shape check could refuse it.
WIDTH, COUNT, LEVELS = 1 << 16, 256, 8
INT_RANGES = {
    "num_res_blocks": (1, COUNT), "transformer_depth": (1, COUNT), "layers": (1, COUNT),
    "channel_mult": (1, COUNT), "ch_mult": (1, COUNT), "attention_resolutions": (1, 1 << LEVELS),
    "vocab_size": (1, 1 << 24), "timesteps": (2, 1 << 20),
    # the default size for sampling and training; the size actually used is checked against memory
    # (minidb.sampling.check_memory), this only bounds what a file can ask for
    "image_size": (8, 16384),
}
FLOAT_RANGES = {"scale_factor": (0, math.inf), "linear_start": (0, 1), "linear_end": (0, 1), "guidance": (0, math.inf)}  # exclusive
CHOICES = {"parameterization": ("eps", "v")}


def config_from_dict(values, path=None) -> SDConfig:
    """Rebuild the (nested, frozen) config that save_model stored. Every field is checked first, type
    and range, and then what the models need of them together (widths divisible by heads and groups):
    a bad value is one CheckpointError naming the field, not a TypeError, a division by zero or a huge
    allocation later on. path: the file, for the message."""
    try:
        config = _dataclass_from_dict(SDConfig, values, "")
        _check_structure(config)
    except ValueError as e:
        where = f"{path}: " if path else ""
        raise CheckpointError(f"{where}the minidb config stored in the file is invalid: {e}") from None
    return config


def _dataclass_from_dict(cls, values, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'it'} must be a table of fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [prefix + k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"{', '.join(map(str, unknown))}: no such field")
    kwargs = {}
    for name, v in values.items():
        kind = fields[name].type
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _dataclass_from_dict(kind, v, f"{prefix}{name}.")
        else:
            kwargs[name] = _field_value(prefix + name, name, kind, v)
    return cls(**kwargs)


def _field_value(key: str, name: str, kind, v):
    """v checked against the field's type annotation (int, float, str, tuple[int, ...]) and range."""
    if kind is str:
        if v not in CHOICES[name]:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, CHOICES[name]))}, got {v!r}")
        return v
    if kind is float:
        low, high = FLOAT_RANGES[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v < high:
            between = f"above {low}" if high == math.inf else f"between {low} and {high}, exclusive"
            raise ValueError(f"{key} must be a number {between}, got {v!r}")
        return float(v)
    low, high = INT_RANGES.get(name, (1, WIDTH))
    if typing.get_origin(kind) is tuple:
        levels = name != "attention_resolutions"  # one entry per level: at least one, at most LEVELS
        if (not isinstance(v, (list, tuple)) or not all(_int_in(x, low, high) for x in v)
                or (levels and not 1 <= len(v) <= LEVELS) or len(v) > COUNT):
            count = f"1 to {LEVELS} integers" if levels else "a list of integers"
            raise ValueError(f"{key} must be {count}, each from {low} to {high}, got {v!r}")
        return tuple(v)
    if not _int_in(v, low, high):
        raise ValueError(f"{key} must be an integer from {low} to {high}, got {v!r}")
    return v


def _int_in(v, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _check_structure(c: SDConfig):
    """What the models need of the fields together (UNetModel, AutoencoderKL and CLIPTextModel check
    it too, but without naming the file)."""
    for m in c.unet.channel_mult:
        width = c.unet.model_channels * m
        if width % c.unet.norm_groups or width % c.unet.num_heads:
            raise ValueError(f"the UNet width unet.model_channels x {m} = {width} must be a multiple of "
                             f"unet.norm_groups ({c.unet.norm_groups}) and unet.num_heads ({c.unet.num_heads})")
    if c.vae.ch % c.vae.norm_groups:
        raise ValueError(f"vae.ch ({c.vae.ch}) must be a multiple of vae.norm_groups ({c.vae.norm_groups})")
    if c.clip.width % c.clip.heads:
        raise ValueError(f"clip.width ({c.clip.width}) must be a multiple of clip.heads ({c.clip.heads})")
    if c.linear_start > c.linear_end:
        raise ValueError(f"linear_start ({c.linear_start}) must not exceed linear_end ({c.linear_end})")
    if c.image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {c.image_size}")
