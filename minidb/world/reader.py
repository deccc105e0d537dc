"""The miniature world's reader: what a generated image shows, read from its pixels.

    reader = Reader.load()                        # the shipped shape/pattern network
    reader.read(image)      # {"shape": "star", "color": "red", "size": "small", "position": ..., "background": ...}
    reader.embed(images)    # [n, 128] L2-normalised features: the world's analog of DINO / CLIP-I

Background, color, position and size are measured, not learned: the background is the median
of the border pixels (nearest named background), the shape is every pixel far from it (its
median color, nearest named color), the position is the nearest named centre to the blob's
centroid, and the size compares the blob's circumradius, sqrt(area / (pi * the shape's share
of its circumcircle)), with the midpoint of the two named sizes. The shape and the pattern
are read by a small CNN trained on rendered images, half of them as the shipped world model's VAE
reconstructs them (minidb.world.reader_training, `python -m minidb.world.eval --train-reader`),
whose input is the blob cut out, centred and scaled to a fixed size: so it never sees the
position, size or background, and its penultimate layer describes the object alone.
What the readings add up to (prompt fidelity, DreamBooth's metrics) is minidb.world.metrics.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from minidb.world import BACKGROUNDS, COLORS, PATTERNS, POSITIONS, SHAPES, SIZE, SIZES, outline

READER = Path(__file__).parent.parent / "data" / "world_reader.safetensors"
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
