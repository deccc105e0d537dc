"""minidb: Stable Diffusion v1 and DreamBooth in plain PyTorch.

    import minidb
    sd = minidb.StableDiffusion.from_checkpoint("weights/sd-v1-5.safetensors")
    images = sd.generate(["a photo of an astronaut riding a horse"], seed=0)

Importing minidb has no side effects; the heavy pieces load on first use.
"""
from minidb.config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig, tiny_config

__version__ = "0.1.0"
__all__ = ["SDConfig", "UNetConfig", "VAEConfig", "CLIPTextConfig", "tiny_config", "StableDiffusion"]


def __getattr__(name):
    if name == "StableDiffusion":
        from minidb.pipeline import StableDiffusion
        return StableDiffusion
    raise AttributeError(f"module 'minidb' has no attribute {name!r}")
