"""Custom GPU kernels (installed as minidb.kernels).

    from minidb.kernels import flash_attention, supports
    o = flash_attention(q, k, v, causal=False)   # q [B,H,N,D], k/v [B,H,M,D], like SDPA
    o = flash_attention(q, k, v, scale=0.1, configs={"fwd": (64, 64, 4, 2)})  # for measuring
    supports(q, k, v)                            # None, or why the kernel cannot run them

    from minidb.kernels.adamw8bit import adamw8bit_update   # AdamW8bit's step in one pass (CUDA)
    from minidb.kernels.adamw8bit_cpu import adamw8bit_update  # the same, one C loop (fp32, CPU)

Triton kernels, and one C loop (built on first use with the system's C compiler); the Triton
kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
Without triton this package still imports: supports() says why and flash_attention raises.
"""
try:
    from .flash import flash_attention, supports
except ImportError as _error:  # triton missing (macOS, Windows)
    _reason = f"triton not installed ({_error})"

    def supports(q, k, v):
        return _reason

    def flash_attention(q, k, v, causal=False, scale=None, configs=None):
        raise ImportError(_reason)

__all__ = ["flash_attention", "supports"]
