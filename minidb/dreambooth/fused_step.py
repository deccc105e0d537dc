"""The optimizer step fused into backward: each weight is updated, and its gradient freed, the
moment backward has finished that gradient, so the gradients of the whole model never coexist
(at SD v1 size: 3.9 GB of fp32 gradients become one tensor's worth, at most 152 MB).

    fused = FusedBackwardStep(masters, optimizer.step_param, max_grad_norm=1.0, scaler=scaler)
    stepped, grad_norm = fused.step(lambda: loss_of_the_batch())   # replaces backward + optimizer_step

A hook (`register_post_accumulate_grad_hook`) on every trained parameter does, per tensor, what
minidb.dreambooth.step.TrainStep.optimizer_step does for all of them: fp16/bf16 grad -> fp32 master grad divided by the
loss scale, clip, step the master, round it into the model, free both gradients.

The catch is everything that needs *all* gradients before the first step:
- clipping needs the global norm, and
- the fp16 loss scaler must skip the whole step, every weight unchanged, if any gradient is inf/NaN.
So the step has two modes (`clip`):
- "exact" (default): when clipping is on or a scaler is given, a first backward only measures: each
  hook adds its gradient's norm to a list and frees the gradient. Then, unless that norm is inf/NaN
  (skip: nothing is stepped, the scaler backs off), a second forward and backward steps with the
  known norm. Exactly the plain step's result, at the price of a second forward and backward.
  `loss_fn` must therefore compute the same loss twice: draw noise and timesteps outside it.
- "lagged": one backward; the clipping coefficient comes from the previous step's gradient norm
  (measured for free while stepping it; the first step measures first, as "exact"). An overflow
  cannot be undone after the first weights moved, so this mode refuses a loss scaler (use bf16 or
  fp32, or "exact"). With clipping off and no scaler, both modes are a single exact pass.

Not supported, and refused by `check_supported`: DDP (its hooks all-reduce gradients in buckets
*after* ours fire, so a rank would step on its own gradient) and gradient accumulation (the
gradients of earlier micro-batches are exactly what this frees).
"""
import torch

from minidb.errors import ConfigError
from minidb.dreambooth.scaler import DynamicLossScaler, MasterWeights, clip_coefficient


def check_supported(world_size: int = 1, grad_accum: int = 1, scaler: DynamicLossScaler | bool | None = None,
                    clip: str = "exact") -> None:
    """ConfigError for what the fused step cannot do. scaler: the fp16 loss scaler, or whether
    there will be one (minidb.dreambooth.plan checks before it is built)."""
    if clip not in ("exact", "lagged"):
        raise ConfigError(f"the fused step's clip must be 'exact' or 'lagged' (train.fused_backward: 'off', "
                          f"'exact' or 'lagged'), got {clip!r}")
    if world_size > 1:
        raise ConfigError(f"the fused backward step (train.fused_backward = {clip!r}) does not work with "
                          f"{world_size} processes: DDP all-reduces gradients after the per-parameter hooks have "
                          "already stepped. Train on one process, or set train.fused_backward = 'off'")
    if grad_accum > 1:
        raise ConfigError(f"the fused backward step (train.fused_backward = {clip!r}) frees each gradient once it "
                          f"is used, so train.grad_accum = {grad_accum} has nothing to accumulate into: set "
                          "train.grad_accum = 1 (a larger train.batch_size instead), or train.fused_backward = 'off'")
    if scaler and clip == "lagged":
        raise ConfigError("the fused backward step with lagged clipping (train.fused_backward = 'lagged') cannot "
                          "honour fp16's loss scaler: an inf found late in backward would come after earlier "
                          "weights were stepped. Use train.fused_backward = 'exact' (two backward passes), or "
                          "model.precision = 'bf16' or 'fp32'")


class FusedBackwardStep:
    def __init__(self, masters: MasterWeights, step_fn, max_grad_norm: float = 0.0,
                 scaler: DynamicLossScaler | None = None, clip: str = "exact"):
        """masters: the trained parameters (minidb.dreambooth.scaler.MasterWeights); step_fn(master) steps one
        fp32 master from master.grad (AdamW8bit.step_param, or a per-parameter torch optimizer)."""
        check_supported(scaler=scaler, clip=clip)
        self.masters, self.step_fn, self.max_grad_norm, self.scaler, self.clip = (
            masters, step_fn, max_grad_norm, scaler, clip)
        self.mode = None          # None (hooks idle), "measure" or "step"
        self.norms = []           # per-tensor fp32 norms of the current backward
        self.coef = None          # the clipping coefficient used by "step"
        self.last_norm = None     # the norm measured by the last backward (for "lagged")
        self.handles = [p.register_post_accumulate_grad_hook(lambda p, i=i, m=m: self._hook(i, p, m))
                        for i, (p, m) in enumerate(zip(masters.model_params, masters.params))]

    @torch.no_grad()
    def _hook(self, i: int, p: torch.Tensor, m: torch.Tensor) -> None:
        if self.mode is None:
            return                # a backward outside step(): leave .grad to the caller
        grad = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
        if self.scaler is not None:
            grad = grad * (1.0 / self.scaler.scale)   # a power of two: exact
        self.norms[i] = torch.linalg.vector_norm(grad, dtype=torch.float32)
        if self.mode == "step" and bool(torch.isfinite(self.norms[i])):
            if self.coef is not None:
                grad.mul_(self.coef)
            # no fp32 masters (optim.master_weights = "kahan"): m is the bf16 weight and takes its
            # gradient in bf16 (the optimizer updates in fp32 all the same)
            m.grad = grad if grad.dtype == m.dtype else grad.to(m.dtype)
            self.step_fn(m)
            m.grad = None
            if m is not p:
                p.copy_(m)
        p.grad = None

    def _backward(self, loss_fn, mode: str) -> torch.Tensor:
        """One forward and backward with the hooks in `mode`; returns the global gradient norm."""
        self.mode, self.norms = mode, [None] * len(self.masters.params)
        try:
            loss = loss_fn()
            (self.scaler.scale_loss(loss) if self.scaler else loss).backward()
        finally:
            self.mode = None
        norms = [n for n in self.norms if n is not None]  # in parameter order, as scaler.total_norm sums them
        self.norms = []
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def step(self, loss_fn) -> tuple[bool, float]:
        """Backward through loss_fn() (the unscaled loss) with every parameter stepped inside it.
        Returns (stepped, grad norm) like minidb.dreambooth.step.TrainStep.optimizer_step; stepped is False when a
        gradient was inf/NaN (fp16: the scaler backs off and no weight changes)."""
        if self.max_grad_norm <= 0 and self.scaler is None:   # nothing needs the norm first: one pass
            self.coef = None
            norm = self._backward(loss_fn, "step")
        elif self.clip == "lagged" and self.last_norm is not None:
            self.coef = clip_coefficient(self.max_grad_norm, self.last_norm)
            norm = self._backward(loss_fn, "step")
        else:  # exact: measure, then (unless inf/NaN) step with the known norm
            norm = self._backward(loss_fn, "measure")
            skip = not bool(torch.isfinite(norm))
            if not skip:
                self.coef = clip_coefficient(self.max_grad_norm, norm)
                self._backward(loss_fn, "step")   # the same scale as the measuring pass
            if self.scaler is not None:
                self.scaler.update(skip)
            if skip:
                return False, float(norm)
        # one pass: an inf/NaN is seen only after the finite tensors were stepped (fp32/bf16, where
        # it means divergence and the trainer stops); the tensors holding it were not
        finite = bool(torch.isfinite(norm))
        self.last_norm = norm if finite else None
        return finite, float(norm)

    def state_dict(self) -> dict:
        """What a resume needs: lagged clipping's previous norm (None before the first step)."""
        return {"last_norm": self.last_norm}

    def load_state_dict(self, state: dict) -> None:
        norm = state["last_norm"]
        self.last_norm = norm.to(self.masters.params[0].device) if norm is not None else None

    def remove(self) -> None:
        """Take the hooks off the parameters: backward fills .grad as usual again."""
        for h in self.handles:
            h.remove()
        self.handles = []
