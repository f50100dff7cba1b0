"""Token-reduction methods for timm Vision Transformers, behind one interface.

apply(model, name, **options) -> model     patch a model in place
list_methods() -> list[str]                registered names
token_counts(model, img_size) -> list[int] tokens each block's FFN processes
block_token_counts(model, img_size)        tokens each block's attention and FFN process
apply_floor(model, counts)                 the floor twin: a vanilla model sliced to those counts
kept_patches(model, images) -> list[Stage] original patches kept at each reduction stage
load_checkpoint(model, path_or_dict)       load timm/DeiT, EViT, DynamicViT or Evo-ViT weights, after apply
"""

from methods import dynamicvit, evit, evovit, prune, tome, vanilla  # noqa: F401  (importing a method module registers it)
from methods.api import AppliedMethod, BlockTokenCounts, apply, block_token_counts, token_counts
from methods.checkpoints import LoadedCheckpoint, load_checkpoint
from methods.errors import TokenBenchError
from methods.floor import FloorTwin, apply_floor
from methods.registry import list_methods, lookup
from methods.tracing import Stage, kept_patches

__all__ = [
    "AppliedMethod",
    "BlockTokenCounts",
    "FloorTwin",
    "LoadedCheckpoint",
    "Stage",
    "TokenBenchError",
    "apply",
    "apply_floor",
    "block_token_counts",
    "kept_patches",
    "load_checkpoint",
    "list_methods",
    "lookup",
    "token_counts",
]
