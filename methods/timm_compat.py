"""The only module that knows timm's internals: what a patchable ViT looks like and how to read it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from methods.errors import TokenBenchError

APPLIED_ATTR = "tokenbench_method"


def require_vit(model: nn.Module) -> VisionTransformer:
    """Return `model` if it is a timm VisionTransformer, else raise naming what it is."""
    if not isinstance(model, VisionTransformer):
        raise TokenBenchError(
            f"tokenbench patches timm VisionTransformer models (e.g. deit_small_patch16_224), "
            f"got {type(model).__name__}"
        )
    return model


def require_unpatched(model: nn.Module) -> None:
    applied = getattr(model, APPLIED_ATTR, None)
    if applied is not None:
        raise TokenBenchError(
            f"this model already has method '{applied.name}' applied; create a fresh model to apply another"
        )


def require_class_token(model: VisionTransformer, method: str) -> None:
    if model.cls_token is None:
        raise TokenBenchError(f"method '{method}' ranks tokens by class attention and needs a model with a class token")


def require_stock_blocks(model: VisionTransformer, indices: Sequence[int], method: str) -> None:
    """Blocks that a method swaps must be timm's own pre-norm Block with its own Attention."""
    for i in indices:
        block = model.blocks[i]
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TokenBenchError(
                f"method '{method}' can patch timm's Block/Attention only; block {i} is "
                f"{type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}"
            )


def require_attention_mask(method: str) -> None:
    """An additive attention bias reaches the fused kernel through timm's `attn_mask` (timm 1.0.16 and later)."""
    if "attn_mask" not in inspect.signature(Attention.forward).parameters:
        raise TokenBenchError(
            f"method '{method}' passes a bias to timm's attention as attn_mask, which timm {timm.__version__} "
            f"does not take; install timm>=1.0.16 or set prop_attn=False"
        )


def depth(model: VisionTransformer) -> int:
    return len(model.blocks)


def num_prefix_tokens(model: VisionTransformer) -> int:
    """Tokens before the patch tokens (class, distillation, register tokens): never reduced."""
    return int(model.num_prefix_tokens)


def patch_size(model: VisionTransformer) -> tuple[int, int]:
    return tuple(model.patch_embed.patch_size)


def model_image_size(model: VisionTransformer) -> tuple[int, int]:
    return tuple(model.patch_embed.img_size)


def check_image_size(model: nn.Module, img_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise `img_size` to (height, width) and check the model can take it."""
    vit = require_vit(model)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise TokenBenchError(f"img_size must be a positive int or (height, width), got {img_size!r}")
    ph, pw = patch_size(vit)
    if size[0] % ph or size[1] % pw:
        raise TokenBenchError(f"image size {size[0]}x{size[1]} is not divisible by the patch size {ph}x{pw}")
    built = model_image_size(vit)
    if size != built and not vit.dynamic_img_size:
        raise TokenBenchError(
            f"the model was built for {built[0]}x{built[1]} images, not {size[0]}x{size[1]}; "
            f"create it for that size (harness.measure.models.create_model(name, img_size=...))"
        )
    return size


def pools_patch_mean(model: VisionTransformer) -> bool:
    """Whether timm's own head classifies the mean of the patch tokens (global_pool="avg")."""
    return model.global_pool == "avg"


def mark_applied(model: nn.Module, applied: object) -> None:
    setattr(model, APPLIED_ATTR, applied)


def applied_method(model: nn.Module) -> object | None:
    return getattr(model, APPLIED_ATTR, None)


def tap_query_key(block: Block) -> None:
    """Keep the CLS query row and the keys that timm's attention computes, as `block.tapped_qk`.

    Forward hooks on `q_norm`/`k_norm` (identities unless the model has qk-norm) see q and k as the
    fused SDPA kernel receives them, so timm's attention runs unchanged and we never rebuild it.
    """
    tapped: dict[str, torch.Tensor] = {}
    block.attn.q_norm.register_forward_hook(Tap(tapped, "q_cls"))
    block.attn.k_norm.register_forward_hook(Tap(tapped, "k"))
    block.tapped_qk = tapped


class Tap:
    """A forward hook that keeps its module's output in `tapped[name]`: the CLS query row [B, H, 1, D] for
    "q_cls", the keys [B, H, N, D] for "k". An object, not a closure, so that a deep copy of the model gets
    hooks writing into the copy's own dict (`copy.deepcopy` shares a closure's cells with the original),
    and the model pickles."""

    def __init__(self, tapped: dict[str, torch.Tensor], name: str) -> None:
        self.tapped, self.name = tapped, name

    def __call__(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.tapped[self.name] = output[:, :, :1] if self.name == "q_cls" else output


def take_tapped_qk(block: Block) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The CLS query row and keys of the block's last attention call, and the attention scale."""
    tapped = block.tapped_qk
    q_cls, k = tapped.pop("q_cls"), tapped.pop("k")
    return q_cls, k, block.attn.scale


def resample_pos_embed(
    model: VisionTransformer, state: dict[str, torch.Tensor], interpolation: str
) -> tuple[int, ...] | None:
    """Resample the checkpoint's position embedding to the model's patch grid, in `state`; return the
    old shape, or None when nothing was resampled (same shape, or no square grid to read it as).

    `interpolation` ("bicubic" or "bilinear") is F.interpolate's, with align_corners False and without
    the antialiasing timm's own loader adds (which, even when enlarging, uses another cubic kernel):
    as the official codes resample, DeiT's and EViT's bicubically, DynamicViT's and Evo-ViT's bilinearly."""
    old, new = state.get("pos_embed"), model.pos_embed
    if old is None or new is None or old.shape == new.shape or old.ndim != 3 or old.shape[-1] != new.shape[-1]:
        return None
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = math.isqrt(max(old.shape[1] - prefix, 0))
    if side * side != old.shape[1] - prefix:
        return None
    state["pos_embed"] = resample_abs_pos_embed(
        old,
        new_size=list(model.patch_embed.grid_size),
        old_size=[side, side],
        num_prefix_tokens=prefix,
        interpolation=interpolation,
        antialias=False,
    )
    return tuple(old.shape)
