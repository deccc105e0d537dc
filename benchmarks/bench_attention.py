"""minidb's Triton flash attention against SDPA and diffusers' UNet attention, at SD v1's shapes.

    python -m benchmarks.bench_attention            # print the table (needs a CUDA GPU)
    python -m benchmarks.bench_attention --write    # and append it to benchmarks/RESULTS.md
    python -m benchmarks.bench_attention --pad      # add a column: head dim zero-padded in memory
    python -m benchmarks.bench_attention --sweep    # time candidate block sizes per kernel

Every attention of SD v1 at 512×512 with batch 2 (classifier-free guidance): the UNet's
self-attention over 4096/1024/256/64 latent tokens with 8 heads of width 40/80/160/160, its
cross-attention from those queries to 77 text tokens, and the CLIP text encoder's causal
self-attention over 77 tokens (12 heads of 64). (The VAE's single head of 512 is not here:
the kernel stops at 256 and the seam sends it to SDPA.)

Columns, all fp16, forward and forward+backward, timed in one run:
  minidb     minidb.kernels.flash_attention on [B,H,N,D] tensors
  padded     (--pad) the same with q, k, v zero-padded in memory to the block's head dim (64, 128,
             256) and the output sliced back, pad and slice included in the time
  SDPA       torch.nn.functional.scaled_dot_product_attention on the same tensors
  diffusers  diffusers' Attention module with AttnProcessor2_0 (its default) and with the plain
             AttnProcessor, its q/k/v/out projections replaced by identities so that only
             diffusers' attention itself is timed (head split, attention, head merge) on
             [B,N,H·D] inputs; k and v are then one tensor. No causal mode: "-" for CLIP.
TFLOP/s count 4·B·H·D per (query, visible key) pair forward, on the true head dim (40, not the
padded 64), and 2.5 times that backward (five matmuls instead of two); ×SDPA is minidb's rate
over SDPA's. Times are medians of repeats (CUDA events, L2 flushed before each, after warm-up).
"""
import argparse
import dataclasses
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
DEVICE = "cuda"  # the tests run the table's code on CPU (interpreter) with a stand-in timer


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    n: int          # queries
    m: int          # keys
    head_dim: int
    causal: bool = False


SHAPES = [s for n, d in ((4096, 40), (1024, 80), (256, 160), (64, 160))
          for s in (Shape(f"unet self {n}", 2, 8, n, n, d), Shape(f"unet cross {n}", 2, 8, n, 77, d))]
SHAPES.append(Shape("clip causal 77", 2, 12, 77, 77, 64, causal=True))


def attention_flops(batch, heads, n, m, head_dim, causal=False, backward=False) -> float:
    """Floating-point operations of attention on the true head dim: S = QKᵀ and O = PV are
    2·D each per (query, key) pair; the backward's five matmuls make it 2.5× the forward."""
    pairs = sum(min(i + 1, m) for i in range(n)) if causal else n * m   # top-left causal
    forward = 4 * batch * heads * pairs * head_dim
    return forward * 3.5 if backward else forward


# ---------------------------------------------------------------------------------------------
def median_ms(fn, warmup_ms=30.0, rep_ms=150.0) -> float:
    """Median time of fn() in ms: CUDA events around each call, L2 flushed before each."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = max(10, min(500, int(rep_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def timed(f, inputs, backward):
    """Time f(*inputs), or f and the gradients of all inputs, as one callable."""
    if not backward:
        return median_ms(lambda: f(*inputs))
    out = f(*inputs)
    grad = torch.randn_like(out)
    return median_ms(lambda: torch.autograd.grad(f(*inputs), inputs, grad))


def diffusers_attention(shape: Shape, processor):
    """diffusers' Attention with identity projections: f(hidden [B,N,C], context [B,M,C])."""
    from diffusers.models.attention_processor import Attention
    width = shape.heads * shape.head_dim
    attn = Attention(query_dim=width, cross_attention_dim=width, heads=shape.heads, dim_head=shape.head_dim,
                     processor=processor)
    attn.to_q = attn.to_k = attn.to_v = torch.nn.Identity()
    attn.to_out[0] = torch.nn.Identity()
    attn = attn.to(DEVICE, torch.float16)
    return lambda hidden, context: attn(hidden, encoder_hidden_states=context)


def padded(q, k, v, causal):
    """flash_attention with the head dim zero-padded in memory to the kernel's block (40 -> 64):
    the alternative to the kernel's masked loads. Zero columns add nothing to q·k; the scale stays
    the true head dim's."""
    import triton

    from minidb.kernels import flash_attention
    d = q.shape[-1]
    pad = max(16, triton.next_power_of_2(d)) - d
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return flash_attention(q, k, v, causal=causal, scale=d ** -0.5)[..., :d]


def implementations(shape: Shape, pad: bool):
    """Column name -> f(*inputs) for this shape."""
    from minidb.kernels import flash_attention

    impls = {"minidb": lambda q, k, v: flash_attention(q, k, v, causal=shape.causal),
             "SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)}
    if pad:
        impls["minidb padded"] = lambda q, k, v: padded(q, k, v, shape.causal)
    try:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    except ImportError:
        AttnProcessor = AttnProcessor2_0 = None
    if AttnProcessor is not None and not shape.causal:
        impls["diffusers 2_0"] = diffusers_attention(shape, AttnProcessor2_0())
        impls["diffusers plain"] = diffusers_attention(shape, AttnProcessor())
    return impls


def make_inputs(shape: Shape, name: str, backward: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, h, d = shape.batch, shape.heads, shape.head_dim
    if name.startswith("diffusers"):
        sizes = [(b, shape.n, h * d), (b, shape.m, h * d)]
    else:
        sizes = [(b, h, shape.n, d), (b, h, shape.m, d), (b, h, shape.m, d)]
    return [torch.randn(s, device=DEVICE, dtype=torch.float16, generator=g).requires_grad_(backward)
            for s in sizes]


def check_correct(shape: Shape, configs=None):
    """A benchmark of a wrong kernel is worthless: compare with SDPA first."""
    from minidb.kernels import flash_attention
    q, k, v = make_inputs(shape, "minidb", False)
    ours = flash_attention(q, k, v, causal=shape.causal, configs=configs).float()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=shape.causal)
    err = ((ours - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise SystemExit(f"{shape.name}: minidb differs from SDPA (relative error {err:.2e}); not timed")


def run_table(shapes, pad: bool) -> list[str]:
    header = None
    lines = []
    for shape in shapes:
        check_correct(shape)
        impls = implementations(shape, pad)
        for backward in (False, True):
            flops = attention_flops(shape.batch, shape.heads, shape.n, shape.m, shape.head_dim,
                                    shape.causal, backward)
            ms = {name: timed(f, make_inputs(shape, name, backward), backward) for name, f in impls.items()}
            columns = ["minidb", "SDPA", *(["minidb padded"] if pad else []), "diffusers 2_0", "diffusers plain"]
            if header is None:
                header = (["shape", "B×H", "N", "M", "D", "pass", "minidb ms"]
                          + [f"{c} TFLOP/s" for c in columns] + ["×SDPA"])
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            rate = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
            row = [shape.name, f"{shape.batch}×{shape.heads}", str(shape.n), str(shape.m),
                   str(shape.head_dim), "fwd+bwd" if backward else "fwd", f"{ms['minidb']:.3f}"]
            row += [f"{rate[c]:.1f}" if c in rate else "-" for c in columns]
            row.append(f"{rate['minidb'] / rate['SDPA']:.2f}")
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    return lines


# ---------------------------------------------------------------------------------------------
CANDIDATES = {  # (BLOCK_Q, BLOCK_KV, num_warps, num_stages)
    "fwd": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
            (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3), (128, 64, 8, 2),
            (64, 64, 8, 2), (64, 32, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
           (128, 32, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
             (32, 128, 8, 2), (64, 64, 8, 2), (128, 128, 8, 2), (32, 128, 4, 4), (64, 128, 8, 2),
             (32, 64, 8, 2), (16, 64, 4, 2)],
}


def sweep(shapes):
    """Time each candidate config of one kernel with the others at their defaults."""
    from minidb.kernels import flash_attention
    for shape in shapes:
        for kernel, candidates in CANDIDATES.items():
            backward = kernel != "fwd"
            inputs = make_inputs(shape, "minidb", backward)
            results = []
            for config in candidates:
                configs = {kernel: config}
                try:
                    check_correct(shape, configs)
                    f = lambda q, k, v: flash_attention(q, k, v, causal=shape.causal, configs=configs)
                    results.append((timed(f, inputs, backward), config))
                except (Exception, SystemExit) as e:  # out of shared memory, or wrong
                    print(f"  {shape.name} {kernel} {config}: {type(e).__name__} {str(e)[:80]}")
            results.sort()
            print(f"{shape.name} D={shape.head_dim} {kernel} ({'fwd+bwd' if backward else 'fwd'} ms): "
                  + ", ".join(f"{c}={t:.3f}" for t, c in results[:5]), flush=True)


def write_results(lines, argv, device_name):
    import triton
    try:
        import diffusers
        versions = f"diffusers {diffusers.__version__}"
    except ImportError:
        versions = "diffusers not installed"
    with open(RESULTS, "a") as f:
        f.write(f"\n## Attention: minidb Triton flash attention vs SDPA vs diffusers, {device_name}\n\n"
                f"`python -m benchmarks.bench_attention {' '.join(argv)}` on {datetime.date.today()}: "
                f"torch {torch.__version__}, triton {triton.__version__}, {versions}; fp16, "
                "medians of CUDA-event timings, TFLOP/s on the true head dim.\n\n")
        f.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--pad", action="store_true", help="add a column with the head dim padded in memory")
    parser.add_argument("--sweep", action="store_true", help="time candidate block sizes instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (the kernel's tests run on CPU: "
              "python -m pytest tests/test_kernels.py)")
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    if args.sweep:
        sweep([s for s in SHAPES if s.name in ("unet self 4096", "unet self 1024", "unet self 256")])
        return 0
    lines = run_table(SHAPES, args.pad)
    if args.write:
        write_results(lines, sys.argv[1:] if argv is None else argv, torch.cuda.get_device_name(0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
