"""The `minidb` command: `minidb sample ...`, `minidb train ...`.

Each subcommand lives in its own module with a `add_arguments(parser)` and a `run(args) -> int`.
argparse lives here and in those modules only; the library never parses arguments.
"""
import argparse
import importlib
import sys

from minidb.errors import MinidbError

SUBCOMMANDS = {
    "sample": "minidb.cli.sample",  # text to image
    "train": "minidb.cli.train",    # DreamBooth fine-tuning
    "demo": "minidb.cli.demo",      # DreamBooth on the shipped miniature world, measured
    "eval": "minidb.cli.eval",      # prompt fidelity of a miniature-world model, read from its images
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minidb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0],
                                            description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except (MinidbError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"minidb {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minidb {args.command}: interrupted", file=sys.stderr)
        return 130
