"""The plan of a fine-tuning run: every default and derived choice made once, before anything is
loaded or written, and read by everything after.

    plan = make_plan(load_config("run.toml"))      # checks the config and the base model's header
    plan.cfg          # the config as it runs (what config.toml holds): paths absolute, data.resolution
                      # and unset guidance scales the base model's, train.low_memory spelled out into its switches
    plan.device, plan.precision, plan.dtype, plan.world_size, plan.lr_scale, plan.text_encoder_trains,
    plan.prior_teacher
    plan.config_toml, plan.config_record   # plan.cfg as config.toml and as a training state records it

The choices, each in one place:
- device: model.device, "auto" = this process's GPU if there is one, else the CPU (minidb.device);
- precision: model.precision, "auto" = fp16 on CUDA, fp32 elsewhere (minidb.device);
- resolution: data.resolution, 0 = the base model's own image size (read from its file's header);
- guidance: prior.guidance and validation.guidance, unset = the base model's own scale (config.guidance
  in its file's header, 7.5 for SD v1 files that store none);
- memory: train.low_memory turns on 8-bit AdamW, gradient checkpointing and the fused backward step
  where the run allows it (with_memory_switches); the allocator keeps its freed memory bounded in
  the modes that trade speed for memory (bounded_allocator);
- lr scale: optim.scale_lr = the instance images per step, else 1;
- what trains: with LoRA the adapters (and the text encoder's with model.lora_text_encoder), else the
  UNet and, with model.train_text_encoder, the text encoder;
- the prior's target: with prior preservation and prior.target = "base", a frozen copy of the base
  model predicts the class half's targets (prior_teacher).
"""
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minidb.config import DTYPES, SDConfig
from minidb.device import choose_device, default_precision
from minidb.errors import CheckpointError, ConfigError, MinidbError
from minidb.dreambooth.fused_step import check_supported
from minidb.dreambooth.train_config import DreamBoothConfig, dump_toml, resolved, to_dict, validate
from minidb.dreambooth.train_options import scaled_lr


@dataclass(frozen=True)
class Plan:
    cfg: DreamBoothConfig      # the config as it runs: every default and derived choice filled in
    base: SDConfig             # the base model's config, from its file's header
    device: torch.device
    precision: str             # fp32 | fp16 | bf16 ("auto" resolved)
    world_size: int            # processes (torchrun's WORLD_SIZE)
    lr_scale: float            # optim.scale_lr: the instance images per step; else 1
    text_encoder_trains: bool  # its weights or its LoRA adapters get gradients
    bounded_allocator: bool    # a mode that trades speed for memory: minidb.dreambooth.allocator keeps less freed memory
    token_rows: bool           # the text encoder's token embedding trains only its used rows (minidb.dreambooth.token_rows)
    prior_teacher: bool        # a frozen copy of the base model gives the class half's targets (prior.target = "base")
    dtype: torch.dtype         # the precision's torch dtype
    config_toml: str           # cfg as the run folder's config.toml holds it
    config_record: dict        # cfg as each training state records it (train_config.to_dict)


def make_plan(cfg: DreamBoothConfig, world_size: int | None = None, local_rank: int | None = None) -> Plan:
    """Check cfg and resolve every choice of the run. world_size and local_rank default to
    torchrun's environment (one process without it). Bad input raises a MinidbError."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    validate(cfg)
    cfg, base = read_base(resolved(cfg))
    device = choose_device(cfg.model.device, local_rank, option="model.device")
    precision = cfg.model.precision if cfg.model.precision != "auto" else default_precision(device)
    cfg = with_memory_switches(cfg, precision, world_size)
    t = cfg.train
    if t.fused_backward != "off":  # what the fused step cannot do fails here, before anything is loaded
        check_supported(world_size, t.grad_accum, precision == "fp16", t.fused_backward)
    m = cfg.model
    return Plan(cfg=cfg, base=base, device=device, precision=precision, world_size=world_size,
                lr_scale=scaled_lr(1.0, t.batch_size, t.grad_accum, world_size) if cfg.optim.scale_lr else 1.0,
                text_encoder_trains=m.lora_text_encoder if m.lora_rank else m.train_text_encoder,
                bounded_allocator=bounded_allocator(cfg), token_rows=token_rows(cfg, precision),
                prior_teacher=bool(cfg.prior.class_prompt) and cfg.prior.target == "base",
                dtype=getattr(torch, DTYPES[precision]),
                config_toml=dump_toml(cfg), config_record=to_dict(cfg))


def bounded_allocator(cfg: DreamBoothConfig) -> bool:
    """The modes that trade speed for memory (train.low_memory, the fused step), where keeping all
    freed memory would fragment the heap and cost memory (minidb.dreambooth.allocator)."""
    return cfg.train.low_memory or cfg.train.fused_backward != "off"


def token_rows(cfg: DreamBoothConfig, precision: str) -> bool:
    """train.token_rows where it gives dense AdamW's weights: the whole text encoder trains, with torch's
    AdamW (fp32 masters for a 16-bit model), no EMA and no fused step (minidb.dreambooth.token_rows says why)."""
    m, t = cfg.model, cfg.train
    return (t.token_rows and m.train_text_encoder and not m.lora_rank and cfg.optim.optimizer == "adamw"
            and (precision == "fp32" or cfg.optim.master_weights == "fp32") and not t.ema_decay
            and t.fused_backward == "off")


def read_base(cfg: DreamBoothConfig) -> tuple[DreamBoothConfig, SDConfig]:
    """The base checkpoint opened and checked (format, model family, keys, shapes; no tensor read)
    and the checks that need its config. Returns cfg with data.resolution = 0 replaced by the base
    model's image size and an unset prior.guidance or validation.guidance by its guidance scale, and
    the base model's config."""
    from minidb.pipeline import StableDiffusion
    from minidb.sampling import check_memory, check_size
    if not Path(cfg.model.base).is_file():
        raise CheckpointError(f"model.base: {cfg.model.base}: no such checkpoint file")
    base = StableDiffusion.inspect_checkpoint(cfg.model.base)
    if cfg.data.resolution == 0:  # the default: the resolution the base model was trained at
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=base.image_size))
    for section in ("prior", "validation"):  # unset: the scale the base model samples best at, from its file
        options = getattr(cfg, section)
        if options.guidance is None:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(options, guidance=base.guidance)})
    try:
        check_size(base, cfg.data.resolution, cfg.data.resolution)
        # one image, the narrowest precision, this machine's RAM: a floor that refuses only sizes that cannot fit
        check_memory(base, cfg.data.resolution, cfg.data.resolution, itemsize=2, guided=False)
    except MinidbError as e:
        raise ConfigError(f"data.resolution: {e}") from None
    class_dir = Path(cfg.prior.class_dir)
    if cfg.prior.class_prompt and class_dir.exists() and not class_dir.is_dir():
        raise ConfigError(f"prior.class_dir: {class_dir} is a file, not a folder")
    return cfg, base


def with_memory_switches(cfg: DreamBoothConfig, precision: str, world_size: int) -> DreamBoothConfig:
    """train.low_memory spelled out into the switches it turns on, once the precision ("fp32",
    "fp16", "bf16") and the number of processes are known, so that the run's config.toml says what
    ran. A switch already on stays as set. The fused step comes on only where it works (one
    process, grad_accum = 1), clipping by the last step's norm, or in fp16 measuring first ("exact"):
    an overflow found late in backward could not be undone once earlier weights were stepped."""
    if not cfg.train.low_memory:
        return cfg
    fused = cfg.train.fused_backward
    if fused == "off" and world_size == 1 and cfg.train.grad_accum == 1:
        fused = "exact" if precision == "fp16" else "lagged"
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, gradient_checkpointing=True),
        optim=dataclasses.replace(cfg.optim, optimizer="adamw8bit"),
        train=dataclasses.replace(cfg.train, fused_backward=fused),
    )
