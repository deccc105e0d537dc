"""Does prior preservation train on what the base model drew? Its class images are the model's samples
decoded to pixels, saved as 8-bit PNGs and encoded again by the VAE (the latent cache): a round trip
the sampled latents never made. This reads "a photo of a star" three ways, on the same seeds (issue #27):

    python -m benchmarks.class_round_trip [--model F] [--samples 160] [--seed 9000] [--guidance 1.5]

- sampled:    the sampler's latents, decoded (what `minidb sample` shows);
- round trip: those images encoded (the posterior's mean, as the cache stores it) and decoded again;
- twice:      the round trip of the round trip.
A share that falls along the row is what training on the class images teaches the model to draw.
"""
import argparse
import json

import numpy as np
import torch

from minidb.pipeline import StableDiffusion
from minidb.sampling import decode, sample_latents
from minidb.world.demo import CLASS_PROMPTS
from minidb.world.pretrain import SHIPPED
from minidb.world.reader import Reader


@torch.no_grad()
def round_trip(sd, images):
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    z = sd.vae.encode(pixels.to(sd.device)).mean * sd.config.scale_factor
    return decode(sd, z)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHIPPED))
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--seed", type=int, default=9000, help="seed of sample 0 (default 9000: no demo, tuning or eval seed)")
    p.add_argument("--guidance", type=float, action="append", help="repeatable (default: the model's own)")
    args = p.parse_args(argv)
    sd = StableDiffusion.from_checkpoint(args.model)
    reader = Reader.load()
    size = sd.config.image_size
    out = {}
    for g in args.guidance or [sd.config.guidance]:
        z = torch.cat([sample_latents(sd, [CLASS_PROMPTS[0]] * min(32, args.samples - s), steps=20, guidance=g,
                                      height=size, width=size, seed=list(range(args.seed + s, args.seed + min(s + 32, args.samples))),
                                      progress=False) for s in range(0, args.samples, 32)])
        stages = {"sampled": decode(sd, z)}
        stages["round trip"] = round_trip(sd, stages["sampled"])
        stages["twice"] = round_trip(sd, stages["round trip"])
        out[f"guidance {g:g}"] = {k: sum(r["shape"] == "star" for r in reader.read_all(v)) / len(v) for k, v in stages.items()}
        print(f"guidance {g:g}:", json.dumps(out[f"guidance {g:g}"]), flush=True)
    return out


if __name__ == "__main__":
    main()
