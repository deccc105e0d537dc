"""Measure a miniature-world model from its images: prompt fidelity per attribute (minidb.world.metrics).

    minidb eval                                   # the shipped world model, 200 held-out prompts
    minidb eval --model runs/world/model.safetensors --scale 7.5 --scale 1 --untrained
    minidb eval --reader-accuracy                 # how well the attribute reader reads fresh renders

Prompts are full captions of attribute combinations that pretraining never drew ("held out"),
then class-only prompts ("a photo of a star", --per-shape of each shape). Image i uses seed + i.
Prints a table and writes it as JSON (--out).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from minidb.config import check, guidance_problem, steps_problem
from minidb.errors import MinidbError
from minidb.files import atomic_write_text


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", help="a miniature-world checkpoint (default: the shipped one)")
    p.add_argument("--images", type=int, default=200, help="held-out prompts, one image each (default 200)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--scale", type=float, action="append", help="guidance scale, repeatable (default: the model's own, stored in its file)")
    p.add_argument("--per-shape", type=int, default=10,
                   help='class-only prompts ("a photo of a star") per shape, one image each (default 10; 0: none)')
    p.add_argument("--untrained", action="store_true", help="add a row for the same architecture, untrained")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0 (default 0)")
    p.add_argument("--out", default="outputs/eval.json", help="JSON results (default outputs/eval.json)")
    p.add_argument("--grid", help="also save the first 32 images of the first row as a grid PNG")
    p.add_argument("--device", default="cpu", help="where it samples: cpu (default), cuda, ...")
    p.add_argument("--reader-accuracy", action="store_true", help="only measure the attribute reader on renders")


def run(args) -> int:
    if args.images < 1 or args.per_shape < 0:
        raise MinidbError("--images must be >= 1 and --per-shape >= 0")
    check(steps_problem("--steps", args.steps), *(guidance_problem("--scale", s) for s in args.scale or []))
    import torch

    from minidb.world.metrics import evaluate_model, format_table
    from minidb.world.reader import Reader
    from minidb.world.reader_training import reader_accuracy
    from minidb.pipeline import StableDiffusion
    from minidb.world.pretrain import SHIPPED, save_grid
    reader = Reader.load()
    if args.reader_accuracy:
        acc = reader_accuracy(reader)
        print("\n".join(f"{k}: {100 * v:.1f}%" for k, v in acc.items()))
        return 0
    path = Path(args.model) if args.model else SHIPPED
    if not path.is_file():
        raise MinidbError(f"--model {path}: no such file")
    from minidb.device import choose_device
    sd = StableDiffusion.from_checkpoint(path, device=choose_device(args.device))
    if sd.config.image_size != 64:
        print(f"warning: {path} is not a miniature-world model (image size {sd.config.image_size}); its images "
              "will not read as the world's shapes", file=sys.stderr)
    scales = args.scale or [sd.config.guidance]
    runs = [(f"{path.name}, guidance {s:g}", sd, s) for s in scales]
    if args.untrained:
        torch.manual_seed(args.seed)
        untrained = StableDiffusion(sd.config).to(sd.device)
        untrained.vae.load_state_dict(sd.vae.state_dict())  # the same decoder: only the denoiser is untrained
        runs.append((f"untrained UNet + text encoder, guidance {scales[0]:g}", untrained, scales[0]))
    rows, results = {}, []
    for i, (name, model, scale) in enumerate(runs):
        t0 = time.perf_counter()
        r = evaluate_model(model, args.images, args.steps, scale, args.seed, reader, per_shape=args.per_shape)
        rows[name] = r["fidelity"]
        results.append({"model": name, "guidance": scale, "fidelity": r["fidelity"],
                        "seconds": round(time.perf_counter() - t0, 1)})
        if i == 0 and args.grid:
            save_grid(r["images"][:32], 8, Path(args.grid))
    print(format_table(rows))
    out = atomic_write_text(args.out, json.dumps({"images": args.images, "steps": args.steps, "seed": args.seed,
                                                  "sampler": "ddim", "prompts": "held-out full captions",
                                                  "class_prompts_per_shape": args.per_shape,
                                                  "rows": results}, indent=1))
    print(f"written to {out}", file=sys.stderr)
    return 0


def reader_main(argv=None) -> int:
    """`python -m minidb.world.eval`: train the world's reader, or measure it (minidb.world.reader_training)."""
    p = argparse.ArgumentParser(prog="python -m minidb.world.eval", description="Train or measure the world's reader.")
    p.add_argument("--train-reader", action="store_true", help="train the reader and write it to minidb/data")
    p.add_argument("--reader-accuracy", action="store_true", help="the reader's accuracy on fresh renders")
    args = p.parse_args(argv)
    from minidb.world.reader import Reader
    from minidb.world.reader_training import reader_accuracy, train_reader, world_vae
    if args.train_reader:
        t0 = time.time()
        path = train_reader(vae=world_vae())
        print(f"reader trained in {time.time() - t0:.0f} s: {path}", file=sys.stderr)
    if args.reader_accuracy or args.train_reader:
        print(json.dumps(reader_accuracy(Reader.load(), vae=world_vae()), indent=1))
    return 0
