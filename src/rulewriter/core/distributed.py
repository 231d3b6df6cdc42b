"""Spreading statistics and evaluation over processes with ``torch.distributed`` (torchrun).

Nothing here schedules work itself: ``torchrun`` starts the processes, and every rank runs the same
command on its own shard of the images (``rank::world_size``). Partial second moments are added with
``all_reduce`` in float64; predictions are gathered to every rank in the original image order. Only rank 0
writes files::

    torchrun --nproc_per_node=4 -m rulewriter stats --data ~/imagenet/val --out C.safetensors
    torchrun --nproc_per_node=4 -m rulewriter evaluate --data ~/imagenet/val --edit e.safetensors

From Python, the same code paths shard automatically once a process group is initialised::

    from rulewriter.core.distributed import init_from_env, shard
    init_from_env()                       # no-op outside torchrun
    mine = shard(list(range(10)))         # this rank's items
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "is_distributed", "is_main", "shard", "shard_indices", "init_from_env",
           "local_device", "barrier", "all_reduce_sum", "all_gather_objects", "unshard", "close"]

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes files and prints results."""
    return rank() == 0


def shard_indices(n: int, *, rank_: int | None = None, world: int | None = None) -> list[int]:
    """Indices of ``n`` items that this rank handles: ``rank, rank + world, ...``.

    Strided rather than contiguous so that each rank sees a mix of the (often class-sorted) data and the
    shards differ in size by at most one.

    Example:
        >>> shard_indices(5, rank_=1, world=2)
        [1, 3]
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(range(r, n, w))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (all of them outside a process group)."""
    return [items[i] for i in shard_indices(len(items))]


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group that ``torchrun`` describes in the environment; returns whether one was joined.

    Uses NCCL for CUDA devices and gloo otherwise. Outside torchrun (``WORLD_SIZE`` unset or 1) it does
    nothing, so commands run unchanged on one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def local_device(device: str | torch.device) -> torch.device:
    """A CUDA device becomes this process's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def _reduce_device(t: torch.Tensor) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return t.cuda() if t.device.type != "cuda" else t
    return t.cpu()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over all ranks (float64 stays float64); returns the sums on the inputs' devices."""
    if not is_distributed():
        return list(tensors)
    out = []
    for t in tensors:
        buf = _reduce_device(t.detach().clone())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out.append(buf.to(t.device))
    return out


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself on one process).

    Every rank must call it, and then all take the same branch: a decision one rank makes alone (say, a
    cache file only it can see) would leave the others waiting in a collective it never joins.
    """
    if not is_distributed():
        return bool(flag)
    (n,) = all_reduce_sum([torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)])
    return int(round(float(n[0]))) == world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process). Objects must be picklable in memory;
    nothing read from disk is ever unpickled."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def unshard(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Put per-rank results of :func:`shard_indices` back in the original order of ``n`` items."""
    w = len(parts)
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        for j, item in enumerate(part):
            out[r + j * w] = item
    return out


def close() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
