"""Training the world's reader (minidb.world.reader): rendered images of random attributes, half of them
degraded or passed through the world model's VAE, so that it reads generated images as well as renders.

    python -m minidb.world.eval --train-reader      # writes minidb/data/world_reader.safetensors
    python -m minidb.world.eval --reader-accuracy   # its accuracy on fresh renders, clean and VAE-decoded
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from minidb.files import atomic_write
from minidb.world.metrics import prompt_fidelity
from minidb.world.reader import READER, Reader, ReaderNet, crop
from minidb.world import (BACKGROUNDS, COLORS, PATTERNS, POSITIONS, SHAPES, SIZE, SIZES, Attributes, render,
                          world_seed)


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
    from minidb.world.pretrain import SHIPPED
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
