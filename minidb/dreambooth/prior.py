"""Class images for prior preservation: pictures of the subject's class ("a photo of a dog") that
the base model draws before training, so that fine-tuning can keep drawing the class as it did.

    paths = ensure_class_images(sd, "a photo of a dog", "runs/dog/class_images", 200, seed=0)

Image i is class-0000i.png, drawn with seed + i: the set depends neither on the batch size nor on
the number of processes, and an interrupted run keeps what it drew. The user's own images in the
folder count first.
"""
import re
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from minidb.errors import DataError
from minidb.files import atomic_write

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
                        steps: int = 50, guidance: float | None = None, sampler: str = "ddim", resolution: int = 512,
                        rank: int = 0, world_size: int = 1, progress: bool = True) -> list[Path]:
    """The paths of num_images class images in class_dir, generating the missing ones with sd.

    The user's own images in class_dir (any name) count first; the rest are class-00000.png,
    class-00001.png, ..., image i drawn with seed + i, so the set does not depend on the batch size,
    the number of processes, or how often a run was interrupted. Existing ones are kept; each new
    PNG is written atomically. Process `rank` of `world_size` draws the indices i % world_size ==
    rank; every process returns the same full list (put a barrier after this call). guidance None:
    the model's own scale (sd.config.guidance), which each PNG's metadata records as a number."""
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
    scale = sd.config.guidance_or(guidance)
    with tqdm(total=len(mine), desc="class images", unit="img", disable=not progress or rank != 0) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            images = sd.generate([class_prompt] * len(batch), seed=[seed + i for i in batch], steps=steps,
                                 guidance=scale, sampler=sampler, height=resolution, width=resolution,
                                 progress=False)
            for i, image in zip(batch, images):
                meta = {"prompt": class_prompt, "seed": seed + i, "steps": steps, "guidance": scale,
                        "sampler": sampler}
                _save_png(image, class_dir / class_image_name(i), meta)
            bar.update(len(batch))
    return sorted(own + [class_dir / class_image_name(i) for i in wanted], key=lambda p: p.name)


def _save_png(image: Image.Image, path: Path, meta: dict):
    """Atomically, under a hidden temporary name (so no folder scan sees a half-written image)."""
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_text(f"minidb.{key}", str(value))
    with atomic_write(path, hidden=True) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
