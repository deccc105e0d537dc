"""The few collective operations training needs, for one process or many (torchrun).

    dist = Dist.from_env(timeout_s=600)   # RANK/WORLD_SIZE/LOCAL_RANK set by torchrun, else 1 process
    unet = dist.wrap(sd.unet)             # DistributedDataParallel when world_size > 1
    dist.all_reduce_max_(found_inf)       # every rank skips the same fp16 steps
    if dist.is_main: write files
    dist.barrier(); dist.close()
    dist.lost(error)                      # a collective failed (a peer died or hung): a one-line PeerLost

With one process every method is a no-op (no torch.distributed, no process group), so the
training loop reads the same either way. The engine is PyTorch's own: NCCL on GPUs, gloo on CPUs.
"""
import contextlib
import datetime
import os
import re
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

    @classmethod
    def from_env(cls, timeout_s: float = 600, backend: str | None = None) -> "Dist":
        """Join the process group torchrun describes in the environment, or run alone."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
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

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around a module that trains; the module itself when alone."""
        if not self.active:
            return module
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


def _reason(e: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without the C++ source location."""
    text = re.sub(r"^\[[^\]]*:\d+\]\s*", "", str(e).strip()).splitlines()[0] if str(e).strip() else type(e).__name__
    return re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
