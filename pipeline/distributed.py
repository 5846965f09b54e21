"""Distributed extraction: joining a torchrun process group, splitting a split into per-rank ranges, agreeing on outcomes."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Group", "RankError", "RANK_TOLERANCE", "launched_by_torchrun", "env_rank", "process_group", "rank_range"]

T = TypeVar("T")

# A run under torchrun gives a single process's rows, labels, paths and skipped files exactly, and its features
# within this fraction of the tap's largest feature, not bit for bit: the ranks form the same batches, but each
# process sums with its own number of threads (torchrun sets OMP_NUM_THREADS=1), and the summation order follows
# the thread count. tests/test_distributed.py checks it against a 2-thread process.
RANK_TOLERANCE = 1e-5

# A rank that finishes its range early waits for the slowest one at the final barrier; after a resumed run
# that can be the whole extraction of one rank, so the default 10-30 min collective timeout is too short.
# torchrun still stops every rank at once when one of them dies.
_TIMEOUT = timedelta(hours=48)


class RankError(ValueError):
    """An error that every rank raises together, because one rank (``source``) failed a step they share.

    Rank 0 reports it; the other ranks stay quiet, so a user sees one message, not one per process.
    """

    def __init__(self, message: str, source: int) -> None:
        super().__init__(message)
        self.source = source


@dataclass(frozen=True)
class Group:
    """The processes of one extraction: this one's ``rank`` among ``world`` ranks, and ranks on this node.

    A plain run is a group of one; its collectives are no-ops, so one code path serves both.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (a barrier too)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, step: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
        """Run ``step`` on every rank; if it raised ``errors`` on any rank, raise on all of them.

        A plain run re-raises the original exception unchanged. In a group, every rank raises
        :class:`RankError` with the message of the lowest failing rank (prefixed by that rank when it is not
        rank 0), so no rank is left waiting in a collective for one that gave up.
        """
        if not self.distributed:
            return step()
        value, message = None, None
        try:
            value = step()
        except errors as e:
            message = str(e)
        failed = [(r, m) for r, m in enumerate(self.gather(message)) if m is not None]
        if failed:
            source, message = failed[0]
            raise RankError(message if source == 0 else f"rank {source}: {message}", source)
        return value  # type: ignore[return-value]

    def range(self, n: int, align: int = 1) -> tuple[int, int]:
        """This rank's positions of ``n`` (see :func:`rank_range`)."""
        return rank_range(n, self.rank, self.world, align)


def rank_range(n: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """The contiguous, disjoint block ``[start, stop)`` of ``n`` positions that ``rank`` of ``world`` handles.

    Blocks cover ``0..n`` exactly: no position is padded or repeated (unlike ``DistributedSampler``'s default),
    so the ranks' rows concatenated in rank order are the dataset in order. Block boundaries fall on multiples
    of ``align`` (the batch size), so the ranks form the very batches a single process forms (their features
    still differ from a process with another thread count within :data:`RANK_TOLERANCE`); block sizes differ by
    at most ``align``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    units = -(-n // align)
    return min(n, units * rank // world * align), min(n, units * (rank + 1) // world * align)


def launched_by_torchrun() -> bool:
    """Whether the environment names a multi-process job (torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's global rank from the environment; 0 in a plain run."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def _local() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def process_group(device: torch.device) -> tuple[Group, torch.device]:
    """The group this process extracts in, and the device it should use.

    Inside a process group that is already initialised (a user's own, or one made by an earlier call), that
    group is used as is. Under torchrun without one, a group is initialised from the environment, with NCCL
    for CUDA and gloo otherwise, and kept for later calls (``pipeline extract --split train --split val``
    extracts both in one group; re-initialising a group in the same process is not reliable); it is destroyed
    when the process exits. Otherwise this is a plain run: a group of one.

    On CUDA, a device without an index becomes ``cuda:LOCAL_RANK``, so each rank of a node gets its own GPU.

    Args:
        device: the device the settings resolved to.

    Returns:
        ``(group, device)``.
    """
    if not dist.is_available() or not (dist.is_initialized() or launched_by_torchrun()):
        return Group(), device
    local_rank, local_world = _local()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=_TIMEOUT, **kwargs)
        atexit.register(_destroy)
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, local_world), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
