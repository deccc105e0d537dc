"""DreamBooth's data stage: image files -> examples -> the batches a training step sees.

    instance = load_image_folder("data/dog", "instance", resolution=512)
    classes = load_image_folder("runs/dog/class_images", "class", 512)   # minidb.dreambooth.prior makes them
    dataset = DreamBoothDataset(instance, classes, 512, seed=0)
    example = dataset.get(index, epoch)          # {"instance": [3,512,512], "class_": [3,512,512]}
    batches = Batches(dataset, sd, batch_size=2, dist=dist)
    batch, cursor = batches.next(cursor, step, micro)   # latents, noise, t, prompt of [instance; class]

Reproducibility without saved RNG state: the order of an epoch comes from (seed, epoch), the crop
and flip of an example from (seed, epoch, index), and its timestep and noises from (seed, step,
micro-batch, position in the global batch), each through its own torch.Generator (the offset
noise, when on, is that generator's last draw). A resumed run, or any number of processes, sees
exactly the numbers an uninterrupted run sees.
"""
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from minidb.errors import DataError
from minidb.seeds import derive_seed
from minidb.dreambooth.train_options import offset_noise

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
    named, and skipped with a warning when at least one good image remains. Caption files
    (photo.txt beside photo.png, see minidb.dreambooth.train_options.caption_for) are not candidates."""
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

    stems = {p.stem for p in files if p.suffix.lower() != ".txt"}
    orphans = [p.name for p in files if p.suffix.lower() == ".txt" and p.stem not in stems]
    files = [p for p in files if p.suffix.lower() != ".txt"]  # caption files (any case), never images
    if not files:
        raise DataError(f"{what} images: {folder} holds caption files only ({', '.join(orphans[:5])}): put the "
                        "photos beside them")
    if orphans:
        warnings.warn(f"{what} images: {len(orphans)} caption file(s) of {folder} without an image of the same name, "
                      f"ignored: {', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''}", stacklevel=2)
    return open_images(files, what, folder, resolution)


def open_images(files, what: str, folder, resolution: int | None = None) -> list[tuple[Path, Image.Image]]:
    """The readable images of `files` (load_image_folder's rules); unreadable ones are named and
    skipped with a warning, or a DataError when none is left."""
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
                      f"{', '.join(bad)}", stacklevel=3)
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


# ---- the dataset -------------------------------------------------------------------------------

def _seed_of(*parts) -> int:
    """The seed of one of the dataset's random streams (minidb.seeds): _seed_of("order", seed, epoch)."""
    return derive_seed("minidb-data", *parts)


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


def can_cache_latents(center_crop: bool, hflip: bool, exact_size: bool = False) -> bool:
    """Whether an example's VAE latent is the same in every epoch, so it can be encoded once.
    Only without flips, and with a centre crop or images that are all exactly R x R already
    (`DreamBoothDataset.exact_size`: every crop is then the whole image): a random crop of a larger
    image changes every epoch, and a flipped image is not the flipped latent (the VAE is not
    mirror-equivariant); a cache of both flips would double the VAE work up front for 50% reuse,
    so we decide against it and encode on the fly."""
    return (bool(center_crop) or exact_size) and not hflip


# ---- batches: what one micro-batch of one process trains on --------------------------------------

class Batch(NamedTuple):
    """x0 latents (the VAE posterior sampled, times scale_factor), the noise to predict, the
    timesteps and the prompts, all [batch_size instance examples; batch_size class examples, or none
    without prior preservation]. fp32, on the model's device; prompt on the CPU."""
    latents: torch.Tensor  # [n, 4, h, w]
    noise: torch.Tensor    # [n, 4, h, w]
    t: torch.Tensor        # [n]
    prompt: torch.Tensor   # [n] int64: rows of the run's prompt table (see Batches)


class Batches:
    """The global batch of a micro-step is the next batch_size x world_size examples of the data
    order (crossing epochs); this process takes its batch_size of them. A cursor (epoch, position
    in that epoch's order) says where the next batch starts; it is all a checkpoint has to keep.

    The prompt table: prompt_rows[i] is the row of instance image i's prompt (its caption), and the
    class prompt is the row after the last of them; by default rows 0 (the instance prompt) and 1."""

    def __init__(self, dataset: DreamBoothDataset, sd, batch_size: int, dist, latent_cache=None,
                 noise_offset: float = 0.0, prompt_rows: list[int] | None = None):
        self.dataset, self.sd, self.batch_size, self.latent_cache = dataset, sd, batch_size, latent_cache
        self.rank, self.world_size = dist.rank, dist.world_size
        self.prior = dataset.class_ is not None
        self.hw = dataset.resolution // sd.config.latent_factor
        self.noise_offset = noise_offset
        self.prompt_rows = prompt_rows or [0] * len(dataset.instance)
        self.class_row = max(self.prompt_rows) + 1

    def next(self, cursor: tuple[int, int], step: int, micro: int) -> tuple[Batch, tuple[int, int]]:
        B = self.batch_size
        items, cursor = next_items(self.dataset, cursor, B * self.world_size)
        mine = range(self.rank * B, (self.rank + 1) * B)
        mean, std = encode_batch(self.sd, self.dataset, [items[j] for j in mine], self.prior, self.latent_cache)
        t, noise, eps = draw_noise(self.dataset.seed, step, micro, mine, self.prior, self.sd.config, self.hw,
                                   self.noise_offset)
        latents = (mean + std * eps.to(mean.device)) * self.sd.config.scale_factor  # posterior sample, fp32
        n_instance = len(self.dataset.instance)
        prompt = torch.tensor([self.prompt_rows[items[j][1] % n_instance] for j in mine]
                              + ([self.class_row] * B if self.prior else []))
        return Batch(latents, noise.to(mean.device), t.to(mean.device), prompt), cursor


def next_items(dataset, cursor: tuple[int, int], n: int):
    """The next n (epoch, index) examples of the data order, crossing epochs, and the new cursor."""
    epoch, pos = cursor
    order = dataset.epoch_order(epoch)
    items = []
    while len(items) < n:
        if pos == len(order):
            epoch, pos = epoch + 1, 0
            order = dataset.epoch_order(epoch)
        items.append((epoch, order[pos]))
        pos += 1
    return items, (epoch, pos)


def example_seed(seed: int, step: int, micro: int, position: int) -> int:
    """The seed of one training example's draws (minidb.seeds): the same whatever the batch split."""
    return derive_seed("minidb-dreambooth", seed, step, micro, position)


def draw_noise(seed, step, micro, positions, prior: bool, config, hw: int, noise_offset: float = 0.0):
    """Per example (global batch position j): timestep, target noise and the VAE posterior's noise,
    from its own CPU generator. Returns t [n], noise [n, 4, hw, hw], eps [n, 4, hw, hw] ordered
    [instance examples; class examples], n = len(positions) * (2 if prior else 1). noise_offset > 0:
    the target noise gets offset noise (minidb.dreambooth.train_options), drawn last, so the other draws stay."""
    draws = []
    for j in positions:
        g = torch.Generator().manual_seed(example_seed(seed, step, micro, j))
        t = torch.randint(0, config.timesteps, (2,), generator=g)  # uniform in [0, T)
        noise = torch.randn((2, config.unet.in_channels, hw, hw), generator=g)
        eps = torch.randn((2, config.vae.embed_dim, hw, hw), generator=g)
        draws.append((t, offset_noise(noise, noise_offset, g), eps))
    halves = [0, 1] if prior else [0]
    return tuple(torch.stack([d[k][h] for h in halves for d in draws]) for k in range(3))


@torch.no_grad()
def encode_batch(sd, dataset, items, prior: bool, latent_cache=None):
    """The VAE posterior's mean and std [n, 4, h, w] (fp32) of [instance images; class images]."""
    if latent_cache is not None:
        rows = [latent_cache[index][0] for _, index in items] + ([latent_cache[index][1] for _, index in items]
                                                                  if prior else [])
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    examples = [dataset.get(index, epoch) for epoch, index in items]
    pixels = torch.stack([e["instance"] for e in examples] + ([e["class_"] for e in examples] if prior else []))
    posterior = sd.vae.encode(pixels.to(device=sd.device, dtype=sd.dtype))
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def cache_latents(sd, dataset, prior: bool, dist) -> list:
    """latent_cache[index] = ((mean, std) of the instance image, (mean, std) of the class image or None):
    without random augmentation an example's image never changes, so the VAE encodes it once."""
    cache = []
    for index in tqdm(range(len(dataset)), desc="caching latents", disable=not dist.is_main, leave=False):
        mean, std = encode_batch(sd, dataset, [(0, index)], prior)
        cache.append(((mean[0], std[0]), (mean[1], std[1]) if prior else None))
    return cache
