"""See inside one sample: the denoising trajectory, a heat map per word, the guidance (see minidb.explain).

    minidb explain --prompt "a photo of a red star on a blue background, top left"
    minidb explain --prompt "a photo of sks star" --compare demo/run/model.safetensors --out dreambooth.png
    minidb explain --prompt "a photo of sks star" --lora runs/star/lora.safetensors

Writes OUT (default explain.png), one sheet with every picture labelled, and OUT with .json for
its suffix (the numbers: per word its mean attention per UNet level and its heat map, per step the
noise level). Without --ckpt: the shipped miniature-world model (minidb/data/world.safetensors).
--compare CKPT and --lora FILE[:SCALE] put the same prompt and seed through a second model (CKPT,
or the first with the LoRA applied) and draw the two sheets side by side.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from minidb.errors import MinidbError
from minidb.config import SAMPLER_NAMES, check, guidance_problem, seed_problem, steps_problem
from minidb.files import atomic_write, atomic_write_text


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--prompt", required=True, help="the prompt to look inside")
    p.add_argument("--ckpt", help="model file (default: the shipped miniature-world model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own, stored in its file by minidb)")
    p.add_argument("--sampler", choices=list(SAMPLER_NAMES), default="ddim", help="default ddim")
    p.add_argument("--out", default="explain.png", help="the sheet (default explain.png); the JSON beside it")
    p.add_argument("--compare", metavar="CKPT", help="a second model, side by side (e.g. after DreamBooth)")
    p.add_argument("--lora", metavar="FILE[:SCALE]", help="the first model with this LoRA applied, side by side")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_args(args):
    """Bad input fails here in one line, before any model is loaded."""
    from minidb.cli.sample import parse_lora
    if not args.prompt.strip():
        raise MinidbError("--prompt is empty: give the words whose maps to draw")
    for name in ("ckpt", "compare"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise MinidbError(f"--{name}: {'a folder, not a model file' if Path(path).is_dir() else 'not found'}: {path}")
    check(steps_problem("--steps", args.steps),
          guidance_problem("--scale", args.scale) if args.scale is not None else None,
          seed_problem("--seed", args.seed))
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise MinidbError(f"--out must name a .png file, got {args.out}")
    if out.is_dir() or not out.parent.is_dir():
        raise MinidbError(f"--out: {'a folder' if out.is_dir() else f'no folder {out.parent}'}: {args.out}")
    args.lora = parse_lora(args.lora) if args.lora else None


def run(args) -> int:
    check_args(args)
    from minidb.explain import WORLD, explain, side_by_side, sheet
    from minidb.pipeline import StableDiffusion
    t0 = time.perf_counter()
    ckpt = Path(args.ckpt) if args.ckpt else WORLD
    sd = StableDiffusion.from_checkpoint(ckpt)
    check(steps_problem("--steps", args.steps, sd.config.timesteps))
    kwargs = dict(seed=args.seed, steps=args.steps, scale=args.scale, sampler=args.sampler,
                  progress=not args.no_progress)
    explanations = [explain(sd, args.prompt, model=ckpt.name, **kwargs)]
    if args.compare or args.lora:
        other = StableDiffusion.from_checkpoint(args.compare) if args.compare else sd
        name = Path(args.compare).name if args.compare else ckpt.name
        if args.lora:
            other.load_lora(*args.lora)
            name += f" + LoRA {args.lora[0].name}:{args.lora[1]:g}"
        explanations.append(explain(other, args.prompt, model=name, **kwargs))
    sheets = [sheet(ex) for ex in explanations]
    picture = sheets[0] if len(sheets) == 1 else side_by_side(
        *sheets, (f"A: {explanations[0].settings['model']}", f"B: {explanations[1].settings['model']}"))
    out = Path(args.out)
    with atomic_write(out, hidden=True) as tmp:
        picture.save(tmp, format="PNG")
    summary = [ex.summary() for ex in explanations]
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary[0] if len(summary) == 1 else
                                                           {"A": summary[0], "B": summary[1]}))
    print(f"{out} and {out.with_suffix('.json')} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
