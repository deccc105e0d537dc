"""The miniature world: captioned pictures of simple shapes, drawn on the fly from a seed.
(The package around it: pretrain.py trains a model on it, reader.py and metrics.py read its
images back, demo.py runs DreamBooth on it.)

    world = World(seed=0)
    image, caption, attrs = world.sample(17)    # a 64x64 PIL image, its caption, its Attributes
    image = render(Attributes("star", "red", "small", "top left", "blue"), seed=3)

"a photo of a small red star on a blue background, top left": a shape (6 classes) of a color
(8) and a size (2) at a position (5) on a background (6), every word one CLIP BPE token. Each
caption leaves out some attributes at random, so "a photo of a star" has many right answers,
as "a photo of a dog" does. Rotation, position jitter, soft edges, color jitter and a little
noise make no two renders alike. It is small enough to pretrain an SD v1-architecture model on
two CPU cores in one sitting (minidb/world/pretrain.py; the time in benchmarks/RESULTS.md) and exact
enough that an image's attributes can be read back from its pixels (minidb/world/reader.py).

Held-out combinations: one tenth of the (shape, color, size, position, background) tuples,
chosen by a hash, never appear in World samples, so a model can be tested on prompts it has
never seen. Patterns (two-tone, striped, ...) never appear in World samples either: they exist
for the DreamBooth demo, whose subject the base model cannot know.
"""
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from minidb.seeds import derive_seed

SIZE = 64  # image side in pixels

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
COLORS = {  # the shape's color
    "red": (220, 30, 30), "orange": (250, 140, 0), "yellow": (250, 220, 0), "green": (40, 180, 40),
    "blue": (30, 90, 240), "purple": (140, 40, 200), "pink": (255, 105, 180), "brown": (130, 80, 30),
}
BACKGROUNDS = {  # darker or paler than the shape colors of the same name, so they never blend
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
    "blue": (20, 30, 100), "green": (20, 80, 30), "yellow": (245, 235, 160),
}
SIZES = {"small": 0.15, "large": 0.26}  # circumradius as a fraction of the image side
POSITIONS = {"top left": (0.31, 0.31), "top right": (0.69, 0.31), "bottom left": (0.31, 0.69),
             "bottom right": (0.69, 0.69), "center": (0.5, 0.5)}  # (x, y) of the centre
ROTATION = 180.0  # degrees either way a shape may turn (bounded by half its symmetry period)
PATTERNS = ("solid", "two-tone", "striped", "checkered", "dotted")
ATTRIBUTES = ("shape", "color", "size", "position", "background")


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str = "large"
    position: str = "center"
    background: str = "white"
    pattern: str = "solid"       # the DreamBooth subject's; World samples are all solid
    color2: str | None = None    # the second color of a pattern

    def __post_init__(self):
        for name, choices in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS),
                              ("background", BACKGROUNDS), ("pattern", PATTERNS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")
        if (self.pattern == "solid") != (self.color2 is None) or (self.color2 and self.color2 not in COLORS):
            raise ValueError(f"pattern {self.pattern!r} needs color2 from COLORS exactly when not solid")


def caption(a: Attributes, keep=ATTRIBUTES, subject: str | None = None) -> str:
    """"a photo of a small red star on a blue background, top left", with only the attributes in
    `keep` (the shape always). subject: an identifier instead of the article and color ("sks")."""
    words = [w for name, w in (("size", a.size), ("color", a.color)) if name in keep and not subject]
    if subject:
        words = [a.size] if "size" in keep else []
        noun = " ".join(words + [subject, a.shape])
        text = f"a photo of {'a ' + noun if words else noun}"
    else:
        noun = " ".join(words + [a.shape])
        text = f"a photo of {'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if "background" in keep:
        text += f" on a {a.background} background"
    if "position" in keep:
        text += f", {a.position}"
    return text


def world_seed(*parts) -> int:
    """The seed of one of the world's random streams (minidb.seeds): world_seed("image", seed, index)."""
    return derive_seed("minidb-world", *parts)




def held_out(a: Attributes) -> bool:
    """One in ten combinations, fixed by a hash: never drawn by World, kept for evaluation."""
    return world_seed("held-out", a.shape, a.color, a.size, a.position, a.background) % 10 == 0


def combinations(held: bool | None = None) -> list[Attributes]:
    """Every solid (shape, color, size, position, background) with color != background by name;
    held=True only the held-out ones, False only the trainable ones, None all."""
    every = [Attributes(s, c, z, p, b) for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS
             for b in BACKGROUNDS if b != c]
    return [a for a in every if held is None or held_out(a) == held]


# ---- drawing -------------------------------------------------------------------------------------

def outline(shape: str, n: int = 96) -> list[np.ndarray]:
    """Polygons (unit circumradius, centred, y down) whose filled union is the shape; a second
    polygon is a hole (the ring)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "circle":
        return [circle]
    if shape == "ring":
        return [circle, 0.55 * circle]
    if shape == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        return [np.stack([np.cos(a), np.sin(a)], 1)]
    if shape == "triangle":  # point up; its centroid is the circumcentre
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [np.stack([np.cos(a), np.sin(a)], 1)]
    if shape == "star":  # five points, inner radius 0.45
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    if shape == "heart":  # the classic parametric heart, scaled to fit the unit circle
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1)
        return [pts / np.abs(pts).max(0).max() * 0.98]
    raise ValueError(shape)


def _pattern_mask(pattern: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Where a pattern takes the second color, [size, size] bool, in the shape's own frame."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c, s = math.cos(-angle), math.sin(-angle)
    u = ((xx - cx) * c - (yy - cy) * s) / r  # shape coordinates: unit circumradius
    v = ((xx - cx) * s + (yy - cy) * c) / r
    if pattern == "two-tone":
        return u > 0
    if pattern == "striped":
        return np.floor(v * 2.5) % 2 == 0
    if pattern == "checkered":
        return (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0
    if pattern == "dotted":
        return ((u * 2.5 - np.round(u * 2.5)) ** 2 + (v * 2.5 - np.round(v * 2.5)) ** 2) < 0.12
    return np.zeros((size, size), bool)


def render(a: Attributes, seed: int = 0, size: int = SIZE, jitter: bool = True, rotation: float = ROTATION) -> Image.Image:
    """The image of `a`: the same (a, seed) always gives the same pixels. jitter=False draws the
    canonical picture (no rotation, no offsets, no noise). The shape turns by up to `rotation`
    degrees either way, and never by more than half its symmetry period."""
    rng = np.random.default_rng(world_seed("render", seed, a))
    u = rng.random(8) if jitter else np.full(8, 0.5)
    period = {"circle": 0.0, "ring": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "heart": 30.0}[a.shape]
    angle = math.radians((u[0] - 0.5) * min(period, 2 * rotation))
    r = SIZES[a.size] * size * (0.92 + 0.16 * u[1])
    px, py = POSITIONS[a.position]
    cx, cy = (px + (u[2] - 0.5) * 0.06) * size, (py + (u[3] - 0.5) * 0.06) * size

    ss = 4  # supersampling: draw at 4x, shrink with a box filter = anti-aliased edges
    mask = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(mask)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for i, poly in enumerate(outline(a.shape)):
        pts = (poly @ rot.T) * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in (pts * ss).tolist()], fill=0 if i else 255)
    mask = mask.resize((size, size), Image.Resampling.BOX)
    if jitter and u[4] > 0.5:  # soft edges on half of the images
        mask = mask.filter(ImageFilter.GaussianBlur(radius=float(0.3 + 1.4 * (u[4] - 0.5))))
    m = np.asarray(mask, np.float32)[..., None] / 255.0

    def jittered(rgb, amount):
        return np.clip(np.array(rgb, np.float32) + (rng.random(3) - 0.5) * 2 * amount * jitter, 0, 255)

    fg = np.broadcast_to(jittered(COLORS[a.color], 12), (size, size, 3)).copy()
    if a.pattern != "solid":
        second = _pattern_mask(a.pattern, size, cx, cy, r, angle)
        fg[second] = jittered(COLORS[a.color2], 12)
    bg = jittered(BACKGROUNDS[a.background], 8)
    x = bg * (1 - m) + fg * m
    if jitter:
        x = x + rng.normal(0, 3.0, x.shape)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


class World:
    """Random captioned images, item i a pure function of (seed, i). Held-out combinations and
    patterns never occur. Each attribute but the shape is left out of a caption with probability
    `drop` (independently), and the whole caption with probability `drop_all` (the empty prompt
    that classifier-free guidance learns as "unconditional")."""

    def __init__(self, seed: int = 0, size: int = SIZE, drop: float = 0.3, drop_all: float = 0.1,
                 rotation: float = ROTATION):
        self.seed, self.size, self.drop, self.drop_all, self.rotation = seed, size, drop, drop_all, rotation
        self.allowed = combinations(held=False)

    def attributes(self, index: int) -> tuple[Attributes, tuple[str, ...]]:
        rng = np.random.default_rng(world_seed("sample", self.seed, index))
        a = self.allowed[int(rng.integers(len(self.allowed)))]
        keep = ("shape",) + tuple(n for n in ATTRIBUTES[1:] if rng.random() >= self.drop)
        return a, () if rng.random() < self.drop_all else keep

    def sample(self, index: int) -> tuple[Image.Image, str, Attributes]:
        a, keep = self.attributes(index)
        image = render(a, seed=world_seed("image", self.seed, index), size=self.size, rotation=self.rotation)
        return image, (caption(a, keep) if keep else ""), a

    def batch(self, start: int, n: int) -> tuple[np.ndarray, list[str]]:
        """Items start .. start+n-1 as uint8 [n, size, size, 3] and their captions."""
        items = [self.sample(i) for i in range(start, start + n)]
        return np.stack([np.asarray(im) for im, _, _ in items]), [c for _, c, _ in items]
