"""Pretrain the miniature world's model from scratch: an SD v1-architecture text-to-image model,
only smaller, on the captioned shapes of minidb.world.

    python -m minidb.world.pretrain --out runs/world          # the whole recipe, seeded
    python -m minidb.world.pretrain --out runs/world          # again after Ctrl-C or a crash: resumes
    python -m minidb.world.pretrain --out runs/world --ship   # and install the model as minidb/data/world.safetensors

Two stages, as SD was built:
1. The KL autoencoder (VAE) on rendered images: L1 + MSE reconstruction, the shape's pixels
   weighted 5x, plus a small KL term.
   Its latent scale factor is then measured, as SD's 0.18215 was: 1 / std of the latents.
2. The UNet and the CLIP text encoder *together, from scratch*, on the v-prediction
   loss. This differs from SD, whose CLIP text encoder came pretrained (on 400M image-text pairs)
   and stayed frozen; the world's 30-odd words are learned here. Captions leave out attributes at
   random and one in ten is empty, which is what classifier-free guidance samples from.
   The exported weights are an EMA of the UNet and text encoder. Its timesteps are drawn uniformly
   while the model learns where to put things, then from a log-SNR band around the noise levels where
   the shape is decided (t_sampling_from: R8's recipe, benchmarks/RESULTS.md).

Everything lands in --out: checkpoints/{vae,unet}/step_N.pt (minidb's training checkpoints,
written atomically; the newest one is resumed), metrics.jsonl, loss.png, samples/*.png, and
model.safetensors (an original-layout SD v1 checkpoint, fp16, its config in the metadata).
"""
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from minidb.dreambooth.checkpoint import checkpoint_path, latest_state, prune_checkpoints, rng_state, save_state, set_rng_state
from minidb.config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig
from minidb.errors import ConfigError
from minidb.world import ATTRIBUTES, Attributes, World, caption, world_seed
from minidb.world.metrics import confusions, prompt_fidelity
from minidb.world.reader import Reader
from minidb.files import atomic_write, atomic_write_text
from minidb.dreambooth.step import scheduled_lr
from minidb.dreambooth.train_options import EMA

# SD v1's architecture at 64x64 pixels: a VAE that downsamples by 4 (16x16x4 latents), a UNet
# with cross-attention at every level (16x16, 8x8, 4x4: SD v1 has it at its 64, 32 and 16), and a
# 3-layer CLIP text encoder with SD's tokenizer. Measured on the first two models: with attention
# only at 8x8 and 4x4 the UNet drew blobs of the right color and size in random places (shape
# and position at chance); the 16x16 attention costs 1.3x per step with 2 heads (2x with 4).
# Two departures from SD v1's numbers, both for the small latent, both plain config fields that
# CompVis' LatentDiffusion has too:
# - more noise (betas 0.003..0.02, not 0.00085..0.012): a noise level hides less of a 16x16 latent
#   than of SD's 64x64 one (Hoogeboom et al. 2023, Chen 2023). With SD's numbers the last step keeps
#   sqrt(alphas_cumprod) = 6.8% of the latent, and its mean (the background) shows through the noise;
# - the UNet predicts v, not eps (Salimans & Ho 2022; SD 2's v-models). An eps-model states the image
#   at the top timesteps only as x_t minus a sliver of it: its x0 is its eps error times 1 /
#   sqrt(alphas_cumprod) (~100). Measured with eps (2000 steps): the background followed the starting
#   noise, not the prompt (background fidelity 21.5%, chance 17%).
WORLD_CONFIG = SDConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                    num_heads=2, context_dim=64, norm_groups=8),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    clip=CLIPTextConfig(width=64, layers=3, heads=4),
    linear_start=0.003,
    linear_end=0.02,
    parameterization="v",
    image_size=64,
    # the scale this model draws its prompts best at, chosen on the tuning prompts (benchmarks/RESULTS.md,
    # issue #27): SD's 7.5 oversaturates a 16x16 latent and rounds small shapes off
    guidance=1.5,
)
SHIPPED = Path(__file__).parent.parent / "data" / "world.safetensors"
PREVIEW_PROMPTS = (
    "a photo of a large green heart on a white background",
    "a photo of a small red star on a blue background, top left",
    "a photo of a large yellow circle on a black background, center",
    "a photo of a blue square on a yellow background, bottom right",
    "a photo of a large purple triangle on a gray background",
    "a photo of a small orange ring on a green background, top right",
    "a photo of a pink star, bottom left",
    "a photo of a heart",
)


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_lr: float = 1e-3            # cosine decay to min_lr, as the UNet's
    # stage 1's own warm-up: while it shared `warmup`, R11's 3000 left the VAE's 2500 steps in warm-up,
    # never annealed, and one seed's VAE drew green as black (benchmarks/RESULTS.md, "stage 1's warm-up")
    vae_warmup: int = 100
    kl_weight: float = 1e-5         # per latent element; small, as SD's: the latents stay informative
    pool: int = 8192                # images rendered and encoded once for stage 2 (captions re-drawn each step)
    unet_steps: int = 20500        # R15_s1: every target of issue #27 in one sitting (benchmarks/RESULTS.md)
    unet_batch: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4            # cosine decay to this at the last step
    # long: a small step while the model tells left from right (R8's 100 learned position on one seed of
    # two; benchmarks/RESULTS.md, "R11"), then the large rate that shape needs
    warmup: int = 3000
    ema: float = 0.999              # with the usual warm-up: decay = min(ema, (1 + n) / (10 + n))
    checkpoint_every: int = 100
    sample_every: int = 500
    # where the UNet's training samples fall (see timestep_weights): "uniform" over the timesteps, or
    # "logsnr": log-SNR ~ Normal(t_mean, t_std), with a share t_uniform still drawn uniformly
    t_sampling: str = "logsnr"
    t_mean: float = -1.0
    t_std: float = 2.0
    t_uniform: float = 0.3
    # the UNet step from which t_sampling applies; uniform draws before it, while position is learned
    t_sampling_from: int = 5500
    mask_weight: float = 3.0        # the shape's latent pixels weigh 1 + mask_weight in the UNet's loss
    unet_channels: int = 32         # the UNet's model_channels
    curve_every: int = 0            # every N UNet steps: prompt fidelity of the EMA on the tuning prompts
    unet_from: str = ""             # a world model file whose UNet and text encoder stage 2 continues (probes)
    # the shapes' rotation in the stage-2 images (minidb.world.render; the VAE sees the world's own).
    # Upright: from pure noise the UNet must paint each shape's mean, and over every rotation the
    # mean of a star is a disk (benchmarks/RESULTS.md, issue #27)
    rotation: float = 0.0
    # the share of stage 2's captions that name the shape alone ("a photo of a star"), drawn before the
    # per-attribute dropout, which alone gives them 0.3^4 = 0.8%: the class prompt DreamBooth's prior uses
    class_share: float = 0.0
    # the UNet step from which class_share applies: a tail of class prompts at the end's low lr, as in the
    # paired probe T_tail (benchmarks/RESULTS.md); before it the captions are those of class_share 0
    class_share_from: int = 0
    vae_from: str = ""              # a world model file whose VAE (and scale factor) replaces stage 1


# settings added to PretrainConfig after runs were made, and what those runs did (their pretrain.json lacks them);
# stage 1 used the UNet's warm-up before it had its own
ADDED_SINCE = {"t_sampling_from": 0, "class_share": 0.0, "class_share_from": 0, "vae_warmup": lambda run: run.get("warmup")}


def as_run_did(settings: dict) -> dict:
    """A run folder's pretrain.json with every setting it predates filled in as that run did it."""
    missing = {k: v(settings) if callable(v) else v for k, v in ADDED_SINCE.items() if k not in settings}
    return {**settings, **missing}


def world_config(cfg: PretrainConfig) -> SDConfig:
    """WORLD_CONFIG with the recipe's UNet width."""
    return dataclasses.replace(WORLD_CONFIG, unet=dataclasses.replace(WORLD_CONFIG.unet, model_channels=cfg.unet_channels))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Stage:
    """What both stages share: their checkpoint folder, metrics.jsonl, progress bar."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name
        self.ckpt_dir = out / "checkpoints" / name
        self.metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def resume(self) -> dict | None:
        return latest_state(self.ckpt_dir, "delete the newer checkpoints to resume from it")

    def save(self, step: int, state: dict) -> None:
        save_state(checkpoint_path(self.ckpt_dir, step), {"step": step, "rng": [rng_state()], **state})
        prune_checkpoints(self.ckpt_dir, 2)

    def log(self, step: int, **values) -> None:
        self.metrics.write(json.dumps({"stage": self.name, "step": step, **values, "time": time.time()}) + "\n")
        self.metrics.flush()


# ---- stage 1: the autoencoder ------------------------------------------------------------------

def foreground(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] 1 where a pixel is far from its image's background (the median of the border
    pixels), as minidb.world.reader segments: x in [-1, 1], "far" = 50 of 255 in RGB distance."""
    border = torch.cat([x[:, :, :2].flatten(2), x[:, :, -2:].flatten(2), x[:, :, :, :2].flatten(2),
                        x[:, :, :, -2:].flatten(2)], dim=2)  # [B, 3, n]
    bg = border.median(dim=2).values[:, :, None, None]
    return ((x - bg).norm(dim=1, keepdim=True) > 50 / 127.5).float()


def train_vae(sd, cfg: PretrainConfig, out: Path) -> float:
    """Trains sd.vae in place; returns the latent scale factor."""
    stage = Stage(out, "vae")
    vae = sd.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=True)
    world = World(cfg.seed, drop=0.0, drop_all=0.0)
    step, state = 0, stage.resume()
    if state is not None:
        vae.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][0])
        step = state["step"]
        if "scale_factor" in state:
            return state["scale_factor"]
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="1/2 VAE", dynamic_ncols=True)
    while step < cfg.vae_steps:
        x = images_to_tensor(world.batch(step * cfg.vae_batch, cfg.vae_batch)[0]).to(sd.device)
        posterior = vae.encode(x)
        z = posterior.sample(torch.Generator().manual_seed(world_seed("vae-noise", cfg.seed, step)))
        y = vae.decode(z)
        w = 1.0 + 4.0 * foreground(x)  # the shape is ~5% of the pixels and all of the meaning
        rec = (w * ((y - x).abs() + (y - x).pow(2))).mean() / w.mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.std.pow(2) - 1.0 - posterior.logvar).mean()
        loss = rec + cfg.kl_weight * kl
        lr = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_warmup, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        stage.log(step, loss=loss.item(), rec=rec.item(), kl=kl.item(), lr=lr)
        bar.set_postfix(rec=f"{rec.item():.4f}", refresh=False)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < cfg.vae_steps:
            stage.save(step, {"weights": vae.state_dict(), "optimizer": opt.state_dict()})
    bar.close()
    vae.eval().requires_grad_(False)
    # SD's scale factor: latents / their std have unit variance, which the noise schedule assumes
    with torch.no_grad():
        x = images_to_tensor(World(cfg.seed + 1).batch(0, 256)[0]).to(sd.device)
        scale_factor = float(1.0 / torch.cat([vae.encode(c).mean for c in x.split(64)]).std())
    stage.save(step, {"weights": vae.state_dict(), "optimizer": opt.state_dict(), "scale_factor": scale_factor})
    return scale_factor


CHECKED = ATTRIBUTES  # every attribute a caption names: a VAE's round trip can lose any of them


@torch.no_grad()
def check_vae(vae, seed: int, n: int = 120, reader: Reader | None = None) -> dict:
    """Round trips (the posterior's mean, decoded) of n fresh renders, read by the world's reader:
    {"shape": share read right, "color": ..., ..., "wrong": {"background": {"green -> black": count}, ...}}.
    Stage 1's loss is a mean over every pixel, so a VAE can lose one background's color and still look
    trained (benchmarks/RESULTS.md, "R11"), or blur small shapes past reading (a 1000-step VAE, "stage 1's
    warm-up"): this reads each attribute of each image."""
    world = World(seed + 3, drop=0.0, drop_all=0.0)
    images = world.batch(0, n)[0]
    truth = [world.attributes(i)[0] for i in range(n)]
    x = images_to_tensor(images).to(next(vae.parameters()).device)
    y = torch.cat([vae.decode(vae.encode(c).mean) for c in x.split(60)])  # [n, 3, H, W], 60 at a time
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [n, H, W, 3]
    reads = (reader or Reader.load()).read_all([Image.fromarray(im) for im in y])
    report = {name: share for name, share in prompt_fidelity(reads, truth, keep=CHECKED).items() if name != "all"}
    report["wrong"] = {name: {f"{a} -> {b}": k for (a, b), k in sorted(confusions(reads, truth, name).items(),
                                                                       key=lambda kv: -kv[1]) if a != b}
                       for name in CHECKED}
    return report


def warn_if_vae_is_wrong(report: dict, bound: float = 0.95) -> bool:
    """A warning on stderr when the VAE's round trips lose an attribute; True when it warned."""
    bad = [name for name in CHECKED if report[name] < bound]
    for name in bad:
        print(f"warning: the VAE's round trips keep the {name} of {report[name]:.1%} of fresh renders "
              f"(misread: {report['wrong'][name]}); every sample of this model will share the loss. "
              "Another --seed, or more VAE steps, gives another VAE.", file=sys.stderr)
    return bool(bad)


# ---- stage 2: UNet and text encoder ------------------------------------------------------------

@torch.no_grad()
def encode_pool(sd, cfg: PretrainConfig, out: Path):
    """The stage-2 images: `pool` renders (drawn from World(seed + 2)), their attributes, the VAE
    posterior (mean, std) of each and the shape's mask at latent resolution. Cached in pool.pt,
    keyed by what made it, and read back as tensors and strings only (weights_only)."""
    path = out / "pool.pt"
    key = {"seed": cfg.seed, "pool": cfg.pool, "vae": _weights_sum(sd.vae), "rotation": cfg.rotation, "version": 2}
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
        except Exception:  # a pool of an older version, or torn: it is only a cache
            cached = {"key": None}
        if cached["key"] == key:
            return cached["mean"], cached["std"], cached["mask"], [Attributes(*a) for a in cached["items"]]
    world = World(cfg.seed + 2, rotation=cfg.rotation)
    items = [world.attributes(i)[0] for i in range(cfg.pool)]
    means, stds, masks = [], [], []
    for start in tqdm(range(0, cfg.pool, 64), desc="encoding images", leave=False):
        x = images_to_tensor(world.batch(start, min(64, cfg.pool - start))[0]).to(sd.device)
        posterior = sd.vae.encode(x)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        masks.append(F.adaptive_avg_pool2d(foreground(x), posterior.mean.shape[-2:]).cpu())  # [B, 1, h, w]
    mean, std, mask = torch.cat(means), torch.cat(stds), torch.cat(masks)
    with atomic_write(path) as tmp:
        torch.save({"key": key, "mean": mean, "std": std, "mask": mask,
                    "items": [[a.shape, a.color, a.size, a.position, a.background] for a in items]}, tmp)
    return mean, std, mask, items


def _weights_sum(module) -> float:
    """The sum of every weight: a cheap fingerprint of the VAE for the pool cache's key, not a hash."""
    return float(sum(p.double().sum() for p in module.state_dict().values()))


def lr_at(step: int, total: int, peak: float, warmup: int, min_lr: float) -> float:
    """Linear warm-up to `peak` (reached on its last step), then a cosine down to min_lr at step `total`."""
    return scheduled_lr(step, peak, total, warmup, min_lr, peak_in_warmup=True)


def step_captions(cfg: PretrainConfig, world: World, items: list, step: int) -> list[str]:
    """The captions of stage 2's step `step` for its images' attributes `items`: each attribute but the
    shape left out with probability world.drop, the whole caption with world.drop_all, and a share
    cfg.class_share naming the shape alone from step cfg.class_share_from on."""
    rng = np.random.default_rng(world_seed("captions", cfg.seed, step))
    # a stream of its own: with class_share 0 the captions are those of the runs before it
    share = cfg.class_share if step >= cfg.class_share_from else 0.0
    alone = np.random.default_rng(world_seed("shape-alone", cfg.seed, step)).random(len(items)) < share
    prompts = []
    for a, shape_alone in zip(items, alone):
        keep = ("shape",) + tuple(n for n in ATTRIBUTES[1:] if rng.random() >= world.drop)
        empty = rng.random() < world.drop_all
        prompts.append("" if empty else caption(a, ("shape",) if shape_alone else keep))
    return prompts


def train_unet(sd, cfg: PretrainConfig, out: Path) -> dict:
    """Trains sd.unet and sd.text_encoder together; returns the EMA weights {"unet.*", "text_encoder.*"}."""
    device = sd.device
    mean, std, mask, items = (t.to(device) if torch.is_tensor(t) else t for t in encode_pool(sd, cfg, out))
    banded = timestep_weights(sd.schedule, cfg)
    uniform = timestep_weights(sd.schedule, dataclasses.replace(cfg, t_sampling="uniform"))
    stage = Stage(out, "unet")
    models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    for m in models.values():
        m.train().requires_grad_(True)
    params = {f"{n}.{k}": p for n, m in models.items() for k, p in m.named_parameters()}
    ema = EMA(params.items(), cfg.ema, warmup=True)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.01, fused=True)  # fused: 4x faster on CPU
    step, state = 0, stage.resume()
    if state is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["weights"][k])
        # the checkpoint holds the average's tensors; the warm-up's position is the step
        ema.load_state_dict({"decay": cfg.ema, "shadow": state["ema"], "updates": state["step"]})
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][0])
        step = state["step"]
    world = World(cfg.seed + 2)
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="2/2 UNet + text encoder", dynamic_ncols=True)
    while step < cfg.unet_steps:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(world_seed("unet-step", cfg.seed, step))
        index = torch.randint(0, cfg.pool, (cfg.unet_batch,), generator=g)  # drawn on the CPU: any device, same run
        prompts = step_captions(cfg, world, [items[i] for i in index.tolist()], step)
        shape = (cfg.unet_batch,) + tuple(mean.shape[1:])
        rows = index.to(device)
        latents = (mean[rows] + std[rows] * torch.randn(shape, generator=g).to(device)) * sd.config.scale_factor
        noise = torch.randn(shape, generator=g).to(device)
        weights = banded if step >= cfg.t_sampling_from else uniform
        t = torch.multinomial(weights, cfg.unet_batch, replacement=True, generator=g)
        context = sd.text_encoder(sd.tokenizer(prompts).to(device))
        pred = sd.unet(sd.schedule.add_noise(latents, noise, t), t.to(device), context)
        target = noise if sd.config.parameterization == "eps" else sd.schedule.velocity(latents, noise, t)
        w = 1.0 + cfg.mask_weight * mask[rows]  # [B, 1, h, w]: the shape is few pixels and all of the meaning
        loss = (w * (pred - target).pow(2)).mean() / w.mean()
        lr = lr_at(step, cfg.unet_steps, cfg.lr, cfg.warmup, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        step += 1
        ema.update(params.items())
        stage.log(step, loss=loss.item(), lr=lr, grad_norm=float(grad_norm),
                  images_per_s=cfg.unet_batch / (time.perf_counter() - t0))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            stage.save(step, {"weights": {k: p.detach() for k, p in params.items()}, "ema": ema.shadow,
                              "optimizer": opt.state_dict()})
        if step % cfg.sample_every == 0 or step == cfg.unet_steps:
            preview(sd, ema.shadow, out / "samples" / f"unet_step_{step:06d}.png")
        if cfg.curve_every and (step % cfg.curve_every == 0 or step == cfg.unet_steps):
            stage.log(step, curve=fidelity_probe(sd, ema.shadow))
    bar.close()
    return ema.shadow


def timestep_weights(schedule, cfg: PretrainConfig) -> torch.Tensor:
    """[T] probabilities of drawing each training timestep. "logsnr": the density of
    Normal(t_mean, t_std) over log-SNR, carried to the timesteps (times each one's share of the
    log-SNR axis), mixed with a t_uniform share of uniform draws. It moves the samples from the
    near-pure-noise and near-clean ends, where the caption changes little, to the middle, where the
    shape is decided (benchmarks/RESULTS.md, the diagnosis)."""
    T = schedule.timesteps
    uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
    if cfg.t_sampling == "uniform":
        return uniform
    if cfg.t_sampling != "logsnr":
        raise ConfigError(f't_sampling must be "uniform" or "logsnr", got {cfg.t_sampling!r}')
    a = schedule.alphas_cumprod
    lam = (a / (1 - a)).log()                                   # [T] decreasing
    width = torch.gradient(lam)[0].abs()                        # each timestep's share of the axis
    density = torch.exp(-0.5 * ((lam - cfg.t_mean) / cfg.t_std) ** 2) * width
    return (1 - cfg.t_uniform) * density / density.sum() + cfg.t_uniform * uniform


def tuning_prompts(n: int = 48) -> list:
    """Held-out combinations the final evaluation never uses (it takes the first 200 of
    minidb.world.metrics.held_out_prompts' seed-0 order; these come from its end), for the learning curve
    and the recipe's choices, so that nothing is tuned on the evaluation prompts."""
    from minidb.world.metrics import held_out_prompts
    from minidb.world import combinations
    order = held_out_prompts(len(combinations(held=True)), seed=0)
    return order[::-1][:n]


@torch.no_grad()
def fidelity_probe(sd, weights: dict, n: int = 48, per_shape: int = 4, guidance: float | None = None) -> dict:
    """The learning curve's point: prompt fidelity per attribute of `weights` (the EMA) on n tuning
    prompts, and the shape read on class-only prompts ("a photo of a star", per_shape each), read by
    the shipped reader from 20-step DDIM samples (seeds 50000 + i: never the evaluation's), at the
    model's own guidance scale unless `guidance` is given (curves before 2026-12-04's third session
    were drawn at 7.5)."""
    from minidb.world.metrics import class_prompts, prompt_fidelity
    from minidb.pipeline import StableDiffusion
    from minidb.world import caption
    copy = StableDiffusion(sd.config).to(sd.device)
    load_trained(copy, weights, sd.vae)
    wanted = tuning_prompts(n)
    classes, shapes = class_prompts(per_shape)
    size = sd.config.image_size
    images = copy.generate([caption(a) for a in wanted] + classes, steps=20, guidance=guidance or sd.config.guidance, height=size,
                           width=size, seed=[50000 + i for i in range(n + len(classes))], progress=False)
    reads = Reader.load().read_all(images)
    out = prompt_fidelity(reads[:n], wanted)
    out["class_shape"] = float(np.mean([r["shape"] == s for r, s in zip(reads[n:], shapes)]))
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def preview(sd, weights: dict, path: Path, prompts=PREVIEW_PROMPTS, n: int = 2) -> Path:
    """A grid, one row per prompt, n seeds each, from `weights` (the EMA), 20 DDIM steps at guidance 5."""
    from minidb.pipeline import StableDiffusion
    copy = StableDiffusion(sd.config).to(sd.device)
    load_trained(copy, weights, sd.vae)
    size = sd.config.image_size
    images = copy.generate([p for p in prompts for _ in range(n)], steps=20, guidance=5.0, height=size,
                           width=size, seed=[1000 + i for _ in prompts for i in range(n)], progress=False)
    return save_grid(images, n, path)


def load_trained(sd, weights: dict, vae=None) -> None:
    """weights {"unet.*", "text_encoder.*"} into sd's models (and a trained VAE's state)."""
    for name in ("unet", "text_encoder"):
        module = getattr(sd, name)
        module.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")})
    if vae is not None:
        sd.vae.load_state_dict(vae.state_dict())
    for m in sd.models.values():
        m.eval().requires_grad_(False)


def save_png(image, path: Path) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def save_grid(images, columns: int, path: Path, scale: int = 4) -> Path:
    """The grid at `scale` times its size (nearest neighbour: 64x64 samples are thumbnails on a
    screen) as `path`, and as it is beside it (NAME_1x.png)."""
    from minidb.sampling import image_grid
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, columns)
    save_png(grid, path.with_name(path.stem + "_1x.png"))
    save_png(grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST), path)
    return path


@torch.no_grad()
def sample_sheet(sd, path: Path, prompts=PREVIEW_PROMPTS, n: int = 4, steps: int = 20,
                 guidance: float | None = None) -> Path:
    """The README's picture of a model: one row per prompt, labelled, seeds 0..n-1."""
    size = sd.config.image_size
    images = sd.generate([p for p in prompts for _ in range(n)], steps=steps, guidance=guidance, height=size,
                         width=size, seed=[i for _ in prompts for i in range(n)], progress=False)
    label, scale = 300, 4  # 64x64 images shown at 256x256
    sheet = Image.new("RGB", (label + n * size * scale, len(prompts) * size * scale), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        draw.text((4, row * size * scale + size * scale // 2 - 6), prompt, fill="black")
        for col in range(n):
            image = images[row * n + col].resize((size * scale,) * 2, Image.NEAREST)
            sheet.paste(image, (label + col * size * scale, row * size * scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(sheet, path)
    return path


def plot_losses(metrics_file: Path, path: Path) -> Path:
    """loss.png: each stage's loss per step (log scale, a 25-step running mean), drawn with PIL."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    stages = [s for s in ("vae", "unet") if any(r["stage"] == s for r in rows)]
    W, H, pad = 480, 260, 40
    image = Image.new("RGB", (W * len(stages), H), "white")
    draw = ImageDraw.Draw(image)
    for k, name in enumerate(stages):
        last = {r["step"]: r["loss"] for r in rows if r["stage"] == name and "loss" in r}  # a resumed step: its last value
        steps = sorted(last)
        losses = np.log10(np.maximum([last[s] for s in steps], 1e-8))
        smooth = np.convolve(losses, np.ones(25) / 25, mode="valid") if len(losses) >= 25 else losses
        lo, hi = float(losses.min()), float(losses.max()) + 1e-9
        x0 = k * W

        def xy(i, v):
            return x0 + pad + (W - 2 * pad) * i / max(1, len(steps) - 1), H - pad - (H - 2 * pad) * (v - lo) / (hi - lo)
        draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(200, 200, 230), width=1)
        offset = len(losses) - len(smooth)
        draw.line([xy(i + offset, v) for i, v in enumerate(smooth)], fill=(30, 60, 200), width=2)
        draw.rectangle([x0 + pad, pad, x0 + W - pad, H - pad], outline="black")
        draw.text((x0 + pad, 10), f"{name} loss (log10), steps 1-{steps[-1]}", fill="black")
        draw.text((x0 + 2, pad - 6), f"{hi:.2f}", fill="black")
        draw.text((x0 + 2, H - pad - 6), f"{lo:.2f}", fill="black")
    save_png(image, path)
    return path


CURVE_COLORS = {"shape": (200, 30, 30), "class_shape": (240, 140, 0), "color": (40, 160, 40),
                "background": (120, 120, 120), "position": (30, 90, 240), "size": (140, 40, 200), "all": (0, 0, 0)}


def plot_curve(metrics_file: Path, path: Path) -> Path | None:
    """curve.png: the learning curve, prompt fidelity per attribute of the EMA against UNet steps
    and minutes of stage 2, 0-100%, drawn with PIL. None when the run logged no curve points."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    points = {r["step"]: r["curve"] for r in rows if "curve" in r}  # a resumed step: its last value
    if not points:
        return None
    start = min(r["time"] for r in rows if r.get("stage") == "unet")
    minutes = {r["step"]: (r["time"] - start) / 60 for r in rows if "curve" in r}
    steps = sorted(points)
    W, H, pad, key = 640, 360, 48, 130
    image = Image.new("RGB", (W + key, H), "white")
    draw = ImageDraw.Draw(image)
    last = max(steps[-1], 1)

    def xy(step, v):
        return pad + (W - 2 * pad) * step / last, H - pad - (H - 2 * pad) * v
    for level in (0.25, 0.5, 0.75, 0.9, 1.0):
        draw.line([xy(0, level), xy(last, level)], fill=(225, 225, 225))
        draw.text((4, xy(0, level)[1] - 6), f"{level:.0%}", fill="black")
    draw.line([xy(0, 1 / 6), xy(last, 1 / 6)], fill=(200, 160, 160))  # chance for shape
    for k, (name, color) in enumerate(CURVE_COLORS.items()):
        line = [xy(s, points[s][name]) for s in steps if name in points[s]]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        label = "class prompts: shape" if name == "class_shape" else name
        draw.rectangle([W + 4, pad + 18 * k, W + 16, pad + 18 * k + 10], fill=color)
        draw.text((W + 20, pad + 18 * k - 1), label, fill="black")
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    draw.text((pad, 10), "prompt fidelity of the EMA on held-out tuning prompts (chance for shape: pink line)",
              fill="black")
    for s in (steps[0], steps[len(steps) // 2], steps[-1]):
        x, _ = xy(s, 0)
        draw.text((x - 20, H - pad + 6), f"{s} ({minutes[s]:.0f} min)", fill="black")
    draw.text((W // 2 - 60, H - 16), "UNet steps (minutes of stage 2)", fill="black")
    save_png(image, path)
    return path


def pretrain(out, cfg: PretrainConfig = PretrainConfig(), ship: bool = False, device="cpu") -> Path:
    """The whole recipe; resumes from out/checkpoints when they are there. Returns the model path.
    device: where it computes (not a setting of the recipe: the data and noise are drawn on the CPU)."""
    from minidb.pipeline import StableDiffusion
    if not 0.0 <= cfg.class_share <= 1.0:
        raise ConfigError(f"class_share is a share of the captions, from 0 to 1; got {cfg.class_share}")
    if cfg.class_share and not 0 <= cfg.class_share_from < cfg.unet_steps:
        raise ConfigError(f"class_share_from {cfg.class_share_from} is not a UNet step of this run "
                          f"(0 to {cfg.unet_steps - 1}): its class prompts would never be drawn")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "pretrain.json"
    # a setting added since the run began reads as the value every run had before it existed
    if settings.is_file():
        try:
            stored = json.loads(settings.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # torn or foreign: not a run to resume
            raise ConfigError(f"{settings} is unreadable ({e}): choose another --out") from None
        if not isinstance(stored, dict):
            raise ConfigError(f"{settings} holds no settings: choose another --out")
        before, now = as_run_did(stored), dataclasses.asdict(cfg)
        differ = [f"{k}: {before.get(k)!r} there, {v!r} here" for k, v in now.items() if before.get(k) != v]
        differ += [f"{k}: {before[k]!r} there, unknown here" for k in before.keys() - now.keys()]
        if differ:
            raise ConfigError(f"{out} holds a pretraining run with other settings ({'; '.join(differ)}): "
                              "choose another --out, or give the same settings to resume it")
    atomic_write_text(settings, json.dumps(dataclasses.asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    sd = StableDiffusion(world_config(cfg)).to(device)  # random init, seeded (on the CPU, then moved)
    t0 = time.time()
    if cfg.vae_from:  # stage 1 done before: its VAE and scale factor
        trained = StableDiffusion.from_checkpoint(cfg.vae_from)
        sd.vae.load_state_dict(trained.vae.state_dict())
        sd.vae.eval().requires_grad_(False)
        scale_factor = trained.config.scale_factor
    else:
        scale_factor = train_vae(sd, cfg, out)
    report = check_vae(sd.vae, cfg.seed)  # seconds; read before stage 2 spends its hours on this VAE
    Stage(out, "vae-check").log(cfg.vae_steps, check=report)  # a row of its own: stage rows are steps
    warn_if_vae_is_wrong(report)
    if cfg.unet_from:
        trained = StableDiffusion.from_checkpoint(cfg.unet_from, dtype=torch.float32)
        sd.unet.load_state_dict(trained.unet.state_dict())
        sd.text_encoder.load_state_dict(trained.text_encoder.state_dict())
    sd.config = dataclasses.replace(sd.config, scale_factor=round(scale_factor, 5))
    ema = train_unet(sd, cfg, out)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    plot_curve(out / "metrics.jsonl", out / "curve.png")
    model = StableDiffusion(sd.config)
    load_trained(model, {k: v.cpu() for k, v in ema.items()}, sd.vae.cpu())
    path = out / "model.safetensors"
    model.save(path, dtype=torch.float16)
    print(f"pretrained in {(time.time() - t0) / 60:.1f} min (this session); model {path} "
          f"({path.stat().st_size / 2 ** 20:.1f} MiB), scale factor {sd.config.scale_factor}", file=sys.stderr)
    if ship:
        with atomic_write(SHIPPED) as tmp:
            shutil.copyfile(path, tmp)
        print(f"installed as {SHIPPED}", file=sys.stderr)
    return path


if __name__ == "__main__":  # the command line lives in minidb.cli.pretrain
    from minidb.cli.pretrain import main
    main()
