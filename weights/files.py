"""Checkpoint files on disk <-> named tensors, for the two formats SD v1 ships in.

- `.safetensors`: a JSON header (dtype, shape and byte range of every tensor, plus a
  `__metadata__` dict of strings), then the raw bytes; read and written by the safetensors
  library (`safe_open`: the header first, then one tensor at a time; `save_file`).
- `.ckpt`: a `torch.save` zip. It is unpickled only by `torch.load(weights_only=True, mmap=True)`,
  which builds tensors and plain containers and refuses anything that would run code. Tensors
  stay in the mapped file until asked for; each is then copied out and its pages handed back.

Both give a `CheckpointFile`: `.shapes` (key -> (shape, dtype), read without touching the
data), `.config` (the dict minidb stored, or None) and `.get(key, dtype)`, one tensor at a time.
Writing (`write_tensors`) is atomic, through minidb.files.atomic_write.
"""
import codecs
import ctypes
import json
import mmap
import os
import pickle
import re
import struct
import sys
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minidb.errors import CheckpointError
from minidb.files import atomic_write

CONFIG_KEY = "minidb_config"

DTYPES = {  # safetensors' dtype names
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


def open_checkpoint(path) -> "CheckpointFile":
    """Open a .safetensors or .ckpt file (recognised by its bytes, not its name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file" if not os.path.exists(path)
                              else f"{path}: is a directory, not a checkpoint file")
    try:
        kind = _sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if kind == "safetensors":
        return SafetensorsFile(path)
    if kind == "zip":
        return TorchFile(path)
    raise CheckpointError(f"{path}: {kind} (minidb reads Stable Diffusion v1 .safetensors and .ckpt files)")


def _sniff(path: str) -> str:
    """'safetensors', 'zip', or a few words saying what the file is instead of a checkpoint."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        return "is empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if size >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**28:
        return "safetensors"  # a JSON header of plausible length (text would read as ~2**60)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("is a pickle in the old (pre-1.6) torch.save format, which cannot be memory-mapped; "
                "re-save it with a recent torch or convert it to .safetensors")
    for magic, what in [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"GIF8", "a GIF image"), (b"RIFF", "a RIFF (WebP/WAV) file"),
                        (b"version https://git-lfs", "a Git LFS pointer (the real file was never "
                                                     "downloaded: run `git lfs pull`)")]:
        if head.startswith(magic):
            return f"is {what}, not a checkpoint"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "is an HTML page (a failed download?), not a checkpoint"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # may end mid-character
    except UnicodeDecodeError:
        text = "\0"
    if all(c.isprintable() or c.isspace() for c in text):
        return "is a text file, not a checkpoint"
    return "is in no format minidb knows"


class CheckpointFile:
    """Named tensors in a file, read one at a time. Use as a context manager or call close()."""
    path: str
    shapes: dict  # key -> (torch.Size, torch.dtype)
    config: dict | None  # what save_model stored under "minidb_config"

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(CheckpointFile):
    def __init__(self, path: str):
        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
            metadata = self._file.metadata() or {}
            self.shapes = {}
            for key in self._file.keys():
                info = self._file.get_slice(key)
                self.shapes[key] = (torch.Size(info.get_shape()), DTYPES[info.get_dtype()])
            self.config = json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None
        except (SafetensorError, ValueError, KeyError) as e:
            truncated = re.search(r"invalid header length|incomplete metadata|not fully covered", str(e))
            raise CheckpointError(f"{path}: " + ("is truncated" if truncated else
                                                 f"has a corrupt safetensors header ({type(e).__name__}: {e})")) from None

    def get(self, key, dtype=None):
        tensor = self._file.get_tensor(key)  # a view of the mapped file: pages are read when touched
        if dtype is None or dtype == tensor.dtype:
            return tensor
        converted = tensor.to(dtype)
        _give_back_pages(tensor)  # else the file's pages stay resident beside the copy: 1.5x a fp16 -> fp32 load
        return converted

    def close(self):
        self._file = None


class _Opaque:
    """Stands in, during unpickling, for the non-tensor objects training frameworks save beside
    the weights (Lightning's ModelCheckpoint callback, numpy scalars in SD v1's .ckpt files):
    it keeps their arguments and state as plain data and runs none of their code."""
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_OPAQUE_GLOBALS = [(_Opaque, name) for name in [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    *(f"numpy.dtypes.{t}DType" for t in ["Int64", "Int32", "Float64", "Float32", "Bool"]),
]]


def unpickling_refusal(path, e: pickle.UnpicklingError, advice: str = "") -> str:
    """One line for a file torch.load(weights_only=True) would not unpickle: the code-running global
    it asks for, or the reason in torch's words. torch's own text is several lines and advises
    weights_only=False, the unsafe path; no minidb message does."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    if found:
        return (f"{path}: refused to unpickle: it asks for {found.group(1)}, which could run arbitrary code. "
                "minidb loads only tensors and plain containers" + (f"; {advice}" if advice else ""))
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "weights_only" not in line
             and "documentation" not in line]
    return (f"{path}: is corrupt, or holds objects other than tensors and plain containers, which minidb does "
            "not unpickle" + (f" ({lines[-1].removeprefix('WeightsUnpickler error: ')})" if lines else ""))


class TorchFile(CheckpointFile):
    def __init__(self, path: str):
        self.path = path
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: is truncated or corrupt (unreadable zip archive: {e})") from None
        if not any(name.endswith("data.pkl") for name in names):
            raise CheckpointError(f"{path}: is a zip archive, but not one written by torch.save")
        try:
            with torch.serialization.safe_globals(_OPAQUE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(unpickling_refusal(path, e, "if you trust the file, convert it to "
                                                              ".safetensors with a tool that unpickles it")) from None
        except Exception as e:  # torch reports broken zips as RuntimeError, bad records as others
            raise CheckpointError(f"{path}: is truncated or corrupt ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        state_dict = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
        self._tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        not_names = [k for k in self._tensors if not isinstance(k, str)]
        if not_names:  # tensors are found by name: any other key is a damaged or foreign file
            raise CheckpointError(f"{path}: holds tensors under keys that are not names ({len(not_names)}, e.g. "
                                  f"{not_names[0]!r} of type {type(not_names[0]).__name__}); a checkpoint "
                                  "maps tensor names to tensors")
        self.shapes = {k: (v.shape, v.dtype) for k, v in self._tensors.items()}
        self.config = obj.get(CONFIG_KEY) if isinstance(obj.get(CONFIG_KEY), dict) else None

    def get(self, key, dtype=None):
        mapped = self._tensors[key]
        tensor = mapped.clone() if dtype in (None, mapped.dtype) else mapped.to(dtype)
        _give_back_pages(mapped)
        return tensor

    def close(self):
        self._tensors = {}  # the file stays mapped until the last mapped tensor is gone


_madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None


def _give_back_pages(tensor: torch.Tensor):
    """Let the kernel drop the mapped file pages behind a tensor we have copied out. They were only
    read, so the file can always refill them; without this they stay resident until the whole
    file is unmapped, and a .ckpt load would peak at twice the model's size."""
    if _madvise is None or tensor.nbytes == 0:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start:
        _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def write_tensors(path, tensors: dict, config: dict | None = None, dtype: torch.dtype | None = None):
    """Write tensors (converting floating-point ones to dtype, if given) to a .safetensors or
    .ckpt file, chosen by the file name, atomically. `config` goes in the file's metadata."""
    path = os.fspath(path)
    if not path.endswith((".safetensors", ".ckpt")):
        raise CheckpointError(f"{path}: the file name must end in .safetensors or .ckpt")
    tensors = {k: t.detach().to("cpu", _out_dtype(t, dtype)).contiguous() for k, t in tensors.items()}
    unknown = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in DTYPES.values()]
    if unknown:
        raise KeyError(f"no dtype SD checkpoints use: {', '.join(unknown)}")
    if path.endswith(".safetensors"):
        metadata = {"format": "pt", **({CONFIG_KEY: json.dumps(config)} if config is not None else {})}
        with atomic_write(path, hidden=True) as tmp:
            save_file(tensors, tmp, metadata)
    else:
        with atomic_write(path, hidden=True) as tmp:
            torch.save({"state_dict": {k: _own_storage(t) for k, t in tensors.items()}, CONFIG_KEY: config}, tmp)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: copy views so the file holds only the tensor.
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype
