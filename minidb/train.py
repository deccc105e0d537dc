"""DreamBooth (Ruiz et al. 2022): fine-tune SD v1 on a few photos of one subject, with prior
preservation, so that "a photo of sks dog" draws *that* dog and "a photo of a dog" still draws dogs.

    minidb train --config run.toml [--set optim.lr=2e-6 ...] [--resume latest]

    from minidb.train import train
    from minidb.train_config import load_config
    result = train(load_config("run.toml"))            # -> TrainResult(model_path=..., ...)

`train` reads top to bottom: set-up, data, model and optimizer, the loop (micro-batches -> loss ->
backward -> the precision step), checkpoints, export. What it writes into the run folder
(train.output_dir) is minidb.run's; the data stage, its batches and their noise are minidb.data's.

Randomness: noise (offset noise included), timesteps and the VAE posterior sample of each training
example come from a generator seeded by (seed, step, micro-batch, position in the global batch),
augmentation from (seed, epoch, index), and new LoRA adapters from the seed: no global RNG state
enters a step, so a resumed run repeats an uninterrupted one bit for bit, and N processes draw what
one process would.

LoRA (model.lora_rank > 0, minidb.lora): adapters hooked onto the frozen UNet (and text encoder)
are the only trained parameters, so the masters, the optimizer and the checkpoints hold just them,
and the run writes lora.safetensors in kohya's format. The smaller options (min-SNR weighting,
offset noise, EMA, caption files, lr scaling) are minidb.train_options'.
"""
import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minidb.adamw8bit import AdamW8bit
from minidb.checkpoint import set_rng_state
from minidb.config import DTYPES, SDConfig
from minidb.data import Batches, DreamBoothDataset, can_cache_latents, cache_latents, load_image_folder, open_images
from minidb.distributed import Dist, StopOnSignal
from minidb.errors import CheckpointError, ConfigError, MinidbError
from minidb.fused_step import FusedBackwardStep, check_supported
from minidb.lora import (TEXT_ENCODER_TARGETS, UNET_ATTENTION, UNET_TRANSFORMER, LoRANetwork, add_lora, save_lora,
                         with_alphas)
from minidb.run import Run
from minidb.scaler import DynamicLossScaler, MasterWeights, found_inf, total_norm
from minidb.train_config import (DreamBoothConfig, ModelConfig, OptimConfig, TrainConfig, check_prompts, resolved,
                                 resolved_memory, validate)
from minidb.train_options import EMA, caption_file_of, caption_for, min_snr_weights, scaled_lr, weighted_mse


class TrainingDiverged(MinidbError):
    """The loss or the gradients became inf/NaN in fp32/bf16 (where no loss scaler can help)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None       # the newest training checkpoint
    model_path: Path | None       # the exported model (None when interrupted, or LoRA without lora_merge_export)
    interrupted: bool = False
    loss: float = float("nan")    # mean loss of the last step
    stopped_by: str | None = None  # when interrupted: "SIGINT", "SIGTERM" or "another process"
    lora_path: Path | None = None  # a LoRA run's lora.safetensors


def train(cfg: DreamBoothConfig, resume: str | None = None, callback=None) -> TrainResult:
    """Fine-tune per cfg. resume: None (a new run), "latest" (the newest checkpoint of the run
    folder) or a checkpoint path. callback(step, metrics) is called after every step.
    Bad input raises a MinidbError before any training starts."""
    from minidb.pipeline import StableDiffusion
    from minidb.prior import ensure_class_images

    # ---- set-up (the cheap checks first: bad input fails before anything is loaded or written) --
    validate(cfg)
    cfg = resolved(cfg)
    run = Run(cfg)
    state = run.find_state(resume)
    finished = run.finished_model(state)
    if finished is None:
        cfg, base_config = check_base(cfg)
        run.cfg = cfg
    # one writer per run folder: an existing folder is locked now, a new one once it is made (minidb.run)
    with Dist.from_env(cfg.train.dist_timeout_s) as dist, run.writer(dist):  # a lost peer: a one-line PeerLost
        dist.hint = lambda: f"continue the run with --resume latest (newest checkpoint: {run.latest_state() or 'none'})"
        if finished is not None:  # nothing to train, nothing to write
            lora = cfg.model.lora_rank > 0
            run.result(f"{run.folder} is already finished: step {state['step']} of train.steps = {cfg.train.steps}; "
                       f"{'LoRA' if lora else 'model'}: {finished}. To train on, resume with a larger train.steps "
                       "(--set train.steps=N)")
            return TrainResult(run.folder, state["step"], state["path"], None if lora else finished,
                               loss=state.get("loss", float("nan")), lora_path=finished if lora else None)
        device = dist.device(cfg.model.device)
        precision = cfg.model.precision if cfg.model.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
        dtype = getattr(torch, DTYPES[precision])
        seed, B, accum, W = cfg.train.seed, cfg.train.batch_size, cfg.train.grad_accum, dist.world_size
        cfg = run.cfg = resolved_memory(cfg, precision, W)  # train.low_memory's switches, into config.toml
        if cfg.train.fused_backward != "off":  # what it cannot do fails here, before anything is loaded
            check_supported(W, accum, precision == "fp16", cfg.train.fused_backward)
        lr_scale = scaled_lr(1.0, B, accum, W) if cfg.optim.scale_lr else 1.0
        text_encoder_trains = cfg.model.lora_text_encoder if cfg.model.lora_rank else cfg.model.train_text_encoder
        torch.manual_seed(seed + dist.rank)  # the global RNGs are not used by a step; seeded for anything else
        random.seed(seed + dist.rank)
        np.random.seed(seed + dist.rank)

        # ---- data -------------------------------------------------------------------------------
        instance_images = load_image_folder(cfg.data.instance_dir, "instance", cfg.data.resolution)
        prior = bool(cfg.prior.class_prompt)
        check_prompts(cfg.data.instance_prompt, cfg.prior.class_prompt or None)
        prompts, prompt_rows = prompt_table(cfg, instance_images)
        warn_long_prompts(cfg, instance_images)
        run.prepare(state)
        run.log(f"loading {cfg.model.base} ({device}, {precision})")
        try:
            sd = StableDiffusion.from_checkpoint(cfg.model.base, config=base_config, device=device, dtype=dtype)
        except CheckpointError:
            # what only the tensors can show (NaN weights): a new run's folder goes back to holding no run,
            # so that the command with another model.base runs
            if state is None and dist.is_main:
                (run.folder / "config.toml").unlink(missing_ok=True)
            raise
        class_images = None
        if prior:  # missing class images are generated from the base model, each rank its share
            p = cfg.prior
            paths = ensure_class_images(sd, p.class_prompt, p.class_dir, p.num_class_images, seed=seed,
                                        batch_size=p.batch_size, steps=p.sample_steps, guidance=p.guidance,
                                        sampler=p.sampler, resolution=cfg.data.resolution, rank=dist.rank,
                                        world_size=W, progress=dist.is_main)
            dist.barrier()
            class_images = open_images(paths, "class", p.class_dir, cfg.data.resolution)  # junk named, skipped
        dataset = DreamBoothDataset(instance_images, class_images, cfg.data.resolution, cfg.data.center_crop,
                                    cfg.data.hflip, seed)

        # ---- model and optimizer ----------------------------------------------------------------
        lora = add_adapters(sd, cfg.model, seed) if cfg.model.lora_rank else {}
        trainable = set_trainable(sd, cfg.model.train_text_encoder, lora)
        sd.unet.gradient_checkpointing = cfg.model.gradient_checkpointing
        sd.text_encoder.gradient_checkpointing = cfg.model.gradient_checkpointing  # frozen: no_grad, nothing to redo
        # fp32: the masters are the model's own parameters. fp16 and bf16: fp32 copies, because an
        # update of lr * ~1 is far below the 2**-10 (fp16) or 2**-7 (bf16) resolution of a weight and
        # would round away; bf16 needs no loss scaler, its exponent range is fp32's (minidb.scaler).
        # optim.master_weights = "kahan" (bf16): no copies, the 8-bit AdamW compensates the rounding.
        masters = MasterWeights(trainable, fp32_masters=cfg.optim.master_weights == "fp32")
        o = cfg.optim
        optimizer = make_optimizer(masters.params, o)
        scaler = DynamicLossScaler(o.loss_scale_init, o.loss_scale_growth_interval,
                                   min_scale=o.loss_scale_min) if precision == "fp16" else None
        # the fused step: each weight stepped inside backward (minidb.fused_step), replacing
        # backward + optimizer_step below; None: the plain step
        fused = FusedBackwardStep(masters, step_one(optimizer), o.max_grad_norm, scaler,
                                  cfg.train.fused_backward) if cfg.train.fused_backward != "off" else None
        step, cursor = 0, (0, 0)  # cursor: (epoch, position in that epoch's order) of the next example
        if state is not None:
            step, cursor = restore(state, masters, optimizer, scaler, dist, run, fused)
        if isinstance(optimizer, AdamW8bit):
            optimizer.init_state()  # now, not between the first backward's gradients (fragmenting the heap)
        ema = start_ema(cfg.train, masters, state, run)
        unet = dist.wrap(sd.unet, lora.get("unet"))
        text_encoder = dist.wrap(sd.text_encoder, lora.get("text_encoder")) if text_encoder_trains else sd.text_encoder

        prompt_ids = sd.tokenizer(prompts).to(device)
        fixed_context = None
        if not text_encoder_trains:
            with torch.no_grad():
                fixed_context = sd.text_encoder(prompt_ids)  # [prompts, 77, width]: each encoded once, for every step
        latent_cache = None
        if cfg.data.cache_latents and can_cache_latents(cfg.data.center_crop, cfg.data.hflip, dataset.exact_size):
            latent_cache = cache_latents(sd, dataset, prior, dist)
        elif cfg.data.cache_latents:
            run.log("not caching latents: random " + ("flips" if cfg.data.hflip else "crops of images larger than "
                                                      "the resolution") + " change the image every epoch")
        batches = Batches(dataset, sd, B, dist, latent_cache, cfg.train.noise_offset, prompt_rows)
        run.log(describe(cfg, base_config, len(instance_images), class_images, masters, precision, W))
        captioned = sum(prompts[r] != cfg.data.instance_prompt for r in prompt_rows)
        if captioned:
            run.log(f"{captioned} of {_count(len(prompt_rows), 'instance image')} have a caption file, used in "
                    "place of the instance prompt (data.captions)")

        # ---- the loop ---------------------------------------------------------------------------
        last_checkpoint = run.latest_state()
        loss_value = state.get("loss", float("nan")) if state is not None else float("nan")
        with run.open(step), StopOnSignal(run.log) as stop:
            while step < cfg.train.steps:
                t_start = time.perf_counter()
                lr = lr_at(step, cfg.optim, cfg.train.steps) * lr_scale
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = torch.zeros(3, device=device)  # total, instance, class: summed over micro-batches
                for micro in range(accum):
                    batch, cursor = batches.next(cursor, step, micro)  # [instance x B; class x B or none]
                    parts = []  # (loss, instance, class) of the last forward pass

                    def loss_fn():  # batch holds its noise and timesteps: a second call (exact clipping) repeats the first
                        context = prompt_context(text_encoder, prompt_ids, fixed_context, batch.prompt)
                        parts[:] = micro_batch_loss(
                            unet, sd.schedule, batch.latents, batch.noise, batch.t, context, B, cfg.prior.loss_weight,
                            dtype, sd.config.parameterization, cfg.train.min_snr_gamma)
                        return parts[0]

                    if fused is not None:  # backward and the optimizer step in one (grad_accum is 1)
                        stepped, grad_norm = fused.step(loss_fn)
                    else:
                        with dist.no_sync([unet, text_encoder], skip_all_reduce=micro < accum - 1):
                            loss = loss_fn()
                            # fp16: scale the loss up so small gradients survive; / accum: the mean over micro-batches
                            ((scaler.scale_loss(loss) if scaler else loss) / accum).backward()
                    loss, loss_instance, loss_class = parts
                    losses += torch.stack([loss, loss_instance, loss_class if prior else torch.zeros_like(loss)
                                           ]).detach() / accum

                if fused is None:  # the optimizer step, precision tricks in plain sight (see optimizer_step)
                    stepped, grad_norm = optimizer_step(masters, optimizer, scaler, cfg.optim.max_grad_norm, dist)
                if ema is not None and stepped:
                    ema.update(zip(masters.names, masters.params))
                step += 1
                loss_value, loss_instance_value, loss_class_value = dist.all_reduce_mean_(losses).tolist()
                if scaler is None and (not stepped or not math.isfinite(loss_value)):
                    raise TrainingDiverged(
                        f"loss {loss_value:g} / grad norm {grad_norm:g} at step {step} ({precision}): training "
                        f"stopped, nothing after step {step - 1} was saved; the last good checkpoint is "
                        + (f"{last_checkpoint}" if last_checkpoint else "none (no checkpoint was written yet)")
                        + ". Lower optim.lr, or check the data")
                metrics = {"step": step, "loss": loss_value, "loss_instance": loss_instance_value,
                           "loss_class": loss_class_value if prior else None, "lr": lr,
                           "loss_scale": scaler.scale if scaler else None,
                           "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # None: inf/NaN, skipped
                           "skipped": not stepped, "images_per_s": len(batch.t) * W * accum / (
                               time.perf_counter() - t_start), "epoch": cursor[0], "time": time.time()}
                run.log_metrics(metrics)
                if callback is not None:
                    callback(step, metrics)

                if cfg.validation.prompts and (step % cfg.validation.every == 0 or step == cfg.train.steps):
                    run.validation_grid(sd, step)
                stop_now = dist.any(stop.requested is not None, device=device)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop_now:
                    last_checkpoint = run.save_state(step, {
                        "data": {"epoch": cursor[0], "index": cursor[1]},  # the next example of the order
                        "weights": masters.state_dict(),                    # trainable weights, fp32
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None,
                        "fused_step": fused.state_dict() if fused else None,  # lagged clipping's last norm
                        "ema": ema.state_dict() if ema else None,           # the fp32 average, or None
                        # the lr schedule keeps no state: lr = lr_at(step), from the stored config
                        "loss": loss_value})
                if stop_now:
                    who = stop.requested or "another process"
                    run.log(f"stopped by {who} at step {step}; checkpoint {last_checkpoint}; continue with: "
                            f"minidb train --resume {run.folder}  (Python: train(cfg, resume=\"latest\"))")
                    return TrainResult(run.folder, step, last_checkpoint, None, interrupted=True, loss=loss_value,
                                       stopped_by=who)

        # ---- the end: the fine-tuned model as an SD v1 checkpoint, or the LoRA file ---------------
        if fused is not None:
            fused.remove()  # its hooks hold the optimizer
        del optimizer, fused  # the moments (2x the trained weights): freed before the export loads the base
        weights = ema.shadow if ema is not None and cfg.train.export_ema else masters.state_dict()
        if dist.is_main:
            run.result(f"done: {_count(step, 'step')}, loss {loss_value:.4f}; " + export(cfg, run, weights, step))
        dist.barrier()
        m = cfg.model
        model_path = run.model_path if not m.lora_rank or m.lora_merge_export else None
        return TrainResult(run.folder, step, last_checkpoint, model_path, loss=loss_value,
                           lora_path=run.lora_path if m.lora_rank else None)


def check_base(cfg: DreamBoothConfig) -> tuple[DreamBoothConfig, SDConfig]:
    """The base checkpoint opened and checked (format, model family, keys, shapes; no tensor read)
    and the checks that need its config, before anything is written. Returns the config with
    data.resolution = 0 replaced by the base model's image size, and the base model's config."""
    from minidb.pipeline import StableDiffusion
    from minidb.sampling import check_memory, check_size
    if not Path(cfg.model.base).is_file():
        raise CheckpointError(f"model.base: {cfg.model.base}: no such checkpoint file")
    base_config = StableDiffusion.inspect_checkpoint(cfg.model.base)
    if cfg.data.resolution == 0:  # the default: the resolution the base model was trained at
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=base_config.image_size))
    try:
        check_size(base_config, cfg.data.resolution, cfg.data.resolution)
        # one image, the narrowest precision, this machine's RAM: a floor that refuses only sizes that cannot fit
        check_memory(base_config, cfg.data.resolution, cfg.data.resolution, itemsize=2, guided=False)
    except MinidbError as e:
        raise ConfigError(f"data.resolution: {e}") from None
    class_dir = Path(cfg.prior.class_dir)
    if cfg.prior.class_prompt and class_dir.exists() and not class_dir.is_dir():
        raise ConfigError(f"prior.class_dir: {class_dir} is a file, not a folder")
    return cfg, base_config


def restore(state, masters, optimizer, scaler, dist, run, fused=None) -> tuple[int, tuple[int, int]]:
    """Weights, optimizer, loss scaler, the fused step's clipping norm, RNG states; returns (step, data cursor)."""
    try:
        masters.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{state['path']}: does not fit this model: {e}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if fused is not None and state.get("fused_step"):
        fused.load_state_dict(state["fused_step"])
    rngs = state["rng"]
    if state["world_size"] != dist.world_size:
        run.log(f"resuming a {state['world_size']}-process run with {dist.world_size}: the data order continues, "
                "the batch per step changes")
    set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    run.log(f"resumed from {state['path']} at step {state['step']}")
    return state["step"], (state["data"]["epoch"], state["data"]["index"])


def describe(cfg, base_config, n_instance, class_images, masters, precision, world_size) -> str:
    """The one line that says what this run trains, on what, at what size."""
    B, accum, r = cfg.train.batch_size, cfg.train.grad_accum, cfg.data.resolution
    m = cfg.model
    parts = "UNet + text encoder" if m.train_text_encoder else "UNet (text encoder frozen)"
    if m.lora_rank:
        parts = (f"rank-{m.lora_rank} LoRA adapters (alpha {m.lora_alpha or m.lora_rank:g}) on the UNet's "
                 + ("attention" if m.lora_targets == "attention" else "transformer blocks")
                 + (" + text encoder" if m.lora_text_encoder else " (text encoder frozen)"))
    n_trained = sum(p.numel() for p in masters.params)
    return (_count(n_instance, "instance image")
            + (f", {_count(len(class_images), 'class image')}" if class_images is not None else "")
            + f" at {r}x{r}" + (" (the base model's image size)" if r == base_config.image_size else "")
            + f"; {_count(cfg.train.steps, 'step')} of {B} x {world_size} process(es) x {accum} accumulation = "
            f"{_count(B * world_size * accum, 'instance image')} per step; training {parts}, "
            f"{n_trained / 1e6:.1f}M parameters, {precision}"
            + (" with fp32 master weights" if masters.separate else
               " with Kahan-compensated weights (no fp32 masters)" if cfg.optim.master_weights == "kahan" else "")
            + memory_options(cfg)
            + (f", lr x {B * world_size * accum} (optim.scale_lr)" if cfg.optim.scale_lr else "")
            + f"; run folder {cfg.train.output_dir}")


def memory_options(cfg) -> str:
    """"; adamw8bit, fused backward step (lagged clipping), gradient checkpointing", or what of it is on."""
    on = ([cfg.optim.optimizer] if cfg.optim.optimizer != "adamw" else []) + (
        [f"fused backward step ({cfg.train.fused_backward} clipping)"] if cfg.train.fused_backward != "off" else []) + (
        ["gradient checkpointing"] if cfg.model.gradient_checkpointing else [])
    return "; " + ", ".join(on) + (" (train.low_memory)" if cfg.train.low_memory else "") if on else ""


def export(cfg: DreamBoothConfig, run: Run, weights: dict, step: int) -> str:
    """Write the run's result into the run folder: model.safetensors, or for LoRA lora.safetensors
    (and, with lora_merge_export, the base with it merged in). Returns what the summary says of it."""
    from minidb.pipeline import export_model
    m = cfg.model
    dtype = getattr(torch, DTYPES[m.export_dtype])
    prompt = json.dumps(cfg.data.instance_prompt)
    if not m.lora_rank:
        export_model(m.base, weights, run.model_path, dtype)
        return (f"model: {run.model_path} ({m.export_dtype}, {_size(run.model_path)}); try: minidb sample "
                f"--ckpt {run.model_path} --prompt {prompt}")
    r = cfg.data.resolution
    save_lora(run.lora_path, with_alphas(weights, m.lora_alpha or m.lora_rank), dtype, metadata={
        "ss_sd_model_name": Path(m.base).name, "ss_resolution": f"({r}, {r})", "ss_steps": step,
        "ss_learning_rate": cfg.optim.lr, "ss_seed": cfg.train.seed})
    said = f"LoRA: {run.lora_path} (rank {m.lora_rank}, {m.export_dtype}, {_size(run.lora_path)})"
    if m.lora_merge_export:
        export_model(m.base, {}, run.model_path, dtype, lora=run.lora_path)
        said += f"; merged model: {run.model_path} ({_size(run.model_path)})"
    return said + f"; try: minidb sample --ckpt {m.base} --lora {run.lora_path} --prompt {prompt}"


def _size(path: Path) -> str:
    size = path.stat().st_size
    if size < 2 ** 20:
        return f"{size / 2 ** 10:.1f} KiB"
    return f"{size / 2 ** 30:.2f} GiB" if size > 2 ** 30 else f"{size / 2 ** 20:.1f} MiB"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---- the pieces of a step ------------------------------------------------------------------------

def set_trainable(sd, train_text_encoder: bool, lora: dict | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """VAE frozen in eval mode; UNet trained; text encoder trained or frozen. With LoRA (the networks
    of add_adapters) every model is frozen and only the adapters train. Returns the named trainable
    parameters: these, and only these, reach the optimizer."""
    sd.vae.eval().requires_grad_(False)
    if lora:
        sd.unet.train().requires_grad_(False)
        sd.text_encoder.train("text_encoder" in lora).requires_grad_(False)
        return [(n, p) for network in lora.values() for n, p in network.named_parameters()]  # kohya names
    sd.unet.train().requires_grad_(True)
    if train_text_encoder:
        sd.text_encoder.train().requires_grad_(True)
    else:
        sd.text_encoder.eval().requires_grad_(False)
    modules = [("unet", sd.unet)] + ([("text_encoder", sd.text_encoder)] if train_text_encoder else [])
    return [(f"{name}.{n}", p) for name, module in modules for n, p in module.named_parameters()]


def add_adapters(sd, m: ModelConfig, seed: int) -> dict[str, LoRANetwork]:
    """New rank-m.lora_rank LoRA adapters on the UNet's attention projections (m.lora_targets
    "transformer": also its feed-forward and proj_in/out) and, with
    m.lora_text_encoder, the text encoder's attention and MLP: one network per model, for each DDP
    wrap to hold its own. Their init is drawn from `seed` alone, so every rank builds the same."""
    unet_targets = UNET_TRANSFORMER if m.lora_targets == "transformer" else UNET_ATTENTION
    targets = {"unet": (unet_targets, ()), "text_encoder": ((), TEXT_ENCODER_TARGETS)}
    with torch.random.fork_rng(devices=[]):  # adapters are built on the CPU, then moved
        torch.manual_seed(seed)
        return {name: add_lora({name: sd.models[name]}, m.lora_rank, m.lora_alpha or None, *targets[name])
                for name in ("unet", "text_encoder") if name == "unet" or m.lora_text_encoder}


def prompt_table(cfg: DreamBoothConfig, instance_images) -> tuple[list[str], list[int]]:
    """The run's distinct prompts: the instance prompt or, with data.captions, each image's caption
    file, then the class prompt (with prior preservation); and each instance image's row in it."""
    captions = [caption_for(path, cfg.data.instance_prompt) if cfg.data.captions else cfg.data.instance_prompt
                for path, _ in instance_images]
    prompts = list(dict.fromkeys(captions))
    return prompts + ([cfg.prior.class_prompt] if cfg.prior.class_prompt else []), [prompts.index(c) for c in captions]


def warn_long_prompts(cfg: DreamBoothConfig, instance_images) -> None:
    """A warning for each prompt the tokenizer will cut to CLIP's 77 tokens, naming where it came
    from (an option or a caption file), as `minidb sample` warns for its prompts."""
    from minidb.sampling import truncated_prompts
    from minidb.tokenizer import CLIPTokenizer
    sources = {}  # prompt -> where it is written
    if cfg.data.captions:
        for path, _ in instance_images:
            caption_file = caption_file_of(path)
            if caption_file is not None:
                sources.setdefault(caption_for(path, ""), f"caption file {caption_file}")
    sources.setdefault(cfg.data.instance_prompt, "data.instance_prompt")
    if cfg.prior.class_prompt:
        sources.setdefault(cfg.prior.class_prompt, "prior.class_prompt")
    for prompt in cfg.validation.prompts:
        sources.setdefault(prompt, "validation.prompts")
    tokenizer = CLIPTokenizer()
    for prompt in truncated_prompts(tokenizer, list(sources)):
        warnings.warn(f"{sources[prompt]}: prompt truncated to CLIP's 77 tokens ({tokenizer.num_tokens(prompt) + 2} "
                      f"with start and end), the rest is ignored: {prompt[:57] + '...' if len(prompt) > 60 else prompt!r}",
                      stacklevel=2)


def prompt_context(text_encoder, prompt_ids, fixed_context, rows: torch.Tensor) -> torch.Tensor:
    """The text encoder's output [n, 77, width] for each example's prompt (rows: of the prompt table).
    A frozen encoder's outputs were computed once (fixed_context); a trained one encodes each
    distinct prompt of the batch once."""
    if fixed_context is not None:
        return fixed_context[rows]
    used, inverse = rows.unique(return_inverse=True)
    return text_encoder(prompt_ids[used])[inverse]


def start_ema(t: TrainConfig, masters: MasterWeights, state, run) -> EMA | None:
    """The fp32 moving average of the trained weights (train.ema_decay > 0), continued from the
    checkpoint being resumed when it holds one, else started from the weights as they are."""
    if not t.ema_decay:
        return None
    ema = EMA(zip(masters.names, masters.params), t.ema_decay, device="cpu" if t.ema_on_cpu else None)
    if state is not None and state.get("ema"):
        ema.load_state_dict(state["ema"])
        ema.decay = t.ema_decay  # the configured decay, also when the resume changed it
    elif state is not None:
        run.log(f"train.ema_decay: the checkpoint holds no EMA; it starts at step {state['step']}")
    return ema


def micro_batch_loss(unet, schedule, latents, noise, t, context, n_instance: int, prior_loss_weight: float,
                     dtype=torch.float32, parameterization: str = "eps", min_snr_gamma: float = 0.0):
    """Noise-prediction MSE on latents [instance; class] (one UNet pass over both halves):
    loss = MSE(instance half) + prior_loss_weight * MSE(class half). Returns (loss, instance, class);
    without class examples (no prior preservation), class is None and loss = instance.
    A v-model (parameterization "v") is fitted to v instead of the noise. min_snr_gamma > 0: each
    example's MSE weighted by its min-SNR weight (minidb.train_options.min_snr_weights)."""
    noisy = schedule.add_noise(latents, noise, t)                     # x_t, fp32 [2B, 4, h, w]
    pred = unet(noisy.to(dtype), t, context.to(dtype)).float()        # the MSE in fp32 whatever the model
    target = noise if parameterization == "eps" else schedule.velocity(latents, noise, t)
    weights = min_snr_weights(schedule.snr(t), min_snr_gamma, parameterization) if min_snr_gamma else None
    return dreambooth_loss(pred, target, n_instance, prior_loss_weight, weights)


def dreambooth_loss(eps_pred, noise, n_instance: int, prior_loss_weight: float, weights=None):
    def mse(rows):  # weights None: the plain MSE (weighted_mse would sum in another order)
        if weights is None:
            return torch.nn.functional.mse_loss(eps_pred[rows], noise[rows])
        return weighted_mse(eps_pred[rows], noise[rows], weights[rows])
    loss_instance = mse(slice(0, n_instance))
    if eps_pred.shape[0] == n_instance:
        return loss_instance, loss_instance, None
    loss_class = mse(slice(n_instance, None))
    return loss_instance + prior_loss_weight * loss_class, loss_instance, loss_class


def optimizer_step(masters: MasterWeights, optimizer, scaler: DynamicLossScaler | None, max_grad_norm: float,
                   dist: Dist | None = None) -> tuple[bool, float]:
    """Model gradients -> one optimizer step on the fp32 masters -> the model's weights.
    Returns (stepped, grad norm); stepped is False when a gradient was inf/NaN (on any rank)."""
    # 1. fp16/bf16 grads -> fp32 master grads; fp16 also divides out the loss scale (a power of 2: exact)
    masters.grads_from_model(1.0 / scaler.scale if scaler else 1.0)
    # 2. one norm serves clipping and the overflow check; the flag is all-reduced so all ranks agree
    grads = masters.grads()
    norm = total_norm(grads)
    inf = found_inf(grads, norm)
    if dist is not None:
        dist.all_reduce_max_(inf)
    skip = bool(inf.item())
    # 3. fp16: an overflow skips the step and halves the scale; clean steps let it grow back
    if scaler is not None:
        scaler.update(skip)
    if skip:
        masters.zero_grad()
        return False, float(norm)
    # 4. clip (as torch.nn.utils.clip_grad_norm_ does), step the fp32 masters, round them into the model
    if max_grad_norm > 0:
        coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
    optimizer.step()
    masters.copy_to_model()
    masters.zero_grad()
    return True, float(norm)


def make_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    """optim.optimizer: torch's AdamW, or minidb's with 8-bit moments (the same update, a quarter of the state).
    torch's is its fused implementation (one kernel for all tensors) where it has one: on CPU several times
    faster than its default (foreach) implementation (benchmarks/RESULTS.md, "The default optimizer")."""
    hyper = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        return AdamW8bit(params, **hyper, kahan=o.master_weights == "kahan")
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, **hyper, fused=fused or None)


def step_one(optimizer: torch.optim.Optimizer):
    """step_fn(master) for the fused step: one parameter's update. AdamW8bit has it; torch's AdamW
    steps every parameter of its groups, so for the call its group holds only that one."""
    if isinstance(optimizer, AdamW8bit):
        return optimizer.step_param

    def step(master):
        group, = optimizer.param_groups  # train() gives every master one group
        params, group["params"] = group["params"], [master]
        try:
            optimizer.step()
        finally:
            group["params"] = params
    return step


def lr_at(step: int, o, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine down to min_lr at the last step."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if o.lr_schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)
