"""minidb's Triton kernels compiled for GPUs that are not here: shared memory, registers, spills.

    python -m benchmarks.kernel_resources            # the table, on the CPU (needs triton's ptxas)
    python -m benchmarks.kernel_resources --write    # and append it to benchmarks/RESULTS.md
    python -m benchmarks.kernel_resources --all      # every row of the config table, not just the one chosen
    python -m benchmarks.kernel_resources --json     # one JSON object per launch (the test reads these)

Every attention launch minidb makes for SD v1 (bench_attention.SHAPES: the UNet's self- and
cross-attention at 512×512, CLIP's causal 77 tokens), forward and backward, fp16 and bf16, for
each target in TARGETS. The launch is planned by minidb's own host code (flash.plan_forward and
plan_backward, on CPU tensors laid out as the models lay them out), specialised on its arguments
as Triton's JIT does (JITFunction.run), and compiled ahead of time:
triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)). Of the launch's candidate
configs the one that runs on the target is the first whose shared memory fits: that is Triton's
own test (CompiledKernel._init_handles raises OutOfResources when metadata.shared exceeds the
device's opt-in shared memory per block) and flash._run's fallback. Registers and spills are
ptxas -v's report on the very compile that made the cubin; "spills in loop" counts the spill
instructions (STL/LDL) of the SASS that sit between a loop's label and its backward branch.

Also the fused 8-bit AdamW step (minidb.kernels.adamw8bit), as AdamW8bit launches it for fp32
weights and for bf16 weights with and without a compensation buffer.

Compiled, not timed: which of two clean configs is faster is for bench_attention.py --sweep on a GPU.
"""
import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

# cc -> (name, opt-in shared memory per block in bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin,
# the figure Triton compares against; CUDA C Programming Guide, "Technical Specifications per
# Compute Capability": 163 KB on 8.0, 99 KB on 8.6/8.9, 227 KB on 9.0).
TARGETS = {80: ("A100", 166912), 89: ("L4/RTX 4090", 101376), 90: ("H100", 232448)}
DTYPES = ("float16", "bfloat16")
KERNELS = {"fwd": "_fwd_kernel", "preprocess": "_bwd_preprocess_kernel", "dkdv": "_bwd_dkdv_kernel",
           "dq": "_bwd_dq_kernel"}
OPTIMIZER = "adamw8bit"   # the optimizer kernel's rows: kernel == OPTIMIZER
OPTIMIZER_VARIANTS = {"fp32": ("float32", False), "bf16+kahan": ("bfloat16", True), "bf16": ("bfloat16", False)}


def sd_launches(dtype_name: str):
    """[(shape, Launch)]: every kernel launch of SD v1's attention, planned by minidb's host code."""
    import torch

    from benchmarks.bench_attention import SHAPES
    from minidb.kernels import flash

    dtype = getattr(torch, dtype_name)
    out = []
    for s in SHAPES:
        # The models' layout: [B,N,H,D] memory seen as [B,H,N,D] (unet.CrossAttention, clip.CLIPAttention).
        q, do = (torch.empty(s.batch, s.n, s.heads, s.head_dim, dtype=dtype).transpose(1, 2) for _ in range(2))
        k, v = (torch.empty(s.batch, s.m, s.heads, s.head_dim, dtype=dtype).transpose(1, 2) for _ in range(2))
        scale = s.head_dim ** -0.5
        o, lse, forward = flash.plan_forward(q, k, v, s.causal, scale)
        *_, backward = flash.plan_backward(do, q, k, v, o, lse, s.causal, scale)
        out += [(s, launch) for launch in forward + backward]
    return out


def optimizer_launch(variant: str):
    """(kernel, args, constexprs) of AdamW8bit's fused step for one 2**20-value weight, planned by
    minidb's own host code (AdamW8bit's state and code tables, kernels.adamw8bit.plan)."""
    import torch

    from minidb.dreambooth.adamw8bit import AdamW8bit
    from minidb.kernels import adamw8bit

    dtype, kahan = OPTIMIZER_VARIANTS[variant]
    p = torch.nn.Parameter(torch.empty(2 ** 20, dtype=getattr(torch, dtype)))
    p.grad = torch.empty_like(p)
    opt = AdamW8bit([p], kahan=kahan)
    opt.init_state()
    (m_code, m_table), (v_code, v_table) = opt.code(True, "cpu"), opt.code(False, "cpu")
    _, args, consts = adamw8bit.plan(p, p.grad, opt.state[p], (m_code, v_code, m_table, v_table), lr=1e-4,
                                     betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bias_correction1=0.1,
                                     bias_correction2_sqrt=0.03, block_size=opt.block_size)
    return adamw8bit._adamw8bit_kernel, args, consts


def measure_optimizer(targets=tuple(TARGETS), jobs=None):
    """One row per (target, variant) of the fused 8-bit AdamW kernel."""
    from triton.backends.compiler import GPUTarget

    plans = []
    for variant in OPTIMIZER_VARIANTS:
        kernel, args, consts = optimizer_launch(variant)
        for cc in targets:
            plans.append((cc, variant, (OPTIMIZER, *specialise(kernel, args, consts, GPUTarget("cuda", cc, 32)), cc)))
    with concurrent.futures.ProcessPoolExecutor(jobs or len(os.sched_getaffinity(0)),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_one, [job for *_, job in plans]))
    return [dict(target=f"sm_{cc}", gpu=TARGETS[cc][0], limit=TARGETS[cc][1], dtype=variant, kernel=OPTIMIZER, **r)
            for (cc, variant, _), r in zip(plans, results)]


def optimizer_table(rows) -> list[str]:
    out = ["| target | " + " | ".join(OPTIMIZER_VARIANTS) + " |", "|---|" + "---|" * len(OPTIMIZER_VARIANTS)]
    for cc in sorted({r["target"] for r in rows}):
        cells = []
        for variant in OPTIMIZER_VARIANTS:
            r = next(r for r in rows if r["target"] == cc and r["dtype"] == variant)
            if "error" in r:
                cells.append(f"**{r['error']}**")
            else:
                spills = r["spill_stores"] + r["spill_loads"]
                cells.append(f"{r['shared']} B, {r['registers']} reg" + (f", **spills {spills} B**" if spills else ""))
        out.append(f"| {cc} {next(r['gpu'] for r in rows if r['target'] == cc)} | " + " | ".join(cells) + " |")
    return out


def specialise(kernel, args, kwargs, target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run (triton/runtime/jit.py)
    makes them for these arguments on this target: its binder and _pack_args, no device needed."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                      r".*?Used (\d+) registers", re.S)
SPILL_RE = re.compile(r"\b(STL|LDL)\b")   # local memory: ptxas's spills (minidb's kernels have no stack arrays)


def spills_in_loops(sass: str) -> int:
    """Spill instructions (STL/LDL) inside a loop: between a label and a later branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\w+):\s*$", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bBRA(?:\.\w+)* (\w+);", line)) and labels.get(m.group(1), i) < i]
    return sum(1 for i, line in enumerate(lines) if SPILL_RE.search(line) and any(a < i < b for a, b in loops))


def compile_one(job):
    """Compile one specialised kernel for one target; its shared memory, registers and spills."""
    name, signature, constexprs, attrs, options, cc = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minidb.kernels import adamw8bit, flash

    kernel = adamw8bit._adamw8bit_kernel if name == OPTIMIZER else getattr(flash, KERNELS[name])
    knobs.compilation.always_compile = True   # the ptxas log below belongs to this very cubin
    knobs.nvidia.dump_ptxas_log = True        # triton prints ptxas -v's report (compiler.py make_cubin)
    log = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
            knobs.cache.dir = cache
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # a failure to compile is a finding, reported with the rest
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    m = PTXAS_RE.search(log.getvalue())
    if m is None:
        return dict(error="no ptxas -v report in triton's log")
    stack, stores, loads, regs = map(int, m.groups())
    in_loops = spills_in_loops(compiled.asm["sass"]) if stores + loads else 0   # cuobjdump -sass: slow
    return dict(shared=compiled.metadata.shared, registers=regs, stack=stack, spill_stores=stores,
                spill_loads=loads, spills_in_loops=in_loops)


def job_key(job):
    return json.dumps([job[0], job[1], sorted((str(k), v) for k, v in job[2].items()),
                       sorted((str(k), v) for k, v in job[3].items()), job[4], job[5]], sort_keys=True, default=str)


def config_of(kwargs) -> str:
    if "BLOCK_KV" not in kwargs:
        return f"{kwargs['BLOCK_Q']}/{kwargs.get('num_warps', 4)}w"
    return f"{kwargs['BLOCK_Q']}×{kwargs['BLOCK_KV']}/{kwargs['num_warps']}w/{kwargs['num_stages']}s"


def measure(targets=tuple(TARGETS), dtypes=DTYPES, every_row=False, jobs=None):
    """One row per (target, dtype, shape, kernel): the config that runs there and what it costs.
    every_row: also compile the table's rows after the one that fits (then listed in "rest")."""
    from triton.backends.compiler import GPUTarget

    plans = []   # (cc, dtype, shape, launch, [compile job per candidate])
    for dtype in dtypes:
        for shape, launch in sd_launches(dtype):
            for cc in targets:
                target = GPUTarget("cuda", cc, 32)
                jobs_ = [(launch.name, *specialise(launch.kernel, launch.args, kw, target), cc)
                         for _, kw in launch.candidates]
                plans.append((cc, dtype, shape, launch, jobs_))

    # Compile in rounds, as the launches would try them: first rows, then the next row of each
    # launch whose row did not fit. Fresh processes: Triton's compiler is not fork-safe once used.
    results, tried = {}, [0] * len(plans)
    with concurrent.futures.ProcessPoolExecutor(jobs or len(os.sched_getaffinity(0)),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            wanted = {}
            for row, (*_, jobs_) in zip(tried, plans):
                for job in (jobs_ if every_row else jobs_[row:row + 1]):
                    wanted.setdefault(job_key(job), job)
            wanted = {k: job for k, job in wanted.items() if k not in results}
            if not wanted:
                break
            results.update(zip(wanted, pool.map(compile_one, wanted.values())))
            for i, (cc, *_, jobs_) in enumerate(plans):
                r = results[job_key(jobs_[tried[i]])]
                if "error" not in r and r["shared"] > TARGETS[cc][1] and tried[i] + 1 < len(jobs_):
                    tried[i] += 1

    rows = []
    for i, (cc, dtype, shape, launch, jobs_) in enumerate(plans):
        found = [dict(row=j, config=config_of(kw), **results[job_key(job)]) if job_key(job) in results else None
                 for j, ((_, kw), job) in enumerate(zip(launch.candidates, jobs_))]
        chosen = found[tried[i]]
        if "error" not in chosen and chosen["shared"] > TARGETS[cc][1]:
            chosen = dict(chosen, error=f"no config fits {TARGETS[cc][1]} B of shared memory")
        rows.append(dict(target=f"sm_{cc}", gpu=TARGETS[cc][0], limit=TARGETS[cc][1], dtype=dtype,
                         shape=shape.name, n=shape.n, m=shape.m, d=shape.head_dim, causal=shape.causal,
                         kernel=launch.name, remember=repr(launch.remember), skipped=found[:tried[i]],
                         rest=[f for f in found[tried[i] + 1:] if f], **chosen))
    return rows


def versions() -> str:
    import torch
    import triton
    from triton import knobs
    found = []
    for name, label in (("ptxas", "ptxas (sm_80, sm_89)"), ("ptxas_blackwell", "ptxas-blackwell (sm_90)")):
        try:
            found.append(f"{label} {getattr(knobs.nvidia, name).version}")
        except RuntimeError:   # knobs: "Cannot find ptxas"
            found.append(f"{label} missing")
    return f"triton {triton.__version__}, {', '.join(found)}, torch {torch.__version__}"


def table(rows) -> list[str]:
    """Markdown, one line per target and shape (shapes and dtypes that compile alike share one);
    a cell: config (its row in CONFIGS when not the first), shared bytes, registers, spills."""
    def cell(r):
        if "error" in r:
            return f"**{r['error']}**"
        row = f" (row {r['row']})" if r["row"] else ""
        text = f"{r['config']}{row}: {r['shared']} B, {r['registers']} reg"
        if r["spill_stores"] + r["spill_loads"]:
            text += f", **spills {r['spill_stores']}/{r['spill_loads']} B**"
            text += f" ({r['spills_in_loops']} in loop)" if r["spills_in_loops"] else " (none in a loop)"
        return text

    cells = {}
    for r in rows:
        if r["kernel"] != "preprocess":
            key = (r["target"], r["gpu"], r["limit"], r["shape"], r["d"], r["dtype"])
            cells.setdefault(key, {})[r["kernel"]] = cell(r)
    lines = {}   # (target, d, dtype, cells) -> shapes
    for (target, gpu, limit, shape, d, dtype), c in sorted(cells.items(), key=lambda kv: kv[0][0]):  # stable
        both = [cells.get((target, gpu, limit, shape, d, t)) for t in DTYPES]
        if dtype == DTYPES[1] and both[0] == both[1]:
            continue
        dtypes = "fp16, bf16" if both[0] == both[1] else {"float16": "fp16", "bfloat16": "bf16"}[dtype]
        row = (f"{target} {gpu}, {limit} B", d, dtypes, tuple(c[k] for k in ("fwd", "dkdv", "dq")))
        lines.setdefault(row, []).append(shape)
    out = ["| target, shared limit | shapes | D | dtype | forward | dK/dV | dQ |", "|---|---|---|---|---|---|---|"]
    for (target, d, dtypes, kernel_cells), shapes in lines.items():
        out.append(f"| {target} | {' / '.join(shapes)} | {d} | {dtypes} | " + " | ".join(kernel_cells) + " |")
    pre = [r for r in rows if r["kernel"] == "preprocess" and "error" not in r]
    if pre:
        out.append(f"\nThe backward's preprocess (delta = rowsum(dO∘O), {pre[0]['config']}) everywhere: "
                   f"{max(r['shared'] for r in pre)} B shared at most, {min(r['registers'] for r in pre)}–"
                   f"{max(r['registers'] for r in pre)} registers, "
                   f"{sum(r['spill_stores'] + r['spill_loads'] for r in pre)} B of spills.")
    return out


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--json", action="store_true", help="print one JSON object per launch instead")
    parser.add_argument("--all", action="store_true", help="also compile the table rows after the one chosen")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per core)")
    parser.add_argument("--target", type=int, action="append", choices=sorted(TARGETS), help="default: all")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    rows = measure(tuple(args.target or TARGETS), every_row=args.all, jobs=args.jobs)
    optimizer_rows = measure_optimizer(tuple(args.target or TARGETS), jobs=args.jobs)
    if args.json:
        print(versions())
        for r in rows + optimizer_rows:
            print(json.dumps(r))
        return 0
    lines = table(rows) + ["", "The fused 8-bit AdamW step (minidb.kernels.adamw8bit, 4 blocks of 256 per program), "
                               "per weight dtype:", ""] + optimizer_table(optimizer_rows)
    print(versions())
    print("\n".join(lines))
    if args.all:
        for r in rows:
            for x in r["rest"]:
                print(f"  later row: {r['target']} {r['dtype']} {r['shape']} {r['kernel']} {x}")
    if args.write:
        command = "python -m benchmarks.kernel_resources " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(RESULTS, "a") as f:
            f.write(f"\n## Triton kernels compiled, not timed ({datetime.date.today()})\n\n`{command.strip()}`  \n"
                    f"Machine: {machine()}; {versions()}\n\n" + "\n".join(lines) + "\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
