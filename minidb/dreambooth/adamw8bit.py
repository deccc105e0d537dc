"""AdamW with 8-bit moments (Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization",
arXiv 2110.02861), in plain PyTorch: CPU and GPU alike, no bitsandbytes.

Adam keeps two fp32 numbers per weight, the gradient's running mean m and its running square v:
8 bytes against the weight's own 4, so at SD v1 size (983M trained weights, UNet + text encoder)
its state alone is 7.9 GB. Here both are stored in 8 bits, 2.03 bytes per weight in all:

1. Block-wise: a tensor is cut into blocks of `block_size` (256) values; each block stores its
   absmax in fp32 and its values divided by it, in [-1, 1]. An outlier then only coarsens its own
   256 neighbours, not the whole tensor.
2. A dynamic code: those normalised values are rounded to the nearest of 256 fixed numbers that
   are spaced like a float, not evenly: a code is a sign, then e zeros (a magnitude of 10**-e),
   a 1, then linear fraction bits filling [0.1, 1] * 10**-e. Large values get 6 fraction bits,
   values near 1e-6 still get one, so a block spans 7 decades where int8 would span 2.
   v is never negative, so its code spends the sign bit on one more fraction bit (`dynamic_code`).
   Rounding is a table lookup: the nearest code value for each of the 65536 fp16 numbers, indexed
   by the fp16 bits of the normalised value (a binary search per value is slower on CPU).
3. Each step dequantises m and v to fp32 (two codes per lookup: `code_pairs`), does the AdamW
   update in fp32 with torch's own fused AdamW kernel (decoupled weight decay, bias corrections; one
   pass instead of eight operations; the gain is in benchmarks/RESULTS.md), and quantises them back,
   one chunk of 2**20 values (whole blocks) at a time, so the fp32 temporaries stay ~30 MB.

On CUDA the whole update of a tensor runs as one Triton kernel (minidb.kernels.adamw8bit: every byte
read and written once, ~14 bytes per fp32 weight instead of the ~176 the chunked torch operations
move), the same arithmetic to rounding. On CPU, fp32 tensors get the same single pass as one C loop
(minidb.kernels.adamw8bit_cpu, built on first use by the system's C compiler; faster than the torch
path: `python -m benchmarks.bench_optimizer` times both). `backend` picks ("auto": the kernel on CUDA, the C
loop for fp32 CPU tensors where it builds, the torch operations below for the rest).

Tensors under `min_8bit_size` values (biases, norms: 0.3% of SD's weights) keep fp32 moments, as
bitsandbytes does: they are cheap, and their few values get no help from blocks. Rounding error:
`quantize` is round-to-nearest (of the fp16-rounded value), so a value's error is at most half the
gap between the two codes around it plus 2**-11 of it, times its block's absmax
(tests/test_adamw8bit.py derives and checks that bound); but v is never rounded to 0 (it would
turn m / (sqrt(v) + eps) into m / eps): below half its smallest code value it rounds up to it.

`kahan=True` lets bf16 weights train without fp32 master copies (4 bytes per weight saved). A bf16
weight cannot hold a small update (its resolution is 2**-7 of it; lr * 1 is far below), so each bf16
weight keeps a bf16 *compensation*: what rounding the last update into the weight lost. The update
starts from weight + compensation (in fp32), and after it the weight takes the rounded result and
the compensation the remainder: compensated (Kahan) summation, as in Zamirai et al. 2020,
"Revisiting BFloat16 Training". 2 bytes per weight instead of fp32 masters' 4; the master value is
kept to ~16 significant bits instead of 24. fp32 weights need none and get none.
"""
import math
import warnings

import torch
from torch.optim.adamw import adamw as adamw_functional

BACKENDS = ("auto", "torch", "triton", "c")
_warned = False


def _warn_once(why: str) -> None:
    global _warned
    _warned = True
    warnings.warn(f"AdamW8bit: the C loop for CPU tensors is unavailable ({why}); stepping with torch "
                  f"operations instead: the same results, only slower", stacklevel=3)


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 values an 8-bit state can take, for a block whose absmax is 1.
    For e = 0..6 leading zeros (magnitude 10**-e) a signed code has 6 - e fraction bits
    (2**(6-e) bin centres over [0.1, 1] * 10**-e, each with both signs); an unsigned one has
    7 - e. With 0 and 1.0 (so the block's absmax itself is exact) that is 256 values."""
    fraction_bits = 6 if signed else 7
    values = [0.0, 1.0]
    for e in range(7):
        n = 2 ** (fraction_bits - e)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        centres = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** -e).tolist()
        values += centres + ([-c for c in centres] if signed else [])
    code = torch.tensor(sorted(values), dtype=torch.float64).float()  # signed: 2 + 2 * 127; unsigned: 2 + 254
    assert code.numel() == 256 and torch.unique(code).numel() == 256
    return code


def nearest_code_table(code: torch.Tensor) -> torch.Tensor:
    """For each of the 65536 fp16 bit patterns (read as unsigned 16-bit integers), the index of the
    nearest code value: quantising is then one table lookup instead of a binary search per value.
    For an unsigned code (v's), every positive pattern maps to index 1 or above: a positive v rounded
    to 0 would turn m / (sqrt(v) + eps) into m / eps."""
    every_fp16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()  # wraps to int16
    midpoints = (code[1:] + code[:-1]) / 2
    table = torch.bucketize(every_fp16.nan_to_num(0.0), midpoints.to(every_fp16.device))
    if code.min() >= 0:
        table = torch.where(every_fp16 > 0, table.clamp(min=1), table)
    return table.to(torch.uint8)


def quantize(x: torch.Tensor, table: torch.Tensor, block_size: int, unsigned: bool = False, out=None):
    """fp32 x (any shape) -> (uint8 codes, fp32 absmax per block): each value divided by its block's
    absmax, rounded to fp16 (2**-11 relative), then to the nearest code value (`table`). `out`: a
    uint8 tensor of x's size to write the codes into (the optimizer's state, so no copy)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block_size  # only a tensor's last block can be short: the rest is not copied
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)
    absmax = (blocks if unsigned else blocks.abs()).amax(dim=1)  # unsigned: x >= 0 already
    normed = torch.empty(blocks.shape, dtype=torch.float16, device=blocks.device)
    torch.div(blocks, absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None], out=normed)  # in fp32, stored fp16
    if unsigned:  # 0 < y < 2**-25 rounded to fp16's 0: lift it (and 0, harmlessly) to fp16's smallest
        normed.clamp_(min=2 ** -24)  # positive value, which the table maps to code 1, never to 0
    bits = normed.view(torch.uint16).view(-1).int()
    if pad or out is None:
        return table.index_select(0, bits)[:flat.numel()], absmax
    return torch.index_select(table, 0, bits, out=out), absmax


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """The values of every two consecutive codes, for each of the 65536 values two uint8s can hold
    side by side: 65536 fp64 words, each the two fp32 code values in memory order. Dequantising looks
    up two codes at once through it: half the lookups, and half the index conversions (the time saved:
    benchmarks/RESULTS.md, "Dequantising looks two codes up at once")."""
    two_bytes = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)  # each uint16's bytes
    return code.index_select(0, two_bytes.int()).view(torch.float64)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int,
               shape: torch.Size, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes + fp32 absmax per block -> fp32 values of `shape`. pairs: code_pairs(code), to
    look codes up two at a time (where the codes are an even number at an even address)."""
    n = codes.numel()
    pad = -n % block_size
    codes = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    if pairs is not None and codes.numel() % 2 == 0 and codes.storage_offset() % 2 == 0:
        values = pairs.index_select(0, codes.view(torch.uint16).int()).view(torch.float32)
    else:
        values = code.index_select(0, codes.int())
    values = values.view(-1, block_size).mul_(absmax[:, None])
    return values.view(-1)[:n].view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update with m and v stored in 8 bits (see the module docstring).
    `step()` steps every parameter with a gradient; `step_param(p)` steps one (the fused backward
    step, minidb.dreambooth.fused_step, calls it from a gradient hook). Per-parameter state:
    step (int), and either exp_avg/exp_avg_sq (fp32, small tensors) or exp_avg_codes/exp_avg_absmax/
    exp_avg_sq_codes/exp_avg_sq_absmax (8-bit). backend: "torch" (the chunked torch operations below),
    "triton" (minidb.kernels.adamw8bit for every 8-bit tensor; a clear error where it cannot run one),
    "c" (minidb.kernels.adamw8bit_cpu, likewise), "auto" (the kernel for CUDA tensors it can run, the C
    loop for fp32 CPU tensors, torch otherwise; a warning, once, where the C loop cannot be built)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = 256, min_8bit_size: int = 4096,
                 chunk_size: int = 2 ** 20, kahan: bool = False, backend: str = "auto"):
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise ValueError(f"AdamW8bit: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW8bit: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if chunk_size % block_size:
            raise ValueError(f"AdamW8bit: chunk_size {chunk_size} must be a multiple of block_size {block_size}")
        self.block_size, self.min_8bit_size, self.chunk_size = block_size, min_8bit_size, chunk_size
        if backend not in BACKENDS:
            raise ValueError(f"AdamW8bit: backend must be one of {BACKENDS}, got {backend!r}")
        self.kahan = kahan    # bf16/fp16 weights: a compensation buffer instead of fp32 masters (docstring)
        self.backend = backend
        self._codes = {}      # (signed, device) -> (code values, nearest-code table, code pairs), once per device
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    def code(self, signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(code values, nearest-code table) of m's (signed) or v's code, on `device`."""
        return self._code(signed, device)[:2]

    def _code(self, signed: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (signed, torch.device(device))
        if key not in self._codes:
            code = dynamic_code(signed)
            self._codes[key] = code.to(device), nearest_code_table(code).to(device), code_pairs(code).to(device)
        return self._codes[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate the state of every parameter that has none yet (step_param would, on its first
        call). minidb.dreambooth.train calls it before the first backward: the fused step would otherwise allocate
        it tensor by tensor between that backward's gradients and activations, fragmenting the heap."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._new_state(p)

    def _new_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = 0
        if p.numel() >= self.min_8bit_size:
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):  # all 0.0: absmax 0, code of 0.0
                zero = int((self.code(signed, p.device)[0] == 0).nonzero())
                state[name + "_codes"] = torch.full((p.numel(),), zero, dtype=torch.uint8, device=p.device)
                state[name + "_absmax"] = torch.zeros(-(-p.numel() // self.block_size), device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if self.kahan and p.dtype != torch.float32:
            state["kahan"] = torch.zeros_like(p)  # in p's dtype: what rounding p lost

    def kernel(self, p: torch.Tensor):
        """The module whose adamw8bit_update steps p in one pass (minidb.kernels.adamw8bit, Triton;
        minidb.kernels.adamw8bit_cpu, C), or None: the chunked torch operations below."""
        if p.numel() < self.min_8bit_size or self.backend == "torch":
            return None
        if self.backend == "triton":
            from minidb.kernels import adamw8bit
            return adamw8bit
        from minidb.kernels import adamw8bit_cpu
        if self.backend == "c":
            return adamw8bit_cpu
        grad = p if p.grad is None else p.grad
        if p.is_cuda:
            try:
                from minidb.kernels import adamw8bit
            except ImportError:  # no triton: the torch path
                return None
            return adamw8bit if adamw8bit.supports(p, grad, self.block_size) is None else None
        if adamw8bit_cpu.supports(p, grad, self.block_size) is None:
            return adamw8bit_cpu
        why = adamw8bit_cpu.unavailable()
        if why is not None and p.device.type == "cpu" and not _warned:
            _warn_once(why)
        return None

    def uses_kernel(self, p: torch.Tensor) -> bool:
        """Whether step_param steps p in one pass (a kernel or the C loop), not the torch path."""
        return self.kernel(p) is not None

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict | None = None) -> None:
        """One AdamW update of p from p.grad (fp32 arithmetic whatever the storage)."""
        group = group or self._group_of[p]
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        eight_bit = p.numel() >= self.min_8bit_size
        if not state:
            self._new_state(p)
        state["step"] += 1
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** state["step"])
        kernel = self.kernel(p) if eight_bit else None
        if kernel is not None:
            (m_code, m_table), (v_code, v_table) = self.code(True, p.device), self.code(False, p.device)
            kernel.adamw8bit_update(p, p.grad, state, (m_code, v_code, m_table, v_table), lr=lr, betas=(beta1, beta2),
                             eps=eps, weight_decay=wd, bias_correction1=bias_correction1,
                             bias_correction2_sqrt=bias_correction2_sqrt, block_size=self.block_size)
            return

        def adamw(weight, grad, m, v):  # torch.optim.AdamW's single-tensor update, operation for operation
            weight.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
            weight.addcdiv_(m, denom, value=-lr / bias_correction1)

        def fused_adamw(weight, grad, m, v):  # the same update in one pass: torch's fused AdamW kernel
            if weight.device.type not in ("cpu", "cuda"):
                return adamw(weight, grad, m, v)
            step = torch.tensor(float(state["step"] - 1), device=weight.device)  # it counts this step itself
            adamw_functional([weight], [grad], [m], [v], [], [step], fused=True, amsgrad=False, beta1=beta1,
                             beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False)

        weight = p if p.dtype == torch.float32 else p.float()
        compensation = state.get("kahan")
        if compensation is not None:
            weight.add_(compensation)  # the master value: the stored weight plus what its rounding lost
        if not eight_bit:
            adamw(weight, p.grad.float(), state["exp_avg"], state["exp_avg_sq"])
        else:  # chunk by chunk of whole blocks, so the fp32 temporaries stay small whatever p's size
            codes = self._code(True, p.device), self._code(False, p.device)
            flat_w, flat_g, bs = weight.view(-1), p.grad.view(-1), self.block_size
            for start in range(0, p.numel(), self.chunk_size):
                end = start + self.chunk_size
                values, blocks = slice(start, end), slice(start // bs, end // bs)
                m, v = (dequantize(state[name + "_codes"][values], state[name + "_absmax"][blocks], code[0], bs, (-1,),
                                   pairs=code[2])
                        for name, code in (("exp_avg", codes[0]), ("exp_avg_sq", codes[1])))
                fused_adamw(flat_w[values], flat_g[values].float(), m, v)
                for name, moment, code, signed in (("exp_avg", m, codes[0], True), ("exp_avg_sq", v, codes[1], False)):
                    stored = state[name + "_codes"][values]  # written in place: no reallocation
                    q, absmax = quantize(moment, code[1], bs, unsigned=not signed, out=stored)
                    if q is not stored:
                        stored.copy_(q)
                    state[name + "_absmax"][blocks] = absmax
        if weight is not p:
            p.copy_(weight)                           # rounded to p's dtype
            if compensation is not None:
                compensation.copy_(weight.sub_(p))    # the part of the update the rounding dropped

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except for dtypes: torch casts every state tensor of a floating-point
        parameter to that parameter's dtype, which would turn the uint8 codes into floats. Here each
        state tensor keeps its saved dtype and only moves to its parameter's device."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved[i].items()}
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (for the memory breakdowns)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))
