"""DreamBooth (Ruiz et al. 2022): fine-tune SD v1 on a few photos of one subject, with prior
preservation, so that "a photo of sks dog" draws *that* dog and "a photo of a dog" still draws dogs.

    minidb train --config run.toml [--set optim.lr=2e-6 ...] [--resume latest]

    from minidb.train import train
    from minidb.train_config import load_config
    result = train(load_config("run.toml"))            # -> TrainResult(model_path=..., ...)

`train` reads top to bottom: set-up, data, model and optimizer, the loop (micro-batches ->
loss -> backward -> the precision step), checkpoints, export. Everything it writes goes into the
run folder (train.output_dir):

    config.toml            the resolved config (a second run into this folder must match it)
    metrics.jsonl          one JSON line per step: loss, lr, loss scale, grad norm, images/s
    checkpoints/step_N.pt  full training state (minidb.checkpoint), the newest keep_checkpoints
    samples/step_N.png     validation grids, one image per validation prompt, fixed seeds
    class_images/          generated class images (unless prior.class_dir points elsewhere)
    model.safetensors      the fine-tuned model, original SD v1 layout, for `minidb sample`
    tensorboard/           when the tensorboard package is installed

Randomness: noise, timesteps and the VAE posterior sample of each training example come from a
generator seeded by (seed, step, micro-batch, position in the global batch), and augmentation
from (seed, epoch, index) in minidb.data: no global RNG state enters a step, so a resumed run
repeats an uninterrupted one bit for bit, and N processes draw what one process would.
"""
import dataclasses
import hashlib
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minidb.checkpoint import (checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                               prune_checkpoints, rng_state, save_checkpoint, set_rng_state)
from minidb.config import SDConfig
from minidb.distributed import Dist, PeerLost
from minidb.errors import CheckpointError, ConfigError, MinidbError
from minidb.scaler import DynamicLossScaler, MasterWeights, found_inf, total_norm
from minidb.train_config import (DreamBoothConfig, differences, dump_toml, from_dict, load_config, resolved,
                                 to_dict, validate)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Changing these between a checkpoint and its resume would not continue the same training.
MUST_MATCH_ON_RESUME = ("model.base", "model.train_text_encoder")


class TrainingDiverged(MinidbError):
    """The loss or the gradients became inf/NaN in fp32/bf16 (where no loss scaler can help)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None       # the newest training checkpoint
    model_path: Path | None       # the exported model (None when interrupted)
    interrupted: bool = False
    loss: float = float("nan")    # mean loss of the last step
    stopped_by: str | None = None  # when interrupted: "SIGINT", "SIGTERM" or "another process"


def train(cfg: DreamBoothConfig, resume: str | None = None, callback=None) -> TrainResult:
    """Fine-tune per cfg. resume: None (a new run), "latest" (the newest checkpoint of the run
    folder) or a checkpoint path. callback(step, metrics) is called after every step.
    Bad input raises a MinidbError before any training starts."""
    # ---- set-up --------------------------------------------------------------------------------
    validate(cfg)
    cfg = resolved(cfg)
    run = Path(cfg.train.output_dir)
    ckpt_dir = run / "checkpoints"
    if run.exists() and not run.is_dir():
        raise ConfigError(f"train.output_dir: {run} is a file, not a folder: choose another train.output_dir")
    state = find_resume_state(resume, ckpt_dir)
    finished = finished_model(state, run, cfg)
    if finished is None:
        cfg, base_config = check_base(cfg)
    dist = Dist.from_env(cfg.train.dist_timeout_s)
    try:
        if finished is not None:  # nothing to train, nothing to write
            Log(dist).result(f"{run} is already finished: step {state['step']} of train.steps = {cfg.train.steps}; "
                             f"model: {finished}. To train on, resume with a larger train.steps "
                             "(--set train.steps=N)")
            return TrainResult(run, state["step"], state["path"], finished, loss=state.get("loss", float("nan")))
        return _train(cfg, state, callback, dist, run, ckpt_dir, base_config)
    except RuntimeError as e:  # a collective failed because a peer died or hung: one line, not a traceback
        lost = dist.lost(e)
        if lost is None:
            raise
        newest = latest_checkpoint(ckpt_dir)
        raise PeerLost(f"{lost}; continue the run with --resume latest (newest checkpoint: "
                       f"{newest or 'none'})") from e
    finally:
        dist.close()


def _train(cfg, state, callback, dist, run, ckpt_dir, base_config) -> TrainResult:
    from minidb.data import (DreamBoothDataset, can_cache_latents, check_prompts, ensure_class_images,
                             load_image_folder, open_rgb)
    from minidb.pipeline import StableDiffusion

    log = Log(dist)
    device = pick_device(cfg.model.device, dist)
    precision = cfg.model.precision if cfg.model.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[precision]
    seed, B, accum, W = cfg.train.seed, cfg.train.batch_size, cfg.train.grad_accum, dist.world_size
    torch.manual_seed(seed + dist.rank)  # the global RNGs are not used by a step; seeded for anything else
    random.seed(seed + dist.rank)
    np.random.seed(seed + dist.rank)

    # ---- data (the cheap checks first: bad input fails before anything is loaded or written) ---
    instance_images = load_image_folder(cfg.data.instance_dir, "instance", cfg.data.resolution)
    prior = bool(cfg.prior.class_prompt)
    check_prompts(cfg.data.instance_prompt, cfg.prior.class_prompt or None)
    prepare_run_folder(cfg, run, ckpt_dir, state, dist, log)
    log(f"loading {cfg.model.base} ({device}, {precision})")
    sd = StableDiffusion.from_checkpoint(cfg.model.base, config=base_config, device=device, dtype=dtype)
    class_images = None
    if prior:  # missing class images are generated from the base model, each rank its share
        paths = ensure_class_images(
            sd, cfg.prior.class_prompt, cfg.prior.class_dir, cfg.prior.num_class_images, seed=seed,
            batch_size=cfg.prior.batch_size, steps=cfg.prior.sample_steps, guidance=cfg.prior.guidance,
            sampler=cfg.prior.sampler, resolution=cfg.data.resolution, rank=dist.rank,
            world_size=W, progress=dist.is_main)
        dist.barrier()
        class_images = [(p, open_rgb(p, cfg.data.resolution)) for p in paths]
    dataset = DreamBoothDataset(instance_images, class_images, cfg.data.resolution, cfg.data.center_crop,
                                cfg.data.hflip, seed)

    # ---- model and optimizer -------------------------------------------------------------------
    trainable = set_trainable(sd, cfg.model.train_text_encoder)
    sd.unet.gradient_checkpointing = cfg.model.gradient_checkpointing
    # fp32: the masters are the model's own parameters. fp16 and bf16: fp32 copies, because an
    # update of lr * ~1 is far below the 2**-10 (fp16) or 2**-7 (bf16) resolution of a weight and
    # would round away; bf16 needs no loss scaler, its exponent range is fp32's (minidb.scaler).
    masters = MasterWeights(trainable)
    optimizer = torch.optim.AdamW(masters.params, lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                                  eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay)
    scaler = DynamicLossScaler(cfg.optim.loss_scale_init, cfg.optim.loss_scale_growth_interval,
                               min_scale=cfg.optim.loss_scale_min) if precision == "fp16" else None
    step, cursor = 0, (0, 0)  # cursor: (epoch, position in that epoch's order) of the next example
    if state is not None:
        step, cursor = restore(state, masters, optimizer, scaler, dist, log)
    unet = dist.wrap(sd.unet)
    text_encoder = dist.wrap(sd.text_encoder) if cfg.model.train_text_encoder else sd.text_encoder

    prompt_ids = sd.tokenizer([cfg.data.instance_prompt] + ([cfg.prior.class_prompt] if prior else [])).to(device)
    if not cfg.model.train_text_encoder:
        with torch.no_grad():
            fixed_context = sd.text_encoder(prompt_ids)  # [1 or 2, 77, width], the same every step
    latent_cache = None
    if cfg.data.cache_latents and can_cache_latents(cfg.data.center_crop, cfg.data.hflip, dataset.exact_size):
        latent_cache = cache_latents(sd, dataset, prior, dist)
    elif cfg.data.cache_latents:
        log("not caching latents: random " + ("flips" if cfg.data.hflip else "crops of images larger than the "
                                              "resolution") + " change the image every epoch")

    n_trained = sum(p.numel() for p in masters.params)
    parts = "UNet + text encoder" if cfg.model.train_text_encoder else "UNet (text encoder frozen)"
    r = cfg.data.resolution
    log(_count(len(instance_images), "instance image")
        + (f", {_count(len(class_images), 'class image')}" if prior else "")
        + f" at {r}x{r}" + (" (the base model's image size)" if r == base_config.image_size else "")
        + f"; {_count(cfg.train.steps, 'step')} of {B} x {W} process(es) x {accum} accumulation = "
        f"{_count(B * W * accum, 'instance image')} per step; training {parts}, {n_trained / 1e6:.1f}M parameters, "
        f"{precision}"
        + (" with fp32 master weights" if masters.separate else "") + f"; run folder {run}")

    # ---- the loop ------------------------------------------------------------------------------
    metrics_file = open_metrics(run, step, dist)
    tb = open_tensorboard(run, dist)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not dist.is_main, dynamic_ncols=True)
    log.bar = bar
    latents_hw = cfg.data.resolution // 2 ** (len(sd.config.vae.ch_mult) - 1)
    last_checkpoint = latest_checkpoint(ckpt_dir)
    loss_value = state.get("loss", float("nan")) if state is not None else float("nan")
    try:
        with StopOnSignal(log) as stop:
            while step < cfg.train.steps:
                t_start = time.perf_counter()
                lr = lr_at(step, cfg.optim, cfg.train.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = torch.zeros(3, device=device)  # total, instance, class: summed over micro-batches
                for micro in range(accum):
                    # data: the next B x W examples of the global order; this rank takes its B
                    items, cursor = next_items(dataset, cursor, B * W)
                    mine = range(dist.rank * B, (dist.rank + 1) * B)
                    mean, std = encode_batch(sd, dataset, [items[j] for j in mine], prior, latent_cache)
                    t, noise, eps = draw_noise(seed, step, micro, mine, prior, sd.config, latents_hw)
                    # one forward pass over [instance; class], the loss split in two
                    with dist.no_sync([unet, text_encoder], skip_all_reduce=micro < accum - 1):
                        context = text_encoder(prompt_ids) if cfg.model.train_text_encoder else fixed_context
                        context = context.repeat_interleave(B, dim=0)  # [instance x B; class x B, 77, width]
                        latents = (mean + std * eps.to(device)) * sd.config.scale_factor  # posterior sample, fp32
                        loss, loss_instance, loss_class = micro_batch_loss(
                            unet, sd.schedule, latents, noise.to(device), t.to(device), context, B,
                            cfg.prior.loss_weight, dtype, sd.config.parameterization)
                        # fp16: scale the loss up so small gradients survive; / accum: the mean over micro-batches
                        backward_loss = scaler.scale_loss(loss) if scaler else loss
                        (backward_loss / accum).backward()
                    losses += torch.stack([loss.detach(), loss_instance.detach(),
                                           loss_class.detach() if prior else loss.new_zeros(())]) / accum

                # the optimizer step, precision tricks in plain sight (see optimizer_step)
                stepped, grad_norm = optimizer_step(masters, optimizer, scaler, cfg.optim.max_grad_norm, dist)
                step += 1
                loss_value, loss_instance_value, loss_class_value = dist.all_reduce_mean_(losses).tolist()
                if scaler is None and (not stepped or not math.isfinite(loss_value)):
                    raise TrainingDiverged(
                        f"loss {loss_value:g} / grad norm {grad_norm:g} at step {step} ({precision}): training "
                        f"stopped, nothing after step {step - 1} was saved; the last good checkpoint is "
                        + (f"{last_checkpoint}" if last_checkpoint else "none (no checkpoint was written yet)")
                        + ". Lower optim.lr, or check the data")
                elapsed = time.perf_counter() - t_start
                images = B * W * accum * (2 if prior else 1)
                images_per_s = images / elapsed
                metrics = {"step": step, "loss": loss_value, "loss_instance": loss_instance_value,
                           "loss_class": loss_class_value if prior else None, "lr": lr,
                           "loss_scale": scaler.scale if scaler else None,
                           "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # None: inf/NaN, skipped
                           "skipped": not stepped, "images_per_s": images_per_s, "epoch": cursor[0],
                           "time": time.time()}
                log_metrics(metrics, metrics_file, tb, bar, dist)
                if callback is not None:
                    callback(step, metrics)

                if cfg.validation.prompts and (step % cfg.validation.every == 0 or step == cfg.train.steps):
                    validation_grid(sd, cfg, step, run, tb, dist)
                stop_now = dist.any(stop.requested is not None, device=device)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop_now:
                    last_checkpoint = write_checkpoint(ckpt_dir, step, cursor, masters, optimizer, scaler, cfg,
                                                       precision, dist, loss_value)
                if stop_now:
                    who = stop.requested or "another process"
                    log(f"stopped by {who} at step {step}; checkpoint {last_checkpoint}; continue with: "
                        f"minidb train --resume {run}  (Python: train(cfg, resume=\"latest\"))")
                    return TrainResult(run, step, last_checkpoint, None, interrupted=True, loss=loss_value,
                                       stopped_by=who)
    finally:
        bar.close()
        log.bar = None
        if metrics_file:
            metrics_file.close()
        if tb:
            tb.close()

    # ---- the end: the fine-tuned model as an SD v1 checkpoint ----------------------------------
    model_path = run / "model.safetensors"
    del optimizer  # its moments are 2x the trained weights: free them before the export loads the base
    if dist.is_main:
        export_model(cfg.model.base, masters.state_dict(), model_path, DTYPES[cfg.model.export_dtype])
        size = model_path.stat().st_size
        size = f"{size / 2 ** 30:.2f} GiB" if size > 2 ** 30 else f"{size / 2 ** 20:.1f} MiB"
        log.result(f"done: {_count(step, 'step')}, loss {loss_value:.4f}; model: {model_path} "
                   f"({cfg.model.export_dtype}, {size}); try: minidb sample --ckpt {model_path} "
                   f"--prompt {json.dumps(cfg.data.instance_prompt)}")
    dist.barrier()
    return TrainResult(run, step, last_checkpoint, model_path, loss=loss_value)


def check_base(cfg: DreamBoothConfig) -> tuple[DreamBoothConfig, SDConfig]:
    """The base checkpoint opened and checked (format, model family, keys, shapes; no tensor read)
    and the checks that need its config, before anything is written. Returns the config with
    data.resolution = 0 replaced by the base model's image size, and the base model's config."""
    from minidb.pipeline import StableDiffusion
    from minidb.sampling import check_size
    if not Path(cfg.model.base).is_file():
        raise CheckpointError(f"model.base: {cfg.model.base}: no such checkpoint file")
    base_config = StableDiffusion.inspect_checkpoint(cfg.model.base)
    if cfg.data.resolution == 0:  # the default: the resolution the base model was trained at
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=base_config.image_size))
    try:
        check_size(base_config, cfg.data.resolution, cfg.data.resolution)
    except MinidbError as e:
        raise ConfigError(f"data.resolution: {e}") from None
    class_dir = Path(cfg.prior.class_dir)
    if cfg.prior.class_prompt and class_dir.exists() and not class_dir.is_dir():
        raise ConfigError(f"prior.class_dir: {class_dir} is a file, not a folder")
    return cfg, base_config


def finished_model(state, run: Path, cfg) -> Path | None:
    """The run's model when a resume finds nothing left to do: the checkpoint is at (or past)
    train.steps and model.safetensors was written after it (else the export still has to happen)."""
    model = run / "model.safetensors"
    if state is None or state["step"] < cfg.train.steps or not model.is_file():
        return None
    return model if model.stat().st_mtime >= Path(state["path"]).stat().st_mtime else None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---- the pieces of a step ------------------------------------------------------------------------

def set_trainable(sd, train_text_encoder: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """VAE frozen in eval mode; UNet trained; text encoder trained or frozen. Returns the named
    trainable parameters: these, and only these, reach the optimizer."""
    sd.vae.eval().requires_grad_(False)
    sd.unet.train().requires_grad_(True)
    if train_text_encoder:
        sd.text_encoder.train().requires_grad_(True)
    else:
        sd.text_encoder.eval().requires_grad_(False)
    modules = [("unet", sd.unet)] + ([("text_encoder", sd.text_encoder)] if train_text_encoder else [])
    return [(f"{name}.{n}", p) for name, module in modules for n, p in module.named_parameters()]


def micro_batch_loss(unet, schedule, latents, noise, t, context, n_instance: int, prior_loss_weight: float,
                     dtype=torch.float32, parameterization: str = "eps"):
    """Noise-prediction MSE on latents [instance; class] (one UNet pass over both halves):
    loss = MSE(instance half) + prior_loss_weight * MSE(class half). Returns (loss, instance, class);
    without class examples (no prior preservation), class is None and loss = instance.
    A v-model (parameterization "v") is fitted to v instead of the noise."""
    noisy = schedule.add_noise(latents, noise, t)                     # x_t, fp32 [2B, 4, h, w]
    pred = unet(noisy.to(dtype), t, context.to(dtype)).float()        # the MSE in fp32 whatever the model
    target = noise if parameterization == "eps" else schedule.velocity(latents, noise, t)
    return dreambooth_loss(pred, target, n_instance, prior_loss_weight)


def dreambooth_loss(eps_pred, noise, n_instance: int, prior_loss_weight: float):
    loss_instance = torch.nn.functional.mse_loss(eps_pred[:n_instance], noise[:n_instance])
    if eps_pred.shape[0] == n_instance:
        return loss_instance, loss_instance, None
    loss_class = torch.nn.functional.mse_loss(eps_pred[n_instance:], noise[n_instance:])
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


def lr_at(step: int, o, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine down to min_lr at the last step."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if o.lr_schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


def next_items(dataset, cursor: tuple[int, int], n: int):
    """The next n (epoch, index) examples of the data order, crossing epochs, and the new cursor."""
    epoch, pos = cursor
    order = dataset.epoch_order(epoch)
    items = []
    while len(items) < n:
        if pos == len(order):
            epoch, pos = epoch + 1, 0
            order = dataset.epoch_order(epoch)
        items.append((epoch, order[pos]))
        pos += 1
    return items, (epoch, pos)


def example_seed(seed: int, step: int, micro: int, position: int) -> int:
    digest = hashlib.sha256(f"minidb-dreambooth/{seed}/{step}/{micro}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_noise(seed, step, micro, positions, prior: bool, config, hw: int):
    """Per example (global batch position j): timestep, target noise and the VAE posterior's noise,
    from its own CPU generator. Returns t [n], noise [n, 4, hw, hw], eps [n, 4, hw, hw] ordered
    [instance examples; class examples], n = len(positions) * (2 if prior else 1)."""
    draws = []
    for j in positions:
        g = torch.Generator().manual_seed(example_seed(seed, step, micro, j))
        t = torch.randint(0, config.timesteps, (2,), generator=g)  # uniform in [0, T)
        noise = torch.randn((2, config.unet.in_channels, hw, hw), generator=g)
        eps = torch.randn((2, config.vae.embed_dim, hw, hw), generator=g)
        draws.append((t, noise, eps))
    halves = [0, 1] if prior else [0]
    return tuple(torch.stack([d[k][h] for h in halves for d in draws]) for k in range(3))


@torch.no_grad()
def encode_batch(sd, dataset, items, prior: bool, latent_cache=None):
    """The VAE posterior's mean and std [n, 4, h, w] (fp32) of [instance images; class images]."""
    if latent_cache is not None:
        rows = [latent_cache[index][0] for _, index in items] + ([latent_cache[index][1] for _, index in items]
                                                                  if prior else [])
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    examples = [dataset.get(index, epoch) for epoch, index in items]
    pixels = torch.stack([e["instance"] for e in examples] + ([e["class_"] for e in examples] if prior else []))
    vae = sd.vae
    posterior = vae.encode(pixels.to(device=next(vae.parameters()).device, dtype=next(vae.parameters()).dtype))
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def cache_latents(sd, dataset, prior: bool, dist: Dist) -> list:
    """latent_cache[index] = ((mean, std) of the instance image, (mean, std) of the class image or None):
    without random augmentation an example's image never changes, so the VAE encodes it once."""
    cache = []
    for index in tqdm(range(len(dataset)), desc="caching latents", disable=not dist.is_main, leave=False):
        mean, std = encode_batch(sd, dataset, [(0, index)], prior)
        cache.append(((mean[0], std[0]), (mean[1], std[1]) if prior else None))
    return cache


# ---- checkpoints, resume, export -----------------------------------------------------------------

def write_checkpoint(ckpt_dir, step, cursor, masters, optimizer, scaler, cfg, precision, dist, loss) -> Path | None:
    """Every rank hands in its RNG states; rank 0 writes the file atomically and prunes old ones."""
    rngs = dist.gather_object(rng_state())
    path = checkpoint_path(ckpt_dir, step)
    if dist.is_main:
        save_checkpoint(path, {
            "step": step,
            "data": {"epoch": cursor[0], "index": cursor[1]},       # the next example of the order
            "weights": masters.state_dict(),                         # trainable weights, fp32
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "lr_schedule": {"schedule": cfg.optim.lr_schedule, "warmup_steps": cfg.optim.warmup_steps,
                            "lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr},  # lr = lr_at(step): no other state
            "rng": rngs,                                             # one dict per rank
            "world_size": dist.world_size,
            "precision": precision,
            "config": to_dict(cfg),
            "loss": loss,
        })
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
    dist.barrier()
    return path


def find_resume_state(resume, ckpt_dir: Path) -> dict | None:
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise CheckpointError(f"--resume latest: no checkpoint in {ckpt_dir}")
    else:
        path = Path(resume)
        if path.is_dir():  # a run folder, or its checkpoints folder
            path = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
            if path is None:
                raise CheckpointError(f"--resume {resume}: no checkpoint in that folder")
    state = load_checkpoint(path)
    state["path"] = path
    return state


def restore(state, masters, optimizer, scaler, dist, log) -> tuple[int, tuple[int, int]]:
    """Weights, optimizer, loss scaler, RNG states; returns (step, data cursor)."""
    try:
        masters.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{state['path']}: does not fit this model: {e}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if state["world_size"] != dist.world_size:
        log(f"resuming a {state['world_size']}-process run with {dist.world_size}: the data order continues, "
            "the batch per step changes")
    set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    log(f"resumed from {state['path']} at step {state['step']}")
    return state["step"], (state["data"]["epoch"], state["data"]["index"])


def prepare_run_folder(cfg, run: Path, ckpt_dir: Path, state, dist: Dist, log) -> None:
    """Refuse a folder that holds another run (unless resuming), then write config.toml."""
    config_file = run / "config.toml"
    if state is not None:
        old = resolved(from_dict(state["config"]))
        changed = differences(old, cfg)
        fatal = [c for c in changed if c.split(":")[0] in MUST_MATCH_ON_RESUME]
        if fatal:
            raise ConfigError(f"cannot resume {state['path']} with a different " + "; ".join(fatal))
        if changed:
            log("resuming with changed settings: " + "; ".join(changed))
    elif config_file.is_file():
        old = load_config(config_file)
        changed = differences(old, cfg)
        found = list_checkpoints(ckpt_dir)
        if changed:
            raise ConfigError(f"{run} holds a different run ({'; '.join(changed[:4])}"
                              f"{'; ...' if len(changed) > 4 else ''}): choose another train.output_dir, or "
                              + ("continue that run with --resume latest" if found else
                                 "delete the folder (that run wrote no checkpoint)"))
        if found:
            raise ConfigError(f"{run} already holds this run, with checkpoints up to step {found[-1][0]}: "
                              "continue it with --resume latest, or delete the folder to start over")
    elif any((run / name).exists() for name in ("checkpoints", "metrics.jsonl", "model.safetensors")):
        raise ConfigError(f"{run} holds files of a run without its config.toml: choose another train.output_dir")
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        tmp = config_file.with_suffix(".toml.tmp")
        tmp.write_text(dump_toml(cfg), encoding="utf-8")
        tmp.replace(config_file)
    dist.barrier()


def export_model(base, trained: dict, path, dtype=torch.float16) -> Path:
    """The fine-tuned model as an original-layout SD v1 checkpoint: the trained weights ("unet.*",
    "text_encoder.*", fp32) over a fresh fp32 load of the base checkpoint, which supplies the frozen
    parts exactly as they were (not rounded through the training dtype)."""
    from minidb.pipeline import StableDiffusion
    sd = StableDiffusion.from_checkpoint(base, device="cpu", dtype=torch.float32)
    for name, module in sd.models.items():
        part = {k[len(name) + 1:]: v for k, v in trained.items() if k.startswith(name + ".")}
        if part:
            full = module.state_dict()
            unknown = sorted(set(part) - set(full))
            if unknown:
                raise CheckpointError(f"trained weights not in the {name}: {unknown[:5]}")
            full.update({k: v.to("cpu", torch.float32) for k, v in part.items()})
            module.load_state_dict(full, strict=True)
    sd.save(path, dtype=dtype)
    return Path(path)


def export_checkpoint(checkpoint, path, dtype=torch.float16) -> Path:
    """Export any training checkpoint (e.g. an earlier step that overfits less) as a model."""
    state = load_checkpoint(checkpoint)
    return export_model(state["config"]["model"]["base"], state["weights"], path, dtype)


# ---- what the user sees --------------------------------------------------------------------------

class Log:
    """Messages on rank 0 only, above the progress bar when there is one."""

    def __init__(self, dist: Dist):
        self.dist, self.bar = dist, None

    def __call__(self, message: str) -> None:
        if self.dist.is_main:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def result(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)


def pick_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device is {name!r} but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank)
    return device


def open_metrics(run: Path, step: int, dist: Dist):
    """metrics.jsonl for appending, after dropping lines of steps past the one resumed from."""
    if not dist.is_main:
        return None
    path = run / "metrics.jsonl"
    if step == 0:
        path.unlink(missing_ok=True)
    elif path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")


def open_tensorboard(run: Path, dist: Dist):
    if not dist.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(str(run / "tensorboard"))


def log_metrics(metrics: dict, metrics_file, tb, bar, dist: Dist) -> None:
    if not dist.is_main:
        return
    metrics_file.write(json.dumps(metrics) + "\n")
    metrics_file.flush()
    if tb is not None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                tb.add_scalar(f"train/{key}", value, metrics["step"])
    postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
    if metrics["loss_scale"] is not None:
        postfix["scale"] = f"{metrics['loss_scale']:g}" + (" skip" if metrics["skipped"] else "")
    postfix["img/s"] = f"{metrics['images_per_s']:.2f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


@torch.no_grad()
def validation_grid(sd, cfg, step: int, run: Path, tb, dist: Dist) -> Path | None:
    """samples/step_N.png: one image per validation prompt, the same seeds every time (rank 0)."""
    if not dist.is_main:
        dist.barrier()
        return None
    from PIL import Image
    v = cfg.validation
    training = {name: m.training for name, m in sd.models.items()}
    for m in sd.models.values():
        m.eval()
    try:
        images = sd.generate(list(v.prompts), steps=v.sample_steps, guidance=v.guidance, sampler=v.sampler,
                             height=cfg.data.resolution, width=cfg.data.resolution, seed=v.seed, progress=False)
    finally:
        for name, m in sd.models.items():
            m.train(training[name])
    columns = min(4, len(images))
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * math.ceil(len(images) / columns)), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    path = run / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    grid.save(path)
    if tb is not None:
        tb.add_image("validation", torch.from_numpy(np.array(grid)).permute(2, 0, 1), step)
    dist.barrier()
    return path


class StopOnSignal:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and write a checkpoint;
    a second Ctrl-C stops at once (no checkpoint)."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: stopping after this step to write a checkpoint (Ctrl-C again: stop now, no checkpoint)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
