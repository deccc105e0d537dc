"""DreamBooth's training data: the subject's photos, the class images of prior preservation, and
the augmentation that turns them into [3, R, R] tensors in [-1, 1].

    instance = load_image_folder("data/dog", "instance", resolution=512)
    check_prompts("a photo of sks dog", "a photo of a dog")
    paths = ensure_class_images(sd, "a photo of a dog", "runs/dog/class_images", 200)
    dataset = DreamBoothDataset(instance, load_image_folder("runs/dog/class_images", "class", 512), 512)
    for index in shard(dataset.epoch_order(epoch), rank, world_size):
        example = dataset.get(index, epoch)     # {"instance": [3,512,512], "class_": [3,512,512]}

Reproducibility without saved RNG state: the order of an epoch comes from (seed, epoch), and the
crop and flip of an example from (seed, epoch, index), each through its own torch.Generator. A
resumed run, or any number of processes, sees exactly the pixels an uninterrupted run sees.
"""
import hashlib
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from tqdm.auto import tqdm

from minidb.errors import DataError

RESAMPLE = Image.Resampling.LANCZOS  # antialiased when shrinking
SMALL_WARNED = "minidb.small_warned_at"  # image.info key: load_image_folder already warned at this resolution


# ---- images ------------------------------------------------------------------------------------

def load_image_folder(folder, what: str = "instance", resolution: int | None = None) -> list[tuple[Path, Image.Image]]:
    """Every image of `folder` (not its subfolders, not hidden files), sorted by file name, as
    upright RGB PIL images. Files are recognised by content, whatever their extension.

    resolution: warn about images whose shorter side is below it, and shrink larger ones to that
    shorter side as they load (JPEGs are even decoded at reduced scale), so that five 12 MP photos
    hold ~1 MB each instead of 36. Without it images keep their size (DreamBoothDataset fits them).
    Raises DataError when the folder is missing or holds no usable image; unusable files are
    named, and skipped with a warning when at least one good image remains."""
    if folder is None or str(folder).strip() == "":
        raise DataError(f"{what} images: no folder given")
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"{what} images: {folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{what} images: {folder} is a file, not a folder of images")
    try:
        files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"{what} images: cannot list {folder}: {e.strerror or e}") from None
    if not files:
        raise DataError(f"{what} images: {folder} is empty: put the photos there")

    images, bad, small = [], [], []
    for path in files:
        try:
            image = open_rgb(path, resolution)
        except MemoryError:
            raise
        except Exception as e:  # Pillow's plugins raise many kinds of errors on junk
            bad.append(f"{path.name} ({_reason(e)})")
            continue
        if resolution and min(image.size) < resolution:
            small.append(f"{path.name} ({image.width}x{image.height})")
            image.info[SMALL_WARNED] = resolution
        images.append((path, image))
    if not images:
        raise DataError(f"{what} images: no usable image in {folder}: {', '.join(bad)}")
    if bad:
        warnings.warn(f"{what} images: skipping {len(bad)} file(s) of {folder} that are not readable images: "
                      f"{', '.join(bad)}", stacklevel=2)
    if small:
        _warn_small(what, small, resolution)
    return images


def open_rgb(path, resolution: int | None = None) -> Image.Image:
    """One image file -> an upright RGB image (decoded in full here, so corruption shows now)."""
    with Image.open(path) as image:
        if resolution:
            image.draft(None, (2 * resolution, 2 * resolution))  # JPEG: DCT-domain downscale, >= 2x what we keep
        image.load()
        image = ImageOps.exif_transpose(image)  # phones store photos sideways plus an EXIF orientation
    image = to_rgb(image)
    if resolution and min(image.size) > resolution:
        image = fit_shorter_side(image, resolution)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (a transparent pixel's colour is
    arbitrary, often black); 16-bit grayscale is scaled, where Pillow's convert would clip at 255."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and a.max() > 255):
            a = a / 257.0  # 65535 -> 255
        elif image.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size`, keeping the aspect ratio (the longer side >= size)."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    return image.resize(new, RESAMPLE)


def _reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image"
    if isinstance(e, Image.DecompressionBombError):
        return "too many pixels"
    text = str(e).split("\n")[0]
    return f"corrupt: {text}" if text else f"corrupt: {type(e).__name__}"


def _warn_small(what, names, resolution):
    warnings.warn(f"{what} images smaller than the training resolution {resolution}x{resolution} will be "
                  f"upscaled, which blurs them: {', '.join(names)}", stacklevel=3)


# ---- prompts -----------------------------------------------------------------------------------

# Words that are neither the class noun nor an identifier: articles, prepositions, the medium.
FILLER = frozenset("a an the of in on at with and or for to by from my our your his her their its this that "
                   "some photo photograph picture image pic shot painting drawing rendering render portrait "
                   "close up closeup".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def check_prompts(instance_prompt: str, class_prompt: str | None, identifier: str | None = None) -> None:
    """DataError for an empty instance prompt; a warning when it lacks the class word(s) (the class
    prompt's nouns, "dog" in "a photo of a dog") or any identifier: DreamBooth binds a rare token
    to the subject *within its class* ("a photo of sks dog"), which prior preservation then keeps
    apart from the class itself. identifier: the expected token; None: any word beyond the class
    prompt's words (and filler) counts."""
    if not instance_prompt or not instance_prompt.strip():
        raise DataError('the instance prompt is empty: give one like "a photo of sks dog"')
    words = set(_words(instance_prompt))
    class_prompt = class_prompt if class_prompt and class_prompt.strip() else None
    if class_prompt:
        class_words = [w for w in _words(class_prompt) if w not in FILLER]
        missing = [w for w in class_words if w not in words]
        if missing:
            warnings.warn(f"the instance prompt {instance_prompt!r} lacks the class word(s) {' '.join(missing)!r} "
                          f"of the class prompt {class_prompt!r}: DreamBooth expects the subject within its class, "
                          f'e.g. "a photo of sks dog" with "a photo of a dog"', stacklevel=2)
    if identifier:
        if not set(_words(identifier)) <= words:
            warnings.warn(f"the instance prompt {instance_prompt!r} does not contain the identifier {identifier!r}",
                          stacklevel=2)
    elif class_prompt:
        beyond = words - set(_words(class_prompt)) - FILLER
        if not beyond:
            warnings.warn(f"the instance prompt {instance_prompt!r} has no identifier beyond the words of the class "
                          f"prompt {class_prompt!r}: add a rare token, e.g. \"a photo of sks dog\", or training "
                          f"shifts the whole class towards your subject", stacklevel=2)


# ---- the dataset -------------------------------------------------------------------------------

def _seed_of(*parts) -> int:
    """A 63-bit seed from a tuple: (seed, epoch) and (seed, epoch + 1) give unrelated streams."""
    digest = hashlib.sha256("minidb-data/".encode() + "/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DreamBoothDataset:
    """Examples pair instance image index % n_instance with class image index % n_class.
    len = max(n_instance, n_class), as diffusers' DreamBooth script does, so that an epoch shows
    every class image once (and the few instance photos many times).

    Images are fitted once, here, to shorter side = resolution (Lanczos) and kept as uint8; get()
    then only crops (centre, or at a random position), flips (hflip), and scales to [-1, 1]."""

    def __init__(self, instance_images, class_images, resolution: int, center_crop: bool = False,
                 hflip: bool = False, seed: int = 0):
        if not instance_images:
            raise DataError("no instance images")
        if class_images is not None and len(class_images) == 0:
            raise DataError("prior preservation needs class images, and none were given")
        self.resolution, self.center_crop, self.hflip, self.seed = resolution, center_crop, hflip, seed
        small = []
        self.instance = [self._prepare(item, small) for item in instance_images]
        self.class_ = None if class_images is None else [self._prepare(item, small) for item in class_images]
        if small:
            _warn_small("training", small, resolution)
        # every image already R x R, so a random crop is the whole image too
        self.exact_size = all(x.shape[1:] == (resolution, resolution) for x in self.instance + (self.class_ or []))

    def _prepare(self, item, small: list) -> torch.Tensor:
        """(path, image) or an image -> uint8 [3, h, w] with min(h, w) = resolution."""
        path, image = item if isinstance(item, tuple) else (None, item)
        if min(image.size) < self.resolution and image.info.get(SMALL_WARNED) != self.resolution:
            small.append(f"{Path(path).name if path else 'an image'} ({image.width}x{image.height})")
        image = fit_shorter_side(to_rgb(image), self.resolution)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # [3, h, w]

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_) if self.class_ is not None else 0)

    def get(self, index: int, epoch: int = 0) -> dict:
        """{"instance": float32 [3, R, R] in [-1, 1], "class_": the same or None}. A pure function of
        (seed, epoch, index): no global RNG is read or advanced."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        g = torch.Generator().manual_seed(_seed_of("augment", self.seed, epoch, index))
        u = torch.rand(6, generator=g, dtype=torch.float64).tolist()  # always 6 draws: crop y, x, flip, twice
        instance = self._augment(self.instance[index % len(self.instance)], u[:3])
        class_ = None if self.class_ is None else self._augment(self.class_[index % len(self.class_)], u[3:])
        return {"instance": instance, "class_": class_}

    def _augment(self, pixels: torch.Tensor, u: list[float]) -> torch.Tensor:
        r = self.resolution
        _, h, w = pixels.shape
        if self.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top, left = int(u[0] * (h - r + 1)), int(u[1] * (w - r + 1))  # u in [0, 1)
        x = pixels[:, top:top + r, left:left + r]
        if self.hflip and u[2] < 0.5:
            x = x.flip(-1)
        return x.float() / 127.5 - 1.0  # [3, R, R], 0 -> -1, 255 -> 1

    def epoch_order(self, epoch: int) -> list[int]:
        """The shuffled example order of an epoch, from (seed, epoch)."""
        g = torch.Generator().manual_seed(_seed_of("order", self.seed, epoch))
        return torch.randperm(len(self), generator=g).tolist()


def shard(order: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share of an order: every world_size-th item from position rank (as torch's
    DistributedSampler), the order first padded by wrapping around to a multiple of world_size,
    so every rank gets ceil(len / world_size) items and steps in lockstep with the others."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}")
    order = list(order)
    if not order:
        return []
    padded = [order[i % len(order)] for i in range(math.ceil(len(order) / world_size) * world_size)]
    return padded[rank::world_size]


def can_cache_latents(center_crop: bool, hflip: bool, exact_size: bool = False) -> bool:
    """Whether an example's VAE latent is the same in every epoch, so it can be encoded once.
    Only without flips, and with a centre crop or images that are all exactly R x R already
    (`DreamBoothDataset.exact_size`: every crop is then the whole image): a random crop of a larger
    image changes every epoch, and a flipped image is not the flipped latent (the VAE is not
    mirror-equivariant); a cache of both flips would double the VAE work up front for 50% reuse,
    so we decide against it and encode on the fly."""
    return (bool(center_crop) or exact_size) and not hflip


# ---- class images for prior preservation --------------------------------------------------------

CLASS_IMAGE = re.compile(r"class-(\d{5,})\.png")


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def _class_index(name: str) -> int | None:
    m = CLASS_IMAGE.fullmatch(name)
    return int(m.group(1)) if m and class_image_name(int(m.group(1))) == name else None


def _readable(path: Path) -> dict | None:
    """The image's metadata (PNG text included) after a structural check, or None for junk."""
    try:
        with Image.open(path) as image:
            info = dict(image.info)
            image.verify()  # checks the structure (PNG: chunk CRCs) without decoding
            return info
    except MemoryError:
        raise
    except Exception:
        return None


def ensure_class_images(sd, class_prompt: str, class_dir, num_images: int, seed: int = 0, batch_size: int = 4,
                        steps: int = 50, guidance: float = 7.5, sampler: str = "ddim", resolution: int = 512,
                        rank: int = 0, world_size: int = 1, progress: bool = True) -> list[Path]:
    """The paths of num_images class images in class_dir, generating the missing ones with sd.

    The user's own images in class_dir (any name) count first; the rest are class-00000.png,
    class-00001.png, ..., image i drawn with seed + i, so the set does not depend on the batch size,
    the number of processes, or how often a run was interrupted. Existing ones are kept; each new
    PNG is written atomically. Process `rank` of `world_size` draws the indices i % world_size ==
    rank; every process returns the same full list (put a barrier after this call)."""
    if not class_prompt or not class_prompt.strip():
        raise DataError("class images: the class prompt is empty")
    if num_images < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"num_images={num_images}, batch_size={batch_size}, rank={rank}, world_size={world_size}")
    class_dir = Path(class_dir).expanduser()
    if class_dir.exists() and not class_dir.is_dir():
        raise DataError(f"class images: {class_dir} is a file, not a folder")
    class_dir.mkdir(parents=True, exist_ok=True)

    own, generated = [], {}
    for path in sorted(class_dir.iterdir(), key=lambda p: p.name):
        if not path.is_file() or path.name.startswith("."):
            continue
        index = _class_index(path.name)
        if index is not None:
            generated[index] = path
        elif _readable(path) is not None:
            own.append(path)
    if len(own) >= num_images:
        return own[:num_images]
    wanted = range(num_images - len(own))
    todo, other_prompt = [], []
    for i in wanted:
        info = _readable(generated[i]) if i in generated else None
        if info is None:
            todo.append(i)  # missing, or unreadable: drawn (again)
        elif info.get("minidb.prompt", class_prompt) != class_prompt:
            other_prompt.append(generated[i].name)
    if other_prompt and rank == 0:
        warnings.warn(f"class images: {len(other_prompt)} image(s) in {class_dir} were generated for another prompt "
                      f"than {class_prompt!r} (e.g. {other_prompt[0]}); they are used as they are: delete them to "
                      f"draw new ones", stacklevel=2)

    mine = [i for i in todo if i % world_size == rank]
    with tqdm(total=len(mine), desc="class images", unit="img", disable=not progress or rank != 0) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            images = sd.generate([class_prompt] * len(batch), seed=[seed + i for i in batch], steps=steps,
                                 guidance=guidance, sampler=sampler, height=resolution, width=resolution,
                                 progress=False)
            for i, image in zip(batch, images):
                meta = {"prompt": class_prompt, "seed": seed + i, "steps": steps, "guidance": guidance,
                        "sampler": sampler}
                _save_png_atomic(image, class_dir / class_image_name(i), meta)
            bar.update(len(batch))
    return sorted(own + [class_dir / class_image_name(i) for i in wanted], key=lambda p: p.name)


def _save_png_atomic(image: Image.Image, path: Path, meta: dict):
    """Temp file (hidden, so no loader sees it), fsync, rename: a crash leaves the old state or
    the whole new image, never half of one."""
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_text(f"minidb.{key}", str(value))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
