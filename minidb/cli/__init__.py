"""The `minidb` command: `minidb sample ...`, `minidb train ...`.

Each subcommand lives in its own module with a `add_arguments(parser)` and a `run(args) -> int`.
argparse lives here and in those modules only; the library never parses arguments.
"""
import argparse
import ctypes
import errno
import importlib
import os
import platform
import sys

from minidb.errors import MinidbError

# What the file system says about the user's paths and disks: one line, not a traceback. Any other
# OSError (EINVAL, EBADF, ...) would be a bug in minidb and keeps its traceback.
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
               errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY,
               errno.EIO, errno.EMFILE, errno.EBUSY, errno.EXDEV}

SUBCOMMANDS = {
    "sample": "minidb.cli.sample",  # text to image
    "train": "minidb.cli.train",    # DreamBooth fine-tuning
    "demo": "minidb.cli.demo",      # DreamBooth on the shipped miniature world, measured
    "eval": "minidb.cli.eval",      # prompt fidelity of a miniature-world model, read from its images
    "explain": "minidb.cli.explain",  # inside one sample: trajectory, a heat map per word, guidance
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other failure (argparse adds its usage block)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# On Linux, glibc's malloc hands big freed blocks back to the kernel (mmap'd ones from 128 KiB up, and the
# heap it trims) and maps fresh ones for the next allocation, which the kernel zero-fills page by page again:
# every training step re-faulted its gradients and activations, and the kernel's zero-filling was a large
# part of the UNet's backward. The command keeps freed memory in the process instead, so no page is faulted
# after the first steps, and peak memory stays as it was.
# The low-memory training modes (train.low_memory, train.fused_backward) get a bounded version: their many
# short-lived blocks of changing sizes fragment a heap that is never trimmed, which raised their peak, so
# there at most 1 GiB of free heap is kept, and only blocks under 256 MiB come from the heap (every gradient
# and activation of an SD v1 step at 256x256: the largest, the token embedding's gradient, is 152 MB). With
# a 32 MiB threshold the larger gradients were still mapped afresh every step.
# The step times, page faults and peaks behind each choice: benchmarks/RESULTS.md ("Page faults", and "The
# bounded allocator setting keeps blocks under 256 MiB").
# Memory freed is not returned to the system until the process exits (bounded: beyond 1 GiB it is).
# `import minidb` changes nothing. Opt out: MINIDB_KEEP_FREED_MEMORY=0.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt(3) parameters


def keep_freed_memory(bounded: bool = False) -> bool:
    """glibc: big blocks from the heap instead of fresh mappings, and the heap never trimmed, so the
    next step reuses the pages the last one freed; bounded: blocks under 256 MiB only, and at most
    1 GiB of free heap kept. True if that is now in force."""
    if os.environ.get("MINIDB_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if bounded:  # mallopt(3): mmap from 256 MiB up (32 MiB where a glibc caps it there); trim beyond 1 GiB free
        mmap = libc.mallopt(M_MMAP_THRESHOLD, 256 << 20) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return bool(mmap) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    # M_MMAP_MAX 0: no mmap for large requests; M_TRIM_THRESHOLD -1: never trim
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["train"]:  # before anything allocates; `minidb train` decides once it has read its config
        keep_freed_memory()
    parser = Parser(prog="minidb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules, parsers = {}, {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        parsers[name] = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(parsers[name])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand, whose --help lists what it takes
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        check_text_arguments(args)
        from minidb.attention import get_backend
        get_backend()  # a bad MINIDB_ATTENTION fails now, not after the model has loaded
        return modules[args.command].run(args) or 0
    except MinidbError as e:  # bad input: one clear line, no traceback
        return error(args.command, str(e))
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        return error(args.command, describe_os_error(e))
    except KeyboardInterrupt:
        print(f"minidb {args.command}: interrupted", file=sys.stderr)
        return 130


def check_text_arguments(args) -> None:
    """Prompts and --set values are text: bytes that are not UTF-8 (Python keeps them as lone
    surrogates) would fail deep inside the tokenizer or a PNG's text chunk. File paths may hold any bytes."""
    for name in ("prompt", "negative_prompt", "set"):
        values = getattr(args, name, None)
        for value in [values] if isinstance(values, str) else values or []:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                raise MinidbError(f"--{name.replace('_', '-')} {shown!r} holds bytes that are not UTF-8 text "
                                  f"(position {e.start}): pass it as UTF-8") from None


def error(command: str, message: str) -> int:
    print(f"minidb {command}: error: {message}", file=sys.stderr)
    return 2


def describe_os_error(e: OSError) -> str:
    """"runs/dog/config.toml: No space left on device", without Python's "[Errno 28]"."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {e.strerror}" if where and e.strerror else str(e)
