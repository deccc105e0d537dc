"""The `minidb` command: `minidb sample ...`, `minidb train ...`.

Each subcommand lives in its own module with a `add_arguments(parser)` and a `run(args) -> int`.
argparse lives here and in those modules only; the library never parses arguments.
"""
import argparse
import errno
import importlib
import sys

from minidb.dreambooth.allocator import keep_freed_memory
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
