"""minidb.dreambooth.adamw8bit's update of one tensor as one Triton kernel: a single pass over memory.

    adamw8bit_update(weight, grad, state, tables, lr=..., betas=..., eps=..., weight_decay=..., step=...)

AdamW8bit's torch path steps a tensor chunk by chunk with about twenty operations, each its own pass
over memory (~176 bytes moved per weight, and on a GPU one launch per operation per chunk). Here one
program owns ROWS quantisation blocks of BLOCK values and keeps everything in registers between one
read and one write of each thing it touches: weight and gradient (fp32: 4 + 4 bytes, then 4 written),
the two code bytes (read and written), the blocks' absmax (1/BLOCK of that), and a bf16 weight's
compensation: 14 bytes per fp32 weight, 12 per bf16 weight with compensation.

Per value, in fp32, torch.optim.AdamW's update (the torch path's, minidb/dreambooth/adamw8bit.py):
    m, v   = code_m[m_code] * m_absmax, code_v[v_code] * v_absmax        dequantise
    w      = (w [+ compensation]) * (1 - lr * wd)                          decoupled weight decay
    m      = m + (1 - beta1) * (g - m);  v = v * beta2 + (1 - beta2) * g * g
    w      = w - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    absmax = max |m| (max v) over each block; code = table[fp16 bits of m / absmax]   quantise
Division and square root are the correctly rounded ones (div_rn, sqrt_rn), as torch's are; torch's
fused AdamW and a GPU may each fuse multiplies and adds differently, so results agree to rounding, not bit for bit
(tests/test_adamw8bit_kernel.py states the tolerances). On CPU tensors it runs under TRITON_INTERPRET=1
(the tests); AdamW8bit uses it for CUDA tensors only.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROWS = 4  # quantisation blocks per program: 1024 values at the default block of 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest-even in dtype. bf16 by hand: Triton's interpreter (the CPU tests)
    truncates fp32 -> bf16 whatever rounding is asked for; on a GPU this is what .to() does."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16   # ties to even
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _adamw8bit_kernel(w_ptr, g_ptr, comp_ptr, m_codes_ptr, m_absmax_ptr, v_codes_ptr, v_absmax_ptr,
                      m_code_ptr, v_code_ptr, m_table_ptr, v_table_ptr, n, n_blocks,
                      decay, beta1, beta2, one_minus_beta1, one_minus_beta2, bc2_sqrt, eps, step_size,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, KAHAN: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)                           # [ROWS] block indices
    offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]      # [ROWS, BLOCK]
    inside = offs < n
    row_inside = rows < n_blocks

    w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if KAHAN:  # the master value: the stored weight plus what its rounding lost
        w += tl.load(comp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m_codes = tl.load(m_codes_ptr + offs, mask=inside, other=0).to(tl.int32)
    v_codes = tl.load(v_codes_ptr + offs, mask=inside, other=0).to(tl.int32)
    m = tl.load(m_code_ptr + m_codes) * tl.load(m_absmax_ptr + rows, mask=row_inside, other=0.0)[:, None]
    v = tl.load(v_code_ptr + v_codes) * tl.load(v_absmax_ptr + rows, mask=row_inside, other=0.0)[:, None]

    w = w * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    m = tl.where(inside, m, 0.0)  # past the end: out of every block's absmax
    v = tl.where(inside, v, 0.0)
    w = w + step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)

    stored = _round(w, w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs, stored, mask=inside)
    if KAHAN:  # what rounding into the stored dtype dropped
        tl.store(comp_ptr + offs, _round(w - stored.to(tl.float32), comp_ptr.dtype.element_ty), mask=inside)

    m_absmax = tl.max(tl.abs(m), axis=1)                                          # [ROWS]
    v_absmax = tl.max(v, axis=1)
    m_normed = tl.div_rn(m, tl.maximum(m_absmax, 1.1754943508222875e-38)[:, None]).to(tl.float16)
    v_normed = tl.maximum(tl.div_rn(v, tl.maximum(v_absmax, 1.1754943508222875e-38)[:, None]),
                          5.960464477539063e-08).to(tl.float16)  # >= 2**-24: v never rounds to code 0
    m_bits = m_normed.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    v_bits = v_normed.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(m_codes_ptr + offs, tl.load(m_table_ptr + m_bits), mask=inside)
    tl.store(v_codes_ptr + offs, tl.load(v_table_ptr + v_bits), mask=inside)
    tl.store(m_absmax_ptr + rows, m_absmax, mask=row_inside)
    tl.store(v_absmax_ptr + rows, v_absmax, mask=row_inside)


def supports(weight: torch.Tensor, grad: torch.Tensor, block_size: int) -> str | None:
    """None if adamw8bit_update can step this weight, else a short reason why not."""
    if weight.device.type != "cuda" and not (weight.device.type == "cpu" and INTERPRET):
        return f"{weight.device.type} tensors (CPU needs TRITON_INTERPRET=1 before triton is imported)"
    if weight.dtype not in DTYPES or grad.dtype not in DTYPES:
        return f"dtypes {weight.dtype}, {grad.dtype}"
    if grad.shape != weight.shape or grad.device != weight.device:
        return "gradient and weight differ in shape or device"
    if not (weight.is_contiguous() and grad.is_contiguous()):
        return "not contiguous"
    if block_size & (block_size - 1) or not 16 <= block_size <= 4096:
        return f"block size {block_size} (a power of two from 16 to 4096)"
    return None


def adamw8bit_update(weight: torch.Tensor, grad: torch.Tensor, state: dict, tables, *, lr: float,
                     betas: tuple, eps: float, weight_decay: float, bias_correction1: float,
                     bias_correction2_sqrt: float, block_size: int) -> None:
    """One AdamW update of weight (in place) and of its 8-bit moments in `state` (AdamW8bit's
    exp_avg_codes / exp_avg_absmax / exp_avg_sq_codes / exp_avg_sq_absmax, and "kahan" if there is a
    compensation buffer). tables: (signed code values, unsigned code values, signed nearest-code
    table, unsigned nearest-code table), AdamW8bit.code()'s, on weight's device."""
    reason = supports(weight, grad, block_size)
    if reason is not None:
        raise ValueError(f"adamw8bit_update cannot step this tensor: {reason}")
    grid, args, consts = plan(weight, grad, state, tables, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              bias_correction1=bias_correction1, bias_correction2_sqrt=bias_correction2_sqrt,
                              block_size=block_size)
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
        _adamw8bit_kernel[grid](*args, **consts)


def plan(weight, grad, state, tables, *, lr, betas, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
         block_size):
    """(grid, arguments, constexprs) of the launch (benchmarks/kernel_resources.py compiles it for GPUs)."""
    beta1, beta2 = betas
    n = weight.numel()
    n_blocks = triton.cdiv(n, block_size)
    compensation = state.get("kahan")
    m_code, v_code, m_table, v_table = tables
    args = (weight, grad, weight if compensation is None else compensation,
            state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"],
            m_code, v_code, m_table, v_table, n, n_blocks,
            1 - lr * weight_decay, beta1, beta2, 1 - beta1, 1 - beta2, bias_correction2_sqrt, eps,
            -lr / bias_correction1)
    return (triton.cdiv(n_blocks, ROWS),), args, dict(BLOCK=block_size, ROWS=ROWS, KAHAN=compensation is not None)
