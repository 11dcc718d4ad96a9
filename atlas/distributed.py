"""Several processes on one build: torchrun's ranks split every stage's work units.

`torchrun --nproc-per-node N -m atlas build ...` starts N copies of the same
command; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each. Every rank
plans the same list of work units from the same set of finished units (rank 0
lists them and sends the list to the others), takes every N-th unit starting
at its rank, and writes each finished unit as its own part, so ranks never
write the same file. Between stages the ranks wait for each other: a later
stage reads the parts of an earlier one. Rank 0 alone opens the store,
consolidates it and renders the site.

A unit's result does not depend on which rank computed it or on what else
that rank computed, so the store equals a single-process build's. The CPU
uses the gloo backend, CUDA uses NCCL with one GPU per rank (LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from atlas.errors import AtlasError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(hours=6)  # a rank may wait this long for the slowest rank of a stage


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one build."""

    rank: int = 0
    world: int = 1
    local: int = 0  # index among the ranks of this machine: picks the GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of an ordered list: every `world`-th item starting at `rank`."""
        return list(items)[self.rank::self.world]


def from_env() -> Ranks:
    """The ranks torchrun describes in the environment; a single process without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise AtlasError(f"malformed torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise AtlasError(f"malformed torchrun environment: RANK {rank}, WORLD_SIZE {world}")
    return Ranks(rank, world, local)


def start(ranks: Ranks, device: torch.device) -> None:
    """Joins the process group of a multi-process build (nothing to do for one process)."""
    if ranks.world == 1 or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise AtlasError("WORLD_SIZE is set but MASTER_ADDR is not: start several ranks with torchrun "
                         "(torchrun --nproc-per-node N -m atlas build ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world, timeout=TIMEOUT)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits until every rank gets here."""
    if dist.is_initialized():
        dist.barrier()


def share(value: T) -> T:
    """Rank 0's `value`, on every rank (a picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Calls `fn` on rank 0 alone and gives its result to every rank; its AtlasError is raised on
    every rank, so none waits for a rank that stopped."""
    answer: tuple[T | None, str | None] = (None, None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            answer = (fn(), None)
        except AtlasError as exc:
            answer = (None, str(exc))
    result, error = share(answer)
    if error is not None:
        raise AtlasError(error)
    return result


def smallest(value: int) -> int:
    """The smallest of every rank's `value`: a batch size that fits on every rank's device."""
    if not dist.is_initialized():
        return value
    every: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, int(value))
    return min(int(v) for v in every)
