"""Reading and writing original Stable Diffusion v1 checkpoints (installed as `minidb.weights`).

    files.py  bytes on disk <-> named tensors (.safetensors via the safetensors library, .ckpt via a
              safe torch.load), written atomically (minidb.files)
    sd1.py    the CompVis SD v1 layout: split by prefix, strict load, EMA, save_model

    from minidb.weights import open_checkpoint, load_models
    with open_checkpoint("sd-v1-5.safetensors") as ckpt:
        extras = load_models(ckpt, {"unet": unet, "vae": vae, "text_encoder": text_encoder})

Most users want `minidb.StableDiffusion.from_checkpoint(path)`, which does exactly this.
"""
from minidb.weights.files import CheckpointFile, Deferred, open_checkpoint, write_tensors
from minidb.weights.sd1 import (EXTRA_KEYS, PREFIXES, check_finite, config_from_dict, ema_key, identify, load_models,
                                plan_load, save_model)

__all__ = ["CheckpointFile", "Deferred", "open_checkpoint", "check_finite", "write_tensors", "EXTRA_KEYS", "PREFIXES",
           "config_from_dict", "ema_key", "identify", "load_models", "plan_load", "save_model"]
