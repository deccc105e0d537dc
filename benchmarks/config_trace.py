"""Issue #29's closing note: the run's config followed from train() through the calls, and the
longest functions and line counts per file of minidb/.

    python -m benchmarks.config_trace [--steps 2] [--append-results]

One tiny DreamBooth run (a random tiny SD, minidb.config.tiny_config, 32x32, CPU, fp32, 3 instance
photos, prior preservation with 2 ready-made class images so that none are generated) runs under
sys.setprofile. The tracer records every Python function call into a file under minidb/ whose
arguments, at call time, hold the run's config: a DreamBoothConfig, one of its sections (every
dataclass of minidb/dreambooth/train_config.py) or the Plan (minidb/dreambooth/plan.py). "Hold" means:
an argument is such an instance, or an element of *args / a value of **kwargs is, or (counted
apart, column "self") the first argument is an object one of whose own attributes (vars(self)) is
one. Nothing deeper is followed: a config inside a list, a tuple or another object's attributes is
not seen. Generator resumptions are not calls (only a generator's first run is); calls from C
(dataclasses.replace's __init__, generated <string> methods) and calls into files outside minidb/
are not recorded. Any instance of those classes counts, not only the object train() received: the
plan's cfg and every dataclasses.replace copy are the run's config too.

From the ordered modules of the recorded calls: a maximal run of consecutive calls in one module is
one *entry*; a *return* is an entry into a module that an earlier entry already left (A B A: 1).
The first step is marked by the first call of TrainStep.begin (minidb/dreambooth/step.py), the first
line of the training loop. Results: benchmarks/RESULTS.md.
"""
import argparse
import ast
import dataclasses
import functools
import inspect
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minidb"
PREFIX = str(PACKAGE) + os.sep
CO_GENERATOR_LIKE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
SECTION_HEADING = "## The run's config followed through the calls (2026-12-04, fourth session, issue #29): the plan holds config.toml"
COUNTED = (
    "The run: one tiny DreamBooth run (a random tiny SD, 32x32, CPU, fp32, 3 instance photos, prior preservation with "
    "2 ready-made class images so none are generated, train.steps as given, a checkpoint and the export at the end) "
    "under `sys.setprofile`, followed from `train(cfg)` (`load_config` runs before the tracer starts). **Counted**: "
    "every Python function call into a file under `minidb/` one of whose arguments, at call time, is a "
    "`DreamBoothConfig`, one of its sections (every dataclass of `minidb/dreambooth/train_config.py`) or the `Plan` "
    "(an element of `*args` or a value of `**kwargs` too; a method of those classes, such as the property "
    "`Plan.dtype` had been, counts through its `self`); and, apart (marked `*`, left out of the \"arguments only\" column), a "
    "method whose `self` has such an instance among its own attributes (`vars(self)`). Any instance counts, not only "
    "the object `train()` received: the plan's `cfg` and every `dataclasses.replace` copy are the run's config too. "
    "**Not counted**: a config inside a list, tuple or another object's attributes (other than `self`'s); calls whose "
    "arguments are values read out of the config (`cfg.data.resolution`, a prompt); calls into files outside "
    "`minidb/` (torch, dataclasses, the generated `<string>` dataclass methods); generator resumptions; the issue's "
    "\"went back up to a higher-level module\", which it does not define, is not measured. An *entry* is a maximal "
    "run of consecutive recorded calls in one module; a *return* is an entry into a module an earlier entry already "
    "left (A B A = 1). The first step starts at the first call of `TrainStep.begin` (the training loop's first line). "
    "The issue's figures are its author's, on the code before it, and are not re-measured here.")
# the issue's own figures on the code before it (not re-measured here)
CONFIG_SIDE = ("minidb.dreambooth.plan", "minidb.dreambooth.train_config")
ISSUE_BEFORE = {"modules": 14, "back up to a higher-level module": 25, "returns": 41, "train_config entries before the first step": 6}


def tracked_classes() -> tuple[type, ...]:
    from minidb.dreambooth import train_config
    from minidb.dreambooth.plan import Plan
    sections = [c for c in vars(train_config).values()
                if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == train_config.__name__]
    return (*sections, Plan)


@functools.lru_cache(maxsize=None)
def module_name(filename: str) -> str:
    rel = Path(filename).resolve().relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@dataclasses.dataclass
class Call:
    module: str
    function: str         # qualified name
    via_self: bool        # only self's attributes held the config, no argument did
    before_first_step: bool
    caller: str = ""      # the calling frame's module ("" outside minidb/)


class ConfigTracer:
    """sys.setprofile hook: the calls into minidb/ that receive the config (see the module's docstring)."""

    def __init__(self, classes: tuple[type, ...]):
        self.classes = classes
        self.calls: list[Call] = []
        self.all_calls_before_step: Counter = Counter()  # every call into a minidb module before the first step, any arguments
        self.first_step_at: int | None = None  # index into self.calls of the first call at or after the first step
        self._generators = {}  # id(frame) -> frame, generator frames already started (kept alive so ids stay unique)
        self._files = {}

    def _is_ours(self, filename: str) -> bool:
        ours = self._files.get(filename)
        if ours is None:
            ours = self._files[filename] = filename.startswith(PREFIX)
        return ours

    def _holds(self, value) -> bool:
        return isinstance(value, self.classes)

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not self._is_ours(code.co_filename):
            return
        if code.co_flags & CO_GENERATOR_LIKE:
            if id(frame) in self._generators:  # a resumption, not a call
                return
            self._generators[id(frame)] = frame
        if self.first_step_at is None and code.co_name == "begin" and code.co_filename.endswith(
                os.path.join("dreambooth", "step.py")):
            self.first_step_at = len(self.calls)
        if self.first_step_at is None:
            self.all_calls_before_step[module_name(code.co_filename), code.co_qualname] += 1
        n_args = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[:n_args])
        flags = code.co_flags
        star = code.co_varnames[n_args] if flags & inspect.CO_VARARGS else None
        starstar = code.co_varnames[n_args + bool(star)] if flags & inspect.CO_VARKEYWORDS else None
        local = frame.f_locals
        values = [local.get(name) for name in names]
        if star:
            values += list(local.get(star, ()))
        if starstar:
            values += list(local.get(starstar, {}).values())
        held = any(self._holds(v) for v in values)
        via_self = False
        if not held and names and names[0] == "self":
            attrs = getattr(local.get("self"), "__dict__", None)
            via_self = isinstance(attrs, dict) and any(self._holds(v) for v in list(attrs.values()))
        if held or via_self:
            back = frame.f_back
            caller = module_name(back.f_code.co_filename) if back and self._is_ours(back.f_code.co_filename) else ""
            self.calls.append(Call(module_name(code.co_filename), code.co_qualname, via_self and not held,
                                   self.first_step_at is None, caller))


def entries(modules: list[str]) -> list[tuple[str, int]]:
    """Maximal runs of one module: (module, index of its first call)."""
    out = []
    for i, m in enumerate(modules):
        if not out or out[-1][0] != m:
            out.append((m, i))
    return out


def summarize(calls: list[Call], first_step_at: int | None) -> dict:
    modules = [c.module for c in calls]
    runs = entries(modules)
    seen, returns = set(), 0
    for m, _ in runs:
        returns += m in seen
        seen.add(m)
    first = len(calls) if first_step_at is None else first_step_at

    def entered(module, before=False):
        return sum(1 for m, i in runs if m == module and (not before or i < first))

    order = list(dict.fromkeys(modules))
    # the config side: plan.py resolves the run, train_config.py is its schema; a call into either made
    # from any other module is the rest of the run going back to the config
    side = CONFIG_SIDE
    from_outside = [i for i, c in enumerate(calls) if c.module in side and c.caller not in side]
    return {"config_side_from_outside": len(from_outside),
            "config_side_from_outside_before": sum(i < first for i in from_outside),
            "config_side_calls": [calls[i].function for i in from_outside],
            "calls": len(calls), "modules": order, "distinct": len(order), "entries": len(runs), "returns": returns,
            "train_config": entered("minidb.dreambooth.train_config"),
            "train_config_before": entered("minidb.dreambooth.train_config", True),
            "plan": entered("minidb.dreambooth.plan"), "plan_before": entered("minidb.dreambooth.plan", True),
            "make_plan": sum(c.function == "make_plan" for c in calls)}


def tiny_world(root: Path) -> Path:
    """A tiny random SD as base.safetensors (weights nudged off their zero inits), 3 instance photos, 2 class images."""
    import numpy as np
    import torch
    from PIL import Image

    from minidb.config import tiny_config
    from minidb.pipeline import StableDiffusion
    sd = StableDiffusion(tiny_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in sd.models.values():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    sd.save(root / "base.safetensors")
    rng = np.random.default_rng(0)
    for folder, n in (("instance", 3), ("class", 2)):
        (root / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def tiny_config(root: Path, steps: int = 2):
    from minidb.dreambooth.train_config import load_config
    return load_config(None, [
        f"model.base={root / 'base.safetensors'}", "model.device=cpu", "model.precision=fp32",
        f"data.instance_dir={root / 'instance'}", "data.instance_prompt=a photo of sks dog", "data.resolution=32",
        "prior.class_prompt=a photo of a dog", f"prior.class_dir={root / 'class'}", "prior.num_class_images=2",
        f"train.output_dir={root / 'run'}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
        "optim.lr=1e-3"])


def trace_tiny_run(root: Path, steps: int = 2) -> ConfigTracer:
    """A tiny run in root (made there) under the tracer, which is returned."""
    from minidb.dreambooth.train import train
    cfg = tiny_config(tiny_world(Path(root)), steps)
    tracer = ConfigTracer(tracked_classes())
    sys.setprofile(tracer)
    try:
        train(cfg)
    finally:
        sys.setprofile(None)
    return tracer


# ---- the code's shape ----------------------------------------------------------------------------

def line_counts(repo: Path = REPO) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(repo)), len(p.read_text().splitlines())) for p in (repo / "minidb").rglob("*.py"))


def longest_functions(n: int = 10, repo: Path = REPO) -> list[tuple[int, str]]:
    found = []
    for path in (repo / "minidb").rglob("*.py"):
        tree = ast.parse(path.read_text())
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = prefix + child.name
                    if not isinstance(child, ast.ClassDef):
                        found.append((child.end_lineno - child.lineno + 1,
                                      f"{path.relative_to(repo)}:{child.lineno} {name}"))
                    stack.append((child, name + "."))
                else:
                    stack.append((child, prefix))
    return sorted(found, key=lambda x: (-x[0], x[1]))[:n]


# ---- the report ----------------------------------------------------------------------------------

def report(tracer: ConfigTracer, steps: int) -> str:
    s = summarize(tracer.calls, tracer.first_step_at)
    before = tracer.calls[:tracer.first_step_at if tracer.first_step_at is not None else len(tracer.calls)]
    sb = summarize(before, None)
    args_only = [c for c in tracer.calls if not c.via_self]
    first_args = sum(1 for c in before if not c.via_self)
    sa = summarize(args_only, first_args)
    lines = [
        "| measure | whole run (arguments or self) | before the first step | arguments only, whole run | "
        "the issue's figure on the old code (not re-measured) |",
        "|---|---|---|---|---|",
        f"| calls recorded | {s['calls']} | {sb['calls']} | {sa['calls']} | - |",
        f"| distinct modules | {s['distinct']} | {sb['distinct']} | {sa['distinct']} | {ISSUE_BEFORE['modules']} |",
        f"| module entries (runs of consecutive calls in one module) | {s['entries']} | {sb['entries']} | "
        f"{sa['entries']} | - |",
        f"| returns to a module already left (A B A = 1) | {s['returns']} | {sb['returns']} | {sa['returns']} | "
        f"{ISSUE_BEFORE['returns']} |",
        f"| went back up to a higher-level module | not measured | not measured | not measured | "
        f"{ISSUE_BEFORE['back up to a higher-level module']} |",
        f"| train_config.py entries | {s['train_config']} | {s['train_config_before']} | {sa['train_config']} | "
        f"{ISSUE_BEFORE['train_config entries before the first step']} (before the first step) |",
        f"| plan.py entries | {s['plan']} | {s['plan_before']} | {sa['plan']} | (no plan.py) |",
        f"| make_plan calls | {s['make_plan']} | {sb['make_plan']} | {sa['make_plan']} | - |",
        f"| calls into the config side (plan.py, train_config.py) from any other module | "
        f"{s['config_side_from_outside']} ({', '.join(s['config_side_calls'])}) | "
        f"{s['config_side_from_outside_before']} | {sa['config_side_from_outside']} | - |",
    ]
    out = ["\n".join(lines), "",
           "Modules in the order first visited: " + ", ".join(f"`{m}`" for m in s["modules"]) + ".", ""]
    # the entries themselves, with the functions called in each
    seq, rows = tracer.calls, []
    for k, (m, i) in enumerate(entries([c.module for c in seq])):
        j = i
        while j < len(seq) and seq[j].module == m:
            j += 1
        funcs = list(dict.fromkeys(c.function + ("*" if c.via_self else "") for c in seq[i:j]))
        when = "before" if seq[i].before_first_step else "after"
        rows.append(f"| {k + 1} | `{m}` | {j - i} | {when} | {', '.join(funcs)} |")
    out += ["The entries in order (`*`: recorded only through `self`'s attributes; before/after: the first step's "
            "start, the first `TrainStep.begin`):", "",
            "| # | module | calls | first step | functions |", "|---|---|---|---|---|", *rows, ""]
    for module in ("minidb.dreambooth.train_config", "minidb.dreambooth.plan"):
        other = {f: n for (m, f), n in tracer.all_calls_before_step.items() if m == module}
        out += [f"Every call into `{module}` before the first step, whatever its arguments (not only the recorded "
                f"ones): {sum(other.values())}: " + ", ".join(f"{f} {n}" for f, n in sorted(other.items())) + ".", ""]
    funcs = longest_functions()
    out += ["The longest functions in minidb/ (lines from `def` to the function's last line, via ast):", "",
            "| lines | function |", "|---|---|", *[f"| {n} | `{name}` |" for n, name in funcs], ""]
    counts = line_counts()
    out += [f"Line counts per file of minidb/ ({len(counts)} files, {sum(n for _, n in counts)} lines):", "",
            "| file | lines |", "|---|---|", *[f"| `{p}` | {n} |" for p, n in counts], ""]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--append-results", action="store_true", help="append the section to benchmarks/RESULTS.md")
    ap.add_argument("--shape-of", metavar="DIR", help="only the line counts and longest functions of another "
                    "checkout's minidb/ (e.g. a `git worktree` of an older commit)")
    args = ap.parse_args(argv)
    if args.shape_of:
        counts = line_counts(Path(args.shape_of))
        print(f"{len(counts)} files, {sum(n for _, n in counts)} lines")
        print("\n".join(f"{n} {name}" for n, name in longest_functions(10, Path(args.shape_of))))
        return
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        tracer = trace_tiny_run(Path(tmp), args.steps)
    text = report(tracer, args.steps)
    print(text)
    if args.append_results:
        head = (f"\n{SECTION_HEADING}\n\n`taskset -c 1 nice -n 5 env OMP_NUM_THREADS=1 python -m benchmarks.config_trace "
                f"--steps {args.steps}` on 2 CPU cores (torch {torch.__version__}, Python {sys.version.split()[0]}).\n\n"
                f"{COUNTED}\n\n")
        from minidb.files import atomic_write_text  # the one writer every file goes through
        results = REPO / "benchmarks" / "RESULTS.md"
        atomic_write_text(results, results.read_text(encoding="utf-8") + head + text)


if __name__ == "__main__":
    main()
