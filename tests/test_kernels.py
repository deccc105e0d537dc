"""minidb.kernels.flash_attention against a float64 reference: outputs and dQ, dK, dV.

On a CPU machine the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), with
the interpreter's small unequal blocks (queries 32 / keys 16 forward and dQ, 16 / 32 for dK dV), so
lengths 64 (whole blocks) and 50 or 77 (tails) cover every masked edge; each row of the GPU
config table runs here too. The reference is torch's own SDPA in float64 on the same fp16 inputs,
so causal alignment (top-left) is torch's. Every buffer a kernel writes is NaN-filled first
(`poisoned`): an element left unwritten fails. GPU tests (`-m gpu` selects them; skipped without
CUDA) rerun this at SD's real shapes with the real block sizes, in fp16 and bf16.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
from helpers import rel_err

import minidb.attention
from benchmarks import bench_attention as bench
from minidb.kernels import flash as fa
from minidb.kernels import flash_attention, supports

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output buffer starts as NaN; returns the list of buffers handed out."""
    handed_out, real_alloc = [], fa._alloc

    def alloc(like, shape=None, dtype=None):
        buf = real_alloc(like, shape, dtype).fill_(float("nan"))
        handed_out.append(buf)
        return buf

    monkeypatch.setattr(fa, "_alloc", alloc)
    return handed_out


def inputs(b, h, n, m, d, dtype=torch.float16, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(device, dtype) for length in (n, m, m))
    do = torch.randn(b, h, n, d, generator=g).to(device, dtype)
    return q, k, v, do


def reference(q, k, v, do, causal):
    """Output and gradients in float64 from the same (rounded) inputs."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    o.backward(do.double())
    return o, q.grad, k.grad, v.grad


def run(q, k, v, do, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal=causal)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def check(ours, ref, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.shape == b.shape, name
        assert not torch.isnan(a).any(), f"{name}: NaN (an element never written?)"
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


# (N, M, causal): whole blocks, query tails, the 77 text tokens, CLIP's causal 77, N != M causal.
CASES = [(64, 64, False), (64, 77, False), (50, 77, False),
         (64, 64, True), (77, 77, True), (50, 77, True), (77, 50, True)]


@pytest.mark.parametrize("d", [40, 64, 80, 160])
@pytest.mark.parametrize("n,m,causal", CASES)
def test_matches_float64_reference(poisoned, d, n, m, causal):
    q, k, v, do = inputs(1, 2, n, m, d, seed=d + n + m)
    check(run(q, k, v, do, causal), reference(q, k, v, do, causal), 1e-2)
    assert len(poisoned) == 6  # o, lse, delta, dq, dk, dv: all went through the poisoned path


GPU_TABLE = [(block_d, row) for block_d, table in fa.CONFIGS.items()
             for row in range(max(map(len, table.values())))]


@pytest.mark.parametrize("block_d,row", GPU_TABLE)
def test_gpu_config_table_rows(poisoned, monkeypatch, block_d, row):
    """Each row of the GPU config table (the launch falls back down it on small GPUs), run here
    too: block sizes decide every mask and loop bound; warps and stages change no result."""
    keys = ("BLOCK_Q", "BLOCK_KV", "num_warps", "num_stages")
    table = {kernel: [dict(zip(keys, rows[min(row, len(rows) - 1)]))]
             for kernel, rows in fa.CONFIGS[block_d].items()}
    monkeypatch.setattr(fa, "_configs", lambda kernel, _: table[kernel])
    monkeypatch.setattr(fa, "_first_fit", {})
    d = {64: 40, 128: 80, 256: 160}[block_d]
    for n, m, causal in ((200, 300, True), (130, 77, False)):
        q, k, v, do = inputs(1, 2, n, m, d, seed=row)
        try:
            ours = run(q, k, v, do, causal)
        except triton.runtime.OutOfResources:
            pytest.skip(f"row {row} needs more shared memory than this GPU has")
        check(ours, reference(q, k, v, do, causal), 1e-2)


def test_poison_catches_unwritten_output(poisoned, monkeypatch):
    """Negative control: launch one program fewer, and the check must see the hole."""
    class DropLastProgram:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return self.kernel[(grid[0] - 1,)]

    monkeypatch.setattr(fa, "_fwd_kernel", DropLastProgram(fa._fwd_kernel))
    q, k, v, _ = inputs(1, 2, 64, 77, 40)
    o = flash_attention(q, k, v)
    assert torch.isnan(o[0, 1, -1]).all() and not torch.isnan(o[0, 0]).any()


def test_strided_batched_inputs(poisoned):
    """The models' layout: [B,N,H,D] memory seen as [B,H,N,D], k and v packed in one tensor,
    batch and heads > 1; plus a misaligned view and a head dim with stride != 1."""
    b, h, n, m, d = 2, 3, 50, 77, 40
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, n, h, d, generator=g).to(DEVICE, torch.float16).transpose(1, 2)
    kv = torch.randn(b, m, 2, h, d, generator=g).to(DEVICE, torch.float16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE, torch.float16)
    check(run(q, k, v, do, False), reference(q, k, v, do, False), 1e-2)
    q_odd = torch.randn(b, h, n, d + 1, generator=g).to(DEVICE, torch.float16)[..., 1:]  # 2-byte offset
    v_t = torch.randn(b, h, d, m, generator=g).to(DEVICE, torch.float16).transpose(-1, -2)  # stride(-1) = m
    check(run(q_odd, k, v_t, do, True), reference(q_odd, k, v_t, do, True), 1e-2)


def test_float32_inputs(poisoned):
    q, k, v, do = inputs(1, 2, 50, 77, 40, dtype=torch.float32)
    if CUDA:  # fp32 tiles spill registers on GPUs; the seam's "auto" must send them to SDPA
        assert supports(q, k, v) == "float32 on CUDA (fp16 and bf16 only)"
        return
    check(run(q, k, v, do, True), reference(q, k, v, do, True), 1e-5)


def test_falls_back_to_a_config_that_fits(monkeypatch):
    """A config the GPU has no shared memory for raises OutOfResources at launch; the next one
    in the list runs, and is remembered."""
    import triton
    tried = []

    class SmallSharedMemory:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append(kwargs["BLOCK_Q"])
                if kwargs["BLOCK_Q"] > 16:
                    raise triton.runtime.OutOfResources(10**6, 10**5, "shared memory")
                return self.kernel[grid](*args, **kwargs)
            return launch

    big, small = (dict(BLOCK_Q=b, BLOCK_KV=16, num_warps=4, num_stages=1) for b in (32, 16))
    monkeypatch.setattr(fa, "_configs", lambda kernel, block_d: [big, small])
    monkeypatch.setattr(fa, "_fwd_kernel", SmallSharedMemory(fa._fwd_kernel))
    monkeypatch.setattr(fa, "_first_fit", {})
    q, k, v, _ = inputs(1, 2, 50, 77, 40)
    expected = reference(q, k, v, torch.ones_like(q), False)[0]
    assert rel_err(flash_attention(q, k, v), expected) < 1e-2
    assert rel_err(flash_attention(q, k, v), expected) < 1e-2
    assert tried == [32, 16, 16]  # the second call starts from the config that fit
def test_supports_and_errors():
    x = torch.zeros(1, 2, 8, 40, dtype=torch.float16, device=DEVICE)
    assert supports(x, x, x) is None
    assert supports(x.double(), x.double(), x.double()) == "dtype float64"
    wide = torch.zeros(1, 1, 8, 512, dtype=torch.float16, device=DEVICE)  # the VAE's single head
    assert supports(wide, wide, wide) == "head dim 512 > 256"
    assert "4-D" in supports(x[0], x[0], x[0])
    assert "mixed dtypes" in supports(x, x.float(), x)
    assert "shapes" in supports(x, x[..., :32], x[..., :32])
    with pytest.raises(ValueError, match="head dim 512 > 256"):
        flash_attention(wide, wide, wide)


def test_import_without_triton():
    """No triton (macOS, Windows): the package imports, supports() says why, the call raises."""
    code = ("import sys, torch; sys.modules['triton'] = None\n"
            "from minidb.kernels import supports, flash_attention\n"
            "x = torch.zeros(1, 1, 4, 8)\n"
            "print(supports(x, x, x))\n"
            "try:\n    flash_attention(x, x, x)\nexcept ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("triton not installed") and "ImportError triton not installed" in out


def test_attention_seam_triton_equals_math():
    """minidb.attention's "triton" backend is this kernel, and agrees with the "math" reference
    (N == M for causal: the case the models use)."""
    q, k, v, _ = inputs(2, 2, 50, 77, 40)
    qc, kc, vc, _ = inputs(2, 2, 77, 77, 64)
    for args, causal in (((q, k, v), False), ((qc, kc, vc), True)):
        with minidb.attention.use_backend("math"):
            expected = minidb.attention.attention(*args, causal=causal)
        with minidb.attention.use_backend("triton"):
            got = minidb.attention.attention(*args, causal=causal)
        assert rel_err(got, expected) < 2e-3


# --- benchmark script: its CPU path, shape table and FLOP count -------------------------------
def test_bench_flop_count():
    # Two matmuls of 2·N·M·D each; backward 2.5× that (five matmuls): 3.5× for forward+backward.
    assert bench.attention_flops(1, 1, 2, 3, 5, causal=False) == 4 * 2 * 3 * 5
    assert bench.attention_flops(2, 8, 4096, 4096, 40, causal=False, backward=True) == \
        3.5 * 4 * 2 * 8 * 4096 * 4096 * 40
    # Top-left causal: query i sees min(i + 1, M) keys. N=M=4: 1+2+3+4 = 10 pairs.
    assert bench.attention_flops(1, 1, 4, 4, 1, causal=True) == 4 * 10
    assert bench.attention_flops(1, 1, 5, 3, 1, causal=True) == 4 * (1 + 2 + 3 + 3 + 3)
    mask = torch.ones(77, 77).tril()
    assert bench.attention_flops(1, 1, 77, 77, 1, causal=True) == 4 * mask.sum().item()


def test_bench_shapes_are_sd_v1():
    shapes = {(s.name, s.batch, s.heads, s.n, s.m, s.head_dim, s.causal) for s in bench.SHAPES}
    for n, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
        assert (f"unet self {n}", 2, 8, n, n, d, False) in shapes
        assert (f"unet cross {n}", 2, 8, n, 77, d, False) in shapes
    assert ("clip causal 77", 2, 12, 77, 77, 64, True) in shapes
    assert len(shapes) == 9


@pytest.mark.skipif(CUDA, reason="the no-GPU path; with a GPU main() runs the whole benchmark")
def test_bench_without_gpu_exits_cleanly(capsys):
    assert bench.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow  # a benchmark script's table end to end, as tests/test_benchmarks.py's: .ci/run runs it
def test_bench_table_and_sweep_run(monkeypatch, tmp_path, capsys):
    """The GPU code path end to end on tiny shapes, with a stand-in timer (2 ms per call)."""
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setattr(bench, "median_ms", lambda fn: (fn(), 2.0)[1])
    shapes = [bench.Shape("tiny cross", 1, 2, 40, 77, 40),
              bench.Shape("tiny causal", 1, 2, 20, 20, 16, causal=True)]
    lines = bench.run_table(shapes, pad=True)
    assert len(lines) == 2 + 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header = cells[0]
    assert header[7:] == ["minidb TFLOP/s", "SDPA TFLOP/s", "minidb padded TFLOP/s",
                          "diffusers 2_0 TFLOP/s", "diffusers plain TFLOP/s", "×SDPA"]
    fwd = bench.attention_flops(1, 2, 40, 77, 40) / 2e-3 / 1e12
    assert cells[2][5:] == ["fwd", "2.000"] + [f"{fwd:.1f}"] * 5 + ["1.00"]
    assert cells[3][5] == "fwd+bwd" and cells[3][7] == f"{3.5 * fwd:.1f}"
    assert cells[4][10:12] == ["-", "-"]  # diffusers' UNet attention has no causal mode
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "RESULTS.md"))
    bench.write_results(lines, ["--write"], "test device")
    written = (tmp_path / "RESULTS.md").read_text()
    assert "test device" in written and "python -m benchmarks.bench_attention --write" in written and lines[-1] in written
    monkeypatch.setattr(bench, "CANDIDATES", {"fwd": [(32, 16, 4, 1)], "dq": [(16, 16, 4, 1)],
                                              "dkdv": [(16, 16, 4, 1)]})
    bench.sweep(shapes[:1])
    out = capsys.readouterr().out
    assert "tiny cross D=40 fwd (fwd ms): (32, 16, 4, 1)=2.000" in out and "dkdv (fwd+bwd ms)" in out


# --- GPU: SD v1's real shapes, real block sizes, fp16 and bf16 --------------------------------
SD_SHAPES = [(2, 8, 4096, 4096, 40, False), (2, 8, 4096, 77, 40, False), (2, 8, 1024, 1024, 80, False),
             (2, 8, 1024, 77, 80, False), (2, 8, 256, 256, 160, False), (2, 8, 64, 77, 160, False),
             (2, 12, 77, 77, 64, True), (1, 3, 300, 200, 256, True), (1, 2, 200, 300, 64, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,n,m,d,causal", SD_SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (full SD shapes; no bf16 in the interpreter)")
def test_gpu_sd_shapes(poisoned, dtype, b, h, n, m, d, causal):
    """Within 1e-2 of float64 (fp16) and no worse than 1.5x SDPA's own error in the same dtype."""
    q, k, v, do = inputs(b, h, n, m, d, dtype=dtype, seed=n + d)
    ref = reference(q, k, v, do, causal)
    ours = run(q, k, v, do, causal)
    sdpa = [t.detach() for t in (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)]
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).backward(do)
    sdpa += [qs.grad, ks.grad, vs.grad]
    check(ours, ref, 1e-2 if dtype == torch.float16 else 3e-2)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref):
        assert rel_err(a, r) <= 1.5 * rel_err(s, r) + 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_auto_backend_dispatch(monkeypatch):
    """"auto" on CUDA: the kernel where supported, SDPA (not an error) for the VAE's head of 512."""
    import minidb.kernels
    calls = []

    def spy(q, k, v, causal=False):
        calls.append(q.shape)
        return flash_attention(q, k, v, causal)

    monkeypatch.setattr(minidb.kernels, "flash_attention", spy)
    q, k, v, _ = inputs(2, 8, 256, 77, 40, device="cuda")
    wide = torch.randn(1, 1, 256, 512, device="cuda", dtype=torch.float16)
    with minidb.attention.use_backend("auto"):
        got = minidb.attention.attention(q, k, v)
        out_wide = minidb.attention.attention(wide, wide, wide)
    assert calls == [q.shape]
    assert rel_err(got, F.scaled_dot_product_attention(q, k, v)) < 2e-3
    assert rel_err(out_wide, F.scaled_dot_product_attention(wide, wide, wide)) == 0
