"""How many pieces of work a call sets off: the count that a small batch on a GPU pays for one by one.

On a GPU, the kernels (and device copies and fills) it launches, as the profiler sees them on the device.
On a CPU, the aten ops that do work, each counted once (not the ops it calls inside), views and
allocations left out: the nearest count there, and what the selection tests bound, op by op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Ops that do no work of their own: views, allocations, and casts or reshapes that copy nothing. One that
# does copy (a `reshape` of strided input, `contiguous`, a cast by `to`) dispatches the copy, which counts.
NO_WORK = frozenset(
    "aten::" + name
    for name in (
        "empty empty_strided empty_like new_empty as_strided view _unsafe_view _reshape_alias reshape slice select "
        "expand transpose t permute unsqueeze squeeze alias detach resolve_conj resolve_neg lift_fresh unbind split "
        "narrow to contiguous flatten diagonal"
    ).split()
)


def dispatched_ops(run: Callable[[], object]) -> Counter:
    """The aten ops that do work for one call of `run`, outermost only, by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") and parent.name not in NO_WORK:
                return False
            parent = parent.cpu_parent
        return True

    events = [e for e in prof.events() if e.name.startswith("aten::") and e.name not in NO_WORK]
    return Counter(e.name for e in events if outermost(e))


def device_launches(run: Callable[[], object]) -> int | None:
    """The kernels, copies and fills one call of `run` puts on the GPU; None where the profiler sees no
    device activity (no CUDA, or no CUPTI to trace it)."""
    if not torch.cuda.is_available():
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    count = sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)
    return count or None


def launches(run: Callable[[], object], device: str) -> int | None:
    """One call's launches on `device`: device work on a GPU, dispatched ops on a CPU."""
    if torch.device(device).type == "cuda":
        return device_launches(run)
    return sum(dispatched_ops(run).values())
