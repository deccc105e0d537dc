"""Checkpoint files on disk <-> named tensors, for the two formats SD v1 ships in.

- `.safetensors`: a JSON header (dtype, shape and byte range of every tensor, plus a
  `__metadata__` dict of strings), then the raw bytes; read and written by the safetensors
  library (`safe_open`: the header first, then one tensor at a time) and written here, one tensor
  at a time, as the library's `save_file` would.
- `.ckpt`: a `torch.save` zip. It is unpickled only by `torch.load(weights_only=True, mmap=True)`,
  which builds tensors and plain containers and refuses anything that would run code. Tensors
  stay in the mapped file until asked for; each is then copied out and its pages handed back.

Both give a `CheckpointFile`: `.shapes` (key -> (shape, dtype), read without touching the
data), `.config` (the dict minidb stored, or None) and `.get(key, dtype)`, one tensor at a time.
Writing (`write_tensors`) is atomic, through minidb.files.atomic_write, and streams: a tensor is
converted and written, then dropped, so a save costs one tensor beyond what the caller holds (and
`Deferred` tensors, read from another file for their turn, cost nothing before it).
"""
import codecs
import collections
import ctypes
import dataclasses
import io
import json
import mmap
import os
import pickle
import re
import struct
import sys
import typing
import zipfile

import torch
from safetensors import SafetensorError, safe_open

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
        give_back_pages(tensor)  # else the file's pages stay resident beside the copy: 1.5x a fp16 -> fp32 load
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
        give_back_pages(mapped)
        return tensor

    def close(self):
        self._tensors = {}  # the file stays mapped until the last mapped tensor is gone


_madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None


def give_back_pages(tensor: torch.Tensor):
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


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A tensor to write whose values are read only when its turn comes (`read()`), one at a time:
    its shape and dtype are known before (a safetensors header lists every tensor first)."""
    shape: torch.Size
    dtype: torch.dtype
    read: typing.Callable[[], torch.Tensor]


def write_tensors(path, tensors: dict, config: dict | None = None, dtype: torch.dtype | None = None):
    """Write tensors (converting floating-point ones to dtype, if given) to a .safetensors or
    .ckpt file, chosen by the file name, atomically. `config` goes in the file's metadata.
    The file is written one tensor at a time, each converted on its way out, so writing costs one
    tensor's memory beyond what `tensors` holds; a Deferred value is read only for its turn."""
    path = os.fspath(path)
    if not path.endswith((".safetensors", ".ckpt")):
        raise CheckpointError(f"{path}: the file name must end in .safetensors or .ckpt")
    specs = {k: (torch.Size(t.shape), _out_dtype(t, dtype)) for k, t in tensors.items()}
    unknown = [f"{k} ({d})" for k, (_, d) in specs.items() if d not in DTYPES.values()]
    if unknown:
        raise KeyError(f"no dtype SD checkpoints use: {', '.join(unknown)}")

    def prepared(key: str) -> torch.Tensor:
        t = tensors[key]
        t = _converted(t.read() if isinstance(t, Deferred) else t, specs[key][1])
        if t.shape != specs[key][0]:
            raise RuntimeError(f"{key}: read as {list(t.shape)}, announced as {list(specs[key][0])}")
        return t

    with atomic_write(path, hidden=True) as tmp:
        if path.endswith(".safetensors"):
            metadata = {"format": "pt", **({CONFIG_KEY: json.dumps(config)} if config is not None else {})}
            _write_safetensors(tmp, specs, prepared, metadata)
        else:
            _write_torch(tmp, specs, prepared, {CONFIG_KEY: config})


def _converted(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t on the CPU, in dtype, contiguous: a copy only where one of those changes it."""
    return t.detach().to("cpu", dtype).contiguous()


def _data(t: torch.Tensor):
    """The tensor's bytes, as a buffer (no copy) for file.write."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


# safetensors' save_file orders the data by dtype (the order of its Rust enum, descending), then by name
SAFETENSORS_ORDER = ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                     "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
NAMES = {d: n for n, d in DTYPES.items()}


def _write_safetensors(tmp, specs: dict, prepared, metadata: dict):
    """The format (github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length,
    the JSON header (each tensor's dtype, shape and byte range in the data, plus `__metadata__`),
    padded with spaces to a multiple of 8, then the data. Every range is known from the shapes, so
    the header goes first and the data follows one tensor at a time, in save_file's order."""
    order = sorted(specs, key=lambda k: (SAFETENSORS_ORDER.index(NAMES[specs[k][1]]), k))
    header, offset = {"__metadata__": metadata}, 0
    for key in order:
        shape, dtype = specs[key]
        size = shape.numel() * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key in order:
            f.write(_data(prepared(key)))


def _write_torch(tmp, specs: dict, prepared, extra: dict):
    """torch.save({"state_dict": tensors, **extra}) written one tensor at a time: torch.save pickles the
    object first, naming each tensor's storage (data/0, data/1, ... in the order met), then writes the
    storages. The pickle needs only shapes and dtypes, so each storage's bytes are read for its record.
    The records are torch.serialization._save's, through torch's own zip writer (torch._C.PyTorchFileWriter)."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(  # torch.save's default protocol
        {"state_dict": {k: _PlannedTensor(str(i), *specs[k]) for i, k in enumerate(specs)}, **extra})
    writer = torch._C.PyTorchFileWriter(os.fspath(tmp), torch.serialization.get_crc32_options(),
                                        torch.serialization._get_storage_alignment())
    pickled = buffer.getvalue()
    writer.write_record("data.pkl", pickled, len(pickled))
    writer.write_record(".format_version", "1", 1)
    alignment = str(torch.serialization._get_storage_alignment())
    writer.write_record(".storage_alignment", alignment, len(alignment))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for i, key in enumerate(specs):
        t = prepared(key)
        if t.untyped_storage().nbytes() != t.nbytes:  # a view: its storage holds more than the tensor
            t = t.clone()
        writer.write_record(f"data/{i}", t.untyped_storage(), t.nbytes)
        del t
    writer.write_end_of_file()


class _PlannedStorage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _PlannedTensor:
    """Pickles as torch pickles a contiguous CPU tensor (Tensor.__reduce_ex__: _rebuild_tensor_v2 of its
    storage), without the tensor existing."""
    def __init__(self, key: str, shape: torch.Size, dtype: torch.dtype):
        self.key, self.shape, self.dtype = key, shape, dtype

    def __reduce_ex__(self, protocol):
        stride = tuple(int(torch.Size(self.shape[i + 1:]).numel()) for i in range(len(self.shape)))
        storage = _PlannedStorage(self.key, self.dtype, self.shape.numel())
        return torch._utils._rebuild_tensor_v2, (storage, 0, tuple(self.shape), stride, False,
                                                 collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):  # torch.serialization._save's, for a TypedStorage on the CPU
        if isinstance(obj, _PlannedStorage):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])  # torch.HalfStorage
            return "storage", storage_type, obj.key, "cpu", obj.numel
        return None


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
