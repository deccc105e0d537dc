"""Samples per second of the world model's two training steps, eager against torch.compile (inductor), in
one process: stage 2's (UNet + text encoder, forward and backward, batch 32) and stage 1's (the VAE's
round trip and its loss, batch 8), on random weights of WORLD_CONFIG. The optimizer step is left out: it is
the same in both. Repeats are interleaved (eager, compiled, eager, ...) so that a noisy CPU slows both.

    python -m benchmarks.world_step_compile --threads 2 --repeats 3

Prints the compile time (the first call: inductor's cache in /tmp makes a second process's far shorter) and
the median seconds per step of each repeat.
"""
import argparse
import statistics
import time

import torch

from minidb.pipeline import StableDiffusion
from minidb.world.pretrain import WORLD_CONFIG


def median_seconds(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def vae_loss(vae, x, noise):
    posterior = vae.encode(x)
    return (vae.decode(posterior.mean + posterior.std * noise) - x).abs().mean()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="steps per repeat (default 8)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sd = StableDiffusion(WORLD_CONFIG)
    for m in sd.models.values():
        m.train().requires_grad_(True)
    tokens = sd.tokenizer(["a photo of a large green heart on a white background, top left"] * 32)
    latents, t = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,))
    x, noise = torch.rand(8, 3, 64, 64) * 2 - 1, torch.randn(8, 4, 16, 16)
    unet, text = torch.compile(sd.unet), torch.compile(sd.text_encoder)
    compiled_vae_loss = torch.compile(vae_loss)
    steps = {
        "stage 2 eager": lambda: sd.unet(latents, t, sd.text_encoder(tokens)).pow(2).mean().backward(),
        "stage 2 compiled": lambda: unet(latents, t, text(tokens)).pow(2).mean().backward(),
        "stage 1 eager": lambda: vae_loss(sd.vae, x, noise).backward(),
        "stage 1 compiled": lambda: compiled_vae_loss(sd.vae, x, noise).backward(),
    }
    for name in ("stage 2 compiled", "stage 1 compiled"):
        t0 = time.perf_counter()
        steps[name]()
        print(f"{name}: compile and first step {time.perf_counter() - t0:.1f} s", flush=True)
    seconds = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            seconds[name].append(median_seconds(step, args.steps))
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    for name, s in seconds.items():
        print(f"{name}: median s/step per repeat {[round(v, 3) for v in s]}")


if __name__ == "__main__":
    main()
