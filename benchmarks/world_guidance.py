"""Prompt fidelity of a world model against the guidance scale, on the tuning prompts only
(minidb.world.pretrain.tuning_prompts: 48 held-out full captions and 4 class prompts per shape, seeds
50000+), never the evaluation's: how the world model's own scale (config.guidance) is chosen.

    python -m benchmarks.world_guidance --model minidb/data/world.safetensors --scales 1,1.5,2,3,5,7.5,9
"""
import argparse
import json

from minidb.files import atomic_write_text
from minidb.pipeline import StableDiffusion
from minidb.world.pretrain import SHIPPED, fidelity_probe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHIPPED))
    p.add_argument("--scales", default="1,1.5,2,3,5,7.5,9")
    p.add_argument("--out", default="benchmarks/world_guidance.json")
    args = p.parse_args(argv)
    sd = StableDiffusion.from_checkpoint(args.model)
    weights = {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in sd.models[n].state_dict().items()}
    out = {}
    for g in (float(x) for x in args.scales.split(",")):
        out[g] = fidelity_probe(sd, weights, guidance=g)
        print(f"guidance {g:g}: {out[g]}", flush=True)
    atomic_write_text(args.out, json.dumps({"model": args.model, "by_guidance": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
