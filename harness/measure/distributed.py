"""torch.distributed from torchrun's environment, and what a sharded run needs: shards, sums, and
rank 0's work (the list of jobs, the timing) shared with every process.

A run on CUDA has two backends, gloo for CPU tensors and nccl for CUDA ones, so a collective works
whichever device the caller evaluates on; each process uses GPU LOCAL_RANK. A CPU run uses gloo
only and never touches CUDA.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from methods.errors import TokenBenchError

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise TokenBenchError(f"environment variable {name} must be an integer, got {value!r}") from None


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_device_for_ranks(device: str) -> None:
    """Under torchrun each process takes the GPU of its LOCAL_RANK: a fixed cuda:N would put them all on one."""
    if env_int("WORLD_SIZE", 1) > 1 and re.fullmatch(r"cuda:\d+", device):
        raise TokenBenchError(
            f"device {device} under torchrun would put every process on one GPU; give cuda or auto: "
            f"each process uses the GPU of its LOCAL_RANK"
        )


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes when WORLD_SIZE > 1; return whether distributed.

    Only a run on CUDA (`device` cuda or cuda:N) takes the GPU of its LOCAL_RANK and adds nccl: a CPU
    run never touches CUDA, so it works on a machine with fewer GPUs than processes."""
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return False
    if is_distributed():
        return True
    missing = [name for name in REQUIRED_ENV if name not in os.environ]
    if missing:
        raise TokenBenchError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with torchrun")
    backend = "gloo"
    if device.startswith("cuda"):
        local_rank = env_int("LOCAL_RANK", 0)
        if not 0 <= local_rank < torch.cuda.device_count():
            raise TokenBenchError(f"LOCAL_RANK={local_rank}, but {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0, or not distributed: the one process that writes results."""
    return not is_distributed() or dist.get_rank() == 0


def shard_indices(length: int) -> range:
    """This process's share of `length` items: i % world == rank, so each item goes to exactly one
    rank (unlike DistributedSampler, which pads the shards with repeated items)."""
    if not is_distributed():
        return range(length)
    return range(dist.get_rank(), length, dist.get_world_size())


def from_main_process(value: T) -> T:
    """Rank 0's `value` on every process (picklable values; `value` itself when not distributed). It goes
    through gloo (a CPU run's only backend, and the one a CUDA run's group prefers for objects), so the
    other processes wait for it in a socket read, taking no CPU from rank 0."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_process(compute: Callable[[], T]) -> T:
    """`compute()` run by rank 0 alone while the other processes wait, its result on every process.
    For timing: processes timing at once would share the machine's cores (and its GPUs' host) and each
    time a contended machine. An error on rank 0 is raised on every process, rather than leaving the
    others waiting for a result that never comes."""
    if not is_distributed():
        return compute()
    outcome: tuple[T | None, str | None] = (None, None)
    if is_main_process():
        try:
            outcome = (compute(), None)
        except Exception as error:
            from_main_process((None, f"{type(error).__name__}: {error}"))
            raise
    result, failure = from_main_process(outcome)
    if failure is not None:
        raise TokenBenchError(f"rank 0 failed, so every rank stops: {failure}")
    return result


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all processes (a copy; the input is left alone)."""
    total = values.clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
