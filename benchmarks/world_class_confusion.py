"""Which shape a world model draws for each class-only prompt ("a photo of a square"), per shape, on
diagnostic seeds that are neither the tuning prompts' (50000+) nor the evaluation's (0-259), at one or more
guidance scales (issue #27: the class prompts stay under the full captions; this shows which shapes they
lose, and whether the scale changes it):

    python -m benchmarks.world_class_confusion --model runs/R14_s1/model.safetensors --scales 1.5,2,3

Writes the confusion counts as JSON and, with --sheet, the first scale's samples as one row per shape (at x4,
nearest neighbour, and as drawn beside it), so that a reader can check the reads by eye. --guided LO,HI
guides only at timesteps LO..HI and takes the conditional prediction alone outside them, the limited
guidance interval of Kynkaenniemi et al. 2024 (arXiv 2404.07724: guidance at high noise exaggerates shapes,
at low noise it is largely unnecessary).
"""
import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch
from minidb.files import atomic_write_text
from minidb.pipeline import StableDiffusion
from minidb.world.metrics import class_prompts
from minidb.world.pretrain import SHIPPED, save_grid
from minidb.world.reader import Reader


class GuidedIn(torch.nn.Module):
    """A UNet wrapper for the guided batch [unconditional; conditional]: at timesteps outside lo..hi both
    halves get the conditional output, so that eps_u + g * (eps_c - eps_u) = eps_c there (no guidance)."""

    def __init__(self, unet, lo: int, hi: int):
        super().__init__()
        self.unet, self.lo, self.hi = unet, lo, hi

    def forward(self, x, t, context):
        out = self.unet(x, t, context)
        if not self.lo <= int(t[0]) <= self.hi:  # a batch shares one timestep
            cond = out.chunk(2)[1]
            out = torch.cat([cond, cond])
        return out


def guided_in(unet, interval, guidance: float):
    """The UNet to sample with: wrapped in GuidedIn when an interval is given and the scale guides (at 1 the
    samplers run the conditional batch alone, which has no halves to swap)."""
    return GuidedIn(unet, *interval) if interval and guidance != 1 else unet


def confusion(sd, reader, guidance: float, per_shape: int, seed: int, batch: int = 60):
    prompts, shapes = class_prompts(per_shape)
    images = []
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        images += sd.generate(prompts[i:j], steps=20, guidance=guidance, height=sd.config.image_size,
                              width=sd.config.image_size, seed=list(range(seed + i, seed + j)), progress=False)
    reads = reader.read_all(images)
    counts = collections.defaultdict(collections.Counter)
    for r, s in zip(reads, shapes):
        counts[s][r["shape"]] += 1
    share = float(np.mean([r["shape"] == s for r, s in zip(reads, shapes)]))
    return share, {s: dict(c) for s, c in counts.items()}, images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHIPPED))
    p.add_argument("--scales", default="1.5")
    p.add_argument("--per-shape", type=int, default=20)
    p.add_argument("--seed", type=int, default=70000)
    p.add_argument("--out", default="benchmarks/world_class_confusion.json")
    p.add_argument("--sheet", default="", help="a PNG of the first scale's samples, one row per shape")
    p.add_argument("--guided", default="", metavar="LO,HI",
                   help="guide only at timesteps LO..HI, e.g. 0,550 (default: at every timestep, as the samplers do)")
    args = p.parse_args(argv)
    try:
        scales = [float(x) for x in args.scales.split(",")]
    except ValueError:
        p.error(f"--scales: comma-separated numbers, e.g. 1.5,2,3; got {args.scales!r}")
    if args.per_shape < 1:
        p.error(f"--per-shape must be at least 1, got {args.per_shape}")
    interval = None
    if args.guided:
        try:
            interval = [int(x) for x in args.guided.split(",")]
        except ValueError:
            interval = []
        if len(interval) != 2 or not 0 <= interval[0] <= interval[1]:
            p.error(f"--guided: two timesteps LO,HI with 0 <= LO <= HI, e.g. 0,550; got {args.guided!r}")
    sd = StableDiffusion.from_checkpoint(args.model)
    unet = sd.unet
    reader = Reader.load()
    rows = []
    for k, g in enumerate(scales):
        sd.unet = guided_in(unet, interval, g)
        share, counts, images = confusion(sd, reader, g, args.per_shape, args.seed)
        rows.append({"guidance": g, "class_shape": round(share, 4), "read_as": counts})
        print(f"guidance {g:g}: class prompts read as the named shape {100 * share:.1f}%", flush=True)
        for s, c in counts.items():
            print(f"  {s}: {c}", flush=True)
        if k == 0 and args.sheet:
            save_grid(images, args.per_shape, Path(args.sheet))
    atomic_write_text(args.out, json.dumps({"model": args.model, "per_shape": args.per_shape, "seed": args.seed,
                                            "steps": 20, "guided": interval, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
