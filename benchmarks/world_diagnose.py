"""Why the world model does or does not draw shapes: the diagnosis of issue #27, from images and losses.

    python -m benchmarks.world_diagnose --model minidb/data/world.safetensors --out benchmarks/world_diagnosis.json
    python -m benchmarks.world_diagnose --state runs/world/checkpoints/unet/step_005000.pt ...  # EMA vs raw

Four measurements, none on the evaluation's prompts or seeds (minidb.world.pretrain.tuning_prompts):
- classifier: the diffusion classifier of Li et al. 2023 (arXiv 2303.16203). The same noisy latent of a
  render is denoised with its full caption and with the caption's shape word swapped for each other
  shape; per timestep band, how often the right word gives the lowest loss (chance 1/6), and the
  wrong words' mean loss over the right word's. If the model knows shape, some band says so, and
  that band is where shape is decided.
- guidance: shape fidelity of samples against the guidance scale.
- seen: shape fidelity on training combinations against held-out ones.
- ema: with a training state, the EMA weights against the raw ones.
- samplers (--samplers): stochastic DDIM and more steps, so that the sampler can be ruled in or out.
- x0 (--x0 PNG): a picture of what the model predicts at each noise level. Rows are noise levels;
  each row shows four renders' noisy latents x_t (decoded), then the model's clean prediction x0
  from them. It shows at which noise level the object's position and shape appear in the
  prediction, and what the model draws where it cannot yet see the object.

    python -m benchmarks.world_diagnose --model runs/world/model.safetensors --x0 benchmarks/world_x0.png
- means (--means PNG): what a perfect model would predict from pure noise for "a photo of a large red
  <shape> on a white background, center": the mean of 64 renders' latents, decoded (first row: no
  rotation; second: the world's rotation), and the mean of the renders' pixels (rows 3-4). Compare
  with the bottom rows of the x0 sheet.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from minidb.world.eval import Reader, class_prompts, prompt_fidelity
from minidb.files import atomic_write_text
from minidb.pipeline import StableDiffusion
from minidb.world.pretrain import images_to_tensor, load_trained, tuning_prompts
from minidb.world import ATTRIBUTES, SHAPES, Attributes, caption, combinations, render, world_seed

BANDS = tuple(range(50, 1000, 100))  # timesteps at the band centres


@torch.no_grad()
def classifier(sd, n: int = 60, seed: int = 0) -> list[dict]:
    wanted = tuning_prompts(n)
    x = images_to_tensor(np.stack([np.asarray(render(a, seed=world_seed("diagnose", seed, i))) for i, a in enumerate(wanted)]))
    latents = sd.vae.encode(x).mean * sd.config.scale_factor
    captions = [[caption(Attributes(s, a.color, a.size, a.position, a.background)) for s in SHAPES] for a in wanted]
    context = sd.text_encoder(sd.tokenizer([c for row in captions for c in row])).view(n, len(SHAPES), -1, sd.config.clip.width)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t_mid in BANDS:
        t = torch.randint(t_mid - 50, t_mid + 50, (n,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        x_t = sd.schedule.add_noise(latents, noise, t)
        target = sd.schedule.velocity(latents, noise, t)
        losses = torch.stack([(sd.unet(x_t, t, context[:, k]) - target).pow(2).flatten(1).mean(1)
                              for k in range(len(SHAPES))], 1)  # [n, shapes]
        right = torch.tensor([SHAPES.index(a.shape) for a in wanted])
        a = sd.schedule.alphas_cumprod[t_mid]
        r = losses[torch.arange(n), right]
        wrong = (losses.sum(1) - r) / (len(SHAPES) - 1)
        rows.append({"t": t_mid, "log_snr": round(float((a / (1 - a)).log()), 2),
                     "accuracy": float((losses.argmin(1) == right).float().mean()),
                     "wrong_over_right": float((wrong / r).mean()), "loss": float(r.mean())})
    return rows


@torch.no_grad()
def x0_sheet(sd, path, n: int = 4, timesteps=(100, 250, 400, 550, 700, 850), seed: int = 0):
    """The picture described in the module docstring, written to `path` (4x and 1x)."""
    from minidb.world.pretrain import save_grid
    from minidb.sampling import decode
    wanted = []
    for a in tuning_prompts(48):  # n different shapes
        if len(wanted) < n and a.shape not in {w.shape for w in wanted}:
            wanted.append(a)
    x = images_to_tensor(np.stack([np.asarray(render(a, seed=world_seed("x0", seed, i))) for i, a in enumerate(wanted)]))
    latents = sd.vae.encode(x).mean * sd.config.scale_factor
    context = sd.text_encoder(sd.tokenizer([caption(a) for a in wanted]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    cells, snr = [], []
    for step in timesteps:
        t = torch.full((n,), step)
        x_t = sd.schedule.add_noise(latents, noise, t)
        a = sd.schedule.alphas_cumprod[step]
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * sd.unet(x_t, t, context)  # v-prediction's clean image
        cells += decode(sd, x_t) + decode(sd, x0)
        snr.append(round(float((a / (1 - a)).log()), 2))
    return save_grid(cells, 2 * n, Path(path)), {"timesteps": list(timesteps), "log_snr": snr, "prompts": [caption(a) for a in wanted]}


@torch.no_grad()
def mean_sheet(sd, path, n: int = 64):
    from PIL import Image

    from minidb.world.pretrain import save_grid
    from minidb.sampling import decode
    from minidb.world import ROTATION
    cells, pixels = [], []
    for rotation in (0.0, ROTATION):
        for shape in SHAPES:
            a = Attributes(shape, "red", "large", "center", "white")
            x = np.stack([np.asarray(render(a, seed=world_seed("means", i), rotation=rotation)) for i in range(n)])
            cells += decode(sd, sd.vae.encode(images_to_tensor(x)).mean.mean(0, keepdim=True) * sd.config.scale_factor)
            pixels.append(Image.fromarray(x.astype(np.float32).mean(0).round().astype(np.uint8)))
    return save_grid(cells + pixels, len(SHAPES), Path(path))


def fidelity(sd, reader, wanted: list, guidance: float, seed: int) -> dict:
    size = sd.config.image_size
    images = sd.generate([caption(a) for a in wanted], steps=20, guidance=guidance, height=size, width=size,
                         seed=[seed + i for i in range(len(wanted))], progress=False)
    return prompt_fidelity(reader.read_all(images), wanted)


def samplers(sd, reader, n: int = 48) -> dict:
    """Shape fidelity at guidance 7.5 with stochastic DDIM (eta 1) and with more steps."""
    held, size = tuning_prompts(n), sd.config.image_size
    out = {}
    for eta, steps in ((1.0, 20), (0.0, 50), (1.0, 50)):
        images = sd.generate([caption(a) for a in held], steps=steps, guidance=7.5, eta=eta, height=size, width=size,
                             seed=[60000 + i for i in range(n)], progress=False)
        out[f"eta {eta:g}, {steps} steps"] = prompt_fidelity(reader.read_all(images), held)
    return out


def class_shape(sd, reader, guidance: float, per_shape: int = 4, seed: int = 70000) -> float:
    prompts, shapes = class_prompts(per_shape)
    size = sd.config.image_size
    images = sd.generate(prompts, steps=20, guidance=guidance, height=size, width=size,
                         seed=[seed + i for i in range(len(prompts))], progress=False)
    return float(np.mean([r["shape"] == s for r, s in zip(reader.read_all(images), shapes)]))


def diagnose(sd, n: int = 48, scales=(1.0, 3.0, 5.0, 7.5, 9.0), raw: dict | None = None,
             with_samplers: bool = False) -> dict:
    reader = Reader.load()
    held = tuning_prompts(n)
    train = [combinations(held=False)[i] for i in np.random.default_rng(world_seed("diagnose-train")).permutation(2444)[:n]]
    t0 = time.time()
    out = {"classifier": classifier(sd)}
    out["guidance"] = {g: {**fidelity(sd, reader, held, g, 60000), "class_shape": class_shape(sd, reader, g)} for g in scales}
    if with_samplers:
        out["samplers"] = samplers(sd, reader, n)
    out["seen"] = {"held-out": out["guidance"][7.5], "training": fidelity(sd, reader, train, 7.5, 60000)}
    if raw is not None:
        copy = StableDiffusion(sd.config)
        load_trained(copy, raw, sd.vae)
        out["ema"] = {"ema": out["guidance"][7.5], "raw": {**fidelity(copy, reader, held, 7.5, 60000),
                                                            "class_shape": class_shape(copy, reader, 7.5)}}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a world model file (default: the shipped one)")
    p.add_argument("--state", default=None, help="a pretraining state (checkpoints/unet/step_N.pt): EMA vs raw")
    p.add_argument("--out", default="benchmarks/world_diagnosis.json")
    p.add_argument("--classifier-only", action="store_true")
    p.add_argument("--samplers", action="store_true", help="also eta 1 and 50 steps (~3 more minutes)")
    p.add_argument("--x0", metavar="PNG", help="only draw the x0-prediction sheet to PNG")
    p.add_argument("--means", metavar="PNG", help="only draw the conditional means of renders to PNG")
    p.add_argument("--confusions", choices=ATTRIBUTES, help="only count what is read for what is asked, for one "
                   "attribute, on the evaluation's 200 held-out captions (seeds 0-199, the model's guidance)")
    args = p.parse_args(argv)
    from minidb.world.pretrain import SHIPPED
    sd = StableDiffusion.from_checkpoint(args.model or SHIPPED, dtype=torch.float32)
    if args.means:
        print(mean_sheet(sd, args.means))
        return
    if args.confusions:
        from minidb.world.metrics import confusions, evaluate_model, held_out_prompts
        counts = confusions(evaluate_model(sd, 200)["reads"], held_out_prompts(200), args.confusions)
        print("\n".join(f"{asked:>14} -> {str(read):<14} {n}" for (asked, read), n in counts.items()))
        return
    if args.x0:
        assert sd.config.parameterization == "v", "the sheet reads x0 from a v-prediction"
        path, info = x0_sheet(sd, args.x0)
        print(json.dumps({"sheet": str(path), **info}, indent=1))
        return
    raw = None
    if args.state:
        from minidb.dreambooth.checkpoint import load_state
        raw = load_state(args.state)["weights"]
    result = {"classifier": classifier(sd)} if args.classifier_only else diagnose(sd, raw=raw, with_samplers=args.samplers)
    result["model"] = str(args.model or SHIPPED)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
