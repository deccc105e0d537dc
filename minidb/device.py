"""Where minidb runs and in what precision, when the user says "auto": one rule for sampling and
training alike.

    choose_device(None)            # this process's GPU if torch sees one, else the CPU
    choose_device("cuda:1")        # checked now: a missing GPU is one line, not a traceback later
    default_precision(device)      # fp16 on CUDA (its tensor cores; SD v1 was trained for it), fp32 elsewhere
"""
import torch

from minidb.errors import ConfigError


def choose_device(name: str | None = "auto", local_rank: int = 0, option: str = "--device") -> torch.device:
    """name: None or "auto", "cpu", "cuda", "cuda:1", "mps", ...; a bare "cuda" means this process's
    own GPU (local_rank, torchrun's LOCAL_RANK). option: how the user wrote it, for the error."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise ConfigError(f"{option} {name}: {why}; use {option} cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {name}: MPS is not available here; use {option} cpu")
    return device


def default_precision(device: torch.device | str) -> str:
    """What precision "auto" means on `device`."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"
