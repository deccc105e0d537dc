"""The few collective operations training needs, for one process or many (torchrun).

    with Dist.from_env(timeout_s=600) as dist:  # RANK/WORLD_SIZE/LOCAL_RANK set by torchrun, else 1 process
        unet = dist.wrap(sd.unet)               # DistributedDataParallel when world_size > 1
        unet = dist.wrap(sd.unet, lora)         # LoRA: the adapters are what DDP syncs
        dist.all_reduce_max_(found_inf)         # every rank skips the same fp16 steps
        if dist.is_main: write files
        dist.barrier()
    # leaving the block closes the process group; a collective that failed because a peer died or
    # hung leaves it as a one-line PeerLost, not a traceback from inside torch.distributed

    with StopOnSignal(log) as stop:             # Ctrl-C / SIGTERM: stop.requested, checked once a step

With one process every method is a no-op (no torch.distributed, no process group), so the
training loop reads the same either way. The engine is PyTorch's own: NCCL on GPUs, gloo on CPUs.
"""
import contextlib
import datetime
import os
import re
import signal
import threading
from dataclasses import dataclass

import torch

from minidb.errors import MinidbError


class PeerLost(MinidbError):
    """A multi-process run lost a process: it crashed, was killed, hung past the timeout, or never joined."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 600
    hint: object = None  # () -> str: what to do after a lost peer, added to the PeerLost message (Run.resume_hint)

    @classmethod
    def from_env(cls, timeout_s: float = 600, backend: str | None = None) -> "Dist":
        """Join the process group torchrun describes in the environment, or run alone."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(timeout_s=timeout_s)
        import torch.distributed as td
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if not td.is_initialized():  # a dead peer ends the run after timeout_s instead of hanging it
            try:
                td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            except td.DistError as e:  # e.g. a peer that never started: the store times out
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise PeerLost(f"process {rank} of {world_size} could not join the others at {where} within "
                               f"{timeout_s:g} s ({_reason(e)})") from e
        return cls(rank, world_size, local_rank, timeout_s)

    def __enter__(self) -> "Dist":
        return self

    def __exit__(self, kind, error, traceback):
        lost = self.lost(error) if error is not None else None
        hint = self.hint() if lost is not None and self.hint is not None else None
        self.close()
        if lost is not None:
            raise PeerLost(f"{lost}; {hint}" if hint else str(lost)) from error
        return False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def all_reduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t /= self.world_size
        return t

    def any(self, flag: bool, device="cpu") -> bool:
        """True on every rank if it is True on any (e.g. a stop request seen by one process)."""
        if not self.active:
            return bool(flag)
        return bool(self.all_reduce_max_(torch.tensor([float(flag)], device=device)).item())

    def gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def wrap(self, module: torch.nn.Module, adapters: torch.nn.Module | None = None) -> torch.nn.Module:
        """DistributedDataParallel around a module that trains; the module itself when alone.
        adapters: LoRA adapters hooked onto the (frozen) module from outside it (minidb.lora). Their
        parameters are the trained ones and not among the module's, so DDP wraps the two together."""
        if not self.active:
            return module
        if adapters is not None:
            module = WithAdapters(module, adapters)
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def no_sync(self, modules, skip_all_reduce: bool):
        """On all but the last micro-batch of an accumulated step, keep the gradients local."""
        stack = contextlib.ExitStack()
        if self.active and skip_all_reduce:
            for m in modules:
                if hasattr(m, "no_sync"):
                    stack.enter_context(m.no_sync())
        return stack

    def lost(self, e: BaseException) -> "PeerLost | None":
        """The one-line error for a collective that failed because a peer is gone, else None.
        gloo raises a bare RuntimeError (its message names gloo), NCCL and the store a DistError."""
        if not self.active or not isinstance(e, RuntimeError):
            return None
        if not (isinstance(e, torch.distributed.DistError) or re.search(r"gloo|NCCL|c10d", str(e))):
            return None
        return PeerLost(f"process {self.rank} of {self.world_size} lost contact with the others ({_reason(e)}): "
                        f"another process crashed, was killed, or was silent for over {self.timeout_s:g} s "
                        "(train.dist_timeout_s); its own output says which")

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class WithAdapters(torch.nn.Module):
    """A model and the adapters hooked onto it as one module, computing what the model computes:
    DDP all-reduces the gradients of the parameters it finds, and here it finds the adapters'."""

    def __init__(self, model: torch.nn.Module, adapters: torch.nn.Module):
        super().__init__()
        self.model, self.adapters = model, adapters

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)  # the adapters run as the model's forward hooks


def _reason(e: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without the C++ source location."""
    text = re.sub(r"^\[[^\]]*:\d+\]\s*", "", str(e).strip()).splitlines()[0] if str(e).strip() else type(e).__name__
    return re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")


class StopOnSignal:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and write a checkpoint
    (`requested` names the signal); a second Ctrl-C stops at once (no checkpoint)."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: stopping after this step to write a checkpoint (Ctrl-C again: stop now, no checkpoint)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
