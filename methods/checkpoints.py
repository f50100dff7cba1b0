"""Load official checkpoints into a (patched) timm ViT: DeiT/timm/EViT, DynamicViT and Evo-ViT layouts.

Call `load_checkpoint` after `apply`, so the model has every module the checkpoint fills (DynamicViT's
score predictors). The layout is told from the keys; the load is strict: a checkpoint that does not
fit (another model size, another method) raises TokenBenchError naming the keys or shapes at fault.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from methods.dynamicvit import PREDICTORS_ATTR, mark_predictors_trained
from methods.errors import TokenBenchError
from methods.evovit import MeanPoolHead
from methods.timm_compat import pools_patch_mean, require_vit, resample_pos_embed

StateDict = dict[str, torch.Tensor]

WRAPPERS = ("model", "state_dict", "model_ema")  # looked for in this order: the trained weights first
DDP_PREFIX = "module."
EVO_VIT_TRAINING_ONLY = ("head_cls.", "norm_cls.")  # the auxiliary class-token classifier
EVO_VIT_QK = re.compile(r"^qks\.(\d+)\.qk\.(.+)$")
EVO_VIT_V = re.compile(r"^vs\.(\d+)\.v\.(.+)$")
SHOWN = 3  # keys named in an error message, per list
# How each format's official code resamples a position embedding for another grid: DeiT's fine-tuning and
# EViT's model bicubically; DynamicViT's and Evo-ViT's checkpoint filters bilinearly.
POS_EMBED_INTERPOLATION = {"timm": "bicubic", "dynamicvit": "bilinear", "evo-vit": "bilinear"}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` did.

    format: "timm" (DeiT, EViT, timm), "dynamicvit" or "evo-vit".
    loaded: tensors loaded (every entry of the model's state dict).
    dropped: checkpoint keys left out because only training uses them (Evo-ViT's head_cls, norm_cls).
    pos_embed_from: the checkpoint's position-embedding shape when it was resampled to the model's grid.
    """

    format: str
    loaded: int
    dropped: tuple[str, ...] = ()
    pos_embed_from: tuple[int, ...] | None = None


def load_checkpoint(model: nn.Module, source: str | PathLike | Mapping) -> LoadedCheckpoint:
    """Load a checkpoint (a file path or an in-memory dict) into `model`, after `apply`.

    The weights are taken from the first of `model`, `state_dict`, `model_ema` that the dict holds, or
    from the dict itself when it is a bare state dict; a leading `module.` (DDP) is stripped. Evo-ViT's
    split attention is fused back into timm's `qkv`, its post-pooling `norm` goes to the model's final
    norm (`norm`, or `fc_norm` on a model that pools first), and the position embedding is resampled
    when the checkpoint was trained on another grid, as the format's official code resamples it
    (POS_EMBED_INTERPOLATION). Loading DynamicViT predictors marks them trained.
    """
    vit = require_vit(model)
    state = unwrap(read_checkpoint(source) if isinstance(source, (str, PathLike)) else source)
    fmt = detect_format(state)
    dropped: tuple[str, ...] = ()
    expected = vit.state_dict()
    if fmt == "evo-vit":
        check_mean_pool_head(vit)
        state, dropped = from_evo_vit(state, final_norm="norm" if "norm.weight" in expected else "fc_norm")
    check_keys(vit, expected, state, fmt)
    pos_embed_from = resample_pos_embed(vit, state, POS_EMBED_INTERPOLATION[fmt])
    check_shapes(expected, state)
    vit.load_state_dict(state)
    if fmt == "dynamicvit":
        mark_predictors_trained(vit)
    return LoadedCheckpoint(format=fmt, loaded=len(state), dropped=dropped, pos_embed_from=pos_embed_from)


def read_checkpoint(path: str | PathLike) -> object:
    """torch.load on the CPU, with weights_only=True first.

    Files that also pickle other Python objects (the official training scripts save `args`, an
    argparse.Namespace) are refused by weights_only=True and re-read with weights_only=False, which
    runs the pickled code in the file: load only checkpoints you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenBenchError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # it holds more than tensors and containers: read in full below
    except Exception as error:
        raise TokenBenchError(f"cannot read checkpoint {path}: {describe(error)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise TokenBenchError(f"cannot read checkpoint {path}: {describe(error)}") from None


def describe(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def unwrap(checkpoint: object) -> StateDict:
    """The state dict inside a checkpoint dict (see `load_checkpoint`), without the `module.` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise TokenBenchError(f"a checkpoint must be a dict of tensors, got {type(checkpoint).__name__}")
    inner = next((checkpoint[key] for key in WRAPPERS if isinstance(checkpoint.get(key), Mapping)), checkpoint)
    if not inner or not all(isinstance(value, torch.Tensor) for value in inner.values()):
        raise TokenBenchError(
            f"found no state dict in the checkpoint: expected tensors, or one of {', '.join(WRAPPERS)}; "
            f"its top-level keys are {', '.join(map(str, list(checkpoint)[:8]))}"
        )
    return {key.removeprefix(DDP_PREFIX): value for key, value in inner.items()}


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """ "evo-vit" (split q/k and v), "dynamicvit" (score predictors) or "timm" (everything else)."""
    if any(key.startswith("qks.") for key in state):
        return "evo-vit"
    if any(key.startswith(PREDICTORS_ATTR + ".") for key in state):
        return "dynamicvit"
    return "timm"


def from_evo_vit(state: Mapping[str, torch.Tensor], final_norm: str) -> tuple[StateDict, tuple[str, ...]]:
    """Official Evo-ViT keys to timm's: qks.i.qk (rows q, k) and vs.i.v (rows v) stack into
    blocks.i.attn.qkv; norms.i -> blocks.i.norm1; projs.i -> blocks.i.attn.proj; norm -> `final_norm`.

    A q/k without its v (or the reverse) keeps its own name, so the key check reports it.
    """
    renames = [(r"^norms\.(\d+)\.", r"blocks.\1.norm1."), (r"^projs\.(\d+)\.", r"blocks.\1.attn.proj.")]
    renames.append((r"^norm\.", final_norm + "."))
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state.items():
        qk, v = EVO_VIT_QK.match(key), EVO_VIT_V.match(key)
        if key.startswith(EVO_VIT_TRAINING_ONLY):
            dropped.append(key)
        elif qk and f"vs.{qk[1]}.v.{qk[2]}" in state:
            out[f"blocks.{qk[1]}.attn.qkv.{qk[2]}"] = torch.cat([value, state[f"vs.{qk[1]}.v.{qk[2]}"]], dim=0)
        elif not (v and f"qks.{v[1]}.qk.{v[2]}" in state):  # a v with its q/k went into the qkv above
            for pattern, replacement in renames:
                key = re.sub(pattern, replacement, key, count=1)
            out[key] = value
    return out, tuple(dropped)


def check_mean_pool_head(model: nn.Module) -> None:
    """Evo-ViT's classifier was trained on the mean of the patch tokens: on the class token it would
    load without complaint and give meaningless predictions."""
    if not (isinstance(model, MeanPoolHead) or pools_patch_mean(model)):
        raise TokenBenchError(
            "an Evo-ViT checkpoint's classifier reads the mean of the patch tokens, but this model classifies "
            "its class token; apply evo-vit with variant='official' or head='mean' before loading it"
        )


def check_keys(model: nn.Module, expected: Mapping[str, torch.Tensor], state: Mapping, fmt: str) -> None:
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if not missing and not unexpected:
        return
    has_predictors = hasattr(model, PREDICTORS_ATTR)
    hint = ""
    if fmt == "dynamicvit" and not has_predictors:
        hint = "; a DynamicViT checkpoint loads after methods.apply(model, 'dynamicvit')"
    elif fmt != "dynamicvit" and has_predictors:
        hint = "; a dynamicvit model needs a DynamicViT checkpoint, which holds its score predictors"
    raise TokenBenchError(
        f"the {fmt} checkpoint does not fit this model: {name_keys(missing, 'missing')}, "
        f"{name_keys(unexpected, 'unexpected')}{hint}"
    )


def name_keys(keys: list[str], what: str) -> str:
    if not keys:
        return f"0 {what} keys"
    more = ", ..." if len(keys) > SHOWN else ""
    return f"{len(keys)} {what} keys ({', '.join(keys[:SHOWN])}{more})"


def check_shapes(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    wrong = [key for key in expected if state[key].shape != expected[key].shape]
    if wrong:
        shown = ", ".join(f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in wrong[:SHOWN])
        more = ", ..." if len(wrong) > SHOWN else ""
        raise TokenBenchError(
            f"the checkpoint does not fit this model (another size?): {len(wrong)} tensors differ in shape, "
            f"checkpoint vs model: {shown}{more}"
        )
