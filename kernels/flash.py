"""Flash attention in Triton, forward and backward, for Stable Diffusion's shapes.

    o = flash_attention(q, k, v, causal=False)   # q [B,H,N,D], k and v [B,H,M,D] -> [B,H,N,D]

Same layout and result as torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...),
without ever storing the N×M score matrix (Dao et al. 2022; loop order of FlashAttention-2).

Forward: a program owns BLOCK_Q query rows and walks the keys BLOCK_KV at a time, keeping in fp32
registers a running row max m, a running row sum l and the unnormalised output (online softmax).
It writes O and lse = m + log2(l), all the backward needs to rebuild P without storing it.

Backward, with P = softmax(S), dP = dO Vᵀ and delta = rowsum(dO ∘ O) (equal to rowsum(P ∘ dP)):
    dV = Pᵀ dO      dS = P ∘ (dP − delta)      dK = dSᵀ Q · scale      dQ = dS K · scale
A preprocess kernel computes delta; one kernel per key block accumulates dK and dV over all the
queries, one kernel per query block accumulates dQ over all the keys. Every output element has
exactly one writer: no atomics, deterministic, and an unwritten element is a bug the tests see.

Scores are kept in base 2 (scale · log2 e folded into one multiply) so every exponential is exp2.
Any N and M: tail rows and columns are masked loads of zeros, their scores -inf / their P zero.
Causal is top-left aligned like SDPA's is_causal: query i sees keys j <= i, also when N != M.

Head dims up to 256 (SD's 40, 80, 160 are not powers of two): tl.arange and tl.dot need powers of
two, so the block's head dim is the next one (at least 16) and the columns past D are masked loads
of zeros, which add nothing to q·k and are never stored. Masking rather than zero-padding q, k, v
in memory: the dots do the padded block's work either way, and the masked loads stay 16-byte
vectors (in the sm_90 PTX every q, k, v, dO tile load is 16 bytes wide for D = 40, 80, 160 once
ALIGN lets the compiler prove the row strides are multiples of 8 elements; without ALIGN they are
all 2 bytes wide), so padding in memory can only add copies. Not yet timed on a GPU:
`python -m benchmarks.bench_attention --pad` does.
fp16 and bf16 on GPUs; fp32 only in the interpreter (fp32 tiles spill registers on a GPU).
"""
import contextlib
import dataclasses
import math

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A [rows, cols] tile with zeros past n_rows / n_cols; masks only where a tail can be."""
    if EVEN_ROWS and EVEN_COLS:
        x = tl.load(ptrs)
    elif EVEN_ROWS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    elif EVEN_COLS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS and EVEN_COLS:
        tl.store(ptrs, x)
    elif EVEN_ROWS:
        tl.store(ptrs, x, mask=cols[None, :] < n_cols)
    elif EVEN_COLS:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _head_offset(bh, H, stride_b, stride_h, ALIGN: tl.constexpr):
    """Start of head (b, h) in int64 (big tensors overflow int32); the strides come in units of
    ALIGN elements so the compiler can prove 16-byte alignment and vectorise the loads."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return b * (stride_b * ALIGN) + h * (stride_h * ALIGN)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N_Q, N_KV, qk_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                ALIGN: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
                EVEN_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                BLOCK_D: tl.constexpr):
    n_q_blocks = tl.cdiv(N_Q, BLOCK_Q)
    bh = tl.program_id(0) // n_q_blocks        # consecutive programs share K and V in L2
    start_q = (tl.program_id(0) % n_q_blocks) * BLOCK_Q
    Q += _head_offset(bh, H, sqb, sqh, ALIGN)
    K += _head_offset(bh, H, skb, skh, ALIGN)
    V += _head_offset(bh, H, svb, svh, ALIGN)
    O += _head_offset(bh, H, sob, soh, ALIGN)
    rows = start_q + tl.arange(0, BLOCK_Q)
    offs_kv = tl.arange(0, BLOCK_KV)
    dims = tl.arange(0, BLOCK_D)

    q = _load_tile(Q + rows[:, None] * (sqn * ALIGN) + dims[None, :], rows, N_Q, dims, HEAD_DIM,
                   EVEN_Q, EVEN_D)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    if CAUSAL:
        end_kv = tl.minimum(N_KV, start_q + BLOCK_Q)
    else:
        end_kv = N_KV
    # Every row sees key 0 in the first block, so m_i is finite after it and no row turns NaN.
    for start_kv in range(0, end_kv, BLOCK_KV):
        cols = start_kv + offs_kv
        k = _load_tile(K + cols[:, None] * (skn * ALIGN) + dims[None, :], cols, N_KV, dims, HEAD_DIM,
                       EVEN_KV, EVEN_D)
        v = _load_tile(V + cols[:, None] * (svn * ALIGN) + dims[None, :], cols, N_KV, dims, HEAD_DIM,
                       EVEN_KV, EVEN_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_Q, BLOCK_KV)
        if not EVEN_KV:
            s = tl.where(cols[None, :] < N_KV, s, float("-inf"))
        if CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    _store_tile(O + rows[:, None] * (son * ALIGN) + dims[None, :], acc.to(O.dtype.element_ty),
                rows, N_Q, dims, HEAD_DIM, EVEN_Q, EVEN_D)
    lse_ptrs = LSE + bh.to(tl.int64) * N_Q + rows
    if EVEN_Q:
        tl.store(lse_ptrs, m_i + tl.log2(l_i))
    else:
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=rows < N_Q)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, soh, son, sdob, sdoh, sdon, H, N_Q,
                           HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, EVEN_Q: tl.constexpr,
                           EVEN_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    n_q_blocks = tl.cdiv(N_Q, BLOCK_Q)
    bh = tl.program_id(0) // n_q_blocks
    rows = (tl.program_id(0) % n_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    O += _head_offset(bh, H, sob, soh, ALIGN)
    DO += _head_offset(bh, H, sdob, sdoh, ALIGN)
    o = _load_tile(O + rows[:, None] * (son * ALIGN) + dims[None, :], rows, N_Q, dims, HEAD_DIM,
                   EVEN_Q, EVEN_D)
    do = _load_tile(DO + rows[:, None] * (sdon * ALIGN) + dims[None, :], rows, N_Q, dims, HEAD_DIM,
                    EVEN_Q, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + rows, delta, mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                     sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     H, N_Q, N_KV, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     ALIGN: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
                     EVEN_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    n_kv_blocks = tl.cdiv(N_KV, BLOCK_KV)
    bh = tl.program_id(0) // n_kv_blocks
    start_kv = (tl.program_id(0) % n_kv_blocks) * BLOCK_KV
    Q += _head_offset(bh, H, sqb, sqh, ALIGN)
    K += _head_offset(bh, H, skb, skh, ALIGN)
    V += _head_offset(bh, H, svb, svh, ALIGN)
    DO += _head_offset(bh, H, sdob, sdoh, ALIGN)
    DK += _head_offset(bh, H, sdkb, sdkh, ALIGN)
    DV += _head_offset(bh, H, sdvb, sdvh, ALIGN)
    LSE += bh.to(tl.int64) * N_Q
    DELTA += bh.to(tl.int64) * N_Q
    cols = start_kv + tl.arange(0, BLOCK_KV)
    offs_q = tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)

    k = _load_tile(K + cols[:, None] * (skn * ALIGN) + dims[None, :], cols, N_KV, dims, HEAD_DIM,
                   EVEN_KV, EVEN_D)
    v = _load_tile(V + cols[:, None] * (svn * ALIGN) + dims[None, :], cols, N_KV, dims, HEAD_DIM,
                   EVEN_KV, EVEN_D)
    dk = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    if CAUSAL:
        start_q0 = (start_kv // BLOCK_Q) * BLOCK_Q   # queries before start_kv see none of these keys
    else:
        start_q0 = 0
    # Work in the transposed frame (keys on rows) so dK and dV come out of the dots directly.
    for start_q in range(start_q0, N_Q, BLOCK_Q):
        rows = start_q + offs_q
        q = _load_tile(Q + rows[:, None] * (sqn * ALIGN) + dims[None, :], rows, N_Q, dims, HEAD_DIM,
                       EVEN_Q, EVEN_D)
        do = _load_tile(DO + rows[:, None] * (sdon * ALIGN) + dims[None, :], rows, N_Q, dims,
                        HEAD_DIM, EVEN_Q, EVEN_D)
        if EVEN_Q:
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        else:
            lse = tl.load(LSE + rows, mask=rows < N_Q, other=0.0)
            delta = tl.load(DELTA + rows, mask=rows < N_Q, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_KV, BLOCK_Q)
        p_t = tl.exp2(s_t - lse[None, :])
        if not EVEN_Q:
            p_t = tl.where(rows[None, :] < N_Q, p_t, 0.0)
        if CAUSAL:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)

    dk *= sm_scale
    _store_tile(DK + cols[:, None] * (sdkn * ALIGN) + dims[None, :], dk.to(DK.dtype.element_ty),
                cols, N_KV, dims, HEAD_DIM, EVEN_KV, EVEN_D)
    _store_tile(DV + cols[:, None] * (sdvn * ALIGN) + dims[None, :], dv.to(DV.dtype.element_ty),
                cols, N_KV, dims, HEAD_DIM, EVEN_KV, EVEN_D)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                   sdqb, sdqh, sdqn,
                   H, N_Q, N_KV, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   ALIGN: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr,
                   EVEN_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    n_q_blocks = tl.cdiv(N_Q, BLOCK_Q)
    bh = tl.program_id(0) // n_q_blocks
    start_q = (tl.program_id(0) % n_q_blocks) * BLOCK_Q
    Q += _head_offset(bh, H, sqb, sqh, ALIGN)
    K += _head_offset(bh, H, skb, skh, ALIGN)
    V += _head_offset(bh, H, svb, svh, ALIGN)
    DO += _head_offset(bh, H, sdob, sdoh, ALIGN)
    DQ += _head_offset(bh, H, sdqb, sdqh, ALIGN)
    rows = start_q + tl.arange(0, BLOCK_Q)
    offs_kv = tl.arange(0, BLOCK_KV)
    dims = tl.arange(0, BLOCK_D)

    q = _load_tile(Q + rows[:, None] * (sqn * ALIGN) + dims[None, :], rows, N_Q, dims, HEAD_DIM,
                   EVEN_Q, EVEN_D)
    do = _load_tile(DO + rows[:, None] * (sdon * ALIGN) + dims[None, :], rows, N_Q, dims, HEAD_DIM,
                    EVEN_Q, EVEN_D)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    if CAUSAL:
        end_kv = tl.minimum(N_KV, start_q + BLOCK_Q)
    else:
        end_kv = N_KV
    for start_kv in range(0, end_kv, BLOCK_KV):
        cols = start_kv + offs_kv
        k = _load_tile(K + cols[:, None] * (skn * ALIGN) + dims[None, :], cols, N_KV, dims, HEAD_DIM,
                       EVEN_KV, EVEN_D)
        v = _load_tile(V + cols[:, None] * (svn * ALIGN) + dims[None, :], cols, N_KV, dims, HEAD_DIM,
                       EVEN_KV, EVEN_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale   # (BLOCK_Q, BLOCK_KV)
        p = tl.exp2(s - lse[:, None])
        if not EVEN_KV:
            p = tl.where(cols[None, :] < N_KV, p, 0.0)   # zero keys past M would still score 0
        if CAUSAL:
            p = tl.where(cols[None, :] <= rows[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq *= sm_scale
    _store_tile(DQ + rows[:, None] * (sdqn * ALIGN) + dims[None, :], dq.to(DQ.dtype.element_ty),
                rows, N_Q, dims, HEAD_DIM, EVEN_Q, EVEN_D)


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------
INTERPRET = type(_fwd_kernel).__name__ == "InterpretedFunction"   # TRITON_INTERPRET=1 at import

# (BLOCK_Q, BLOCK_KV, num_warps, num_stages) per kernel and head-dim block, best first. A launch
# takes the first that fits the GPU's shared memory (Triton raises OutOfResources before running
# anything); the later ones fit an A100 (163 KB), then consumer cards (99 KB), then a T4 (64 KB).
# Every row a launch of SD v1 takes on sm_80, sm_89 and sm_90 compiles without register spills,
# except two small ones outside any loop (tests/test_kernel_resources.py checks this; the table
# is in benchmarks/RESULTS.md). Where several configs compile clean, the one kept is the one
# expected to be fastest; time them with `python -m benchmarks.bench_attention --sweep`.
CONFIGS = {
    # dkdv 8 warps, not 4: the same tiles, grid and shared memory, with the dK/dV accumulators
    # over twice the threads (4 warps spilled registers).
    64: dict(fwd=[(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2)],
             dq=[(128, 32, 4, 3), (64, 32, 4, 2)],
             dkdv=[(32, 128, 8, 3), (32, 64, 4, 2)]),
    128: dict(fwd=[(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
              dq=[(128, 32, 8, 2), (64, 32, 4, 2)],
              dkdv=[(32, 128, 8, 2), (32, 64, 4, 2), (16, 32, 4, 1)]),
    # fwd's sm_89 fallback 8 warps, not 4: the same tiles (4 spilled registers), and twice
    # the warps per SM, where its 68 KB of shared memory allow one program per SM.
    # dkdv 32 keys per program, not 64: 64 spilled registers, in the query loop too, on sm_90. At
    # D = 160 SD has at most 256 tokens and B×H = 16: 64-key blocks make 64 programs (32 for the 77
    # text keys) for 108-132 SMs, 32-key blocks twice as many. (64, 32, 8, 2) and (32, 32, 8, 3)
    # compile clean too, with the same grid and 33 KB more shared memory: the sweep may prefer them.
    256: dict(fwd=[(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1)],
              dq=[(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
              dkdv=[(32, 32, 8, 2), (16, 32, 4, 1)]),
}
# Interpreter: small unequal blocks, quick in numpy, and every tail and causal edge is hit.
INTERPRET_CONFIGS = dict(fwd=[(32, 16, 4, 1)], dq=[(32, 16, 4, 1)], dkdv=[(16, 32, 4, 1)])
PREPROCESS_BLOCK_Q = 16 if INTERPRET else 64


def _configs(kernel: str, block_d: int) -> list[dict]:
    table = INTERPRET_CONFIGS if INTERPRET else CONFIGS[max(64, block_d)]
    return [dict(BLOCK_Q=q, BLOCK_KV=kv, num_warps=w, num_stages=s) for q, kv, w, s in table[kernel]]


@dataclasses.dataclass
class Launch:
    """One kernel launch as the host plans it, before any GPU is involved: the kernel, its
    arguments, and the configs it may take, best first, each as (grid, keyword arguments).
    The first that fits the GPU runs; tests/test_kernel_resources.py compiles the same list."""
    name: str                            # "fwd", "preprocess", "dkdv" or "dq"
    kernel: object
    args: tuple
    candidates: list[tuple[tuple, dict]]
    remember: tuple | None = None        # _first_fit's key; None for configs passed explicitly


def _plan(name: str, kernel, grid_len: int, bh: int, n_q: int, n_kv: int, args, consts, config=None):
    """A Launch over bh × ⌈grid_len / block⌉ programs, trying the table's configs (or `config`)."""
    if config is None:
        configs = _configs(name, consts["BLOCK_D"])
        remember = (name, consts["BLOCK_D"], args[0].dtype, args[0].device)
    else:
        configs = [dict(zip(("BLOCK_Q", "BLOCK_KV", "num_warps", "num_stages"), config))]
        remember = None
    candidates = []
    for cfg in configs:
        block = cfg["BLOCK_KV"] if name == "dkdv" else cfg["BLOCK_Q"]
        even = dict(EVEN_Q=n_q % cfg["BLOCK_Q"] == 0, EVEN_KV=n_kv % cfg["BLOCK_KV"] == 0)
        candidates.append(((bh * triton.cdiv(grid_len, block),), dict(consts, **even, **cfg)))
    return Launch(name, kernel, args, candidates, remember)


_first_fit: dict[tuple, int] = {}


def _run(launch: Launch):
    """Run the first candidate that fits the GPU, starting from the one that fitted last time."""
    start = _first_fit.get(launch.remember, 0)
    for i in range(start, len(launch.candidates)):
        grid, kwargs = launch.candidates[i]
        try:
            launch.kernel[grid](*launch.args, **kwargs)
        except triton.runtime.OutOfResources:
            if i + 1 == len(launch.candidates):
                raise
            continue
        if launch.remember is not None:
            _first_fit[launch.remember] = i
        return


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _alloc(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Every buffer a kernel writes is made here; the tests swap in a NaN-filled one."""
    if shape is None:
        return torch.empty_like(like)  # keeps q's strides: [B,N,H,D] memory stays free to reshape
    return torch.empty(shape, dtype=dtype, device=like.device)


def _strides(*tensors: torch.Tensor) -> tuple[int, list[int]]:
    """(alignment in elements, the (b, h, n) strides divided by it) for the kernels' int args."""
    elems16 = 16 // tensors[0].element_size()
    strides = [s for t in tensors for s in t.stride()[:3]]
    aligned = all(s % elems16 == 0 for s in strides) and all(t.data_ptr() % 16 == 0 for t in tensors)
    align = elems16 if aligned else 1
    return align, [s // align for s in strides]


def plan_forward(q, k, v, causal: bool, sm_scale: float, configs: dict | None = None):
    """(o, lse, [Launch]): the forward's outputs, allocated, and the launch that fills them."""
    (b, h, n_q, d), n_kv = q.shape, k.shape[2]
    configs = configs or {}
    block_d = max(16, triton.next_power_of_2(d))
    o = _alloc(q)
    lse = _alloc(q, (b * h, n_q), torch.float32)
    align, strides = _strides(q, k, v, o)
    consts = dict(HEAD_DIM=d, CAUSAL=causal, ALIGN=align, EVEN_D=d == block_d, BLOCK_D=block_d)
    fwd = _plan("fwd", _fwd_kernel, n_q, b * h, n_q, n_kv,
                (q, k, v, o, lse, *strides, h, n_q, n_kv, sm_scale * LOG2E), consts, configs.get("fwd"))
    return o, lse, [fwd]


def plan_backward(do, q, k, v, o, lse, causal: bool, sm_scale: float, configs: dict | None = None):
    """(dq, dk, dv, [Launch]): the gradients, allocated, and the three launches that fill them."""
    (b, h, n_q, d), n_kv = q.shape, k.shape[2]
    configs = configs or {}
    block_d = max(16, triton.next_power_of_2(d))
    delta = _alloc(q, (b * h, n_q), torch.float32)
    align, strides = _strides(o, do)
    block_q = PREPROCESS_BLOCK_Q
    preprocess = Launch("preprocess", _bwd_preprocess_kernel, (o, do, delta, *strides, h, n_q), [(
        (b * h * triton.cdiv(n_q, block_q),),
        dict(HEAD_DIM=d, ALIGN=align, EVEN_Q=n_q % block_q == 0, EVEN_D=d == block_d, BLOCK_Q=block_q,
             BLOCK_D=block_d))])

    dq, dk, dv = _alloc(q), _alloc(k), _alloc(v)
    consts = dict(HEAD_DIM=d, CAUSAL=causal, EVEN_D=d == block_d, BLOCK_D=block_d)
    sizes = (h, n_q, n_kv, sm_scale * LOG2E, sm_scale)
    align, strides = _strides(q, k, v, do, dk, dv)
    dkdv = _plan("dkdv", _bwd_dkdv_kernel, n_kv, b * h, n_q, n_kv,
                 (q, k, v, do, lse, delta, dk, dv, *strides, *sizes), dict(consts, ALIGN=align),
                 configs.get("dkdv"))
    align, strides = _strides(q, k, v, do, dq)
    dq_launch = _plan("dq", _bwd_dq_kernel, n_q, b * h, n_q, n_kv,
                      (q, k, v, do, lse, delta, dq, *strides, *sizes), dict(consts, ALIGN=align),
                      configs.get("dq"))
    return dq, dk, dv, [preprocess, dkdv, dq_launch]


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, configs):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        o, lse, launches = plan_forward(q, k, v, causal, sm_scale, configs)
        with _on_device_of(q):
            for launch in launches:
                _run(launch)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale, ctx.configs = causal, sm_scale, configs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv, launches = plan_backward(_unit_stride(do), q, k, v, o, lse, ctx.causal, ctx.sm_scale,
                                             ctx.configs)
        with _on_device_of(q):
            for launch in launches:
                _run(launch)
        return dq, dk, dv, None, None, None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if flash_attention can run these tensors, else a short reason why not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "expected 4-D [B, H, N, D] tensors"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not q.dtype == k.dtype == v.dtype:
        return f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype not in DTYPES:
        return f"dtype {str(q.dtype).removeprefix('torch.')}"
    if not q.device == k.device == v.device:
        return "tensors on different devices"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} > {MAX_HEAD_DIM}"
    if min(q.shape) == 0 or k.shape[2] == 0:
        return "empty tensor"
    if q.device.type == "cuda":
        if q.dtype == torch.float32:  # fp32 tiles spill registers: SDPA's fp32 kernels win
            return "float32 on CUDA (fp16 and bf16 only)"
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
            return "bf16 needs compute capability 8.0"
    elif not (q.device.type == "cpu" and INTERPRET):
        return f"{q.device.type} tensors (CPU needs TRITON_INTERPRET=1 before triton is imported)"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, configs: dict | None = None):
    """softmax(q kᵀ · scale [+ top-left causal mask]) v. q [B,H,N,D], k and v [B,H,M,D] -> [B,H,N,D].

    scale defaults to 1/√D, as in SDPA. configs, for measuring: {"fwd" | "dkdv" | "dq": (BLOCK_Q,
    BLOCK_KV, num_warps, num_stages)} runs those kernels with exactly that config instead of the
    first in CONFIGS that fits (python -m benchmarks.bench_attention --sweep)."""
    reason = supports(q, k, v)
    if reason is not None:
        raise ValueError(f"flash_attention cannot run these tensors: {reason}")
    if configs and not set(configs) <= {"fwd", "dkdv", "dq"}:
        raise ValueError(f"configs: unknown kernels {sorted(set(configs) - {'fwd', 'dkdv', 'dq'})}")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, bool(causal), sm_scale, configs)
