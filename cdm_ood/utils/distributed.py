"""This process's place in a torchrun job, and the few collective steps the jobs need (gloo or NCCL)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Distributed:
    """This process's place in a torchrun job (world size 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process of the job (nothing without torchrun)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """`value` as rank 0 has it, on every rank (e.g. so that a job stops together when rank 0 cannot go on)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]


def resolve_device(device: str = "auto") -> str:
    """The torch device this process runs a model on: `auto` is cuda:LOCAL_RANK (this process's GPU under
    torchrun) when CUDA is available, else cpu; any other name is checked to exist here (`UsageError`)."""
    import torch

    from ..errors import UsageError

    if device == "auto":
        return f"cuda:{Distributed.from_env().local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device}: {err}") from None
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
