"""minidb.dreambooth.adamw8bit's update of one fp32 CPU tensor as one C loop (adamw8bit_cpu.c), built on first use.

    adamw8bit_update(weight, grad, state, tables, lr=..., betas=..., ...)  # as minidb.kernels.adamw8bit's

Why: on CPU, AdamW8bit's torch path is ~20 whole-chunk operations, and its code lookups (gathers)
run on one core. The C loop reads and writes each byte once and splits the blocks between torch's
threads (`python -m benchmarks.bench_optimizer` times it against the torch path and torch's fused AdamW).

Why built here and not at install: a compiled extension in setup.py would need torch at build time
(pip's build isolation then fetches an unpinned, multi-GB torch). The loop is plain C with no torch
headers, so the system's C compiler (`cc`, or $CC) builds it quickly, once per machine and
source version, into $MINIDB_CACHE (default ~/.cache/minidb); ctypes loads it. Where there is no
compiler, or MINIDB_NO_C=1, `unavailable()` says why and AdamW8bit keeps its torch path: the same
results to rounding (tests/test_adamw8bit_kernel.py), only slower.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from minidb.files import atomic_write

SOURCE = Path(__file__).with_name("adamw8bit_cpu.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]
NATIVE = "-march=native"  # this CPU's vector width (AVX2 where there is one, not just SSE2); dropped if refused
_library: ctypes.CDLL | None = None
_why_not: str | None = None  # set once building or loading has failed


def cache_dir() -> Path:
    return Path(os.environ.get("MINIDB_CACHE") or Path.home() / ".cache" / "minidb")


def cpu_identity() -> str:
    """What -march=native builds for: a cache shared by different machines (an NFS home) keeps one
    library per kind of CPU, and none runs where its instructions do not exist."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({l for l in lines if l.split(":")[0].strip() in ("model name", "flags", "Features")}))
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r} is not on PATH; set $CC)")
    key = hashlib.sha256(SOURCE.read_bytes() + "\n".join([compiler, *FLAGS, NATIVE, platform.machine(),
                                                          cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"adamw8bit_cpu-{key}.so"
    if not target.exists():
        with atomic_write(target) as built:  # built aside, then renamed: another process never loads half a file
            for flags in ([*FLAGS, NATIVE], FLAGS):
                run = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
                if run.returncode == 0:
                    break
            else:
                raise OSError(f"{compiler} failed to build {SOURCE.name}: {run.stderr.strip()[-500:]}")
    library = ctypes.CDLL(str(target))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.adamw8bit_step.argtypes = [p] * 10 + [i64] * 2 + [f32] * 8 + [ctypes.c_int]
    library.adamw8bit_step.restype = ctypes.c_int
    library.fp16_bits_of.argtypes = [p, p, i64]
    library.fp16_bits_of.restype = None
    return library


def fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """The C loop's fp32 -> fp16 rounding (int32 bit patterns), for the tests."""
    if unavailable() is not None:
        raise OSError(unavailable())
    x = x.detach().to("cpu", torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.int32)
    _library.fp16_bits_of(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def unavailable() -> str | None:
    """None once the C loop is built and loaded (the first call builds it), else why it cannot be."""
    global _library, _why_not
    if _library is None and _why_not is None:
        if os.environ.get("MINIDB_NO_C") == "1":
            _why_not = "MINIDB_NO_C=1"
        else:
            try:
                _library = _build()
            except OSError as e:
                _why_not = str(e)
    return _why_not


def supports(weight: torch.Tensor, grad: torch.Tensor, block_size: int) -> str | None:
    """None if adamw8bit_update can step this weight, else a short reason why not."""
    if weight.device.type != "cpu" or grad.device.type != "cpu":
        return f"{weight.device.type} tensors (this loop is for the CPU)"
    if weight.dtype != torch.float32 or grad.dtype != torch.float32:
        return f"dtypes {weight.dtype}, {grad.dtype} (fp32 weights and gradients only)"
    if grad.shape != weight.shape:
        return "gradient and weight differ in shape"
    if not (weight.is_contiguous() and grad.is_contiguous()):
        return "not contiguous"
    if block_size < 1:
        return f"block size {block_size}"
    return unavailable()


def adamw8bit_update(weight: torch.Tensor, grad: torch.Tensor, state: dict, tables, *, lr: float,
                     betas: tuple, eps: float, weight_decay: float, bias_correction1: float,
                     bias_correction2_sqrt: float, block_size: int) -> None:
    """One AdamW update of weight (in place) and of its 8-bit moments in `state` (AdamW8bit's
    exp_avg_codes / exp_avg_absmax / exp_avg_sq_codes / exp_avg_sq_absmax). tables: (signed code
    values, unsigned code values, signed nearest-code table, unsigned nearest-code table), on the CPU."""
    reason = supports(weight, grad, block_size)
    if reason is not None:
        raise ValueError(f"adamw8bit_update (C) cannot step this tensor: {reason}")
    m_code, v_code, m_table, v_table = tables
    m_codes, m_absmax = state["exp_avg_codes"], state["exp_avg_absmax"]
    v_codes, v_absmax = state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"]
    n = weight.numel()
    for t, size, dtype in ((m_codes, n, torch.uint8), (v_codes, n, torch.uint8), (m_absmax, -(-n // block_size), torch.float32),
                           (v_absmax, -(-n // block_size), torch.float32), (m_code, 256, torch.float32),
                           (v_code, 256, torch.float32), (m_table, 65536, torch.uint8), (v_table, 65536, torch.uint8)):
        if t.numel() != size or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"adamw8bit_update (C): a state tensor or table is not {size} contiguous CPU {dtype}")
    beta1, beta2 = betas
    status = _library.adamw8bit_step(
        weight.data_ptr(), grad.data_ptr(), m_codes.data_ptr(), m_absmax.data_ptr(), v_codes.data_ptr(),
        v_absmax.data_ptr(), m_code.data_ptr(), v_code.data_ptr(), m_table.data_ptr(), v_table.data_ptr(),
        n, block_size, 1 - lr * weight_decay, beta1, beta2, 1 - beta1, 1 - beta2, bias_correction2_sqrt, eps,
        -lr / bias_correction1, torch.get_num_threads())
    if status != 0:
        raise MemoryError("adamw8bit_update (C): no memory for its block buffers")
