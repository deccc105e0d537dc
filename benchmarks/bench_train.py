"""One DreamBooth training step, minidb against diffusers: step time and peak memory, and where
minidb's peak goes (weights, gradients, optimizer state, activations).

    python -m benchmarks.bench_train                 # SD v1 size, 256x256 on CPU (512x512 on CUDA)
    python -m benchmarks.bench_train --quick         # the tiny model, seconds (tests run this)
    python -m benchmarks.bench_train --configs diffusers,minidb,low_memory --write

The step, on both sides: a batch of 1 instance + 1 class image with prior preservation (prior
loss weight 1), VAE-encoded each step (frozen), noised at a random timestep; the text encoder and
the UNet both trained; loss = MSE(instance) + MSE(class); global-norm clipping at 1.0; AdamW
(lr 5e-6, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2); fp32 weights on both sides.
diffusers runs its UNet2DConditionModel and transformers' CLIPTextModel holding the same
(random, seeded) weights as minidb's, converted by diffusers' own single-file converters
(benchmarks/reference.py), with the step written as examples/dreambooth/train_dreambooth.py writes it:
one backward over the concatenated batch, clip_grad_norm_, optimizer.step(),
optimizer.zero_grad(set_to_none=False) (its --set_grads_to_none defaults to off).

Configurations (minidb's step is train()'s own: set_trainable, micro_batch_loss and minidb.dreambooth.step.TrainStep,
its switches those the run's plan resolves from the same config, so this measures what it runs):
  diffusers          its train_dreambooth.py step, defaults (torch's default CPU allocator)
  diffusers_tuned    the same with the allocator setting minidb's default runs with, because `minidb
                     train` sets it: freed memory kept for reuse (minidb.dreambooth.allocator.keep_freed_memory)
  minidb             minidb's default step (torch AdamW, gradients set to None after the step)
  +adamw8bit         8-bit AdamW moments
  +fused             the optimizer step inside backward, exact clipping (two backward passes)
  +checkpointing     gradient checkpointing in the UNet and the text encoder
  low_memory         all three, the fused step clipping by the previous step's norm (one pass)
  low_memory_exact   all three, exact clipping (two passes)
  bf16_kahan         low_memory in bf16 with no fp32 master weights (optim.master_weights = "kahan": a bf16
                     compensation per weight instead, minidb.dreambooth.adamw8bit): the recipe aimed at an 8 GB GPU
  lora               LoRA DreamBooth: rank-4 adapters on the UNet's attention projections and the
                     text encoder's attention and MLP, only they trained (torch AdamW), base frozen

Each configuration runs in a fresh process: one warm-up step, then `--steps` timed steps (median
reported), and of each step the time inside the optimizer's update (on CPU; on CUDA it is
asynchronous and not split out). Peak memory: on CPU, the peak RSS (sampled every 2 ms) above the RSS the process had
after its imports, so it includes the weights; on CUDA, torch.cuda.max_memory_allocated. The
breakdown counts tensor bytes: weights (all three models), gradients (all trained weights, or the
largest single one for the fused step), optimizer state (after the steps); activations and the
rest (allocator slack, temporaries) are what remains of the peak.
"""
import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.bench_vs_diffusers import machine, rss
from minidb.dreambooth.train_config import OptimConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CONFIGS = {  # name: (side, the config's overrides, as `minidb train --set` takes them)
    "diffusers": ("diffusers", ()),
    "diffusers_tuned": ("diffusers", ()),  # its step with minidb's command's allocator settings
    "minidb": ("minidb", ()),
    "+adamw8bit": ("minidb", ("optim.optimizer=adamw8bit",)),
    "+fused": ("minidb", ("train.fused_backward=exact",)),
    "+checkpointing": ("minidb", ("model.gradient_checkpointing=true",)),
    "low_memory": ("minidb", ("train.low_memory=true",)),
    "low_memory_exact": ("minidb", ("train.low_memory=true", "train.fused_backward=exact")),
    "lora": ("minidb", ("model.lora_rank=4", "model.lora_text_encoder=true")),  # rank 4: kohya's and diffusers' default
    "bf16_kahan": ("minidb", ("train.low_memory=true", "model.precision=bf16", "optim.master_weights=kahan")),
}
OPTIM = OptimConfig(lr=5e-6, max_grad_norm=1.0)  # betas (0.9, 0.999), eps 1e-8, weight decay 1e-2: the defaults
ADAMW = dict(lr=OPTIM.lr, betas=(OPTIM.adam_beta1, OPTIM.adam_beta2), eps=OPTIM.adam_eps,
             weight_decay=OPTIM.weight_decay)  # diffusers' torch AdamW, with the same numbers
PROMPTS = ["a photo of sks dog", "a photo of dog"]  # instance, class


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(quick: bool):
    from minidb.config import SDConfig, tiny_config
    from minidb.pipeline import StableDiffusion
    torch.manual_seed(0)
    return StableDiffusion(tiny_config() if quick else SDConfig())


def inputs(sd_config, ids, res: int, step: int, device):
    """The step's batch: [instance; class] images and token ids, and the step's noise draws."""
    g = torch.Generator().manual_seed(1000 + step)
    pixels = torch.rand(2, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    h = res // sd_config.latent_factor
    latent_noise = torch.randn(2, sd_config.vae.embed_dim, h, h, generator=g)  # the posterior sample's
    noise = torch.randn(2, sd_config.unet.in_channels, h, h, generator=g)
    t = torch.randint(0, sd_config.timesteps, (2,), generator=g)
    return [x.to(device) for x in (pixels, latent_noise, noise, t, ids)]


def prior_loss(pred, noise):
    """train_dreambooth.py's loss: the batch split in halves, instance MSE + 1.0 * class MSE."""
    pred, pred_prior = pred.float().chunk(2)
    target, target_prior = noise.float().chunk(2)
    mse = torch.nn.functional.mse_loss
    return mse(pred, target) + 1.0 * mse(pred_prior, target_prior)


class Stopwatch:
    """Seconds spent inside the wrapped functions (the optimizer's update), summed until read."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
        return timed

    def read(self) -> float:
        total, self.total = self.total, 0.0
        return total


def run_config(name: str):
    """The configuration's config as the run's plan resolves it (train.low_memory's switches spelled
    out for one process), and its precision."""
    from minidb.dreambooth.plan import with_memory_switches
    from minidb.dreambooth.train_config import load_config
    cfg = load_config(None, CONFIGS[name][1])
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=OPTIM.lr, max_grad_norm=OPTIM.max_grad_norm))
    precision = cfg.model.precision if cfg.model.precision != "auto" else "fp32"  # fp32 weights on both sides
    return with_memory_switches(cfg, precision, world_size=1), precision


def minidb_step_fn(sd, cfg, precision: str, device):
    """train()'s step, on a batch that is VAE-encoded every step (as diffusers' is)."""
    from minidb.dreambooth.step import TrainStep
    from minidb.dreambooth.train import add_adapters, micro_batch_loss, set_trainable

    lora = add_adapters(sd, cfg.model, seed=0) if cfg.model.lora_rank else {}
    for network in lora.values():
        network.to(device)
    sd.unet.gradient_checkpointing = sd.text_encoder.gradient_checkpointing = cfg.model.gradient_checkpointing
    trainer = TrainStep(set_trainable(sd, train_text_encoder=True, lora=lora), cfg.optim, cfg.train, precision)
    watch = Stopwatch()
    optimizer = trainer.optimizer
    if trainer.fused is not None and cfg.optim.optimizer == "adamw8bit":
        optimizer.step_param = watch.wrap(optimizer.step_param)  # what the fused step calls, per tensor
    else:
        optimizer.step = watch.wrap(optimizer.step)
    dtype = sd.dtype
    scale = sd.config.scale_factor
    token_ids = sd.tokenizer(PROMPTS)

    def step(k, res):
        pixels, latent_noise, noise, t, ids = inputs(sd.config, token_ids, res, k, device)
        with torch.no_grad():
            posterior = sd.vae.encode(pixels.to(dtype))
            latents = (posterior.mean.float() + posterior.std.float() * latent_noise) * scale
        trainer.begin(k)
        # one UNet pass over [instance; class]: instance MSE + 1.0 * class MSE
        trainer.backward(lambda: micro_batch_loss(sd.unet, sd.schedule, latents, noise, t, sd.text_encoder(ids),
                                                  1, 1.0, dtype))
        return trainer.step()

    state = lambda: nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))  # noqa: E731
    masters = trainer.masters
    grads = max(nbytes([p]) for p in masters.params) if trainer.fused else nbytes(masters.params)
    return step, state, grads, watch


def diffusers_models(sd):
    from benchmarks.reference import diffusers_pipeline
    with tempfile.TemporaryDirectory() as folder:
        pipe = diffusers_pipeline(sd, Path(folder))
    return pipe.vae, pipe.text_encoder, pipe.unet, sd.schedule


def diffusers_step_fn(vae, text_encoder, unet, schedule, sd_config, token_ids, device):
    """examples/dreambooth/train_dreambooth.py's step (fp32, no accelerate)."""
    vae.requires_grad_(False)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, **ADAMW)
    watch = Stopwatch()
    optimizer.step = watch.wrap(optimizer.step)
    scaling_factor = vae.config.scaling_factor

    def step(k, res):
        pixels, latent_noise, noise, t, ids = inputs(sd_config, token_ids, res, k, device)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            model_input = (dist.mean + dist.std * latent_noise) * scaling_factor  # .sample(), our draw
        noisy = schedule.add_noise(model_input, noise, t)
        encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
        model_pred = unet(noisy, t, encoder_hidden_states, return_dict=False)[0]
        loss = prior_loss(model_pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    state = lambda: nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))  # noqa: E731
    return step, state, nbytes(params), watch


class PeakRSS:
    """Peak RSS while inside the block, sampled every 2 ms."""

    def __enter__(self):
        self.peak, self.done = rss(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss())


def run_child(args) -> dict:
    """One configuration in this (fresh) process."""
    from minidb.dreambooth.allocator import keep_freed_memory
    from minidb.dreambooth.plan import bounded_allocator
    side = CONFIGS[args._child][0]
    cfg, precision = run_config(args._child)
    if tuned_allocator(args._child):  # as `minidb train` does, before the models are built
        keep_freed_memory(bounded=side == "minidb" and bounded_allocator(cfg))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    baseline = rss()
    sd = build(args.quick)
    if side == "diffusers":
        vae, text_encoder, unet, schedule = diffusers_models(sd)
        sd_config, token_ids = sd.config, sd.tokenizer(PROMPTS)
        del sd  # only diffusers' models stay
        models = [vae, text_encoder, unet]
        for m in models:
            m.to(device)
        step, state, grads, watch = diffusers_step_fn(vae, text_encoder, unet, schedule, sd_config, token_ids, device)
    else:
        models = [sd.vae, sd.text_encoder, sd.unet]
        sd.to(device, torch.bfloat16 if precision == "bf16" else None)
        step, state, grads, watch = minidb_step_fn(sd, cfg, precision, device)
    weights = nbytes([t for m in models for t in list(m.parameters()) + list(m.buffers())])
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the build's freed heap back before measuring
    except OSError:
        pass
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, faults_per_step, optimizer_times = [], [], []
    with PeakRSS() as peak:
        for k in range(1 + args.steps):
            if cuda:
                torch.cuda.synchronize()
            start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step(k, args.res)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            optimizer_times.append(watch.read())
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults  # pages the kernel had to hand over
            faults_per_step.append(faults)
            print(f"  {args._child} step {k}: {times[-1]:.2f} s (optimizer {optimizer_times[-1]:.2f} s), "
                  f"{faults} page faults, peak so far "
                  f"{gib(torch.cuda.max_memory_allocated(device) if cuda else peak.peak - baseline)} GiB",
                  file=sys.stderr, flush=True)
    total = torch.cuda.max_memory_allocated(device) if cuda else peak.peak - baseline
    optimizer_state = state()
    return {"config": args._child, "step_s": statistics.median(times[1:]), "times": times,
            "optimizer_s": None if cuda else statistics.median(optimizer_times[1:]),
            "faults": statistics.median(faults_per_step[1:]), "peak": total,
            "weights": weights, "grads": grads, "state": optimizer_state,
            "rest": total - weights - grads - optimizer_state}


def tuned_allocator(name: str) -> bool:
    """Each side's CPU allocator as its own command runs it: `minidb train` keeps freed memory for
    reuse (bounded in its low-memory modes: minidb.dreambooth.plan.bounded_allocator), train_dreambooth.py does
    not; diffusers_tuned gives diffusers the same as minidb's default."""
    return name == "diffusers_tuned" or CONFIGS[name][0] == "minidb"


def child(args, name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--res", str(args.res), "--steps", str(args.steps),
           "--device", args.device, "--_child", name] + (["--quick"] if args.quick else [])
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=HERE.parent, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}"


def table(rows: list[dict], args, command: str) -> str:
    base = {r["config"]: r for r in rows}
    diff, ours = base.get("diffusers"), base.get("minidb")
    lines = [f"## DreamBooth training step, minidb vs diffusers, {'tiny' if args.quick else 'SD v1'} model, "
             f"{args.res}x{args.res}, fp32, {args.device} ({datetime.date.today()})", "",
             f"`{command}`  ", f"Machine: {machine(args.device)}; diffusers {__import__('diffusers').__version__}; "
             f"median of {args.steps} steps after 1 warm-up, each configuration in a fresh process; peak = "
             + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
                "peak RSS above the process's RSS after imports") + "; page faults: median minor faults per "
             "timed step (pages the kernel mapped and zero-filled); of which optimizer: median seconds of a step "
             "inside the optimizer's update (optimizer.step(), or the fused step's per-tensor updates inside "
             "backward; clipping not included; CPU only); GiB = 2^30 bytes", "",
             "| configuration | step time | of which optimizer | x minidb default | page faults | peak memory | "
             "x diffusers | weights | gradients | optimizer state | activations + rest |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_ours = f"{r['step_s'] / ours['step_s']:.2f}" if ours else "-"
        vs_diff = f"**{r['peak'] / diff['peak']:.2f}**" if diff else "-"
        opt = "-" if r.get("optimizer_s") is None else f"{r['optimizer_s']:.2f} s"
        lines.append(f"| {r['config']} | {r['step_s']:.2f} s | {opt} | {vs_ours} | {r['faults']:,.0f} | {gib(r['peak'])} GiB | {vs_diff} | "
                     f"{gib(r['weights'])} | {gib(r['grads'])} | {gib(r['state'])} | {gib(r['rest'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model at 32x32: seconds, for tests")
    p.add_argument("--res", type=int, default=None, help="image side (default 512 on CUDA, 256 on CPU, 32 quick)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration, after 1 warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.res = args.res or (32 if args.quick else 512 if args.device.startswith("cuda") else 256)
    if args.res % 8:
        p.error(f"--res must be a multiple of 8, got {args.res}")
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    if args._child is not None:
        print(json.dumps(run_child(args)))
        return None
    rows = []
    for name in names:
        rows.append(child(args, name))
        r = rows[-1]
        print(f"{name:17s} {r['step_s']:7.2f} s/step  peak {gib(r['peak'])} GiB  (weights {gib(r['weights'])}, "
              f"grads {gib(r['grads'])}, state {gib(r['state'])}, rest {gib(r['rest'])})", flush=True)
    command = "python -m benchmarks.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, args, command.strip())
    print("\n" + text)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")
    return rows


if __name__ == "__main__":
    main()
