"""Execution modes of a throughput measurement: the weights' dtype, autocast, CUDA graphs, compile.

On a GPU the answer depends on them (../shared/gpu-findings.md): fp16 weights make vanilla DeiT-S
1.29x faster than fp16 autocast, and at batch 64 an eager forward waits on kernel launches that a
CUDA graph replays for free. Each mode is checked here, once, with errors that name the allowed
values, and turned into the callable that the timing windows run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from methods.errors import TokenBenchError

PRECISIONS = ("fp32", "fp16", "bf16")
CPU_PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(device: str, precision: str) -> None:
    """Raise unless `precision` (autocast) is known and runs on `device` (CPU autocast has no fp16)."""
    if precision not in PRECISIONS:
        raise TokenBenchError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if device == "cpu" and precision not in CPU_PRECISIONS:
        raise TokenBenchError(f"precision {precision} does not run on CPU; allowed on CPU: {', '.join(CPU_PRECISIONS)}")


@dataclass(frozen=True)
class ExecutionMode:
    """How the timed forward runs.

    precision: autocast dtype (weights stay fp32); model_dtype: the weights' and input's dtype, no
    autocast (timm benchmark's --model-dtype); the two are alternatives, not a combination.
    cuda_graphs: capture the forward once per batch size and replay it; with compile this is
    torch.compile's "reduce-overhead" mode, which captures graphs itself.
    """

    device: str = "cpu"
    precision: str = "fp32"
    model_dtype: str = "fp32"
    cuda_graphs: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        check_precision(self.device, self.precision)
        if self.model_dtype not in DTYPES:
            raise TokenBenchError(f"unknown model dtype {self.model_dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.device == "cpu" and self.model_dtype == "fp16":
            raise TokenBenchError(f"fp16 weights do not run on CPU; allowed on CPU: {', '.join(CPU_PRECISIONS)}")
        if self.precision != "fp32" and self.model_dtype != "fp32":
            raise TokenBenchError(
                f"precision {self.precision} (autocast) and model dtype {self.model_dtype} (weights) contradict "
                f"each other: give one of them, the other fp32"
            )
        if self.cuda_graphs and self.device == "cpu":
            raise TokenBenchError("CUDA graphs need a CUDA device; on CPU run without --cuda-graphs")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.model_dtype]

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode: "reduce-overhead" (its own CUDA graphs) with cuda_graphs, else the default."""
        if not self.compile:
            return None
        return "reduce-overhead" if self.cuda_graphs else "default"

    @property
    def captures_graphs(self) -> bool:
        """Whether the timing captures CUDA graphs itself (with compile, torch.compile does)."""
        return self.cuda_graphs and not self.compile

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to fp16/bf16, or nothing for fp32. Graph capture needs autocast's cast cache off:
        a cached cast would be a tensor from outside the graph's memory pool."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=DTYPES[self.precision], cache_enabled=not self.captures_graphs)

    def describe(self) -> str:
        """A short label, e.g. "fp16 autocast, CUDA graphs" or "bf16 weights, eager"."""
        dtype = f"{self.precision} autocast" if self.precision != "fp32" else f"{self.model_dtype} weights"
        execution = "CUDA graphs" if self.cuda_graphs else "eager"
        return f"{dtype}, {execution}{', compiled' if self.compile else ''}"


def compiled(model: nn.Module, mode: ExecutionMode) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model compiled as `mode` asks; torch's caches are reset first, because every ViT instance
    shares one forward code object and each patched model adds guards to it: past torch's recompile
    limit later models would silently run eagerly."""
    return torch.compile(model, dynamic=False, mode=mode.compile_mode)


def capture_graph(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> Callable[[], object]:
    """Capture one call `run(images)` in a CUDA graph and return its replay. Call it after warm-up:
    the first calls select kernels (cudnn.benchmark) and allocate, which a capture must not see.
    Everything runs on the images' GPU, whichever is current; the capture on a side stream that
    waits for the warm-up. A capture that fails hands the caller's stream back, so that an
    out-of-memory error can be retried at a smaller batch."""
    device = images.device
    graph = torch.cuda.CUDAGraph()
    caller = torch.cuda.current_stream(device)
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            run(images)  # one more call on the capture stream, as torch's recipe asks
        caller.wait_stream(stream)
        try:
            with torch.cuda.graph(graph, stream=stream):
                run(images)
        finally:
            torch.cuda.set_stream(caller)
    return graph.replay


@contextlib.contextmanager
def cast_for_inference(model: nn.Module, device: str, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """The model in eval mode on `device`, its floating-point weights in `dtype` (None: as they are);
    afterwards every parameter and buffer is the very tensor it was (no lossy round trip through
    fp16, no copy back from the GPU), and each module's mode is restored."""
    modes = {module: module.training for module in model.modules()}
    params = {param: param.data for param in model.parameters()}
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()]
    try:
        yield model.eval().to(device=device, dtype=dtype)
    finally:
        for param, data in params.items():
            param.data = data
        for module, name, buffer in buffers:
            module._buffers[name] = buffer
        for module, training in modes.items():
            module.training = training
