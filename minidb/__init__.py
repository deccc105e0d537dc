"""minidb: Stable Diffusion v1 and DreamBooth in plain PyTorch.

    import minidb
    sd = minidb.StableDiffusion.from_checkpoint("checkpoints/v1-5-pruned-emaonly.safetensors")
    images = sd.generate(["a photo of an astronaut riding a horse"], seed=0)

    tiny = minidb.StableDiffusion(minidb.tiny_config())   # random weights, SD v1's structure, tiny sizes
    tiny.save("tiny.safetensors")                          # for tests and CPU demos: seconds, not minutes

SDConfig() is SD v1 (CompVis' v1-inference.yaml); tiny_config() is the same model with 3M
parameters instead of 1.07B, and 32x32 images. Importing minidb has no side effects; the heavy
pieces load on first use.
"""
from minidb.config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig, tiny_config

__version__ = "0.1.0"
__all__ = ["SDConfig", "UNetConfig", "VAEConfig", "CLIPTextConfig", "tiny_config", "StableDiffusion"]


def __getattr__(name):
    if name == "StableDiffusion":
        from minidb.pipeline import StableDiffusion
        return StableDiffusion
    raise AttributeError(f"module 'minidb' has no attribute {name!r}")
