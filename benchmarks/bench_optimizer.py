"""The optimizer step alone at SD v1 size: torch's AdamW against minidb's 8-bit AdamW, whose update
runs as chunked torch operations, as one C loop per tensor (CPU) or as one Triton kernel per tensor (CUDA).

    python -m benchmarks.bench_optimizer                       # SD v1's trained weights, fp32
    python -m benchmarks.bench_optimizer --dtype bf16          # bf16 weights (8-bit: Kahan compensation)
    python -m benchmarks.bench_optimizer --quick               # the tiny model: seconds (tests run this)
    python -m benchmarks.bench_optimizer --write               # and append the table to RESULTS.md

The weights are the UNet's and the text encoder's (what a DreamBooth run trains, 983M at SD v1
size), random, with random gradients; every configuration steps the same ones from fresh state.
One warm-up step (it allocates the state), then `--steps` timed steps: the median is reported, per
step and per weight (on CUDA after torch.cuda.synchronize). Configurations:
  adamw             torch.optim.AdamW, its default implementation here (foreach)
  adamw_fused       torch.optim.AdamW(fused=True)
  adamw8bit         minidb.dreambooth.adamw8bit.AdamW8bit, backend="torch": chunks of 2**20 values
  adamw8bit_c       the same optimizer, backend="c": minidb.kernels.adamw8bit_cpu, one C loop per
                    tensor on torch's threads (CPU only; what "auto" runs on CPU where cc builds it)
  adamw8bit_kernel  the same optimizer, backend="triton": minidb.kernels.adamw8bit (CUDA only; on CPU
                    the kernel only runs in Triton's interpreter, which is for tests, not timing)
"""
import argparse
import datetime
import gc
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_vs_diffusers import machine

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CONFIGS = ("adamw", "adamw_fused", "adamw8bit", "adamw8bit_c", "adamw8bit_kernel")
HYPER = dict(lr=5e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)  # bench_train's


def trained_shapes(quick: bool) -> list[torch.Size]:
    """The shapes of the UNet's and the text encoder's parameters (built on the meta device: no memory)."""
    from minidb.config import SDConfig, tiny_config
    from minidb.pipeline import StableDiffusion
    with torch.device("meta"):
        sd = StableDiffusion(tiny_config() if quick else SDConfig())
    return [p.shape for m in (sd.unet, sd.text_encoder) for p in m.parameters()]


def make_optimizer(name: str, params, kahan: bool):
    from minidb.dreambooth.adamw8bit import AdamW8bit
    if name == "adamw":
        return torch.optim.AdamW(params, **HYPER)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **HYPER)
    backend = {"adamw8bit": "torch", "adamw8bit_c": "c", "adamw8bit_kernel": "triton"}[name]
    return AdamW8bit(params, kahan=kahan, backend=backend, **HYPER)


def skip_reason(name: str, device: str, dtype) -> str | None:
    if name == "adamw8bit_c":
        from minidb.kernels import adamw8bit_cpu
        if device != "cpu" or dtype != torch.float32:
            return "fp32 CPU tensors only"
        return adamw8bit_cpu.unavailable()
    if name == "adamw8bit_kernel":
        if not device.startswith("cuda"):
            return "CUDA only (on CPU the kernel runs in Triton's interpreter: tests, not timing)"
        try:
            import minidb.kernels.adamw8bit  # noqa: F401
        except ImportError as e:
            return f"triton missing ({e})"
    return None


def run(name: str, shapes, device: str, dtype, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:  # drawn on the CPU (same numbers on every device), then moved
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device, dtype)
        params.append(p)
    opt = make_optimizer(name, params, kahan=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(steps + 1):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        if i:  # step 0 allocates the state
            times.append(time.perf_counter() - start)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    n = sum(p.numel() for p in params)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    del opt, params
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    step = statistics.median(times)
    return dict(config=name, seconds=step, ns_per_weight=step / n * 1e9, state_bytes=state, weights=n,
                finite=finite)


def table(rows, skipped) -> list[str]:
    base = next((r["seconds"] for r in rows if r["config"] == "adamw"), None)
    out = ["| configuration | step | per weight | x torch AdamW | state | state per weight |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        out.append(f"| {r['config']} | {r['seconds'] * 1e3:.1f} ms | {r['ns_per_weight']:.2f} ns | {ratio} | "
                   f"{r['state_bytes'] / 2 ** 30:.2f} GiB | {r['state_bytes'] / r['weights']:.2f} B |")
    for name, why in skipped:
        out.append(f"| {name} | not run: {why} | | | | |")
    return out


def main(argv=None, tuned_allocator: bool = False):
    """tuned_allocator: whether the caller set glibc to keep freed memory for reuse (the command line
    does, as `minidb train` does in its low-memory modes: the 8-bit step's chunk temporaries are then
    not page-faulted in afresh each time); it goes into the table's header."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model's weights: seconds, for tests")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration, after 1 warm-up")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--write", action="store_true", help="append the table to RESULTS.md")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shapes = trained_shapes(args.quick)
    n = sum(s.numel() for s in shapes)
    print(f"{'tiny' if args.quick else 'SD v1'}: {n / 1e6:.1f}M trained weights (UNet + text encoder), "
          f"{args.dtype}, {args.device}", flush=True)
    rows, skipped = [], []
    for name in names:
        why = skip_reason(name, args.device, dtype)
        if why:
            skipped.append((name, why))
            print(f"{name:17s} not run: {why}", flush=True)
            continue
        r = run(name, shapes, args.device, dtype, args.steps)
        if not r["finite"]:
            raise SystemExit(f"{name}: the step produced non-finite weights")
        rows.append(r)
        print(f"{name:17s} {r['seconds'] * 1e3:9.1f} ms/step  {r['ns_per_weight']:.2f} ns/weight  "
              f"state {r['state_bytes'] / 2 ** 30:.2f} GiB", flush=True)
    lines = table(rows, skipped)
    command = "python -m benchmarks.bench_optimizer " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    header = [f"## Optimizer step, {'tiny model' if args.quick else 'SD v1'} trained weights ({n / 1e6:.0f}M), "
              f"{args.dtype}, {args.device} ({datetime.date.today()})", "",
              f"`{command.strip()}`  ",
              f"Machine: {machine(args.device)}; median of {args.steps} steps after 1 warm-up; the same random "
              f"weights and gradients for every configuration; allocator: "
              f"{'freed memory kept for reuse (minidb.cli.keep_freed_memory(bounded=True))' if tuned_allocator else 'glibc default'}"
              f"; GiB = 2^30 bytes", ""]
    print("\n" + "\n".join(header + lines))
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + "\n".join(header + lines) + "\n")
        print(f"appended to {RESULTS}")
    return rows


if __name__ == "__main__":
    from minidb.cli import keep_freed_memory
    main(tuned_allocator=keep_freed_memory(bounded=True))  # before anything big is allocated
