"""Mixed-precision training made explicit: fp32 master weights and a dynamic loss scaler.

A half-precision model trains badly on its own for two reasons, and each has its fix:

1. Updates vanish. A step of lr * grad ~ 1e-6 * w is far below fp16's resolution near w
   (2**-10 * w) or bf16's (2**-7 * w), so `w + update` rounds back to w. Fix: the trainer keeps
   an fp32 *master* copy of every trainable weight; the optimizer steps the masters, and the
   model gets them back rounded to its dtype after each step (`MasterWeights`).
2. Small gradients underflow (fp16 only: its smallest number is ~6e-8, bf16 shares fp32's range).
   Fix: multiply the loss by a large `scale` before backward so the gradients are `scale` times
   larger while in fp16, and divide them by `scale` in fp32 before the optimizer sees them.
   Too large a scale overflows to inf: then the step is skipped and the scale halved; after
   `growth_interval` clean steps it doubles again, so it hovers just below overflow
   (`DynamicLossScaler`; Micikevicius et al. 2018, "Mixed Precision Training").

One optimizer step in fp16 (see minidb.dreambooth.step.TrainStep.optimizer_step):

    scaler.scale_loss(loss).backward()               # fp16 grads, `scale` times too large
    masters.grads_from_model(1 / scaler.scale)       # -> fp32 master grads, unscaled
    inf = found_inf(masters.grads())                 # any inf/NaN? (all-reduced across ranks)
    if not inf: clip, optimizer.step(), masters.copy_to_model()
    scaler.update(inf)                               # skip + halve, or count a clean step

No torch.amp.GradScaler: it does the same, hidden in fused kernels; here every step is a line.
"""
import torch

from minidb.errors import MinidbError


class LossScaleCollapsed(MinidbError):
    """The gradients stayed inf/NaN while the loss scale halved down to its floor. Not a too-large
    initial scale (halving would have found a working one long before): the forward pass itself
    overflows (fp16 activations past 65504, a diverged model, NaN inputs), or the floor is set above
    the scale that gradients this large need."""


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, min_scale: float = 1e-4):
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.min_scale = min_scale
        self.clean_steps = 0      # finite steps since the last growth or back-off
        self.skipped_steps = 0    # total, for the logs

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def update(self, found_inf: bool) -> None:
        """After each optimizer step: back off on inf/NaN, grow after growth_interval clean steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            if self.scale < self.min_scale:
                skipped = f"{self.skipped_steps} skipped step" + ("s" if self.skipped_steps != 1 else "")
                raise LossScaleCollapsed(
                    f"fp16 loss scale fell below its floor {self.min_scale:g} (optim.loss_scale_min) after {skipped}: "
                    f"the gradients were inf/NaN at every scale tried, down to {self.scale / self.backoff_factor:g}, "
                    "which a smaller loss scale cannot fix. Either the forward pass overflows (fp16 activations past "
                    "65504, or a model diverged by too high an optim.lr: train in bf16/fp32 (model.precision) to see "
                    "where it breaks), or the floor is too high for gradients this large (lower optim.loss_scale_min)")
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps,
                "growth_interval": self.growth_interval, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "min_scale": self.min_scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        # the schedule (interval, factors, floor) stays as configured now: a resume may change it

    def __repr__(self):
        return f"DynamicLossScaler(scale={self.scale:g}, clean_steps={self.clean_steps})"


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, as an fp32 tensor on their device (no host sync).
    It is inf or NaN exactly when some gradient element is (or the norm itself passes 3e38),
    so one pass serves both gradient clipping and the overflow check."""
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]  # fp32 even for fp16 grads
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_coefficient(max_grad_norm: float, norm: torch.Tensor) -> torch.Tensor | None:
    """What every gradient is multiplied by to clip the global norm to max_grad_norm (as
    torch.nn.utils.clip_grad_norm_ does); None when clipping is off (max_grad_norm 0)."""
    if max_grad_norm <= 0:
        return None
    return (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)


def found_inf(grads: list[torch.Tensor], norm: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 if any gradient holds an inf or NaN, else 0.0, as a float32 tensor of shape [1] on the
    gradients' device: a tensor, not a bool, so a multi-process run all-reduces it (MAX) and every
    rank skips the same steps."""
    norm = total_norm(grads) if norm is None else norm
    return (~torch.isfinite(norm)).float().reshape(1)


class MasterWeights:
    """fp32 copies of the trainable parameters of a fp16/bf16 model, for the optimizer to step.

    For an fp32 model the masters *are* the model's parameters (no copy, and every method below is
    a no-op), so the training loop reads the same in all three precisions. fp32_masters=False makes
    that so for bf16 too: the optimizer then steps the bf16 weights themselves, which needs
    minidb.dreambooth.adamw8bit's `kahan` compensation to keep small updates (optim.master_weights = "kahan")."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], fp32_masters: bool = True):
        self.names = [name for name, _ in named_params]
        self.model_params = [p for _, p in named_params]
        self.separate = fp32_masters and any(p.dtype != torch.float32 for p in self.model_params)
        if self.separate:
            self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        else:
            self.params = self.model_params

    def grads(self) -> list[torch.Tensor]:
        return [m.grad for m in self.params if m.grad is not None]

    @torch.no_grad()
    def grads_from_model(self, inv_scale: float = 1.0) -> None:
        """master.grad = model.grad in fp32 * inv_scale; the model's low-precision grads are freed."""
        for m, p in zip(self.params, self.model_params):
            if p.grad is None:              # a parameter the loss did not reach
                m.grad = None
                continue
            if self.separate:
                if m.grad is None:
                    m.grad = torch.empty_like(m)
                m.grad.copy_(p.grad)        # fp16 -> fp32: exact
                p.grad = None
            if inv_scale != 1.0:
                m.grad.mul_(inv_scale)      # a power of two: exact as well

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The stepped fp32 masters, rounded to the model's dtype, become the model's weights."""
        if self.separate:
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
        for m in self.params:
            m.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 weights by parameter name (what a checkpoint stores)."""
        return {name: m.detach() for name, m in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        unexpected = [n for n in state if n not in set(self.names)]
        if missing or unexpected:
            raise KeyError(f"trainable weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, m in zip(self.names, self.params):
            if state[name].shape != m.shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(m.shape)}")
            m.copy_(state[name])
        self.copy_to_model()
