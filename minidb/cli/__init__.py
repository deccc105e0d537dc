"""The `minidb` command: `minidb sample ...`, `minidb train ...`.

Each subcommand lives in its own module with a `add_arguments(parser)` and a `run(args) -> int`.
argparse lives here and in those modules only; the library never parses arguments.
"""
import argparse
import errno
import importlib
import os
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
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other failure (argparse adds its usage block)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# torch's CPU allocator gets big tensors from the kernel 4 KiB at a time, zeroed on first touch: a
# DreamBooth step at SD v1 size faulted in ~16 GB of such pages per step (4.2M faults). Transparent huge
# pages (torch's own switch, read once when torch loads) cut that to 0.2M and the step from 33.6 s to
# 26.5 s (benchmarks/RESULTS.md). The command sets it; `import minidb` changes nothing. Opt out:
# THP_MEM_ALLOC_ENABLE=0. Only Linux reads it.
HUGE_PAGES = {"THP_MEM_ALLOC_ENABLE": "1"}


def main(argv=None) -> int:
    for key, value in HUGE_PAGES.items():
        os.environ.setdefault(key, value)  # before any subcommand imports torch
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


def error(command: str, message: str) -> int:
    print(f"minidb {command}: error: {message}", file=sys.stderr)
    return 2


def describe_os_error(e: OSError) -> str:
    """"runs/dog/config.toml: No space left on device", without Python's "[Errno 28]"."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {e.strerror}" if where and e.strerror else str(e)
