"""minidb against diffusers, side by side: the same weights, the same inputs, timed in one run.

    python -m benchmarks.bench_vs_diffusers                  # SD v1 sizes, 256x256, on CPU (or CUDA if present)
    python -m benchmarks.bench_vs_diffusers --res 512 --steps 20 --dtype fp16 --device cuda
    python -m benchmarks.bench_vs_diffusers --memory --write # add peak memory; append the table to RESULTS.md

Tasks (batch 2 = one prompt under classifier-free guidance):
  text encoder   CLIP ViT-L/14 text tower on [2, 77] token ids
  UNet step      one UNet call on [2, 4, res/8, res/8] latents, 77 context tokens
  VAE decode     one latent to one image
  txt2img        one image: prompt encoding, `--steps` DDIM steps with guidance 7.5, decoding
diffusers runs its own StableDiffusionPipeline (DDIM configured the CompVis way) on weights converted
from minidb's by diffusers' single-file converters (benchmarks/reference.py, the twin the equivalence
tests build), so both compute the same function (the tests check that). Weights are random (timing
does not depend on their values).

Times are medians over `--repeats`, minidb and diffusers alternating so that a noisy neighbour on a
shared machine hits both; "x" is diffusers' time over minidb's (above 1: minidb is faster).
Peak memory (`--memory`): on CUDA, torch's peak allocation during the task above what was allocated
before it; on CPU, each side in a fresh process holding only its own models, the peak RSS (sampled
every 2 ms) during txt2img above the RSS before it.
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from minidb import config
from minidb.config import SDConfig, tiny_config
from minidb.pipeline import StableDiffusion

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"

PROMPT = "a photo of sks dog in a bucket"
DTYPES = {name: getattr(torch, dtype) for name, dtype in config.DTYPES.items()}  # "fp16" -> torch.float16


def build(size: str, device: str, dtype: torch.dtype):
    """minidb's StableDiffusion and diffusers' pipeline holding the same weights."""
    from benchmarks.reference import diffusers_pipeline, scheduler

    sd = StableDiffusion(tiny_config() if size == "tiny" else SDConfig())
    with tempfile.TemporaryDirectory() as folder:
        pipe = diffusers_pipeline(sd, Path(folder))
    pipe.scheduler = scheduler("ddim")
    sd.to(device, dtype)
    pipe.to(device, dtype)
    return sd, pipe


def tasks(sd, pipe, res: int, steps: int, device: str, dtype: torch.dtype) -> dict:
    """{task: (minidb's callable, diffusers' callable)} on the same inputs."""
    f = sd.config.latent_factor
    g = torch.Generator().manual_seed(0)
    ids = sd.tokenizer([PROMPT, ""]).to(device)
    x = torch.randn(2, 4, res // f, res // f, generator=g).to(device, dtype)
    t = torch.tensor([421, 421], device=device)
    ctx = torch.randn(2, 77, sd.config.clip.width, generator=g).to(device, dtype)
    z = x[:1] / sd.config.scale_factor
    txt2img = dict(steps=steps, guidance=7.5, height=res, width=res, seed=0)
    return {
        "text encoder": (lambda: sd.text_encoder(ids), lambda: pipe.text_encoder(ids)),
        "UNet step": (lambda: sd.unet(x, t, ctx), lambda: pipe.unet(x, t, encoder_hidden_states=ctx)),
        "VAE decode": (lambda: sd.vae.decode(z), lambda: pipe.vae.decode(z)),
        "txt2img": (lambda: sd.generate([PROMPT], progress=False, **txt2img),
                    lambda: pipe([PROMPT], num_inference_steps=steps, guidance_scale=7.5, height=res, width=res,
                                 generator=torch.Generator().manual_seed(0))),
    }


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync(device)
    return time.perf_counter() - start


def cuda_peak(fn, device) -> int:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak(fn) -> int:
    """Peak RSS while fn runs, above the RSS before it (freed heap handed back to the OS first)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before, peak, done = rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with torch.inference_mode():
            fn()
    finally:
        done.set()
        poller.join()
    return max(peak[0], rss()) - before


def child_memory(args, side: int) -> int:
    """CPU txt2img peak of one side (0 minidb, 1 diffusers) in a fresh process holding only its models."""
    cmd = [sys.executable, "-m", "benchmarks.bench_vs_diffusers", "--size", args.size, "--res", str(args.res),
           "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--_child", str(side)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE.parent).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def run_child(args):
    sd, pipe = build(args.size, args.device, DTYPES[args.dtype])
    fn = tasks(sd, pipe, args.res, args.steps, args.device, DTYPES[args.dtype])["txt2img"][args._child]
    del sd, pipe  # fn keeps only its own side's models alive
    print(json.dumps({"peak": cpu_peak(fn)}))


def machine(device) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name += f", {os.cpu_count()} cores"
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["sd", "tiny"], default="sd", help="SD v1 sizes or the tiny test model")
    p.add_argument("--res", type=int, default=None, help="image side in pixels (default 512 on CUDA, 256 on CPU)")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps of the txt2img task")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and task (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of each task")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.res = args.res or (512 if cuda else 256)
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    if args.res % 8:
        p.error(f"--res must be a multiple of 8, got {args.res}")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args._child is not None:
        return run_child(args)

    dtype = DTYPES[args.dtype]
    sd, pipe = build(args.size, args.device, dtype)
    rows = []
    for name, (ours, theirs) in tasks(sd, pipe, args.res, args.steps, args.device, dtype).items():
        timed(ours, args.device), timed(theirs, args.device)  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(ours, args.device))
            b.append(timed(theirs, args.device))
        row = {"task": name, "minidb": statistics.median(a), "diffusers": statistics.median(b)}
        if args.memory and cuda:
            row["mem"] = (cuda_peak(ours, args.device), cuda_peak(theirs, args.device))
        rows.append(row)
        print(f"{name:13s} minidb {row['minidb'] * 1e3:9.1f} ms   diffusers {row['diffusers'] * 1e3:9.1f} ms   "
              f"x{row['diffusers'] / row['minidb']:.2f}", flush=True)
    if args.memory and not cuda:
        del sd, pipe
        rows[-1]["mem"] = (child_memory(args, 0), child_memory(args, 1))

    command = "python -m benchmarks.bench_vs_diffusers " + " ".join(argv if argv is not None else sys.argv[1:])
    table = [f"## minidb vs diffusers, {args.size} model, {args.res}x{args.res}, {args.dtype}, {args.device} "
             f"({datetime.date.today()})", "",
             f"`{command.strip()}`  ", f"Machine: {machine(args.device)}; diffusers "
             f"{__import__('diffusers').__version__}; median of {args.repeats}, sides alternating", "",
             "| task | minidb | diffusers | diffusers / minidb | peak memory minidb | peak memory diffusers |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mem = [f"{m / 2**20:.0f} MiB" for m in r["mem"]] if "mem" in r else ["-", "-"]
        task = r["task"] + (f" ({args.steps} steps)" if r["task"] == "txt2img" else "")
        table.append(f"| {task} | {r['minidb'] * 1e3:.1f} ms | {r['diffusers'] * 1e3:.1f} ms | "
                     f"**{r['diffusers'] / r['minidb']:.2f}** | {mem[0]} | {mem[1]} |")
    text = "\n".join(table) + "\n"
    print("\n" + text)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
