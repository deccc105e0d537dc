"""Files on disk: every file minidb writes goes through `atomic_write`, and every text file a user
writes (a caption, a config, a prompt list) is read by `read_text`.

    with atomic_write(path) as tmp:   # fill tmp; only a complete file is renamed to path
        image.save(tmp, format="PNG")
    atomic_write_text(path, text)     # the same, for config files, JSON results, logs

The temporary file sits in the same folder (a rename across file systems is not atomic) under a
unique name, so two writers never fill one file; `remove_temporaries` sweeps those a killed writer
left. Appending (metrics.jsonl lines) does not go through here: a line cut short by a kill is dropped
when the file is read back.
"""
import codecs
import contextlib
import errno
import os
import re
import secrets
from pathlib import Path

from minidb.errors import DiskFull, MinidbError


@contextlib.contextmanager
def atomic_write(path, hidden: bool = False):
    """`with atomic_write(path) as tmp: write(tmp)`: the writer fills a temporary file in the same
    folder; only a complete, fsync'ed file is renamed to `path` (os.replace, atomic), and the rename
    itself is made durable. A crash or kill mid-write leaves the old file, or none, never half of
    one; an exception removes the temporary file.

    The temporary name is unique (`NAME.<pid>-<random>.tmp`; hidden: `.NAME...`, which folder scans
    skip), so two writers never fill one file; `remove_temporaries` sweeps those of dead writers.
    The file gets the mode a plain open() would (0644 under the usual umask), whatever the writer
    made it. A full disk is one line (DiskFull) naming the file and what was kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{'.' if hidden else ''}{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())          # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise DiskFull(f"{path}: No space left on device; {kept}, and no partial file left") from None
        raise
    if os.name == "posix":                # ... and the rename itself survives a power cut
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path, text: str) -> Path:
    """`text` into `path` as UTF-8, through atomic_write: for config files, JSON results, logs."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


_TEMPORARY = re.compile(r"^\.?.+\.\d+-[0-9a-f]{6}\.tmp$|^\.?.+\.(pt|safetensors|ckpt|png|json|jsonl|toml)\.tmp$")


def remove_temporaries(folder) -> list[Path]:
    """Delete the temporary files atomic_write leaves when its process is killed mid-write (and the
    `NAME.tmp` ones of older minidb versions). Only for a folder whose writer owns it (the run
    folder's lock): another live writer's temporaries would go too."""
    folder = Path(folder)
    found = [folder / n for n in os.listdir(folder) if _TEMPORARY.match(n)] if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def read_text(path, error=MinidbError) -> str:
    """A text file the user wrote (a caption, a config, a prompt list) as UTF-8, with the byte-order
    mark older editors put first removed. Anything else raises `error`, one line naming the file and
    saying to save it as UTF-8, instead of decoding it into wrong characters."""
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise error(f"{path}: is UTF-16 text; minidb reads UTF-8: save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, perhaps "
                    "Latin-1 or another legacy encoding): save it as UTF-8") from None
    if "\0" in text:
        raise error(f"{path}: holds NUL bytes (UTF-16 without a byte-order mark?): save it as UTF-8")
    return text


def _disk_full(e: BaseException) -> bool:
    """Is a full disk (or quota) behind this error? torch's zip writer reports it as a RuntimeError
    ("unexpected pos") with the OSError chained, safetensors as a SafetensorError's text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if re.search(r"No space left on device|Disk quota exceeded|StorageFull|os error 28\b", str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it) where Linux says it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
