"""What every registered method promises; a new method is tested here without being asked."""

import copy

import pytest
import timm
import torch

import methods
from methods import TokenBenchError
from tests.conftest import peaked_attention

ALL = methods.list_methods()


@pytest.mark.parametrize("name", ALL)
def test_keep_rate_one_returns_the_vanilla_logits(deit_tiny, images, name):
    with torch.no_grad():
        expected = deit_tiny(images)
        got = methods.apply(deit_tiny, name, keep_rate=1.0)(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_weights_and_state_dict_keys_stay(deit_tiny, name):
    before = {key: value.clone() for key, value in deit_tiny.state_dict().items()}
    patched = methods.apply(deit_tiny, name)
    assert patched is deit_tiny
    after = patched.state_dict()
    assert set(before) <= set(after)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name", ALL)
def test_applied_method_is_recorded_on_the_model(deit_tiny, name):
    methods.apply(deit_tiny, name)
    applied = deit_tiny.tokenbench_method
    assert applied.name == name and applied.config == methods.lookup(name).make_config()


@pytest.mark.parametrize("name", ALL)
def test_token_counts_never_grow_and_start_full(deit_tiny, name):
    methods.apply(deit_tiny, name)
    entering = []
    deit_tiny.blocks[0].register_forward_pre_hook(lambda _module, args: entering.append(args[0].shape[1]))
    counts = methods.token_counts(deit_tiny, 224)
    assert len(counts) == 12 and entering == [197]  # the first block takes every token (ToMe merges within it)
    assert all(later <= earlier for earlier, later in zip([197, *counts], counts))


@pytest.mark.parametrize("name", ALL)
def test_train_mode_is_restored_by_token_counts(deit_tiny, name):
    methods.apply(deit_tiny, name).train()
    methods.token_counts(deit_tiny, 224)
    assert deit_tiny.training


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size,message", [(230, "not divisible by the patch size 16x16"), (256, "built for 224x224")])
def test_bad_image_size_is_a_clear_error(deit_tiny, name, size, message):
    methods.apply(deit_tiny, name)
    with pytest.raises(TokenBenchError, match=message):
        methods.token_counts(deit_tiny, size)


def test_other_resolution_runs_on_a_model_built_for_it():
    model = peaked_attention(timm.create_model("deit_tiny_patch16_224", img_size=288))
    methods.apply(model, "evit", keep_rate=0.6)
    counts = methods.token_counts(model, 288)
    assert counts[0] == 1 + 18 * 18 and counts[3] == 1 + 195 + 1  # ceil(0.6 * 324) = 195, plus the fused token


@pytest.mark.parametrize("name", methods.list_methods())
def test_a_copy_or_a_pickled_model_computes_what_the_original_does(name, tmp_path):
    """A deep copy (an EMA of the weights, a floor twin) must tap its own attention, not the original's, and
    a patched model saves whole."""
    deit = peaked_attention(timm.create_model("deit_tiny_patch16_224", img_size=64))
    model = methods.apply(deit, name, **({} if name in ("vanilla", "tome") else {"keep_rate": 0.5})).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(images)
        copied = copy.deepcopy(model)
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        for other in (copied, loaded):
            torch.testing.assert_close(other(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)  # the original's taps left intact
