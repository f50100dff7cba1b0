"""MACs for one image, counted by fvcore.

Convention (fvcore's, and the papers'): 1 MAC = one fused multiply-add. Matrix products, linear
layers and convolutions count their multiply-adds; layer norms count 5 per element, as fvcore
does; element-wise and data-movement ops (activations, softmax, additions, gathers, top-k) count
zero. fvcore traces the model and skips ops it has no handle for; here every op is either handled,
listed below as zero by convention, or makes the count fail, so no cost goes missing silently.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore scripts its focal loss at import, which torch now calls deprecated
    # (a FutureWarning in torch 2.14, a DeprecationWarning in 2.11, the GPU machine's): any category
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from methods.errors import TokenBenchError
from methods.timm_compat import check_image_size

# Ops fvcore reports as unhandled whose cost is zero by the convention above.
ZERO_MAC_OPS = frozenset(
    {
        "aten::add",
        "aten::add_",
        "aten::sub",
        "aten::sub_",
        "aten::mul",
        "aten::mul_",
        "aten::lerp_",
        "aten::div",
        "aten::div_",
        "aten::reciprocal_",
        "aten::gelu",
        "aten::silu",
        "aten::sigmoid",
        "aten::tanh",
        "aten::log",
        "aten::softmax",
        "aten::log_softmax",
        "aten::mean",
        "aten::sum",
        "aten::linalg_vector_norm",
        "aten::topk",
        "aten::sort",
        "aten::argsort",
        "aten::scatter_",
        "aten::scatter_reduce",
        "aten::scatter_add_",
        "aten::ones_like",
        "aten::new_ones",
        "aten::fill_",
        "aten::zeros_like",
        "aten::clone",
        "aten::diagonal",
        "aten::type_as",
        "aten::to",
        "aten::repeat",
        "aten::unflatten",
    }
)


class MacCountError(TokenBenchError):
    """The model runs an op whose MACs this counter does not know."""


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """F.scaled_dot_product_attention: q @ k^T and attn @ v, the same MACs as the explicit path."""
    q, k, v = (get_shape(value) for value in inputs[:3])  # [..., Nq, D], [..., Nk, D], [..., Nk, Dv]
    batch_heads = math.prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


def baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """beta * self + alpha * (batch1 @ batch2): the product's multiply-adds, as for bmm."""
    (batch, rows, inner), (_, _, cols) = (get_shape(value) for value in inputs[1:3])
    return batch * rows * inner * cols


def count_macs(model: nn.Module, img_size: int | Sequence[int]) -> float:
    """MACs of the model's forward pass on one image of `img_size` (int or (height, width))."""
    height, width = check_image_size(model, img_size)
    param = next(model.parameters())
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(param)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, image)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
        analysis.set_op_handle("aten::baddbmm_", baddbmm_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = analysis.total()
        unknown = sorted(set(analysis.unsupported_ops()) - ZERO_MAC_OPS)
    finally:
        model.train(was_training)
    if unknown:
        raise MacCountError(
            f"cannot count MACs: no handle for {', '.join(unknown)}; add one in harness/measure/macs.py "
            f"or list it in ZERO_MAC_OPS if it costs no multiply-add"
        )
    return float(total)
