"""One training step, in one object: the optimizer, the lr schedule, the fp16 loss scaler, the
fused backward step, clipping and EMA. train(), the benchmarks and the tests all step through it.

    step = TrainStep(trainable, cfg.optim, cfg.train, precision="fp16", lr_scale=1.0, dist=dist)
    lr = step.begin(k)                                  # the lr of step k (0-based)
    for micro in range(cfg.train.grad_accum):
        loss, *parts = step.backward(loss_fn, modules, micro)   # loss_fn() -> (loss, *parts)
    stepped, grad_norm = step.step()                    # clip, step, round into the model, EMA
    state = step.state_dict()                           # the parts' states, for the training state

Precision: fp32 trains the model's own parameters; fp16 and bf16 train fp32 master copies
(minidb.dreambooth.scaler.MasterWeights), because an update of lr * ~1 is far below the 2**-10 (fp16) or
2**-7 (bf16) resolution of a weight and would round away; bf16 needs no loss scaler, its exponent
range is fp32's. optim.master_weights = "kahan" (bf16): no copies, the 8-bit AdamW compensates the
rounding (minidb.dreambooth.adamw8bit).
"""
import math

import torch

from minidb.dreambooth.adamw8bit import AdamW8bit
from minidb.dreambooth.distributed import Dist
from minidb.dreambooth.fused_step import FusedBackwardStep
from minidb.dreambooth.scaler import DynamicLossScaler, MasterWeights, clip_coefficient, found_inf, total_norm
from minidb.dreambooth.train_config import OptimConfig, TrainConfig
from minidb.dreambooth.train_options import EMA


class TrainStep:
    def __init__(self, trainable: list[tuple[str, torch.nn.Parameter]], optim: OptimConfig, train: TrainConfig,
                 precision: str = "fp32", lr_scale: float = 1.0, dist: Dist | None = None):
        """trainable: the named parameters that train (minidb.dreambooth.train.set_trainable). precision: the
        model's, "auto" resolved (minidb.dreambooth.plan); fp16 brings the loss scaler."""
        self.optim, self.steps, self.grad_accum, self.lr_scale = optim, train.steps, train.grad_accum, lr_scale
        self.dist = dist or Dist()
        self.masters = MasterWeights(trainable, fp32_masters=optim.master_weights == "fp32")
        self.optimizer = make_optimizer(self.masters.params, optim)
        self.scaler = DynamicLossScaler(optim.loss_scale_init, optim.loss_scale_growth_interval,
                                        min_scale=optim.loss_scale_min) if precision == "fp16" else None
        # the fused step: each weight stepped inside backward, so no full set of gradients exists
        self.fused = FusedBackwardStep(self.masters, step_one(self.optimizer), optim.max_grad_norm, self.scaler,
                                       train.fused_backward) if train.fused_backward != "off" else None
        self.ema_decay, self.ema_device = train.ema_decay, "cpu" if train.ema_on_cpu else None
        self.ema = self._new_ema()
        self._fused_result = None   # (stepped, grad norm) of the fused step, done inside backward
        self._started = False

    def _new_ema(self) -> EMA | None:
        """The fp32 moving average of the trained weights (train.ema_decay > 0), from the weights as they are."""
        if not self.ema_decay:
            return None
        return EMA(zip(self.masters.names, self.masters.params), self.ema_decay, device=self.ema_device)

    def begin(self, step: int) -> float:
        """Set the learning rate of `step` (0-based) and return it."""
        if not self._started and isinstance(self.optimizer, AdamW8bit):
            self.optimizer.init_state()  # now, not between the first backward's gradients (fragmenting the heap)
        self._started = True
        lr = lr_at(step, self.optim, self.steps) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, loss_fn, modules=(), micro: int = 0):
        """One micro-batch: loss_fn() -> (loss, *parts), then backward through loss / grad_accum
        (fp16: scaled up, so small gradients survive). modules: the DDP-wrapped models, which keep
        their gradients local on all but the last micro-batch. With the fused step the optimizer
        step happens here, and loss_fn may run twice (exact clipping): it must compute the same loss
        each time. Returns loss_fn()'s last result."""
        out = []

        def loss():
            out[:] = [loss_fn()]
            return out[0][0]

        if self.fused is not None:  # grad_accum is 1 (minidb.dreambooth.fused_step.check_supported)
            self._fused_result = self.fused.step(loss)
            return out[0]
        with self.dist.no_sync(modules, skip_all_reduce=micro < self.grad_accum - 1):
            value = loss()
            ((self.scaler.scale_loss(value) if self.scaler else value) / self.grad_accum).backward()
        return out[0]

    def step(self) -> tuple[bool, float]:
        """After the micro-batches: the optimizer step (done already by the fused step), then EMA.
        Returns (stepped, grad norm); stepped is False when a gradient was inf/NaN (on any rank)."""
        stepped, grad_norm = self._fused_result if self.fused is not None else self.optimizer_step()
        if self.ema is not None and stepped:
            self.ema.update(zip(self.masters.names, self.masters.params))
        return stepped, grad_norm

    def optimizer_step(self, clip_norm: torch.Tensor | None = None) -> tuple[bool, float]:
        """Model gradients -> one optimizer step on the fp32 masters -> the model's weights.
        clip_norm: clip by this norm instead of this step's (what the fused step's lagged clipping does)."""
        masters, scaler = self.masters, self.scaler
        # 1. fp16/bf16 grads -> fp32 master grads; fp16 also divides out the loss scale (a power of 2: exact)
        masters.grads_from_model(1.0 / scaler.scale if scaler else 1.0)
        # 2. one norm serves clipping and the overflow check; the flag is all-reduced so all ranks agree
        grads = masters.grads()
        norm = total_norm(grads)
        skip = bool(self.dist.all_reduce_max_(found_inf(grads, norm)).item())
        # 3. fp16: an overflow skips the step and halves the scale; clean steps let it grow back
        if scaler is not None:
            scaler.update(skip)
        if skip:
            masters.zero_grad()
            return False, float(norm)
        # 4. clip, step the fp32 masters, round them into the model
        coef = clip_coefficient(self.optim.max_grad_norm, norm if clip_norm is None else clip_norm)
        if coef is not None:
            for g in grads:
                g.mul_(coef.to(g.device))
        self.optimizer.step()
        masters.copy_to_model()
        masters.zero_grad()
        return True, float(norm)

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.scale if self.scaler is not None else None

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The trained weights by name, fp32: the EMA's when there is one and `ema`, else the raw ones."""
        return self.ema.shadow if ema and self.ema is not None else self.masters.state_dict()

    def master(self, name: str) -> torch.Tensor:
        """The fp32 weight the optimizer steps for the trained parameter `name`."""
        return self.masters.params[self.masters.names.index(name)]

    def close(self) -> None:
        """Free the optimizer (its moments: twice the trained weights) and the fused step's hooks, which hold it."""
        if self.fused is not None:
            self.fused.remove()
        self.optimizer = self.fused = None

    # ---- the training state: each part's own state dict ---------------------------------------

    def state_dict(self) -> dict:
        """The lr schedule keeps no state: lr = lr_at(step), from the stored config."""
        return {"weights": self.masters.state_dict(),                     # trainable weights, fp32
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "fused_step": self.fused.state_dict() if self.fused else None,  # lagged clipping's last norm
                "ema": self.ema.state_dict() if self.ema else None}       # the fp32 average, or None

    def load_state_dict(self, state: dict) -> None:
        """Raises KeyError or ValueError when the state does not fit these weights. A state without an
        EMA (the run had none, or trained before this version) starts the average at its weights."""
        self.masters.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.fused is not None and state.get("fused_step"):
            self.fused.load_state_dict(state["fused_step"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
            self.ema.decay = self.ema_decay  # the configured decay, also when the resume changed it
        elif self.ema is not None:
            self.ema = self._new_ema()


def make_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    """optim.optimizer: torch's AdamW, or minidb's with 8-bit moments (the same update, a quarter of the state).
    torch's is its fused implementation (one kernel for all tensors) where it has one: on CPU several times
    faster than its default (foreach) implementation (benchmarks/RESULTS.md, "The default optimizer")."""
    hyper = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        return AdamW8bit(params, **hyper, kahan=o.master_weights == "kahan")
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, **hyper, fused=fused or None)


def step_one(optimizer: torch.optim.Optimizer):
    """step_fn(master) for the fused step: one parameter's update. AdamW8bit has it; torch's AdamW
    steps every parameter of its groups, so for the call its group holds only that one."""
    if isinstance(optimizer, AdamW8bit):
        return lambda master: optimizer.step_param(master)  # looked up at each call: a benchmark may time it

    def step(master):
        group, = optimizer.param_groups  # make_optimizer gives every master one group
        params, group["params"] = group["params"], [master]
        try:
            optimizer.step()
        finally:
            group["params"] = params
    return step


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """The lr of `step` (0-based) for a DreamBooth run: warm-up, then constant or cosine (scheduled_lr)."""
    return scheduled_lr(step, o.lr, total_steps, o.warmup_steps, o.min_lr, cosine=o.lr_schedule != "constant")


def scheduled_lr(step: int, peak: float, total: int, warmup: int, min_lr: float, cosine: bool = True,
                 peak_in_warmup: bool = False) -> float:
    """Linear warm-up over `warmup` steps, then `peak` (constant) or a cosine from peak down to min_lr
    at step `total`. The two trainers' warm-ups differ by one step, kept so that no run's numbers
    change: peak_in_warmup (minidb.world.pretrain) reaches peak on the warm-up's last step, otherwise
    (minidb.dreambooth.train) on the first step after it."""
    if step < warmup:
        return peak * (step + 1) / (warmup if peak_in_warmup else warmup + 1)
    if not cosine:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)
