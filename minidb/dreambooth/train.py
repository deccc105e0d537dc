"""DreamBooth (Ruiz et al. 2022): fine-tune SD v1 on a few photos of one subject, with prior
preservation, so that "a photo of sks dog" draws *that* dog and "a photo of a dog" still draws dogs.

    minidb train --config run.toml [--set optim.lr=2e-6 ...] [--resume latest]

    from minidb.dreambooth.train import train
    from minidb.dreambooth.train_config import load_config
    result = train(load_config("run.toml"))            # -> TrainResult(model_path=..., ...)

`train` reads top to bottom: the plan (every choice made once, minidb.dreambooth.plan), data, model and step,
the loop (micro-batches -> loss -> backward -> the precision step, minidb.dreambooth.step), training states,
export. What it writes into the run folder (train.output_dir) is minidb.dreambooth.run's; the data stage, its
batches and their noise are minidb.dreambooth.data's.

Randomness: noise (offset noise included), timesteps and the VAE posterior sample of each training
example come from a generator seeded by (seed, step, micro-batch, position in the global batch),
augmentation from (seed, epoch, index), and new LoRA adapters from the seed: no global RNG state
enters a step, so a resumed run repeats an uninterrupted one bit for bit, and N processes draw what
one process would.

LoRA (model.lora_rank > 0, minidb.lora): adapters hooked onto the frozen UNet (and text encoder)
are the only trained parameters, so the masters, the optimizer and the checkpoints hold just them,
and the run writes lora.safetensors in kohya's format. The smaller options (min-SNR weighting,
offset noise, EMA, caption files, lr scaling) are minidb.dreambooth.train_options'.
"""
import copy
import functools
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minidb.dreambooth.checkpoint import set_rng_state
from minidb.config import DTYPES
from minidb.dreambooth.data import Batches, DreamBoothDataset, can_cache_latents, cache_latents, load_image_folder, open_images
from minidb.dreambooth.distributed import Dist, StopOnSignal
from minidb.errors import CheckpointError, MinidbError, StateError
from minidb.weights.files import give_back_pages
from minidb.pipeline import give_back_freed_memory, release_mapped_pages
from minidb.lora import (TEXT_ENCODER_TARGETS, UNET_ATTENTION, UNET_TRANSFORMER, LoRANetwork, add_lora, save_lora,
                         with_alphas)
from minidb.dreambooth.plan import Plan, make_plan
from minidb.dreambooth.run import Run
from minidb.dreambooth.step import TrainStep
from minidb.dreambooth.token_rows import TOKEN_EMBEDDING, dense_weights, token_rows_of, use_token_rows
from minidb.dreambooth.train_config import DreamBoothConfig, ModelConfig, check_prompts
from minidb.dreambooth.train_options import caption_file_of, caption_for, min_snr_weights, weighted_mse


class TrainingDiverged(MinidbError):
    """The loss or the gradients became inf/NaN in fp32/bf16 (where no loss scaler can help)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    state_path: Path | None       # the newest training state's file (a checkpoint in <run>/checkpoints/)
    model_path: Path | None       # the exported model (None when interrupted, or LoRA without lora_merge_export)
    interrupted: bool = False
    loss: float = float("nan")    # mean loss of the last step
    stopped_by: str | None = None  # when interrupted: "SIGINT", "SIGTERM" or "another process"
    lora_path: Path | None = None  # a LoRA run's lora.safetensors


def train(cfg: DreamBoothConfig | Plan, resume: str | None = None, callback=None) -> TrainResult:
    """Fine-tune per cfg (or its plan, minidb.dreambooth.plan.make_plan). resume: None (a new run), "latest"
    (the newest training state of the run folder) or a state's path. callback(step, metrics) is
    called after every step. Bad input raises a MinidbError before any training starts."""
    # ---- set-up: every choice made once (minidb.dreambooth.plan), then one writer per run folder (minidb.dreambooth.run)
    plan = cfg if isinstance(cfg, Plan) else make_plan(cfg)
    cfg, accum = plan.cfg, plan.cfg.train.grad_accum
    with Dist.from_env(cfg.train.dist_timeout_s) as dist, Run(cfg, dist, plan.config_toml, plan.config_record).writer() as run:
        state = run.find_state(resume)
        finished = run.finished_model(state)
        if finished is not None:  # nothing to train, nothing to write
            return finished_result(run, state, finished)
        dist.hint = run.resume_hint  # a lost peer: a one-line PeerLost saying how to continue
        seed_globals(cfg.train.seed + dist.rank)

        # ---- data, model and step ---------------------------------------------------------------
        instance_images = load_image_folder(cfg.data.instance_dir, "instance", cfg.data.resolution)
        check_prompts(cfg.data.instance_prompt, cfg.prior.class_prompt or None)
        prompts, prompt_rows = prompt_table(cfg, instance_images)
        warn_long_prompts(cfg, instance_images)
        run.prepare(state)
        sd = load_base(plan, run, state, dist)
        give_back_freed_memory()  # each stage's temporaries leave with it: the next one starts from what it holds
        class_images = class_image_set(sd, cfg, dist)
        give_back_freed_memory()
        dataset = DreamBoothDataset(instance_images, class_images, cfg.data.resolution, cfg.data.center_crop,
                                    cfg.data.hflip, cfg.train.seed)
        teacher = Teacher.of_base(sd, prompts) if plan.prior_teacher else None  # before adapters or a resumed state change it
        lora = add_adapters(sd, cfg.model, cfg.train.seed) if cfg.model.lora_rank else {}
        # a state written with the whole table trained resumes so (one from before train.token_rows)
        rows_of = sd.tokenizer(prompts) if plan.token_rows and (state is None or "token_rows" in state) else None
        trainer = TrainStep(set_trainable(sd, cfg.model.train_text_encoder, lora, rows_of), cfg.optim, cfg.train,
                            plan.precision, plan.lr_scale, dist)
        rows = token_rows_of(sd.text_encoder)
        step, cursor = restore(state, trainer, dist, run, rows) if state is not None else (0, (0, 0))
        hand_back_copied(state)
        forward = Forward.build(sd, plan, lora, dist, prompts, teacher)
        batches = Batches(dataset, sd, cfg.train.batch_size, dist, latent_cache(sd, dataset, cfg, run, dist),
                          cfg.train.noise_offset, prompt_rows)
        release_vae(sd, keep_encoder=batches.latent_cache is None)
        give_back_freed_memory()
        run.log(describe(plan, len(instance_images), class_images, trainer.masters))
        note_captions(run, cfg, prompts, prompt_rows)

        # ---- the loop: micro-batches -> loss -> backward -> the precision step (minidb.dreambooth.step) -------
        last_checkpoint = run.latest_checkpoint()
        loss = state.get("loss", float("nan")) if state is not None else float("nan")
        with run.open(step), StopOnSignal(run.log) as stop:
            while step < cfg.train.steps:
                t_start, lr = time.perf_counter(), trainer.begin(step)
                losses = torch.zeros(3, device=plan.device)  # total, instance, class: summed over micro-batches
                for micro in range(accum):
                    batch, cursor = batches.next(cursor, step, micro)  # [instance x B; class x B or none]
                    parts = trainer.backward(functools.partial(forward.loss, batch), forward.trained, micro)
                    losses += torch.stack([p if p is not None else torch.zeros_like(parts[0]) for p in parts]
                                          ).detach() / accum
                stepped, grad_norm = trainer.step()
                if rows is not None and stepped:  # what dense AdamW did to the other rows of the table
                    rows.after_step(lr, cfg.optim.weight_decay, trainer.master(f"{TOKEN_EMBEDDING}.rows"))
                step += 1
                losses = dist.all_reduce_mean_(losses).tolist()
                loss = check_finite(trainer, stepped, losses[0], grad_norm, step, plan.precision, last_checkpoint)
                metrics = step_metrics(step, losses, lr, trainer, stepped, grad_norm, cursor, bool(cfg.prior.class_prompt),
                                       len(batch.t) * plan.world_size * accum / (time.perf_counter() - t_start))
                run.log_metrics(metrics)
                if callback is not None:
                    callback(step, metrics)
                if cfg.validation.prompts and (step % cfg.validation.every == 0 or step == cfg.train.steps):
                    validation_grid(run, sd, step, keep_encoder=batches.latent_cache is None)
                stop_now = dist.any(stop.requested is not None, device=plan.device)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop_now:
                    last_checkpoint = run.save_state(step, {"data": {"epoch": cursor[0], "index": cursor[1]},
                                                       **trainer.state_dict(), "loss": loss,
                                                       **({"token_rows": rows.state_dict_for_training()} if rows is not None else {})})
                if stop_now:
                    return stopped_result(run, stop.requested, step, last_checkpoint, loss)

        # ---- the end: the fine-tuned model as an SD v1 checkpoint, or the LoRA file ---------------
        weights = trainer.weights(ema=cfg.train.export_ema)
        if rows is not None:
            weights = dense_weights(weights, rows)
        trainer.close()  # the optimizer's moments freed before the export
        if dist.is_main:
            run.result(f"done: {_count(step, 'step')}, loss {loss:.4f}; " + export(cfg, run, weights, step))
        dist.barrier()
        m = cfg.model
        model_path = run.model_path if not m.lora_rank or m.lora_merge_export else None
        return TrainResult(run.folder, step, last_checkpoint, model_path, loss=loss,
                           lora_path=run.lora_path if m.lora_rank else None)


# ---- set-up --------------------------------------------------------------------------------------

def seed_globals(seed: int) -> None:
    """A step draws from its own generators (minidb.dreambooth.data); the global RNGs are seeded for anything else."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def load_base(plan: Plan, run: Run, state, dist: Dist):
    """The base model, in the run's device and precision."""
    from minidb.pipeline import StableDiffusion
    cfg = plan.cfg
    run.log(f"loading {cfg.model.base} ({plan.device}, {plan.precision})")
    try:
        return StableDiffusion.from_checkpoint(cfg.model.base, config=plan.base, device=plan.device, dtype=plan.dtype)
    except CheckpointError:
        # what only the tensors can show (NaN weights): a new run's folder goes back to holding no run,
        # so that the command with another model.base runs
        if state is None and dist.is_main:
            (run.folder / "config.toml").unlink(missing_ok=True)
        raise


def class_image_set(sd, cfg: DreamBoothConfig, dist: Dist):
    """Prior preservation's class images (None without it): missing ones are generated from the base
    model, each rank its share; unreadable files are named and skipped."""
    from minidb.dreambooth.prior import ensure_class_images
    p = cfg.prior
    if not p.class_prompt:
        return None
    paths = ensure_class_images(sd, p.class_prompt, p.class_dir, p.num_class_images, seed=cfg.train.seed,
                                batch_size=p.batch_size, steps=p.sample_steps, guidance=p.guidance,
                                sampler=p.sampler, resolution=cfg.data.resolution, rank=dist.rank,
                                world_size=dist.world_size, progress=dist.is_main)
    dist.barrier()
    return open_images(paths, "class", p.class_dir, cfg.data.resolution)


def release_vae(sd, keep_encoder: bool) -> None:
    """The frozen VAE's memory handed back between the stages that use it: its decoder draws only the
    validation grids, its encoder is needed by the steps only without a latent cache (keep_encoder).
    Its weights, views of the mapped base file, are read back from it when next used
    (minidb.pipeline.release_mapped_pages). An encoder the steps do not need is dropped as well (moved
    to the meta device): weights in memory of their own (on a GPU, from a .ckpt, in another dtype) have
    no file to be read back from, and nothing after the latent cache encodes."""
    vae = sd.vae
    release_mapped_pages(vae.decoder, vae.post_quant_conv, *([] if keep_encoder else [vae.encoder, vae.quant_conv]))
    if not keep_encoder:
        vae.encoder.to("meta")
        vae.quant_conv.to("meta")


def validation_grid(run: Run, sd, step: int, keep_encoder: bool) -> None:
    """The validation grid (Run.validation_grid), drawn after the heap the steps keep for each other
    (minidb.dreambooth.allocator) is handed back, so that it does not sit on top of it; its VAE released after."""
    give_back_freed_memory()
    run.validation_grid(sd, step)
    release_vae(sd, keep_encoder)


def latent_cache(sd, dataset, cfg: DreamBoothConfig, run: Run, dist: Dist):
    """Each image encoded once (data.cache_latents), when the augmentation leaves it the same every epoch."""
    if cfg.data.cache_latents and can_cache_latents(cfg.data.center_crop, cfg.data.hflip, dataset.exact_size):
        return cache_latents(sd, dataset, bool(cfg.prior.class_prompt), dist)
    if cfg.data.cache_latents:
        run.log("not caching latents: random " + ("flips" if cfg.data.hflip else "crops of images larger than "
                                                  "the resolution") + " change the image every epoch")
    return None


@dataclass
class Teacher:
    """prior.target = "base": the base model as it was loaded, frozen, whose predictions on the noisy class
    latents are the class half's target. Made before training changes anything (a resumed run's model
    holds trained weights by the time the step is built)."""
    unet: torch.nn.Module
    context: torch.Tensor   # [prompts, 77, width]: the base text encoder's output for each prompt of the table

    @classmethod
    def of_base(cls, sd, prompts: list[str]) -> "Teacher":
        with torch.no_grad():
            context = sd.text_encoder(sd.tokenizer(prompts).to(sd.device))
        return cls(copy.deepcopy(sd.unet).requires_grad_(False).eval(), context)

    def predict(self, noisy, t, rows, dtype) -> torch.Tensor:
        with torch.no_grad():
            return self.unet(noisy.to(dtype), t, self.context[rows].to(dtype)).float()


@dataclass
class Forward:
    """What a micro-batch's loss needs: the models as they train (DDP-wrapped), the prompts as token
    ids (a frozen text encoder's outputs computed once), and the loss's options."""
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    schedule: object
    prompt_ids: torch.Tensor
    fixed_context: torch.Tensor | None
    n_instance: int
    prior_loss_weight: float
    dtype: torch.dtype
    parameterization: str
    min_snr_gamma: float
    teacher: Teacher | None = None

    @classmethod
    def build(cls, sd, plan: Plan, lora: dict, dist: Dist, prompts: list[str], teacher: Teacher | None = None) -> "Forward":
        cfg = plan.cfg
        sd.unet.gradient_checkpointing = cfg.model.gradient_checkpointing
        sd.text_encoder.gradient_checkpointing = cfg.model.gradient_checkpointing  # frozen: no_grad, nothing to redo
        unet = dist.wrap(sd.unet, lora.get("unet"))
        text_encoder = (dist.wrap(sd.text_encoder, lora.get("text_encoder")) if plan.text_encoder_trains
                        else sd.text_encoder)
        prompt_ids = sd.tokenizer(prompts).to(plan.device)
        fixed_context = None
        if not plan.text_encoder_trains:
            with torch.no_grad():
                fixed_context = sd.text_encoder(prompt_ids)  # [prompts, 77, width]: each encoded once, for every step
        return cls(unet, text_encoder, sd.schedule, prompt_ids, fixed_context, cfg.train.batch_size,
                   cfg.prior.loss_weight, plan.dtype, sd.config.parameterization, cfg.train.min_snr_gamma, teacher)

    @property
    def trained(self) -> list[torch.nn.Module]:
        return [self.unet, self.text_encoder]

    def loss(self, batch):
        """(loss, instance, class) of one micro-batch. The batch holds its noise and timesteps, so a
        second call (the fused step's exact clipping) repeats the first."""
        context = prompt_context(self.text_encoder, self.prompt_ids, self.fixed_context, batch.prompt)
        class_target = None
        if self.teacher is not None:
            rows = batch.prompt[self.n_instance:]
            class_target = lambda noisy, t: self.teacher.predict(noisy, t, rows, self.dtype)  # noqa: E731
        return micro_batch_loss(self.unet, self.schedule, batch.latents, batch.noise, batch.t, context,
                                self.n_instance, self.prior_loss_weight, dtype=self.dtype,
                                parameterization=self.parameterization, min_snr_gamma=self.min_snr_gamma,
                                class_target=class_target)


def restore(state, trainer: TrainStep, dist: Dist, run: Run, rows=None) -> tuple[int, tuple[int, int]]:
    """The step's parts and the RNG states from a training state; returns (step, data cursor)."""
    run.log(f"restoring the training state of {state['path']} (step {state['step']})")
    if rows is not None:  # first: other prompts would otherwise read as rows of another shape
        try:
            rows.load_training_state(state["token_rows"])
        except StateError as e:
            raise StateError(f"{state['path']}: {e}") from None
    try:
        trainer.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise StateError(f"{state['path']}: does not fit this model: {e}") from None
    if trainer.ema is not None and not state.get("ema"):
        run.log(f"train.ema_decay: the training state holds no EMA; it starts at step {state['step']}")
    rngs = state["rng"]
    if state["world_size"] != dist.world_size:
        run.log(f"resuming a {state['world_size']}-process run with {dist.world_size}: the data order continues, "
                "the batch per step changes")
    set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    run.log(f"resumed from {state['path']} at step {state['step']}")
    return state["step"], (state["data"]["epoch"], state["data"]["index"])


def hand_back_copied(state) -> None:
    """The training state's weights, now copied into the model (and the token table into TokenRows),
    leave it, and their pages of the mapped checkpoint go back to the kernel: they were only read. The
    optimizer's moments stay where they are, its own tensors now (written pages become the process's)."""
    if state is None:
        return
    copied = list(state.pop("weights", {}).values())
    if isinstance(state.get("token_rows"), dict):
        copied.append(state.pop("token_rows")["table"])
    for tensor in copied:
        give_back_pages(tensor)


# ---- what a step reports -------------------------------------------------------------------------

def check_finite(trainer: TrainStep, stepped: bool, loss: float, grad_norm: float, step: int, precision: str,
                 last_checkpoint) -> float:
    """The loss, when the step was good. In fp32/bf16 an inf/NaN loss or gradient means divergence
    (fp16's loss scaler skips such steps instead): TrainingDiverged, naming the last good state."""
    if trainer.scaler is None and (not stepped or not math.isfinite(loss)):
        raise TrainingDiverged(
            f"loss {loss:g} / grad norm {grad_norm:g} at step {step} ({precision}): training stopped, nothing "
            f"after step {step - 1} was saved; the last good checkpoint is "
            + (f"{last_checkpoint}" if last_checkpoint else "none (no checkpoint was written yet)")
            + ". Lower optim.lr, or check the data")
    return loss


def step_metrics(step, losses, lr, trainer: TrainStep, stepped, grad_norm, cursor, prior, images_per_s) -> dict:
    """One line of metrics.jsonl (prior: whether there is a class half)."""
    loss, loss_instance, loss_class = losses
    return {"step": step, "loss": loss, "loss_instance": loss_instance,
            "loss_class": loss_class if prior else None, "lr": lr,
            "loss_scale": trainer.loss_scale,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # None: inf/NaN, skipped
            "skipped": not stepped, "images_per_s": images_per_s, "epoch": cursor[0], "time": time.time()}


def finished_result(run: Run, state, finished: Path) -> TrainResult:
    """A resume that finds the run done: said, nothing written."""
    cfg, lora = run.cfg, run.cfg.model.lora_rank > 0
    run.result(f"{run.folder} is already finished: step {state['step']} of train.steps = {cfg.train.steps}; "
               f"{'LoRA' if lora else 'model'}: {finished}. To train on, resume with a larger train.steps "
               "(--set train.steps=N)")
    return TrainResult(run.folder, state["step"], state["path"], None if lora else finished,
                       loss=state.get("loss", float("nan")), lora_path=finished if lora else None)


def stopped_result(run: Run, requested: str | None, step: int, last_checkpoint: Path, loss: float) -> TrainResult:
    """Ctrl-C or SIGTERM (here or on another process): the state is written, the resume command said."""
    who = requested or "another process"
    run.log(f"stopped by {who} at step {step}; checkpoint {last_checkpoint}; continue with: "
            f"minidb train --resume {run.folder}  (Python: train(cfg, resume=\"latest\"))")
    return TrainResult(run.folder, step, last_checkpoint, None, interrupted=True, loss=loss, stopped_by=who)


def note_captions(run: Run, cfg: DreamBoothConfig, prompts: list[str], prompt_rows: list[int]) -> None:
    captioned = sum(prompts[r] != cfg.data.instance_prompt for r in prompt_rows)
    if captioned:
        run.log(f"{captioned} of {_count(len(prompt_rows), 'instance image')} have a caption file, used in "
                "place of the instance prompt (data.captions)")


def describe(plan: Plan, n_instance, class_images, masters) -> str:
    """The one line that says what this run trains, on what, at what size."""
    cfg, precision, world_size = plan.cfg, plan.precision, plan.world_size
    B, accum, r = cfg.train.batch_size, cfg.train.grad_accum, cfg.data.resolution
    m = cfg.model
    parts = "UNet + text encoder" if m.train_text_encoder else "UNet (text encoder frozen)"
    if m.lora_rank:
        parts = (f"rank-{m.lora_rank} LoRA adapters (alpha {m.lora_alpha or m.lora_rank:g}) on the UNet's "
                 + ("attention" if m.lora_targets == "attention" else "transformer blocks")
                 + (" + text encoder" if m.lora_text_encoder else " (text encoder frozen)"))
    n_trained = sum(p.numel() for p in masters.params)
    rows = [p for n, p in zip(masters.names, masters.params) if n == f"{TOKEN_EMBEDDING}.rows"]
    if rows:
        parts += f" (of the token embedding the {len(rows[0])} rows the prompts use: train.token_rows)"
    return (_count(n_instance, "instance image")
            + (f", {_count(len(class_images), 'class image')}" if class_images is not None else "")
            + (" (their targets the base model's predictions: prior.target)" if plan.prior_teacher else "")
            + f" at {r}x{r}" + (" (the base model's image size)" if r == plan.base.image_size else "")
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

def set_trainable(sd, train_text_encoder: bool, lora: dict | None = None,
                  rows_of: torch.Tensor | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """VAE frozen in eval mode; UNet trained; text encoder trained or frozen. With LoRA (the networks
    of add_adapters) every model is frozen and only the adapters train. rows_of: the run's tokenized
    prompts, whose rows alone of the token embedding train (minidb.dreambooth.token_rows). Returns the
    named trainable parameters: these, and only these, reach the optimizer."""
    sd.vae.eval().requires_grad_(False)
    if lora:
        sd.unet.train().requires_grad_(False)
        sd.text_encoder.train("text_encoder" in lora).requires_grad_(False)
        return [(n, p) for network in lora.values() for n, p in network.named_parameters()]  # kohya names
    sd.unet.train().requires_grad_(True)
    if train_text_encoder:
        sd.text_encoder.train().requires_grad_(True)
        if rows_of is not None:
            use_token_rows(sd.text_encoder, rows_of)
    else:
        sd.text_encoder.eval().requires_grad_(False)
    modules = [("unet", sd.unet)] + ([("text_encoder", sd.text_encoder)] if train_text_encoder else [])
    return [(f"{name}.{n}", p) for name, module in modules for n, p in module.named_parameters() if p.requires_grad]


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


def micro_batch_loss(unet, schedule, latents, noise, t, context, n_instance: int, prior_loss_weight: float,
                     dtype=torch.float32, parameterization: str = "eps", min_snr_gamma: float = 0.0,
                     class_target=None):
    """Noise-prediction MSE on latents [instance; class] (one UNet pass over both halves):
    loss = MSE(instance half) + prior_loss_weight * MSE(class half). Returns (loss, instance, class);
    without class examples (no prior preservation), class is None and loss = instance.
    A v-model (parameterization "v") is fitted to v instead of the noise. min_snr_gamma > 0: each
    example's MSE weighted by its min-SNR weight (minidb.dreambooth.train_options.min_snr_weights).
    class_target: a function (the class half's x_t, its t) -> its target, in place of its noise (or v):
    prior.target = "base" (Teacher)."""
    noisy = schedule.add_noise(latents, noise, t)                     # x_t, fp32 [2B, 4, h, w]
    pred = unet(noisy.to(dtype), t, context.to(dtype)).float()        # the MSE in fp32 whatever the model
    target = noise if parameterization == "eps" else schedule.velocity(latents, noise, t)
    if class_target is not None and len(t) > n_instance:
        target = torch.cat([target[:n_instance], class_target(noisy[n_instance:], t[n_instance:])])
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
