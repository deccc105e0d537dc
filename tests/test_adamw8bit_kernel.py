"""AdamW8bit's one-pass updates against its torch path: minidb.kernels.adamw8bit (one Triton kernel)
and minidb.kernels.adamw8bit_cpu (one C loop, fp32 CPU tensors; its own checks: test_adamw8bit_cpu.py).

On a CPU machine the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a
GPU machine the same tests run on CUDA tensors, and a `gpu`-marked one at an SD-size weight. Two optimizers, one per backend, start from
the same weights and see the same gradients (spread over four decades, as a network's are) for 6
steps; tensor sizes with and without a short last block and a short last program.

Tolerances, and why: both compute torch.optim.AdamW's update in fp32 with correctly rounded division
and square root, but the torch path's update is torch's fused AdamW kernel (vectorised, its own
multiply-add order) and the interpreter's is numpy's (the C loop's: C's, no fused multiply-adds), so a
value can differ in its last bits. Measured here: codes identical, absmax within 1.2e-7 relative, fp32
weights within 1.2e-7 (9% of them differ at all), bf16 weights identical with and without
compensation; the C loop (two_runs at these sizes and at 100003): codes identical, absmax
within 1.8e-7 relative, 8-9% of fp32 weights differ. Allowed: codes equal but for 0.1% of
values, those one code apart (a value on a rounding midpoint); absmax 1e-6 relative; fp32 weights 4 ulp
of the weight plus 8 ulp of lr per step (an update's size is about lr); bf16 weights 1 bf16 ulp (a
last-bit fp32 difference can cross a bf16 rounding tie) on at most 1% of values.
"""

import pytest
import torch

from minidb.dreambooth.adamw8bit import AdamW8bit
from minidb.kernels import adamw8bit as kernel
from minidb.kernels import adamw8bit_cpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MOMENTS = ("exp_avg", "exp_avg_sq")
# The C loop, where this machine can build it (a C compiler); the Triton kernel, always (interpreter on CPU).
ONE_PASS = ["triton", pytest.param("c", marks=pytest.mark.skipif(adamw8bit_cpu.unavailable() is not None,
                                                                 reason=f"C loop: {adamw8bit_cpu.unavailable()}"))]


def gradients(n, steps, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-4, 0, n)[torch.randperm(n, generator=g)]
    return [(torch.randn(n, generator=g) * scale).to(device, dtype) for _ in range(steps)]


def two_runs(n, dtype, kahan, steps=6, block_size=256, shape=None, backend="triton"):
    """(torch-path parameter and optimizer, `backend`'s parameter and optimizer) after `steps` steps
    on the same weights and gradients. backend "c" (the C loop) runs on the CPU whatever DEVICE is."""
    device = "cpu" if backend == "c" else DEVICE
    w0 = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.5).to(device, dtype)
    shape = shape or (n,)
    runs = []
    for backend in ("torch", backend):
        p = torch.nn.Parameter(w0.clone().view(shape))
        opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, min_8bit_size=1024, block_size=block_size,
                        kahan=kahan, backend=backend)
        runs.append((p, opt))
    for g in gradients(n, steps, dtype, device=device):
        for p, opt in runs:
            p.grad = g.clone().view(shape)
            opt.step()
    return runs


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at each value of x, in fp32."""
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[x.dtype]
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - bits)


def close_fp32(pa, pb, steps=6, lr=1e-2):
    """fp32 weights within 4 ulp of the weight plus 8 ulp of lr per step (docstring)."""
    off = (pa - pb).abs().detach()
    assert (off <= 4 * ulp(pa.detach()) + steps * 8 * ulp(torch.tensor(lr))).all(), off.max().item()


def check_states(a, b):
    (pa, oa), (pb, ob) = a, b
    sa, sb = oa.state[pa], ob.state[pb]
    assert sa["step"] == sb["step"]
    for name in MOMENTS:
        codes_a, codes_b = sa[name + "_codes"].int(), sb[name + "_codes"].int()
        differ = codes_a != codes_b
        assert differ.float().mean() <= 1e-3 and (codes_a - codes_b).abs().max() <= 1, name
        assert torch.allclose(sa[name + "_absmax"], sb[name + "_absmax"], rtol=1e-6, atol=0), name


@pytest.mark.parametrize("backend", ONE_PASS)
@pytest.mark.parametrize("n", [3000, 4 * 1024 + 256, 8 * 1024])  # short block; short program; neither
def test_fp32_matches_the_torch_path(n, backend):
    a, b = two_runs(n, torch.float32, kahan=False, backend=backend)
    check_states(a, b)
    (pa, _), (pb, _) = a, b
    start = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.5).to(pa.device)
    assert (pa.detach() - start).abs().mean() > 1e-2  # six steps of ~lr moved the weights
    close_fp32(pa, pb)


@pytest.mark.parametrize("kahan", [True, False])
def test_bf16_matches_the_torch_path(kahan):
    a, b = two_runs(3000, torch.bfloat16, kahan=kahan)
    check_states(a, b)
    (pa, oa), (pb, ob) = a, b
    off = (pa.float() - pb.float()).abs()
    assert (off <= ulp(pa.detach())).all() and (off > 0).float().mean() <= 0.01
    if kahan:
        ka, kb = oa.state[pa]["kahan"].float(), ob.state[pb]["kahan"].float()
        assert ((ka - kb).abs() <= ulp(oa.state[pa]["kahan"]) + ulp(pa.detach())).all()


@pytest.mark.parametrize("backend", ONE_PASS)
def test_other_block_sizes_and_shapes(backend):
    """A 4-D weight (a convolution's) and a block of 64: the kernel reads it flat, as the torch path does."""
    a, b = two_runs(64 * 3 * 3 * 8, torch.float32, kahan=False, block_size=64, shape=(64, 8, 3, 3), backend=backend)
    check_states(a, b)
    (pa, _), (pb, _) = a, b
    close_fp32(pa, pb)


# the Triton kernel through the interpreter: slow on a CPU, so .ci/run runs it apart
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow), *ONE_PASS[1:]])
def test_it_learns_like_adamw(backend):
    """The kernel path through test_adamw8bit's 300-step regression: close to fp32 torch AdamW
    (that test's tolerance, derived there)."""
    from test_adamw8bit import problem, train
    device = "cpu" if backend == "c" else DEVICE
    net_a, batches = problem()
    net_b, _ = problem()
    net_b.load_state_dict(net_a.state_dict())
    net_a.to(device), net_b.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    start = torch.nn.utils.parameters_to_vector(net_a.parameters()).detach().clone()
    losses_a = train(net_a, torch.optim.AdamW(net_a.parameters(), lr=3e-3), batches)
    opt_b = AdamW8bit(net_b.parameters(), lr=3e-3, min_8bit_size=1024, backend=backend)
    losses_b = train(net_b, opt_b, batches)
    assert opt_b.kernel(net_b[2].weight) is {"triton": kernel, "c": adamw8bit_cpu}[backend]
    a = torch.nn.utils.parameters_to_vector(net_a.parameters()).detach()
    b = torch.nn.utils.parameters_to_vector(net_b.parameters()).detach()
    assert (a - b).norm() / (a - start).norm() < 0.15
    final_a, final_b = sum(losses_a[-20:]) / 20, sum(losses_b[-20:]) / 20
    assert abs(final_b - final_a) / final_a < 0.05, (final_a, final_b)


def test_supports_says_why_not():
    w = torch.zeros(4096, device=DEVICE)
    assert kernel.supports(w, torch.zeros_like(w), 256) is None
    assert "contiguous" in kernel.supports(w.view(64, 64).t(), torch.zeros(64, 64, device=DEVICE).t(), 256)
    assert "block size" in kernel.supports(w, torch.zeros_like(w), 100)
    assert "dtypes" in kernel.supports(w.double(), w.double(), 256)
    assert "shape" in kernel.supports(w, torch.zeros(4095, device=DEVICE), 256)
    assert "meta tensors" in kernel.supports(w.to("meta"), w.to("meta"), 256)


def test_backend_choice():
    """auto: the Triton kernel for CUDA tensors only (the interpreter is for tests), the C loop for
    fp32 CPU tensors where it builds, the torch path for the rest; triton where it cannot run: a
    clear error; an unknown backend: refused up front."""
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="cannot step"):
        AdamW8bit([p], backend="triton").step()
    with pytest.raises(ValueError, match="backend"):
        AdamW8bit([p], backend="cuda")
    cpu = torch.nn.Parameter(torch.zeros(4096))
    assert AdamW8bit([cpu]).kernel(cpu) is (adamw8bit_cpu if adamw8bit_cpu.unavailable() is None else None)
    assert AdamW8bit([cpu], backend="torch").uses_kernel(cpu) is False
    assert AdamW8bit([cpu], backend="triton").kernel(cpu) is kernel
    assert AdamW8bit([cpu], backend="c").kernel(cpu) is adamw8bit_cpu
    bf16 = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    assert AdamW8bit([bf16]).uses_kernel(bf16) is False  # the C loop steps fp32 only
    small = torch.nn.Parameter(torch.zeros(100))
    assert AdamW8bit([small], backend="c").uses_kernel(small) is False  # fp32 moments: torch's update


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_picks_the_kernel_on_cuda_at_sd_size():
    """A 3x3 convolution of SD's 1280 channels (14.7M values): "auto" runs the kernel there, and 3 steps
    agree with the torch path as above."""
    n = 1280 * 1280 * 9
    probe = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    assert AdamW8bit([probe]).uses_kernel(probe)
    a, b = two_runs(n, torch.float32, kahan=False, steps=3)
    check_states(a, b)
    close_fp32(a[0], b[0], steps=3)
