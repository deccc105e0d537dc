"""Training-state checkpoints: everything a run needs to continue exactly where it stopped.

    <run>/checkpoints/step_000200.pt   a torch.save dict: trainable weights (fp32), optimizer,
                                        loss scaler, step, data position, RNG states, config

Only the trained weights are stored (the UNet, and the text encoder when it trains): the frozen
parts come from the base checkpoint again on resume, so a checkpoint is the size of what changes.

Writes are atomic (`save_state`): the bytes go to a uniquely named `step_000200.pt.<pid>-<random>.tmp`,
are fsync'ed, and only then renamed to their final name (os.replace), so a crash or kill mid-write leaves
at most a stray .tmp file (swept by the next prune) and the newest `step_*.pt` is always a whole checkpoint. Reads use torch.load(weights_only=True): plain
containers and tensors, nothing that runs code.
"""
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from minidb.errors import StateError
from minidb.files import atomic_write, remove_temporaries
from minidb.weights.files import unpickling_refusal

FORMAT = "minidb-dreambooth-state"
VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"step_{step:06d}.pt"


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(folder) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_state(path, state: dict) -> Path:
    """torch.save(state) to path, atomically (minidb.files.atomic_write): a crash mid-write leaves
    at most a stray temporary file, never a half-written step_N.pt."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    return Path(path)


def load_state(path) -> dict:
    """The state dict of a training checkpoint; tensors on the CPU. StateError if unusable."""
    path = Path(path)
    if path.is_dir():
        raise StateError(f"{path} is a folder: pass one of the step_N.pt files in a run's checkpoints/")
    if not path.is_file():
        raise StateError(f"{path}: no such training checkpoint")
    try:
        # mapped, not read: a resume holds no second copy of the weights and moments beside the model's
        # (the pages come in as each tensor is used; the file is never written in place: atomic_write)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # a pickle that would run code: one line, never torch's advice
        raise StateError(unpickling_refusal(path, e)) from None
    except Exception as e:  # a truncated zip, a flipped bit, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise StateError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"{path}: not a minidb training checkpoint (an exported model? those are "
                              "for sampling; resume from a file in <run>/checkpoints/)")
    if state.get("version") != VERSION:
        raise StateError(f"{path}: training checkpoint version {state.get('version')}, this minidb "
                              f"reads version {VERSION}")
    return state


def prune_checkpoints(folder, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (and the temporary files of killed writes: the
    caller owns the folder, minidb.dreambooth.run's lock)."""
    removed = [path for _, path in list_checkpoints(folder)[:-keep]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed + remove_temporaries(folder)


def latest_state(folder, remedy: str = "resume from it") -> dict | None:
    """The state of folder's latest checkpoint, the one with the highest step, with its path under
    "path"; None when the folder holds none. The one rule of "latest" (minidb.dreambooth.run's --resume latest,
    minidb.world.pretrain's stages): a damaged latest file is an error that names the newest readable one
    (remedy: what to do with it, "{good}" its path), never skipped silently, since a run continued
    from an older step would train that stretch again on another branch."""
    path = latest_checkpoint(folder)
    if path is None:
        return None
    try:
        state = load_state(path)
    except StateError as e:
        good = newest_readable(path.parent, before=path)
        raise StateError(f"{e}; " + (f"the newest readable checkpoint is {good}: {remedy.format(good=good)}"
                                          if good else "no older checkpoint is readable")) from None
    state["path"] = path
    return state


def newest_readable(folder, before: Path | None = None) -> Path | None:
    """The newest checkpoint of folder (older than `before`, if given) that loads; None if none does."""
    for step, path in reversed(list_checkpoints(folder)):
        if before is not None and path == before:
            continue
        try:
            load_state(path)
            return path
        except StateError:
            continue
    return None


# ---- a training state as a model file ------------------------------------------------------------

def export_state(checkpoint, path=None, dtype=torch.float16) -> Path:
    """A training state's file as a model (e.g. an earlier step that overfits less), or a LoRA run's as
    its LoRA file; the EMA of the weights when the run exports it (train.export_ema).
    path None: <run>/model-step_N.safetensors (lora-step_N.safetensors)."""
    from minidb.lora import save_lora, with_alphas
    from minidb.pipeline import export_model
    state = load_state(checkpoint)
    model, train = state["config"]["model"], state["config"]["train"]
    ema = state.get("ema")
    weights = ema["shadow"] if ema and train.get("export_ema", True) else state["weights"]
    lora_rank = model.get("lora_rank", 0)
    checkpoint = Path(checkpoint)
    path = Path(path or checkpoint.parent.parent / f"{'lora' if lora_rank else 'model'}-{checkpoint.stem}.safetensors")
    if lora_rank:
        save_lora(path, with_alphas(weights, model["lora_alpha"] or lora_rank), dtype)
        return path
    return export_model(model["base"], weights, path, dtype)


# ---- random number generator states --------------------------------------------------------------

def rng_state() -> dict:
    """Every global RNG this process has: torch CPU, CUDA (all devices), numpy, Python's random.
    numpy's state is stored as plain lists so that weights_only loading accepts it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": list(_to_lists(random.getstate())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
