"""Shared test helpers (import as `from helpers import ...`; pytest puts tests/ on sys.path)."""
import math

import torch


def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values that are NOT the default init: norm scales around 1
    but not 1, biases non-zero, weights ~ N(0, 1/fan_in). A swapped scale/shift, a missing bias
    or a wrong transpose then changes the output instead of hiding behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim == 1 and name.endswith("weight"):   # norm scales
                value = 1.0 + 0.2 * r
            elif name.endswith("bias"):
                value = 0.1 * r
            elif p.ndim == 1:
                value = 0.1 * r
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                value = r / math.sqrt(fan_in)
            p.copy_(value.to(p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def assert_same_image_up_to_rounding(a, b, max_fraction: float = 0.01) -> None:
    """Two renderings of one seed, in batches of different sizes (or on other thread counts, CPUs
    or devices), as uint8 arrays. Never bit-equal there: matrix products sum in another order, so
    the float images differ by rounding (~1e-6 relative in fp32) and a value next to a uint8
    rounding boundary can land on the other side. Allowed: 1/255, in at most `max_fraction` of the
    values (measured on tiny models: 9 of 122,880 values differ; a wrong seed or noise changes
    most values by far more). Bit equality is demanded only where the very same computation repeats."""
    import numpy as np
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"max |diff| {diff.max()}/255"
    assert (diff > 0).mean() <= max_fraction, f"{(diff > 0).sum()} of {diff.size} values differ"


def dreambooth_world(root, class_images: int = 0):
    """A training set-up in `root`: a perturbed tiny SD as base.safetensors, 3 random instance
    photos in instance/ and, if asked, `class_images` random class images in class/."""
    import numpy as np
    from PIL import Image

    from minidb.config import tiny_config
    from minidb.pipeline import StableDiffusion

    sd = StableDiffusion(tiny_config())
    for i, model in enumerate(sd.models.values()):
        perturb_(model, seed=i)
    sd.save(root / "base.safetensors")
    rng = np.random.default_rng(0)
    for folder, n in (("instance", 3), ("class", class_images)):
        if n:
            (root / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root
