"""The one attention seam. Every model (CLIP, UNet, VAE) calls `attention(q, k, v, causal)`;
which implementation runs is one setting:

    minidb.attention.set_backend("math")            # for the whole process
    with minidb.attention.use_backend("triton"): ... # for a block
    MINIDB_ATTENTION=sdpa python ...                 # from the environment, checked at first use

Backends: "sdpa" (torch.nn.functional.scaled_dot_product_attention), "math" (plain PyTorch,
the readable reference), "triton" (minidb.kernels.flash_attention), and "auto" (the default):
Triton on CUDA for the shapes and dtypes the kernel supports, SDPA everywhere else.
"""
import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F

from minidb.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "math", "triton")
_backend: str | None = None  # None: MINIDB_ATTENTION is read, and checked, at first use
_fallback_reasons_logged: set[str] = set()


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend in use; the first call reads MINIDB_ATTENTION (a bad value is a ConfigError)."""
    global _backend
    if _backend is None:
        name = os.environ.get("MINIDB_ATTENTION", "").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ConfigError(f"MINIDB_ATTENTION={os.environ['MINIDB_ATTENTION']!r} is not an attention "
                              f"backend: set it to one of {', '.join(BACKENDS)}, or unset it (auto)")
        _backend = name
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    global _backend
    previous = _backend  # may be None (environment not read yet): restored as it was
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def math_attention(q, k, v, causal=False):
    """softmax(q kᵀ / √d) v, in fp32 whatever the input dtype. q [B,H,N,D], k/v [B,H,M,D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale  # (B, H, N, M)
    if causal:
        n, m = scores.shape[-2:]
        # top-left aligned, as SDPA's is_causal: query i sees keys 0..i (CLIP has n == m anyway)
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(0)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v.float()).to(q.dtype)


def _triton_unsupported_reason(q, k, v):
    """None if minidb.kernels.flash_attention can run these tensors, else why not."""
    try:
        from minidb.kernels import supports
    except ImportError as e:  # triton missing (e.g. macOS)
        return f"minidb.kernels unavailable ({e})"
    return supports(q, k, v)


def attention(q, k, v, causal=False):
    """Scaled dot-product attention. q [B,H,N,D], k and v [B,H,M,D] -> [B,H,N,D]."""
    backend = _backend or get_backend()
    if backend == "auto":
        backend = "sdpa"
        if q.is_cuda:
            reason = _triton_unsupported_reason(q, k, v)
            if reason is None:
                backend = "triton"
            elif reason not in _fallback_reasons_logged:
                _fallback_reasons_logged.add(reason)
                log.debug("attention: SDPA instead of Triton: %s", reason)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "math":
        return math_attention(q, k, v, causal)
    assert backend == "triton", backend
    from minidb.kernels import flash_attention
    return flash_attention(q, k, v, causal=causal)
