"""Selection pictures: masks from stages, panels and titles, preprocessing, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import methods
from harness.run import viz
from methods import Stage, TokenBenchError


def test_stage_masks_by_hand():
    stage = Stage(block=3, kept=torch.tensor([[5, 0, -1]]), others="fused")
    (mask,) = viz.stage_masks([stage], grid=(2, 4))
    expected = np.full((2, 4), viz.CODES["fused"])
    expected[0, 0] = expected[1, 1] = viz.KEPT  # patches 0 and 5, row by row; -1 is the fused token
    assert np.array_equal(mask, expected)


def test_titles_count_kept_patches_and_made_tokens():
    fused = Stage(
        block=6, kept=torch.tensor([[5, 0, -1]]), others="fused", appended=1
    )  # a kept fused token + a new one
    assert viz.stage_tokens(fused) == (2, 2)
    assert viz.stage_title(fused).startswith("block 6: 4 tokens")
    dropped = Stage(block=3, kept=torch.tensor([[1, 2, 3]]), others="dropped")
    assert viz.stage_tokens(dropped) == (3, 0)
    slow = Stage(block=4, kept=torch.tensor([[1, 2, 3]]), others="fast path", appended=1)
    assert viz.stage_title(slow) == "block 4: 4 tokens\n(3 patches + 1 representative)"


def test_figure_has_the_input_then_one_panel_per_stage():
    picture = np.random.default_rng(0).random((32, 64, 3))
    stages = [
        Stage(block=3, kept=torch.tensor([[0, 1, 2, 3]]), others="fused", appended=1),
        Stage(block=6, kept=torch.tensor([[2, 0]]), others="fused", appended=1),
    ]
    figure = viz.stage_figure(picture, stages, patch=(16, 16), title="t")
    assert len(figure.axes) == 3
    assert [ax.get_title().split("\n")[0] for ax in figure.axes] == ["input", "block 3: 5 tokens", "block 6: 3 tokens"]
    shown = figure.axes[2].get_images()[0].get_array()
    assert np.allclose(shown[:16, 32:48], picture[:16, 32:48])  # patch 2 is kept as it is
    assert not np.allclose(shown[:16, 16:32], picture[:16, 16:32])  # patch 1 is tinted


def test_non_square_image_is_drawn_as_the_model_sees_it(tmp_path):
    photo = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(photo)
    model = viz.method_model("deit_tiny_patch16_224", "prune", 0.7, None, 224)
    tensor, picture = viz.preprocess(model, photo)
    assert tensor.shape == (1, 3, 224, 224) and picture.shape == (224, 224, 3)
    assert np.allclose(picture[100, 100], np.array([10, 200, 30]) / 255, atol=0.02)  # un-normalised for display


def test_visualise_writes_a_figure_per_image_and_method_and_warns_on_random_weights(tmp_path):
    with pytest.warns(UserWarning, match="random weights"):
        paths = viz.visualise(None, ["evit", "prune"], 0.7, model_name="deit_tiny_patch16_224", out_dir=tmp_path)
    assert paths == [tmp_path / "grace_hopper_evit.png", tmp_path / "grace_hopper_prune.png"]
    for path in paths:
        with Image.open(path) as figure:
            assert figure.format == "PNG" and figure.width > figure.height


@pytest.mark.parametrize("name", ["evit", "prune"])
def test_masks_and_titles_agree_with_the_measured_token_counts(deit_tiny, name):
    """Kept patches in each mask, plus the tokens the method made, are the tokens the next FFN processes."""
    methods.apply(deit_tiny, name, keep_rate=0.7)
    stages = methods.kept_patches(deit_tiny, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)))
    counts = methods.token_counts(deit_tiny, 224)
    assert [stage.block for stage in stages] == [3, 6, 9]
    for stage, mask in zip(stages, viz.stage_masks(stages, grid=(14, 14))):
        patches, made = viz.stage_tokens(stage)
        assert int((mask == viz.KEPT).sum()) == patches
        assert set(np.unique(mask)) <= {viz.KEPT, viz.CODES[stage.others]}
        assert patches + made == counts[stage.block] - 1  # the class token is not counted
    assert viz.stage_tokens(stages[0])[0] == 138  # ceil(0.7 * 196) patches kept at the first stage


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(images=["/no/photo.jpg"]), "image file not found: /no/photo.jpg"),
        (dict(method_names=["nonexistent"]), "unknown method 'nonexistent'"),
        (dict(keep_rate=0.0), "keep_rate must be"),
        (dict(checkpoints={"evit": "/no/w.pth"}), "checkpoint file not found"),
        (dict(model_name="resnet10t"), "VisionTransformer"),
    ],
)
def test_bad_input(tmp_path, kwargs, message):
    args = dict(images=None, method_names=["evit"], keep_rate=0.7, model_name="deit_tiny_patch16_224")
    args.update(kwargs)
    with pytest.raises(TokenBenchError, match=message):
        viz.visualise(args.pop("images"), args.pop("method_names"), args.pop("keep_rate"), out_dir=tmp_path, **args)


def test_visualise_with_a_checkpoint_loads_it_without_the_warning(tmp_path):
    import warnings

    import timm

    weights = tmp_path / "deit_tiny.pth"
    torch.save({"model": timm.create_model("deit_tiny_patch16_224").state_dict()}, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        paths = viz.visualise(
            None, ["prune"], 0.5, model_name="deit_tiny_patch16_224", checkpoints={"prune": weights}, out_dir=tmp_path
        )
    assert paths[0].is_file()
