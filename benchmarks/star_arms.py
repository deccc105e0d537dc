"""A second, geometric reader for one question: is the drawn shape a five-pointed star? It counts the
shape's points, and shares nothing with minidb.world.reader's network but the segmentation, so that a
star drawn unlike the renders the network learnt from (thinner, longer arms after DreamBooth) is still
counted by its points (issue #27: the class prior after DreamBooth).

    python -m benchmarks.star_arms --model /tmp/w/demo/run/model.safetensors --write

The count: the image upsampled 4x (bicubic), segmented as the reader segments (background from the
border, minidb.world.reader.segment), its largest connected region kept; the region's radius from its
centroid in 72 angle bins (the farthest pixel in each), smoothed over 3 bins and divided by its
maximum; a point is a local maximum that rises at least PROMINENCE above the lowest radius on each
side before a higher maximum. A star has five points (tip 1, notch 0.45 of the circumradius in the
world's renderer), a triangle three, a square four, a circle and a ring none.
Checked first on renders and their VAE round trips (which shape is a star: accuracy), then applied
to "a photo of a star" samples of the world model and of a DreamBooth model, beside the network reader.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

BINS, PROMINENCE, UPSAMPLE = 72, 0.2, 4
RESULT = Path(__file__).with_name("star_arms.json")


def points(image: Image.Image) -> int:
    """How many points the largest drawn region has (0 for nothing drawn)."""
    from minidb.world.reader import largest_component, segment
    big = image.convert("RGB").resize((image.width * UPSAMPLE, image.height * UPSAMPLE), Image.BICUBIC)
    _, mask = segment(big)
    if mask.sum() < 4 * UPSAMPLE ** 2:
        return 0
    mask = largest_component(mask)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    angle = np.arctan2(ys - cy, xs - cx)
    radius = np.hypot(ys - cy, xs - cx)
    index = ((angle + np.pi) / (2 * np.pi) * BINS).astype(int) % BINS
    r = np.zeros(BINS)
    np.maximum.at(r, index, radius)
    r = (np.roll(r, 1) + r + np.roll(r, -1)) / 3  # circular smoothing
    r = r / r.max()
    count = 0
    for i in range(BINS):
        if r[i] < r[i - 1] or r[i] < r[(i + 1) % BINS] or (r[i] == r[i - 1] and i > 0):
            continue  # not a maximum (a plateau counts once, at its first bin)
        # walk each way until a higher point: the lowest radius passed on each side
        lows = []
        for step in (1, -1):
            low, j = r[i], i
            for _ in range(BINS - 1):
                j = (j + step) % BINS
                if r[j] > r[i]:
                    break
                low = min(low, r[j])
            lows.append(low)
        if r[i] - max(lows) >= PROMINENCE:
            count += 1
    return count


def is_star(image: Image.Image) -> bool:
    return points(image) == 5


def render_check(n: int = 600, seed: int = 4321) -> dict:
    """Star-or-not accuracy of the point count on fresh renders (the world's own rotation, every
    shape equally often) and on the shipped VAE's round trips of them."""
    from minidb.world import SHAPES, Attributes, COLORS, SIZES, POSITIONS, BACKGROUNDS, render
    from minidb.world.reader_training import decoded, world_vae
    rng = np.random.default_rng(seed)
    attrs = [Attributes(SHAPES[i % len(SHAPES)], *(str(rng.choice(list(v))) for v in (COLORS, SIZES, POSITIONS, BACKGROUNDS)))
             for i in range(n)]
    images = [render(a, seed=int(rng.integers(1 << 30))) for a in attrs]
    truth = np.array([a.shape == "star" for a in attrs])
    out = {}
    for name, imgs in (("renders", images), ("vae_round_trips", decoded(images, world_vae()))):
        got = np.array([is_star(im) for im in imgs])
        out[name] = {"accuracy": float((got == truth).mean()), "stars_found": float(got[truth].mean()),
                     "others_called_star": float(got[~truth].mean())}
    return out


def class_samples(path, n: int = 160, seed: int = 7000) -> list:
    import torch
    from minidb.pipeline import StableDiffusion
    sd = StableDiffusion.from_checkpoint(path)
    images = []
    with torch.no_grad():
        for s in range(0, n, 40):
            images += sd.generate(["a photo of a star"] * min(40, n - s), steps=20, guidance=None, height=64,
                                  width=64, seed=seed + s, progress=False)
    return images


def main(argv=None) -> int:
    from minidb.world.pretrain import SHIPPED, save_grid
    from minidb.world.reader import Reader
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="a DreamBooth model of the world (repeatable)")
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--seed", type=int, default=7000, help="sampling seed of image 0 (the demo's own are 1000+)")
    p.add_argument("--grid", help="PNG: the samples the network reader calls no star, of the first --model")
    p.add_argument("--write", action="store_true", help=f"write {RESULT.name}")
    args = p.parse_args(argv)
    reader = Reader.load()
    result = {"renders": render_check(), "samples": args.samples, "seed": args.seed, "prompt": "a photo of a star",
              "models": {}}
    print(json.dumps(result["renders"]))
    for path in [str(SHIPPED), *args.model]:
        images = class_samples(path, args.samples, args.seed)
        net = [r["shape"] == "star" for r in reader.read_all(images)]
        geo = [is_star(im) for im in images]
        row = {"network_reader": float(np.mean(net)), "point_count": float(np.mean(geo)),
               "either": float(np.mean([a or b for a, b in zip(net, geo)])),
               "network_no_but_five_points": int(sum(g and not n_ for n_, g in zip(net, geo)))}
        result["models"][Path(path).name if path == str(SHIPPED) else path] = row
        print(path, json.dumps(row), flush=True)
        if args.grid and args.model and path == args.model[0]:
            save_grid([im for im, n_ in zip(images, net) if not n_], 8, Path(args.grid), scale=2)
    if args.write:
        from minidb.files import atomic_write_text
        atomic_write_text(RESULT, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
