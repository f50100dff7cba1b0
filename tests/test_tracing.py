"""Kept patches are tracked back to original positions: a model forced to favour known patches.

The model is built by hand so that the tokens never change (attention values, MLP and head are
zero) and block b's class attention goes to exactly the patches whose position embedding has a
spike on channel 2 + b: its q rows read the CLS token's channel 1, its k rows read channel 2 + b.
"""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import methods

GRID = 4  # 64x64 images, 16x16 patches: 16 patches, numbered row by row


def forced_vit(favoured: dict[int, list[int]]) -> VisionTransformer:
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
        model.cls_token[0, 0, 1] = 1.0
        dim = model.embed_dim
        for block_index, patches in favoured.items():
            channel = 2 + block_index
            model.pos_embed[0, [1 + p for p in patches], channel] = 1.0
            qkv = model.blocks[block_index].attn.qkv.weight  # [3C, C]: q rows, k rows, v rows
            qkv[:dim, 1] = 1.0  # every query dimension reads the CLS channel
            qkv[dim : 2 * dim, channel] = 1.0  # every key dimension reads this block's channel
    return model.eval()


def kept_sets(stage: methods.Stage) -> list[set[int]]:
    return [set(row.tolist()) for row in stage.kept]


@pytest.mark.parametrize("name,others", [("evit", "fused"), ("prune", "dropped")])
def test_one_stage_keeps_exactly_the_favoured_patches(name, others):
    favoured = [0, 3, 5, 6, 9, 10, 12, 15]
    model = methods.apply(forced_vit({1: favoured}), name, keep_rate=0.5, locations=(1,))
    stages = methods.kept_patches(model, torch.zeros(2, 3, 64, 64))
    assert [(stage.block, stage.others) for stage in stages] == [(1, others)]
    assert kept_sets(stages[0]) == [set(favoured)] * 2


def test_second_stage_maps_through_the_first_stages_reordering():
    first = [0, 3, 5, 6, 9, 10, 12, 15]
    second = [15, 3, 9, 6]  # a subset: the first stage reorders them, the second must name them as patches
    model = methods.apply(forced_vit({1: first, 2: second}), "prune", keep_rate=0.5, locations=(1, 2))
    stages = methods.kept_patches(model, torch.zeros(3, 3, 64, 64))
    assert [stage.block for stage in stages] == [1, 2]
    assert kept_sets(stages[0]) == [set(first)] * 3
    assert kept_sets(stages[1]) == [set(second)] * 3


def test_fused_token_is_marked_as_made_not_a_patch():
    """EViT's fused token can be kept by the next stage: it is reported as -1, never as a patch index."""
    first = [1, 2, 4, 7, 8, 11, 13, 14]
    model = methods.apply(forced_vit({1: first}), "evit", keep_rate=0.9, locations=(1, 2))
    stages = methods.kept_patches(model, torch.zeros(1, 3, 64, 64))
    assert stages[0].kept.shape[1] == 15  # ceil(0.9 * 16)
    second = stages[1].kept[0].tolist()  # ceil(0.9 * 16) = 15 of the 15 patches and the fused token
    patches = [p for p in second if p != -1]
    assert len(second) == 15 and all(-1 <= p < GRID * GRID for p in second)
    assert len(set(patches)) == len(patches) and set(patches) <= set(stages[0].kept[0].tolist())


def test_tracing_leaves_no_trace_on_the_model():
    model = methods.apply(forced_vit({1: [0, 1]}), "prune", keep_rate=0.5, locations=(1,))
    methods.kept_patches(model, torch.zeros(1, 3, 64, 64))
    assert not any(hasattr(block, "selection_tracer") for block in model.blocks)


@pytest.mark.parametrize("name,appended", [("evit", 1), ("prune", 0)])
def test_stages_say_how_many_tokens_the_method_appends(name, appended):
    model = methods.apply(forced_vit({1: [0, 1]}), name, keep_rate=0.5, locations=(1, 2))
    stages = methods.kept_patches(model, torch.zeros(1, 3, 64, 64))
    assert [stage.appended for stage in stages] == [appended, appended]
