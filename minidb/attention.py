"""The one attention seam. Every model (CLIP, UNet, VAE) calls `attention(q, k, v, causal)`;
which implementation runs is one setting:

    minidb.attention.set_backend("math")            # for the whole process
    with minidb.attention.use_backend("triton"): ... # for a block
    MINIDB_ATTENTION=sdpa python ...                 # from the environment, checked at first use

Backends: "sdpa" (torch.nn.functional.scaled_dot_product_attention), "math" (plain PyTorch,
the readable reference), "triton" (minidb.kernels.flash_attention), and "auto" (the default):
Triton on CUDA for the shapes and dtypes the kernel supports, SDPA everywhere else.

Looking inside (minidb explain): `with record_attention({"name": module, ...}, on_probs):` hands
on_probs(name, probs, backend) the softmax weights [B,H,N,M] of every attention call made inside those
modules, then removes its hooks. The output is still the backend's own: recording changes no value.
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
    return torch.einsum("bhnm,bhmd->bhnd", attention_probabilities(q, k, causal), v.float()).to(q.dtype)


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
    if _recording is not None:
        _recording(q, k, causal, backend)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backend == "math":
        return math_attention(q, k, v, causal)
    assert backend == "triton", backend
    from minidb.kernels import flash_attention
    return flash_attention(q, k, v, causal=causal)


# ---- recording the attention probabilities (minidb explain) -------------------------------------

_recording = None  # while a recorded module runs: a function(q, k, causal, backend); None otherwise
_recording_open = False

# The backends that compute softmax(q kᵀ/√d) as attention_probabilities does, so that its weights are
# the very ones applied to v. SDPA and Triton are fused: they never form the weights, which are then
# recomputed the plain way for the recorded layers, while the output stays the kernel's.
RETURNS_PROBABILITIES = ("math",)


def attention_probabilities(q, k, causal=False):
    """softmax(q kᵀ / √d) in fp32, the weights math_attention applies to v (and what minidb explain
    records): q [B,H,N,D], k [B,H,M,D]
    -> [B,H,N,M], each row summing to 1 over the M keys."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale  # (B, H, N, M)
    if causal:
        n, m = scores.shape[-2:]
        # top-left aligned, as SDPA's is_causal: query i sees keys 0..i (CLIP has n == m anyway)
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(0)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1)


@contextlib.contextmanager
def record_attention(modules: dict, on_probs):
    """Call on_probs(name, probs [B,H,N,M] fp32, backend) for every attention call made while one of
    `modules` ({name: nn.Module}) runs its forward. backend is the one that ran ("sdpa", "math",
    "triton"): outside RETURNS_PROBABILITIES the weights were recomputed, not the kernel's own.
    The hooks are removed on exit, even after an error."""
    global _recording, _recording_open
    if _recording_open:
        raise RuntimeError("record_attention is already active: recordings do not nest")
    handles = []

    def enter(name):
        def record(q, k, causal, backend):
            on_probs(name, attention_probabilities(q, k, causal), backend)

        def hook(module, args):
            global _recording
            _recording = record
        return hook

    def leave(module, args, output):
        global _recording
        _recording = None

    _recording_open = True
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _recording = None
        _recording_open = False
