"""Images per second, timed as timm's benchmark does, for one model or several interleaved.

Protocol: eval mode under torch.inference_mode(), in an execution mode (harness.measure.modes: autocast or
low-precision weights, eager, CUDA graphs or compiled), one random batch created once on the
device, `warmup` untimed iterations of each model at the timed batch size (then, with CUDA graphs,
one capture each), then `windows` windows of `iters` iterations, the models taking turns window by
window, timed with time.perf_counter and bounded by torch.cuda.synchronize() on CUDA. On CUDA,
cudnn.benchmark picks the convolution algorithms (as timm's benchmark does). The figure is the
median over windows; min, max and IQR give its spread. A batch that runs out of GPU memory is
halved and the measurement restarted; the halvings are recorded. With compile, torch's compile
caches are reset for each measurement and each halved batch, so every model runs compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import timm
import torch
from torch import nn

from harness.measure.modes import ExecutionMode, capture_graph, cast_for_inference, compiled
from harness.measure.provenance import device_name
from methods.errors import TokenBenchError
from methods.timm_compat import check_image_size

DEVICES = "auto, cpu, cuda, cuda:N"
CPU_BATCH = 32
OUT_OF_MEMORY_MARKERS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def check_positive(name: str, value: int | None, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TokenBenchError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


# Calls before a compiled model stops compiling: at warm-up 1 the windows of an interleaved CPU run still
# held compilations (evit's speedup read 33.6 over vanilla; 0.75 at 3).
COMPILE_WARMUP = 3


@dataclass(frozen=True)
class ThroughputConfig:
    """How to time. batch_size None: on CUDA the largest power of two up to max_batch that fits
    (found by halving on OOM), on CPU 32. threads: CPU threads for the run (None: leave as is).
    tf32: allow TF32 matmuls and convolutions on CUDA (set explicitly either way).
    precision, model_dtype, cuda_graphs, compile: the execution mode (harness.measure.modes.ExecutionMode)."""

    device: str = "cpu"
    batch_size: int | None = None
    precision: str = "fp32"
    compile: bool = False
    model_dtype: str = "fp32"
    cuda_graphs: bool = False
    warmup: int = 3
    iters: int = 5
    windows: int = 5
    threads: int | None = None
    tf32: bool = True
    max_batch: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise TokenBenchError(f"unknown device {self.device!r}; allowed: {DEVICES}")
        self.mode  # noqa: B018  (builds and so checks the execution mode)
        check_positive("batch_size", self.batch_size, optional=True)
        check_positive("warmup", self.warmup, minimum=0)
        if self.compile and self.warmup < COMPILE_WARMUP:
            raise TokenBenchError(
                f"compile needs warmup >= {COMPILE_WARMUP}: torch.compile compiles again in a model's first calls "
                f"(the models timed together share their forward's code) and records CUDA graphs after a few"
            )
        check_positive("iters", self.iters)
        check_positive("windows", self.windows)
        check_positive("threads", self.threads, optional=True)
        check_positive("max_batch", self.max_batch)
        if self.max_batch & (self.max_batch - 1):
            raise TokenBenchError(f"max_batch must be a power of two, got {self.max_batch}")

    @property
    def mode(self) -> ExecutionMode:
        return ExecutionMode(self.device, self.precision, self.model_dtype, self.cuda_graphs, self.compile)


@dataclass(frozen=True)
class ThroughputResult:
    """Images per second: the median over timing windows, with its spread, and how it was measured."""

    img_per_s: float
    img_per_s_min: float
    img_per_s_max: float
    img_per_s_iqr: float
    batch_size: int
    oom_halvings: int
    device_name: str
    protocol: dict


def resolve_device(device: str) -> str:
    """The device to run on: "auto" is "cuda" if a GPU is visible, else "cpu"; a CUDA device must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if match is None:
        raise TokenBenchError(f"unknown device {device!r}; allowed: {DEVICES}")
    if device != "cpu":
        if not torch.cuda.is_available():
            raise TokenBenchError(f"device {device} asked for, but torch sees no CUDA GPU; use cpu or auto")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise TokenBenchError(f"device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


def check_gpu_has_dtypes(mode: ExecutionMode) -> None:
    """bf16, as autocast or as weights, only where the GPU has it (the mode checks the rest when it is
    built for a resolved device)."""
    if mode.device != "cpu" and "bf16" in (mode.precision, mode.model_dtype) and not torch.cuda.is_bf16_supported():
        raise TokenBenchError(f"{device_name(mode.device)} has no bf16; use fp16 or fp32")


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def run_settings(device: str, config: ThroughputConfig) -> Iterator[dict]:
    """Set CPU threads and (on CUDA) TF32 for the run and restore them after; yields what was used."""
    threads = torch.get_num_threads()
    cuda = device != "cpu"
    backends = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
            torch.backends.cudnn.benchmark = True
        yield {
            "threads": torch.get_num_threads(),
            "tf32": config.tf32 if cuda else None,
            "cudnn_benchmark": True if cuda else None,
        }
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = (
            backends
        )


def measure_throughput(model: nn.Module, img_size: int, config: ThroughputConfig) -> ThroughputResult:
    """Images per second of `model` on `img_size` images; the model is left as it was found."""
    return measure_interleaved({"model": model}, img_size, config)["model"]


def measure_interleaved(
    models: Mapping[str, nn.Module], img_size: int, config: ThroughputConfig
) -> dict[str, ThroughputResult]:
    """Images per second of each model, their windows timed in turn (A B A B ...) at one batch size,
    so that drifts in clock speed or load hit all alike: compare them by the ratio of medians."""
    if not models:
        raise TokenBenchError("measure_interleaved needs at least one model")
    device = resolve_device(config.device)
    config = dataclasses.replace(config, device=device)
    mode = config.mode
    check_gpu_has_dtypes(mode)
    for model in models.values():
        size = check_image_size(model, img_size)
    with contextlib.ExitStack() as stack:
        settings = stack.enter_context(run_settings(device, config))
        runners = {
            name: stack.enter_context(cast_for_inference(model, device, mode.dtype)) for name, model in models.items()
        }
        if config.compile:
            # Inductor lowers some ops (the diagonal of token_ops.class_logits) through a helper that torch
            # itself deprecates: a warning about torch's own code, nothing a user can act on.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="`torch._prims_common.check` is deprecated")
            torch.compiler.reset()  # see harness.measure.modes.compiled
            runners = {name: compiled(model, mode) for name, model in runners.items()}
        batch, halvings, rates = time_with_backoff(runners, size, device, config)
    release_compiled(device, config)
    protocol = {
        "device": device,
        "precision": config.precision,
        "model_dtype": config.model_dtype,
        "cuda_graphs": config.cuda_graphs,
        "compile": config.compile,
        "compile_mode": mode.compile_mode,
        "cudnn_benchmark": settings["cudnn_benchmark"],
        "warmup": config.warmup,
        "iters": config.iters,
        "windows": config.windows,
        "threads": settings["threads"],
        "tf32": settings["tf32"],
        "batch_size_requested": config.batch_size,
        "max_batch": config.max_batch if config.batch_size is None and device != "cpu" else None,
        "img_size": img_size,
        "interleaved": len(models),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda if device != "cpu" else None,
    }
    name = device_name(device)
    return {key: summarise(rates[key], batch, halvings, name, protocol) for key in models}


def release_compiled(device: str, config: ThroughputConfig) -> None:
    """torch.compile keeps its graphs (and with CUDA graphs their memory pools) in a global store, not
    in the compiled models: let them go now, before an accuracy pass or the next row needs the memory."""
    if config.compile:
        torch.compiler.reset()
    if device != "cpu":
        torch.cuda.empty_cache()


def time_with_backoff(
    runners: Mapping[str, Callable], size: tuple[int, int], device: str, config: ThroughputConfig
) -> tuple[int, int, dict[str, list[float]]]:
    """(batch, halvings, images/s per window of each runner), halving the batch on OOM until it fits."""
    batch = config.batch_size or (CPU_BATCH if device == "cpu" else config.max_batch)
    halvings = 0
    while True:
        try:
            return batch, halvings, time_windows(runners, batch, size, device, config)
        except Exception as error:  # anything but running out of memory is raised again
            if not is_out_of_memory(error):
                raise
            # leave the except block first: its traceback holds the tensors to free
        gc.collect()
        if config.compile:
            torch.compiler.reset()  # the next batch size compiles anew; the old graphs only count against the limit
        if device != "cpu":
            torch.cuda.empty_cache()
        if batch == 1:
            raise TokenBenchError(f"out of memory on {device_name(device)} ({device}) even at batch size 1")
        batch //= 2
        halvings += 1


def is_out_of_memory(error: BaseException | None) -> bool:
    """Whether `error`, or an error it wraps, is the GPU running out of memory. cuBLAS and cuDNN report
    their failed allocations as plain RuntimeErrors; torch.compile raises its own error, keeping the
    original as `inner_exception` (and dropping `__cause__`); a CUDA graph capture that an allocation
    broke raises its own error while the OOM is being handled (`__context__`)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.cuda.OutOfMemoryError) or any(
            marker in str(error) for marker in OUT_OF_MEMORY_MARKERS
        ):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def time_windows(
    runners: Mapping[str, Callable], batch: int, size: tuple[int, int], device: str, config: ThroughputConfig
) -> dict[str, list[float]]:
    """Images per second of each runner in each window, the windows going round-robin over runners."""
    mode = config.mode
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=generator, device=device).to(mode.dtype)  # [B, 3, H, W]
    rates: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode(), mode.autocast():
        calls = {name: warmed_up(run, images, config) for name, run in runners.items()}
        for _ in range(config.windows):
            for name, call in calls.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(config.iters):
                    call()
                synchronize(device)
                rates[name].append(batch * config.iters / (time.perf_counter() - start))
    return rates


def warmed_up(run: Callable, images: torch.Tensor, config: ThroughputConfig) -> Callable[[], object]:
    """Run `run(images)` `warmup` times, then return what a timed iteration calls: the forward, or the
    replay of its CUDA graph, captured here at the timed batch size."""
    for _ in range(config.warmup):
        run(images)
    if config.mode.captures_graphs:
        return capture_graph(run, images)
    return lambda: run(images)


def summarise(rates: list[float], batch: int, halvings: int, name: str, protocol: dict) -> ThroughputResult:
    q1, median, q3 = np.percentile(rates, [25, 50, 75])
    return ThroughputResult(
        img_per_s=float(median),
        img_per_s_min=float(min(rates)),
        img_per_s_max=float(max(rates)),
        img_per_s_iqr=float(q3 - q1),
        batch_size=batch,
        oom_halvings=halvings,
        device_name=name,
        protocol=dict(protocol),
    )
