"""Text to image from an SD v1 checkpoint (like CompVis' scripts/txt2img.py).

    minidb sample --prompt "a photo of an astronaut riding a horse" --n-samples 4 --seed 42
    minidb sample --from-file prompts.txt --sampler dpm++2m --steps 20 --precision fp16

Checkpoint: --ckpt, else $MINIDB_CKPT, else the single .safetensors/.ckpt file in ./checkpoints/.
Writes OUTDIR/samples/NNNNN.png (one per image; the prompt, seed, sampler, steps, scale and
checkpoint hash are in the PNG's text, with a "parameters" entry in the form A1111-style tools
read) and OUTDIR/grid-NNNN.png per prompt (one row per --n-iter, --n-samples columns).
Size: --H/--W, default the model's own image size (512 for SD v1; a model minidb saved stores its own).
--lora FILE[:SCALE] (repeatable) applies LoRA files (kohya / AUTOMATIC1111 or diffusers format) at
strength SCALE (default 1), stacked, unmerged.
Image i of the run uses seed + i, so a seed gives the same image whatever the batch size, up to
rounding: in fp32, pixels within 1/255 (another batch size sums matrix products in another order).
"""
import argparse
import hashlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from minidb.errors import MinidbError
from minidb.config import DTYPES, SAMPLER_NAMES, check, eta_problem, guidance_problem, seed_problem, steps_problem
from minidb.device import choose_device, default_precision
from minidb.files import atomic_write, read_text
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples above as written
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt to render")
    src.add_argument("--from-file", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (replaces the empty prompt)")
    p.add_argument("--ckpt", help="SD v1 checkpoint (.safetensors or .ckpt); default $MINIDB_CKPT or ./checkpoints/")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors file at strength SCALE (default 1); repeatable")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale, >= 0: 1 = none, 0 = unconditional (default: the model's "
                        "own, stored in its file by minidb; 7.5 for SD v1)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--sampler", choices=list(SAMPLER_NAMES), default="ddim", help="default ddim")
    p.add_argument("--H", type=int, help="image height in pixels (default: the model's image size, 512 for SD v1)")
    p.add_argument("--W", type=int, help="image width in pixels (default: the model's image size, 512 for SD v1)")
    p.add_argument("--n-samples", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--n-iter", type=int, default=1, help="batches per prompt (default 1)")
    p.add_argument("--seed", type=int, help="seed of the first image (default: random, printed)")
    p.add_argument("--precision", choices=list(DTYPES), help="default fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--outdir", default="outputs/txt2img-samples", help="default outputs/txt2img-samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def find_checkpoint(ckpt: str | None) -> Path:
    """--ckpt, else $MINIDB_CKPT, else the one checkpoint file in ./checkpoints/, else the shipped
    miniature-world model (minidb/data/world.safetensors)."""
    path = ckpt or os.environ.get("MINIDB_CKPT")
    if path:
        if Path(path).is_dir():
            raise MinidbError(f"{path} is a folder: pass the checkpoint file in it (.safetensors or .ckpt)")
        if not Path(path).is_file():
            raise MinidbError(f"checkpoint not found: {path}")
        return Path(path)
    folder = Path("checkpoints")
    found = sorted(p for p in folder.glob("*") if p.suffix in CHECKPOINT_SUFFIXES) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        raise MinidbError(f"{len(found)} checkpoints in {folder}/ ({', '.join(p.name for p in found)}): "
                          "choose one with --ckpt")
    # nothing of the user's: the shipped miniature-world model, said loudly so nobody takes it for SD
    world = Path(__file__).resolve().parent.parent / "data" / "world.safetensors"
    if not world.is_file():
        raise MinidbError("no checkpoint: pass --ckpt PATH, set MINIDB_CKPT=PATH, or put one SD v1 "
                          f".safetensors/.ckpt file in {folder.resolve()}/")
    print(f"no --ckpt, $MINIDB_CKPT or ./checkpoints/ file: using minidb's miniature-world model {world} "
          "(64x64 shapes, not Stable Diffusion)", file=sys.stderr)
    return world


def file_hash(path: Path) -> str:
    """The first 10 hex digits of the file's sha256 (A1111's "Model hash")."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:10]


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        lines = read_text(args.from_file).splitlines()  # UTF-8, an editor's BOM dropped
    except OSError as e:
        raise MinidbError(f"cannot read prompts from {args.from_file}: {e.strerror}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise MinidbError(f"no prompts in {args.from_file}")
    return prompts


def parse_lora(spec: str) -> tuple[Path, float]:
    """FILE[:SCALE] -> (file, scale); a colon that is part of the path (C:\\...) stays in it."""
    path, _, scale = spec.rpartition(":")
    try:
        value = float(scale) if path else None
    except ValueError:
        value = None
    if value is None:
        path, value = spec, 1.0
    if not math.isfinite(value):
        raise MinidbError(f"--lora {spec}: the scale must be a number")
    if not Path(path).is_file():
        raise MinidbError(f"--lora: LoRA file not found: {path}")
    return Path(path), value


def check_args(args):
    """Bad arguments fail here, before minutes of checkpoint loading (check_model_args: those that
    depend on the model, once its file's config is read)."""
    args.lora = [parse_lora(spec) for spec in args.lora]
    check(steps_problem("--steps", args.steps))  # the model's upper bound: check_model_args
    for name in ("H", "W"):
        size = getattr(args, name)
        if size is not None and (size <= 0 or size % 8):
            raise MinidbError(f"--{name} must be a positive multiple of 8, got {size}")
    if args.n_samples < 1 or args.n_iter < 1:
        raise MinidbError("--n-samples and --n-iter must be at least 1")
    check(guidance_problem("--scale", args.scale) if args.scale is not None else None,
          eta_problem("--eta", args.eta, args.sampler),
          seed_problem("--seed", args.seed) if args.seed is not None else None)
    outdir = Path(args.outdir)
    for folder in (outdir, outdir / "samples"):
        if folder.exists() and not folder.is_dir():
            raise MinidbError(f"--outdir: {folder} is a file, not a folder")


def check_model_args(args, config, device="cpu", dtype=torch.float32):
    """The arguments that depend on the model: the step count against its schedule, the image size
    (default: the model's own) against its downsampling and against the memory of the device."""
    from minidb.sampling import check_memory, check_size
    check(steps_problem("--steps", args.steps, config.timesteps))
    args.H = args.H or config.image_size
    args.W = args.W or config.image_size
    args.scale = config.guidance_or(args.scale)
    try:
        check_size(config, args.H, args.W)
        check_memory(config, args.H, args.W, args.n_samples, dtype.itemsize, args.scale != 1.0, device)
    except MinidbError as e:
        raise MinidbError(f"--H/--W: {e}") from None
    if args.lora:  # every check of a LoRA file against the model, on shapes only (meta device)
        from minidb.lora import load_lora, meta_models
        models = meta_models(config)
        for path, _ in args.lora:
            load_lora(path, models).detach()


def png_info(prompt, negative, seed, args, model_hash, ckpt_name) -> PngInfo:
    """A1111's "parameters" text (read by most SD tools) plus one entry per field."""
    sampler = SAMPLER_NAMES[args.sampler]
    settings = (f"Steps: {args.steps}, Sampler: {sampler}, CFG scale: {args.scale:g}, Seed: {seed}, "
                f"Size: {args.W}x{args.H}, Model hash: {model_hash}, Model: {ckpt_name}")
    if args.eta:
        settings += f", Eta: {args.eta:g}"
    info = PngInfo()
    info.add_text("parameters", "\n".join([prompt] + ([f"Negative prompt: {negative}"] if negative else [])
                                         + [settings]))
    fields = [("prompt", prompt), ("negative_prompt", negative), ("seed", seed), ("sampler", args.sampler),
              ("steps", args.steps), ("scale", f"{args.scale:g}"), ("eta", f"{args.eta:g}"),
              ("size", f"{args.W}x{args.H}"), ("checkpoint", ckpt_name), ("checkpoint_hash", model_hash)]
    if args.lora:
        fields.append(("loras", ", ".join(f"{path.name}:{scale:g}" for path, scale in args.lora)))
    for key, value in fields:
        info.add_text(key, str(value))
    return info


def _next_index(folder: Path, pattern: str) -> int:
    """Continue the numbering of earlier runs instead of overwriting them."""
    numbers = [int(p.stem.split("-")[-1]) for p in folder.glob(pattern) if p.stem.split("-")[-1].isdigit()]
    return max(numbers, default=-1) + 1


def run(args) -> int:
    check_args(args)
    device = str(choose_device(args.device))  # checked now: a missing GPU is one line, not a traceback
    prompts = read_prompts(args)
    ckpt = find_checkpoint(args.ckpt)

    from minidb.pipeline import StableDiffusion  # heavy imports only once the arguments are good
    from minidb.sampling import PromptTruncatedWarning, generate, image_grid, truncated_prompts
    from minidb.tokenizer import CLIPTokenizer
    dtype = getattr(torch, DTYPES[args.precision or default_precision(device)])
    check_model_args(args, StableDiffusion.inspect_checkpoint(ckpt), device, dtype)  # reads no tensor: fails in a second
    tokenizer = CLIPTokenizer()
    for p in truncated_prompts(tokenizer, prompts + [args.negative_prompt]):
        short = p if len(p) <= 60 else p[:57] + "..."
        print(f"warning: prompt truncated to CLIP's 77 tokens ({tokenizer.num_tokens(p) + 2} with start and end), "
              f"the rest is ignored: {short!r}", file=sys.stderr)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2 ** 31 - 1, ()).item())

    t0 = time.perf_counter()
    print(f"loading {ckpt} ({device}, {dtype}); images {args.W}x{args.H}", file=sys.stderr)
    sd = StableDiffusion.from_checkpoint(ckpt, device=device, dtype=dtype)
    for path, scale in args.lora:
        sd.load_lora(path, scale)
    model_hash = file_hash(ckpt)
    print(f"loaded in {time.perf_counter() - t0:.1f}s; seed {seed}", file=sys.stderr)

    outdir = Path(args.outdir)
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    index, grid_index = _next_index(samples, "*.png"), _next_index(outdir, "grid-*.png")
    image_seed = seed
    for prompt in prompts:
        rows, prompt_seed = [], image_seed
        for _ in range(args.n_iter):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PromptTruncatedWarning)  # said once, above
                images = generate(sd, [prompt] * args.n_samples, negative_prompts=args.negative_prompt or None,
                                  steps=args.steps, guidance=args.scale, eta=args.eta, sampler=args.sampler,
                                  height=args.H, width=args.W, seed=image_seed, progress=not args.no_progress)
            for image in images:
                info = png_info(prompt, args.negative_prompt, image_seed, args, model_hash, ckpt.name)
                with atomic_write(samples / f"{index:05}.png", hidden=True) as tmp:  # a full disk: no 0-byte PNG
                    image.save(tmp, format="PNG", pnginfo=info)
                index, image_seed = index + 1, image_seed + 1
            rows.append(images)
        grid_path = outdir / f"grid-{grid_index:04}.png"
        grid = image_grid([image for row in rows for image in row], args.n_samples)
        with atomic_write(grid_path, hidden=True) as tmp:
            grid.save(tmp, format="PNG", pnginfo=png_info(prompt, args.negative_prompt, prompt_seed, args, model_hash,
                                                          ckpt.name))
        grid_index += 1
        n = len(rows) * args.n_samples
        print(f"{n} image{'s' if n != 1 else ''} of {prompt[:60]!r} -> {samples}/, grid {grid_path}",
              file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
