"""create_model: timm ViTs at any resolution the patch size divides, clear errors otherwise."""

import pytest
from timm.models.vision_transformer import VisionTransformer

from harness.measure.models import create_model
from methods import TokenBenchError


def test_builds_a_vit_for_the_resolution_asked():
    model = create_model("deit_tiny_patch16_224", img_size=288, num_classes=10)
    assert isinstance(model, VisionTransformer)
    assert model.patch_embed.num_patches == (288 // 16) ** 2 == 324
    assert model.pos_embed.shape[1] == 1 + 324
    assert model.num_classes == 10


def test_unknown_name_lists_close_matches():
    with pytest.raises(TokenBenchError, match=r"no model 'deit_smal_patch16_224'.*deit_small_patch16_224"):
        create_model("deit_smal_patch16_224")


def test_prefix_of_a_name_lists_the_names_it_starts():
    with pytest.raises(TokenBenchError, match="close matches: vit_tiny_patch16_224"):
        create_model("vit_tiny")


@pytest.mark.parametrize("name,kind", [("resnet10t", "ResNet"), ("swin_tiny_patch4_window7_224", "SwinTransformer")])
def test_a_model_that_is_not_a_vit_is_named(name, kind):
    with pytest.raises(TokenBenchError, match=f"{name} is a {kind}, tokenbench needs a timm VisionTransformer"):
        create_model(name)


def test_size_the_patch_size_does_not_divide():
    with pytest.raises(TokenBenchError, match="image size 230 is not divisible by its patch size 16x16"):
        create_model("deit_tiny_patch16_224", img_size=230)


@pytest.mark.parametrize("size", [0, -16, 224.0, True])
def test_size_must_be_a_positive_int(size):
    with pytest.raises(TokenBenchError, match="img_size must be a positive int"):
        create_model("deit_tiny_patch16_224", img_size=size)
