"""DreamBooth fine-tuning: teach SD v1 one subject from a few photos (see minidb.dreambooth.train).

    minidb train --config run.toml
    minidb train --config run.toml --set optim.lr=2e-6 --set train.steps=400
    minidb train --config run.toml --resume latest      # continue after Ctrl-C or a crash
    minidb train --resume runs/dog                       # the same, with the run folder's config
    minidb train --export runs/dog/checkpoints/step_000400.pt   # an earlier step as a model
    minidb train --print-config                          # every option, its default and its meaning, as TOML

Every option, its default and its meaning: `minidb train --print-config`, or minidb/dreambooth/train_config.py.
An example: minidb/data/dreambooth_example.toml.
"""
import argparse
import sys
import warnings
from pathlib import Path

from minidb.dreambooth.allocator import keep_freed_memory
from minidb.errors import ConfigError


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples above as written
    p.add_argument("--config", metavar="TOML", help="the run's config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set optim.lr=2e-6 (repeatable)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the run folder's newest checkpoint, a checkpoint file or a run folder")
    p.add_argument("--export", metavar="CHECKPOINT",
                   help="write a training checkpoint out as a model (a LoRA run's: as a LoRA file) and exit")
    p.add_argument("--out", metavar="PATH", help="with --export: the model file (default: next to the run's "
                                                 "model.safetensors, named after the step: model-step_N or lora-step_N)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="with --export (default fp16)")
    p.add_argument("--print-config", action="store_true",
                   help="print every option (its value from the defaults, --config and --set) and its meaning, "
                        "as TOML, and exit")


def _warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def load(args):
    from minidb.dreambooth.checkpoint import latest_checkpoint, load_state
    from minidb.dreambooth.train_config import DreamBoothConfig, from_dict, load_config, to_dict

    if args.config:
        return load_config(args.config, args.set)
    if args.resume and args.resume != "latest":  # the run's own config, from its folder or checkpoint
        path = Path(args.resume)
        if not path.exists():
            raise ConfigError(f"--resume {args.resume}: no such run folder or checkpoint file")
        if path.is_dir() and (path / "config.toml").is_file():
            return load_config(path / "config.toml", args.set)
        newest = path if path.is_file() else latest_checkpoint(path)  # a checkpoint, or a checkpoints/ folder
        if newest is not None:
            return from_dict(load_state(newest)["config"], args.set)
        raise ConfigError(f"--resume {args.resume}: not a run folder (it has no config.toml); pass the folder "
                          "minidb train wrote (train.output_dir), or add --config run.toml")
    if args.print_config:
        return from_dict(to_dict(DreamBoothConfig()), args.set)
    raise ConfigError("no config: pass --config run.toml (see `minidb train --print-config` and "
                      "minidb/data/dreambooth_example.toml), or --resume RUN_FOLDER")


def run(args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _warning  # one line per warning, no source location
        return _run(args)


def _run(args) -> int:
    import torch

    from minidb.config import DTYPES
    from minidb.dreambooth.checkpoint import export_state
    from minidb.dreambooth.plan import make_plan
    from minidb.dreambooth.train import train
    from minidb.dreambooth.train_config import dump_toml

    if args.export:
        ckpt = Path(args.export)
        out = export_state(ckpt, args.out, getattr(torch, DTYPES[args.dtype]))
        print(f"exported {ckpt} -> {out} ({args.dtype})")
        return 0
    cfg = load(args)
    if args.print_config:
        print(dump_toml(cfg, explain=True), end="")
        return 0
    plan = make_plan(cfg)  # every choice of the run, before anything is loaded
    keep_freed_memory(bounded=plan.bounded_allocator)  # speed; bounded in the low-memory modes (minidb.dreambooth.allocator)
    result = train(plan, resume=args.resume)  # an interruption is reported there, once
    if result.interrupted:  # 128 + the signal's number, as a shell reports it: 130 Ctrl-C, 143 SIGTERM
        return 130 if result.stopped_by == "SIGINT" else 143
    return 0
