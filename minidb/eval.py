"""Measure generated images of the miniature world from their pixels: what they show, how well
they follow their prompts, and how alike they are.

    reader = Reader.load()                        # the shipped shape/pattern network
    reader.read(image)      # {"shape": "star", "color": "red", "size": "small", "position": ..., "background": ...}
    reader.embed(images)    # [n, 128] L2-normalised features: the world's analog of DINO / CLIP-I
    prompt_fidelity(reader.read_all(images), attributes)   # share of images right, per attribute

    minidb eval --model M.safetensors --images 200 --out eval.json

Background, color, position and size are measured, not learned: the background is the median
of the border pixels (nearest named background), the shape is every pixel far from it (its
median color, nearest named color), the position is the nearest named centre to the blob's
centroid, and the size compares the blob's circumradius, sqrt(area / (pi * the shape's share
of its circumcircle)), with the midpoint of the two named sizes. The shape and the pattern
are read by a small CNN trained on rendered images, half of them as the shipped world model's VAE
reconstructs them (`python -m minidb.eval --train-reader`),
whose input is the blob cut out, centred and scaled to a fixed size: so it never sees the
position, size or background, and its penultimate layer describes the object alone.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from minidb.files import atomic_write
from minidb.world import (ATTRIBUTES, BACKGROUNDS, COLORS, PATTERNS, POSITIONS, SHAPES, SIZE, SIZES, Attributes,
                          caption, combinations, outline, render, world_seed)

READER = Path(__file__).parent / "data" / "world_reader.safetensors"
CROP = 32                   # the reader's input: the blob, centred, its circumradius CROP * 0.4
FOREGROUND = 50.0           # RGB distance from the background beyond which a pixel is the shape's


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# each shape's area as a share of its circumcircle's (the ring's hole subtracted)
AREA_SHARE = {s: (sum(_polygon_area(p) * (-1 if i else 1) for i, p in enumerate(outline(s)))) / math.pi
              for s in SHAPES}
SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"]) * SIZE  # circumradius in pixels between the sizes


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    return names[int(np.argmin([np.linalg.norm(rgb - np.array(palette[n], np.float32)) for n in names]))]


def segment(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(background RGB, foreground mask [H, W] bool) of an image."""
    x = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    return bg, np.linalg.norm(x - bg, axis=-1) > FOREGROUND


def measure(image: Image.Image) -> dict:
    """Background, color, position and the blob's centre, area and pixels, from the pixels alone."""
    x = np.asarray(image.convert("RGB"), np.float32)
    bg, mask = segment(image)
    out = {"background": _nearest(bg, BACKGROUNDS), "mask": mask, "area": int(mask.sum())}
    if out["area"] == 0:  # nothing drawn: every other attribute is wrong by definition
        out.update(color=None, position=None, centre=(SIZE / 2, SIZE / 2))
        return out
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    h, w = mask.shape
    dist = np.linalg.norm(x - bg, axis=-1)
    core = mask & (dist >= np.percentile(dist[mask], 50))  # edge pixels are mixed with the background
    out["color"] = _nearest(np.median(x[core], axis=0), COLORS)
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * w - cx) ** 2 + (POSITIONS[p][1] * h - cy) ** 2)
    out["centre"] = (cx, cy)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a [H, W] bool mask (each pixel takes the largest index
    among its neighbours until nothing changes; then the most common index wins)."""
    keep = torch.from_numpy(mask)
    labels = torch.where(keep, torch.arange(1, keep.numel() + 1, dtype=torch.float32).view(keep.shape), 0.0)
    while True:
        grown = torch.where(keep, F.max_pool2d(labels[None], 3, stride=1, padding=1)[0], 0.0)
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = torch.bincount(labels.long().flatten())
    counts[0] = 0
    return (labels == counts.argmax()).numpy()


def crop(image: Image.Image, m: dict | None = None) -> torch.Tensor:
    """The reader's input [3, CROP, CROP]: the blob (the mask's largest connected region) centred,
    scaled so that its circumradius is 0.4 CROP, everything else replaced by 0 (the mid-grey of
    [-1, 1]). A VAE round trip leaves stray pixels past the threshold far from the shape; counted
    in, one of them would set the radius and shrink the shape to a few pixels."""
    m = m or measure(image)
    if m["area"] == 0:
        return torch.zeros(3, CROP, CROP)
    blob = largest_component(m["mask"])
    x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    x = x * torch.from_numpy(blob).float()  # [3, H, W], background 0
    ys, xs = np.nonzero(blob)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    radius = max(2.0, float(np.sqrt(((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).max())))
    h, w = blob.shape
    scale = radius / (0.4 * CROP)  # source pixels per crop pixel
    # affine_grid maps crop coordinates in [-1, 1] to source coordinates in [-1, 1]
    theta = torch.tensor([[scale * CROP / w, 0, 2 * cx / w - 1], [0, scale * CROP / h, 2 * cy / h - 1]],
                         dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 3, CROP, CROP], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


class ReaderNet(nn.Module):
    """A small CNN on the centred blob: shape, pattern and the two colors; its 128 penultimate
    features are the embedding."""

    def __init__(self, width: int = 16):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1, stride=2), nn.GELU(),  # 16
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2), nn.GELU(),  # 8
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.GELU(), nn.Conv2d(4 * c, 4 * c, 3, padding=1, stride=2), nn.GELU(),  # 4
            nn.Flatten(), nn.Linear(4 * c * 16, 128))
        self.heads = nn.ModuleDict({"shape": nn.Linear(128, len(SHAPES)), "pattern": nn.Linear(128, len(PATTERNS)),
                                    "color": nn.Linear(128, len(COLORS)), "color2": nn.Linear(128, len(COLORS) + 1)})

    def forward(self, x):  # [B, 3, CROP, CROP] -> features [B, 128], {head: logits}
        f = self.features(x)
        h = F.gelu(f)
        return f, {name: head(h) for name, head in self.heads.items()}


class Reader:
    """Reads attributes from images and embeds them (see the module docstring)."""

    def __init__(self, net: ReaderNet):
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def load(cls, path=READER) -> "Reader":
        from safetensors.torch import load_file
        net = ReaderNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.no_grad()
    def _run(self, images):
        ms = [measure(im) for im in images]
        x = torch.stack([crop(im, m) for im, m in zip(images, ms)])
        features, logits = self.net(x)
        return ms, features, logits

    def read(self, image: Image.Image) -> dict:
        return self.read_all([image])[0]

    def read_all(self, images) -> list[dict]:
        """Per image {"shape", "color", "size", "position", "background", "pattern"}."""
        out = []
        for start in range(0, len(images), 256):
            ms, _, logits = self._run(images[start:start + 256])
            shapes = [SHAPES[i] for i in logits["shape"].argmax(1).tolist()]
            patterns = [PATTERNS[i] for i in logits["pattern"].argmax(1).tolist()]
            for m, shape, pattern in zip(ms, shapes, patterns):
                r = math.sqrt(m["area"] / (math.pi * AREA_SHARE[shape]))
                out.append({"shape": shape if m["area"] else None, "color": m["color"],
                            "size": ("large" if r > SIZE_SPLIT else "small") if m["area"] else None,
                            "position": m["position"], "background": m["background"],
                            "pattern": pattern if m["area"] else None})
        return out

    def embed(self, images) -> torch.Tensor:
        """[n, 128] unit vectors; cosine similarity = dot product."""
        feats = [self._run(images[s:s + 256])[1] for s in range(0, len(images), 256)]
        return F.normalize(torch.cat(feats), dim=1)


def prompt_fidelity(reads: list[dict], wanted: list[Attributes], keep=ATTRIBUTES) -> dict:
    """Share of images whose read attribute equals the prompt's, for each attribute in keep,
    and "all" for images right in every one of them."""
    result = {name: float(np.mean([r[name] == getattr(a, name) for r, a in zip(reads, wanted)])) for name in keep}
    result["all"] = float(np.mean([all(r[n] == getattr(a, n) for n in keep) for r, a in zip(reads, wanted)]))
    return result


# ---- training the reader -----------------------------------------------------------------------

def random_attributes(rng: np.random.Generator, patterned: float = 0.5) -> Attributes:
    def pick(options):
        return str(options[int(rng.integers(len(options)))])
    shape, size, position, color = pick(SHAPES), pick(list(SIZES)), pick(list(POSITIONS)), pick(list(COLORS))
    background = pick([b for b in BACKGROUNDS if b != color])
    if rng.random() < patterned:
        pattern, color2 = pick(PATTERNS[1:]), pick([c for c in COLORS if c != color])
        return Attributes(shape, color, size, position, background, pattern, color2)
    return Attributes(shape, color, size, position, background)


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur and noise of the kind a small diffusion model's decoder leaves, so the reader is not
    thrown by them."""
    from PIL import ImageFilter
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    x = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 8), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def decoded(images, vae, batch: int = 100) -> list:
    """Images after a round trip through a VAE (encode to the posterior mean, decode): the edges,
    halos and colour shifts every generated image of that model carries."""
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"), np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                             for im in images[s:s + batch]])
            y = vae.decode(vae.encode(x).mode())  # [B, 3, H, W] in [-1, 1]
            y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            out += [Image.fromarray(a) for a in y]
    return out


def world_vae():
    """The shipped world model's VAE (the decoder whose output the reader must read)."""
    from minidb.pipeline import StableDiffusion
    from minidb.pretrain import SHIPPED
    return StableDiffusion.from_checkpoint(SHIPPED).vae


def rendered_set(n: int, seed: int, degrade: bool = True, vae=None):
    """n random renders (half of them patterned) with their attributes. With a vae, every other
    image is that VAE's reconstruction of its render instead of a blurred one."""
    rng = np.random.default_rng(world_seed("reader-set", seed))
    attrs = [random_attributes(rng) for _ in range(n)]
    images = [render(a, seed=world_seed("reader-image", seed, i)) for i, a in enumerate(attrs)]
    if vae is not None:
        images[1::2] = decoded(images[1::2], vae)
    if degrade:
        images = [_degrade(im, rng) if vae is None or i % 2 == 0 else im for i, im in enumerate(images)]
    return images, attrs


def train_reader(out=READER, n: int = 10000, steps: int = 2000, batch: int = 64, seed: int = 0, vae=None) -> Path:
    """Train the reader on n renders, half of them blurred and noised, half (with a vae: the
    shipped world model's) passed through the VAE, as every generated image is. No flips: the
    shapes are not all mirror-symmetric."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    images, attrs = rendered_set(n, seed, vae=vae)
    x = torch.stack([crop(im) for im in tqdm(images, desc="cropping", leave=False)])
    targets = {"shape": [SHAPES.index(a.shape) for a in attrs], "pattern": [PATTERNS.index(a.pattern) for a in attrs],
               "color": [list(COLORS).index(a.color) for a in attrs],
               "color2": [list(COLORS).index(a.color2) if a.color2 else len(COLORS) for a in attrs]}
    targets = {k: torch.tensor(v) for k, v in targets.items()}
    net = ReaderNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="training the reader")
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        _, logits = net(x[idx])
        loss = sum(F.cross_entropy(logits[k], targets[k][idx]) for k in logits)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    with atomic_write(out) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    return Path(out)


def reader_accuracy(reader: Reader, n: int = 600, seed: int = 12345, vae=None) -> dict:
    """Accuracy per attribute on fresh renders (a seed never used in training), solid ones; the
    pattern on patterned renders; with a vae, also every attribute on that VAE's reconstructions
    of the solid renders ("decoded": the images a model of that VAE can at best draw)."""
    rng = np.random.default_rng(world_seed("reader-accuracy", seed))
    attrs = [random_attributes(rng, patterned=0.0) for _ in range(n)]
    clean = [render(a, seed=world_seed("reader-accuracy-image", seed, i)) for i, a in enumerate(attrs)]
    images = [_degrade(im, rng) for im in clean]
    acc = prompt_fidelity(reader.read_all(images), attrs)
    patterned = [random_attributes(rng, patterned=1.0) for _ in range(n // 3)]
    images = [render(a, seed=world_seed("reader-accuracy-pattern", seed, i)) for i, a in enumerate(patterned)]
    acc["pattern"] = float(np.mean([r["pattern"] == a.pattern for r, a in zip(reader.read_all(images), patterned)]))
    if vae is not None:
        acc["decoded"] = prompt_fidelity(reader.read_all(decoded(clean, vae)), attrs)
    return acc


# ---- evaluating a model --------------------------------------------------------------------------

def held_out_prompts(n: int, seed: int = 0) -> list[Attributes]:
    """n combinations never drawn in pretraining (cycling through them in a seeded order)."""
    held = combinations(held=True)
    order = np.random.default_rng(world_seed("eval-order", seed)).permutation(len(held))
    return [held[order[i % len(held)]] for i in range(n)]


def class_prompts(per_shape: int) -> tuple[list[str], list[str]]:
    """("a photo of a star", ...) per_shape times for each shape, and the shape each one names."""
    shapes = [s for s in SHAPES for _ in range(per_shape)]
    return [caption(Attributes(s, "red"), keep=("shape",)) for s in shapes], shapes


def evaluate_model(sd, n: int = 200, steps: int = 20, guidance: float = 7.5, seed: int = 0, reader=None,
                   batch: int = 50, progress: bool = True, per_shape: int = 0) -> dict:
    """Prompt fidelity of `sd` on n held-out full captions (image i: seed + i) and, with
    per_shape, the share of class-only prompts ("a photo of a star") read as the named shape
    ("class_shape"; image j of those: seed + n + j)."""
    from tqdm.auto import tqdm
    reader = reader or Reader.load()
    wanted = held_out_prompts(n, seed)
    classes, shapes = class_prompts(per_shape)
    prompts = [caption(a) for a in wanted] + classes
    images = []
    size = sd.config.image_size
    for s in tqdm(range(0, len(prompts), batch), desc=f"sampling (guidance {guidance:g})", disable=not progress,
                  leave=False):
        images += sd.generate(prompts[s:s + batch], steps=steps, guidance=guidance, height=size, width=size,
                              seed=seed + s, progress=False)
    reads = reader.read_all(images)
    fidelity = prompt_fidelity(reads[:n], wanted)
    if per_shape:
        fidelity["class_shape"] = float(np.mean([r["shape"] == s for r, s in zip(reads[n:], shapes)]))
    return {"fidelity": fidelity, "images": images[:n], "prompts": prompts[:n], "class_images": images[n:]}


def format_table(rows: dict) -> str:
    cols = list(ATTRIBUTES) + ["all"] + (["class_shape"] if any("class_shape" in f for f in rows.values()) else [])
    head = [c if c != "class_shape" else "class prompts: shape" for c in cols]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for name, f in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * f[c]:.1f}%" if c in f else "" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidb.eval", description=__doc__.splitlines()[0])
    p.add_argument("--train-reader", action="store_true", help="train the reader and write it to minidb/data")
    p.add_argument("--reader-accuracy", action="store_true", help="the reader's accuracy on fresh renders")
    args = p.parse_args(argv)
    if args.train_reader:
        t0 = time.time()
        path = train_reader(vae=world_vae())
        print(f"reader trained in {time.time() - t0:.0f} s: {path}", file=sys.stderr)
    if args.reader_accuracy or args.train_reader:
        print(json.dumps(reader_accuracy(Reader.load(), vae=world_vae()), indent=1))
    return 0


# ---- DreamBooth's metrics (Ruiz et al. 2022, section 4.1), on the reader's embedding ------------

def mean_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of a and b (unit vectors)."""
    return float((a @ b.T).mean())


def diversity(groups: list[torch.Tensor]) -> float:
    """DIV: mean pairwise embedding distance (1 - cosine) between samples of the same prompt,
    averaged over prompts: the analog of the paper's LPIPS diversity."""
    values = []
    for e in groups:
        n = len(e)
        if n > 1:
            sim = e @ e.T
            values.append(float((1 - sim)[~torch.eye(n, dtype=torch.bool)].mean()))
    return float(np.mean(values))


def subject_metrics(reader: Reader, subject_images, subject_samples: dict, class_samples: dict) -> dict:
    """subject_samples {Attributes of the prompt: [images]} (prompts with the identifier),
    class_samples {prompt: [images]} (the plain class prompt(s)). Returns
    subject_fidelity (DINO / CLIP-I analog), prompt_fidelity (the context attributes of the subject
    prompts, CLIP-T analog), pres (class samples vs the subject: lower = less collapse), div."""
    real = reader.embed(list(subject_images))
    groups = [reader.embed(images) for images in subject_samples.values()]
    generated = torch.cat(groups)
    reads, wanted, keys = [], [], []
    for (a, keep), images in subject_samples.items():
        reads += reader.read_all(images)
        wanted += [a] * len(images)
        keys.append(keep)
    context = [n for n in ("background", "position", "size") if any(n in k for k in keys)]
    checks = [[r[n] == getattr(a, n) for n in context if n in k] for r, a, k in
              zip(reads, wanted, [k for (a, k), ims in subject_samples.items() for _ in ims])]
    class_embeddings = reader.embed([im for images in class_samples.values() for im in images])
    return {"subject_fidelity": mean_similarity(generated, real),
            "prompt_fidelity": float(np.mean([np.mean(c) for c in checks])),
            "pres": mean_similarity(class_embeddings, real),
            "div": diversity(groups)}


if __name__ == "__main__":
    sys.exit(main())
