"""Shared set-up for the benchmarks: DeiT-S at 224 with random weights, on a batch of random images.

Environment:
  TOKENBENCH_BENCH_BATCH   images per batch (default 2, quick on CPU; a GPU wants 64 or more)
  TOKENBENCH_BENCH_DEVICE  cpu (default), cuda, cuda:N or auto
  TOKENBENCH_BENCH_THREADS CPU threads for torch (default: torch's own choice); 1 is steadiest on a
                           busy or small machine, where waiting threads turn microseconds into milliseconds
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from harness.measure.provenance import provenance
from harness.measure.throughput import resolve_device, synchronize
from methods.errors import TokenBenchError

MODEL = "deit_small_patch16_224"
IMG_SIZE = 224


def positive_env(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise TokenBenchError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def bench_batch() -> int:
    return positive_env("TOKENBENCH_BENCH_BATCH", 2)


def bench_device() -> str:
    return resolve_device(os.environ.get("TOKENBENCH_BENCH_DEVICE", "cpu"))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Each saved run says which code, software, device, batch and threads it timed."""
    threads = positive_env("TOKENBENCH_BENCH_THREADS", None) or torch.get_num_threads()
    setup = {"model": MODEL, "batch_size": bench_batch(), "threads": threads}
    machine_info["tokenbench"] = {**provenance(bench_device()), **setup}


@pytest.fixture(scope="session", autouse=True)
def cpu_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(positive_env("TOKENBENCH_BENCH_THREADS", threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> str:
    return bench_device()


@pytest.fixture(scope="session")
def batch_size() -> int:
    return bench_batch()


@pytest.fixture(scope="session")
def images(device: str, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, IMG_SIZE, IMG_SIZE, generator=generator).to(device)  # [B, 3, H, W]


@pytest.fixture
def measured(device: str) -> Callable[[Callable], Callable]:
    """Wrap a function to run as measurements do: under inference_mode, and waiting for the GPU at
    the end of each call, so that its time is the work's and not the kernel launches'."""

    def wrap(fn: Callable) -> Callable:
        def run():
            with torch.inference_mode():
                out = fn()
            synchronize(device)
            return out

        return run

    return wrap
