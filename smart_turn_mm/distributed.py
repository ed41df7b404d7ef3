"""Where a training process runs: its device and, under ``torchrun``, its rank (DDP).

DDP is detected from the environment ``torchrun`` sets (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``): NCCL on CUDA, gloo on CPU. Rank 0 is the main process: it alone logs and
saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Runtime", "gather_objects", "get_rng_state", "set_rng_state", "setup_runtime"]


@dataclass(frozen=True)
class Runtime:
    """This process's device, rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this call created the process group (and must destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print(self, *args: Any) -> None:
        """print() on rank 0 only."""
        if self.main:
            print(*args, flush=True)


def setup_runtime(device: str = "auto") -> Runtime:
    """The runtime from the environment; joins the process group under ``torchrun``.

    ``device``: "auto" (CUDA when available), "cpu", "cuda" (this rank's ``LOCAL_RANK`` GPU)
    or "cuda:N".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            owns = True
    return Runtime(dev, rank, world, owns)


def gather_objects(runtime: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without DDP)."""
    if not runtime.distributed:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(parts, obj)
    return parts


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """The torch (and CUDA) RNG state, for checkpoints."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
