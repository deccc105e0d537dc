"""The attention seam: its backends compute the same function, and choosing one is one setting."""
import pytest
import torch
import torch.nn.functional as F

from helpers import perturb_, rel_err
from minidb import attention as seam
from minidb.config import tiny_config
from minidb.unet import UNetModel


def qkv(n, m, d=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, length, d, generator=g, dtype=torch.float64).to(dtype)
                 for length in (n, m, m))


def float64_reference(q, k, v, causal):
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:  # query i sees keys 0..i
        i = torch.arange(q.shape[-2])[:, None]
        s = s.masked_fill(torch.arange(k.shape[-2])[None, :] > i, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
@pytest.mark.parametrize("n, m, causal", [(24, 77, False), (77, 77, True), (5, 9, True)])
def test_backends_equal_float64_reference(backend, n, m, causal):
    q, k, v = qkv(n, m)
    with seam.use_backend(backend):
        out = seam.attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = 1e-2 if backend == "triton" else 1e-5  # the kernel computes in fp16/tf32-level precision
    assert rel_err(out, float64_reference(q, k, v, causal)) < tol


def test_math_causal_matches_sdpa_when_lengths_differ():
    q, k, v = qkv(5, 9)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(seam.math_attention(q, k, v, causal=True), ref) < 1e-6


def test_backend_is_one_setting_for_every_model(monkeypatch):
    calls = []
    real = seam.math_attention
    monkeypatch.setattr(seam, "math_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    unet = perturb_(UNetModel(tiny_config().unet), seed=0)  # fresh, its output is zero
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 77, 32)
    with torch.no_grad():
        out_sdpa = unet(x, t, ctx)
        assert not calls
        with seam.use_backend("math"):
            out_math = unet(x, t, ctx)
    assert calls and seam.get_backend() == "auto"
    assert out_sdpa.abs().max() > 0 and rel_err(out_math, out_sdpa) < 1e-5


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*sdpa"):
        seam.set_backend("flash")


def test_environment_is_checked_at_first_use(monkeypatch):
    """MINIDB_ATTENTION is read when attention is first used (importing minidb has no side effects)
    and a bad value is an error then, instead of silently running some backend."""
    from minidb.errors import ConfigError
    monkeypatch.setattr(seam, "_backend", None)
    monkeypatch.setenv("MINIDB_ATTENTION", "bogus")
    with pytest.raises(ConfigError, match="MINIDB_ATTENTION='bogus' is not an attention backend"):
        seam.attention(*qkv(4, 4))
    with seam.use_backend("math"):  # an explicit choice needs no environment, and restores it after
        assert seam.get_backend() == "math"
    assert seam._backend is None
    monkeypatch.setenv("MINIDB_ATTENTION", "math")
    assert seam.get_backend() == "math"
