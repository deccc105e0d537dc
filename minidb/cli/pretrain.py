"""`python -m minidb.world.pretrain`: pretrain the miniature world's model (minidb.world.pretrain, whose docstring
gives the recipe). Every PretrainConfig field is a flag of its own (--unet-steps 7000)."""
import argparse
import dataclasses
import sys
from pathlib import Path

from minidb.errors import MinidbError


def main(argv=None) -> None:
    import torch

    from minidb.world.pretrain import SHIPPED, PretrainConfig, pretrain, sample_sheet
    p = argparse.ArgumentParser(prog="python -m minidb.world.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/world", help="run folder (default runs/world)")
    p.add_argument("--ship", action="store_true", help="copy the model to minidb/data/world.safetensors")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="where it computes: cpu (default), cuda, ... (the run is the same)")
    p.add_argument("--sheet", metavar="PNG", help="only draw the shipped model's sample sheet (README) to PNG")
    for f in dataclasses.fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sheet:
        from minidb.pipeline import StableDiffusion
        print(sample_sheet(StableDiffusion.from_checkpoint(SHIPPED), Path(args.sheet)))
        return
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    try:
        from minidb.device import choose_device
        pretrain(args.out, cfg, args.ship, choose_device(args.device))
    except MinidbError as e:  # bad input: one line and status 2, as minidb's commands say it
        print(f"python -m minidb.world.pretrain: error: {e}", file=sys.stderr)
        sys.exit(2)
