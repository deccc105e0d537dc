"""minidb.kernels.adamw8bit_cpu, AdamW8bit's C loop for CPU tensors: what test_adamw8bit_kernel.py
(the update against the torch path, to rounding) does not cover. Its fp32 -> fp16 rounding against
torch's bit for bit, over every class of float; thread counts; NaN gradients; and the build: the
cache, a missing or failing compiler, and the torch path it then falls back to, with a warning."""
import warnings

import pytest
import torch

import minidb.dreambooth.adamw8bit as adamw8bit_module
from minidb.dreambooth.adamw8bit import AdamW8bit
from minidb.kernels import adamw8bit_cpu

pytestmark = pytest.mark.skipif(adamw8bit_cpu.unavailable() is not None,
                                reason=f"C loop: {adamw8bit_cpu.unavailable()}")
MOMENTS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def torch_fp16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.half().view(torch.int16).int() & 0xFFFF


def test_fp16_rounding_is_torchs():
    """Every fp16 value, the midpoints between neighbours (ties: to even) and the fp32 values on
    either side of each, at both signs; fp32's subnormals, NaNs and infinities; and a million
    random bit patterns. NaNs need only stay NaNs (the nearest-code tables map every NaN alike)."""
    every_fp16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = every_fp16[torch.isfinite(every_fp16)].unique()                      # sorted
    midpoints = (finite[1:].double() + finite[:-1].double()) / 2                   # exact in fp32
    midpoints = midpoints.float()
    up, down = torch.nextafter(midpoints, torch.tensor(float("inf"))), torch.nextafter(midpoints, torch.tensor(0.0))
    beyond = torch.tensor([65504.0, 65519.0, 65520.0, 65536.0, 1e30, float("inf"), -float("inf"), float("nan"),
                           2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -26, 1e-45, 2.0 ** -14, 2.0 ** -24 * 1.5])
    random_bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1_000_000,), dtype=torch.int64,
                                generator=torch.Generator().manual_seed(0)).int().view(torch.float32)
    x = torch.cat([finite, midpoints, up, down, beyond, -beyond, random_bits])
    ours, theirs = adamw8bit_cpu.fp16_bits(x), torch_fp16_bits(x)
    nan = torch.isnan(x)
    assert nan.any() and (~nan).sum() > 1_000_000
    assert torch.equal(ours[~nan], theirs[~nan])
    ours_nan = ours[nan]
    assert (((ours_nan & 0x7C00) == 0x7C00) & ((ours_nan & 0x3FF) != 0)).all()


def step_twice(n, threads, grad_fn=None):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n) * 0.1)
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, backend="c")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i in range(2):
            p.grad = grad_fn(i) if grad_fn else torch.randn(n) * torch.logspace(-5, 0, n)
            opt.step()
    finally:
        torch.set_num_threads(before)
    return p, opt.state[p]


def test_threads_change_nothing():
    """Threads split the blocks and each block's arithmetic is the same whoever runs it: bit-equal
    on 1 and 3 threads (n: 300 blocks and a short one, enough for 3 threads of at least 64 blocks)."""
    n = 300 * 256 + 100
    (pa, sa), (pb, sb) = step_twice(n, 1), step_twice(n, 3)
    assert torch.equal(pa, pb)
    for name in MOMENTS:
        assert torch.equal(sa[name], sb[name]), name


def test_nan_gradient_as_the_torch_path():
    """A NaN in a block's gradient makes that block's m and v NaN, its absmax NaN, as the torch path's
    amax does (the fp16 loss scaler skips such steps before they get here; this is the raw optimizer)."""
    n = 4 * 256

    def grad(i):
        g = torch.randn(n, generator=torch.Generator().manual_seed(i)) * 1e-2
        g[300] = float("nan") if i == 1 else g[300]
        return g
    runs = {}
    for backend in ("torch", "c"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(n) * 0.1)
        opt = AdamW8bit([p], lr=1e-2, min_8bit_size=1024, backend=backend)
        for i in range(2):
            p.grad = grad(i)
            opt.step()
        runs[backend] = p.detach(), opt.state[p]
    (pt, st), (pc, sc) = runs["torch"], runs["c"]
    for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.isnan(sc[name][1]) and torch.isnan(st[name][1])
        assert torch.allclose(sc[name], st[name], rtol=1e-6, atol=0, equal_nan=True)
    assert torch.isnan(pc[300]) and torch.isnan(pt[300])
    assert torch.equal(torch.isnan(pc), torch.isnan(pt))


def fresh_build(monkeypatch, tmp_path, **env):
    """adamw8bit_cpu as if never loaded, with its cache in tmp_path and `env` set."""
    monkeypatch.setattr(adamw8bit_cpu, "_library", None)
    monkeypatch.setattr(adamw8bit_cpu, "_why_not", None)
    monkeypatch.setenv("MINIDB_CACHE", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_builds_once_into_the_cache(monkeypatch, tmp_path):
    fresh_build(monkeypatch, tmp_path)
    assert adamw8bit_cpu.unavailable() is None
    built = list(tmp_path.glob("adamw8bit_cpu-*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temporary left
    mtime = built[0].stat().st_mtime_ns
    fresh_build(monkeypatch, tmp_path)
    assert adamw8bit_cpu.unavailable() is None and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


@pytest.mark.parametrize("env, why", [({"CC": "no-such-compiler-xyz"}, "no C compiler"),
                                      ({"CC": "false"}, "failed to build"),
                                      ({"MINIDB_NO_C": "1"}, "MINIDB_NO_C=1")])
def test_without_the_loop_the_torch_path_with_a_warning(monkeypatch, tmp_path, env, why):
    """No compiler, a compiler that fails, or the loop turned off: unavailable() says which; "auto"
    then steps with the torch path (same results) and warns once; backend "c" is a clear error."""
    fresh_build(monkeypatch, tmp_path, **env)
    monkeypatch.setattr(adamw8bit_module, "_warned", False)
    assert why in adamw8bit_cpu.unavailable()
    p = torch.nn.Parameter(torch.randn(8192))
    p.grad = torch.randn(8192)
    with pytest.warns(UserWarning, match="C loop .* unavailable"):
        opt = AdamW8bit([p])
        opt.step()
    assert opt.kernel(p) is None and opt.state[p]["step"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        opt.step()
    with pytest.raises(ValueError, match=why):
        AdamW8bit([p], backend="c").step()


def test_supports_says_why_not():
    w = torch.zeros(4096)
    assert adamw8bit_cpu.supports(w, torch.zeros_like(w), 256) is None
    assert "fp32" in adamw8bit_cpu.supports(w.bfloat16(), w.bfloat16(), 256)
    assert "contiguous" in adamw8bit_cpu.supports(w.view(64, 64).t(), torch.zeros(64, 64).t(), 256)
    assert "shape" in adamw8bit_cpu.supports(w, torch.zeros(4095), 256)
    assert "CPU" in adamw8bit_cpu.supports(w.to("meta"), w.to("meta"), 256)
