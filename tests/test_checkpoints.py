"""load_checkpoint: each official layout round-trips, and a checkpoint that does not fit is a clear error.

The official layouts are written here from the notes on each repository, independently of the
loader: a model's state dict is converted to the layout, loaded into a fresh model of the same
kind, and the logits must be the source model's.
"""

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

import methods
from methods import TokenBenchError
from methods.checkpoints import load_checkpoint
from methods.dynamicvit import predictors_trained
from tests.conftest import tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:dynamicvit. the score predictors are untrained:UserWarning")

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def redrawn(model, seed):
    """The model with every parameter re-drawn, so a load that leaves anything out shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def logits(model, images=IMAGES):
    with torch.no_grad():
        return model(images)


def assert_same_logits(model, source, images=IMAGES):
    torch.testing.assert_close(logits(model, images), logits(source, images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model_ema": sd, "optimizer": {}},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
    ],
    ids=["bare", "model", "state_dict", "model_ema", "ddp", "model+ddp"],
)
def test_timm_layout_in_every_wrapper(wrap):
    source = redrawn(tiny_vit(), 1)
    model = redrawn(tiny_vit(), 2)
    loaded = load_checkpoint(model, wrap(source.state_dict()))
    assert loaded.format == "timm" and loaded.loaded == len(source.state_dict()) and loaded.dropped == ()
    assert_same_logits(model, source)


def test_model_is_preferred_to_model_ema():
    source, ema = redrawn(tiny_vit(), 1), redrawn(tiny_vit(), 3)
    model = redrawn(tiny_vit(), 2)
    load_checkpoint(model, {"model_ema": ema.state_dict(), "model": source.state_dict()})
    assert_same_logits(model, source)


def test_from_a_file_also_one_with_args(tmp_path):
    """The official training scripts save `args` (an argparse.Namespace), which weights_only=True refuses."""
    source = redrawn(tiny_vit(), 1)
    plain, with_args = tmp_path / "plain.pth", tmp_path / "args.pth"
    torch.save({"model": source.state_dict()}, plain)
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=1e-3)}, with_args)
    for path in (plain, str(with_args)):
        model = redrawn(tiny_vit(), 2)
        load_checkpoint(model, path)
        assert_same_logits(model, source)


def official_dynamicvit_keys(depth, stages):
    """The key set of VisionTransformerDiffPruning (timm-0.4 ViT names) plus its PredictorLG modules."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    keys |= {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    for s in range(stages):
        for part in ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4"):
            keys |= {f"score_predictor.{s}.{part}.weight", f"score_predictor.{s}.{part}.bias"}
    return keys


def test_dynamicvit_layout_with_predictors():
    source = redrawn(methods.apply(tiny_vit(), "dynamicvit", keep_rate=0.5, locations=(1, 2)), 1)
    checkpoint = {"model": source.state_dict(), "model_ema": {}, "epoch": 299}
    assert set(checkpoint["model"]) == official_dynamicvit_keys(depth=4, stages=2)
    model = redrawn(methods.apply(tiny_vit(), "dynamicvit", keep_rate=0.5, locations=(1, 2)), 2)
    assert not predictors_trained(model)
    loaded = load_checkpoint(model, checkpoint)
    assert loaded.format == "dynamicvit" and predictors_trained(model)
    assert_same_logits(model, source)
    assert methods.token_counts(model, 64)[1:3] == [1 + 8, 1 + 4]


def to_official_evo_vit(state, blocks, embed_dim, norm="norm"):
    """timm keys -> the Evo-ViT DeiT layout: q/k and v split, norm1/proj in their own lists, plus the
    training-only class-token head. `norm` names the model's final norm (fc_norm on pooled models)."""
    C = embed_dim
    out = {k: v for k, v in state.items() if not k.startswith(("blocks.", norm + "."))}
    for i in range(blocks):
        b = f"blocks.{i}."
        for p in ("weight", "bias"):
            qkv = state[b + f"attn.qkv.{p}"]
            out[f"qks.{i}.qk.{p}"], out[f"vs.{i}.v.{p}"] = qkv[: 2 * C], qkv[2 * C :]
            out[f"norms.{i}.{p}"] = state[b + f"norm1.{p}"]
            out[f"projs.{i}.{p}"] = state[b + f"attn.proj.{p}"]
            for part in ("norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{part}.{p}"] = state[b + f"{part}.{p}"]
    out["norm.weight"], out["norm.bias"] = state[f"{norm}.weight"], state[f"{norm}.bias"]
    out["head_cls.weight"], out["head_cls.bias"] = torch.randn(10, C), torch.randn(10)
    out["norm_cls.weight"], out["norm_cls.bias"] = torch.randn(C), torch.randn(C)
    return out


def evo_vit_mean_head():
    """A stock model with Evo-ViT's released head (mean of the patch tokens, final norm, classifier)."""
    return methods.apply(tiny_vit(), "evo-vit", keep_rate=1.0, locations=(2,), variant="official")


@pytest.mark.parametrize(
    "make,norm",
    [(evo_vit_mean_head, "norm"), (lambda: tiny_vit(global_pool="avg", fc_norm=True), "fc_norm")],
    ids=["evo-vit-head", "avg"],
)
def test_evo_vit_layout(make, norm):
    source = redrawn(make(), 1)
    checkpoint = {"model": to_official_evo_vit(source.state_dict(), 4, 64, norm)}
    assert not any(".attn." in key or ".norm1." in key for key in checkpoint["model"])
    model = redrawn(make(), 2)
    loaded = load_checkpoint(model, checkpoint)
    assert loaded.format == "evo-vit"
    assert sorted(loaded.dropped) == ["head_cls.bias", "head_cls.weight", "norm_cls.bias", "norm_cls.weight"]
    assert_same_logits(model, source)


def test_evo_vit_without_a_v_names_the_keys():
    checkpoint = to_official_evo_vit(evo_vit_mean_head().state_dict(), 4, 64)
    del checkpoint["vs.2.v.weight"]
    with pytest.raises(TokenBenchError, match=r"1 missing keys \(blocks.2.attn.qkv.weight\), 1 unexpected keys"):
        load_checkpoint(evo_vit_mean_head(), checkpoint)


@pytest.mark.parametrize("make", [tiny_vit, lambda: methods.apply(tiny_vit(), "evo-vit", locations=(2,))])
def test_evo_vit_checkpoint_into_a_class_token_head_is_refused(make):
    checkpoint = to_official_evo_vit(tiny_vit().state_dict(), 4, 64)
    with pytest.raises(TokenBenchError, match="classifies its class token; apply evo-vit with variant='official'"):
        load_checkpoint(make(), checkpoint)


def interpolate_grid(pos_embed, prefix, old, new, mode="bicubic"):
    """The patch part of a position embedding as a grid, resized as the official codes resize it: `mode`,
    align_corners False, no antialiasing."""
    C = pos_embed.shape[-1]
    grid = pos_embed[:, prefix:].reshape(1, old, old, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode=mode, align_corners=False)
    return torch.cat([pos_embed[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, C)], dim=1)


def test_pos_embed_is_resampled_from_224_to_288():
    source = timm.create_model("deit_tiny_patch16_224")
    model = timm.create_model("deit_tiny_patch16_224", img_size=288)
    loaded = load_checkpoint(model, source.state_dict())
    assert loaded.pos_embed_from == (1, 197, 192) and model.pos_embed.shape == (1, 325, 192)
    torch.testing.assert_close(model.pos_embed.data, interpolate_grid(source.pos_embed.data, 1, 14, 18))
    assert logits(model.eval(), torch.randn(1, 3, 288, 288)).shape == (1, 1000)
    torch.testing.assert_close(model.blocks[5].mlp.fc2.weight, source.blocks[5].mlp.fc2.weight, rtol=0, atol=0)


def test_pos_embed_is_resampled_as_each_format_s_official_code_does():
    """Bicubic for DeiT/EViT (timm) checkpoints, bilinear for DynamicViT's and Evo-ViT's; never antialiased,
    which timm's loader is and which moves DeiT-T's logits by 0.3 at 288."""
    dynamicvit_source = redrawn(methods.apply(tiny_vit(), "dynamicvit", locations=(2,)), 1)
    dynamicvit = methods.apply(tiny_vit(img_size=96), "dynamicvit", locations=(2,))
    evo_vit = methods.apply(tiny_vit(img_size=96), "evo-vit", locations=(2,), variant="official")
    evo_vit_source = redrawn(evo_vit_mean_head(), 1)
    for model, checkpoint, source in [
        (dynamicvit, dynamicvit_source.state_dict(), dynamicvit_source),
        (evo_vit, to_official_evo_vit(evo_vit_source.state_dict(), 4, 64), evo_vit_source),
    ]:
        assert load_checkpoint(model, checkpoint).pos_embed_from == (1, 17, 64)
        expected = interpolate_grid(source.pos_embed.data, 1, 4, 6, mode="bilinear")
        torch.testing.assert_close(model.pos_embed.data, expected, rtol=0, atol=1e-6)
    deit_source, deit = redrawn(tiny_vit(), 1), tiny_vit(img_size=96)
    load_checkpoint(deit, deit_source.state_dict())
    torch.testing.assert_close(deit.pos_embed.data, interpolate_grid(deit_source.pos_embed.data, 1, 4, 6))
    grid = deit_source.pos_embed.data[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    antialiased = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    assert (deit.pos_embed.data[:, 1:] - antialiased.reshape(1, 36, 64)).abs().max() > 1e-3  # timm's loader's


@pytest.mark.parametrize(
    "kwargs,prefix", [(dict(reg_tokens=1), 2), (dict(no_embed_class=True), 0)], ids=["register", "no_embed_class"]
)
def test_pos_embed_prefix_slots_are_kept_as_they_are(kwargs, prefix):
    """Only the patch part is a grid: prefix slots (class, register) stay, and none with no_embed_class."""
    source = redrawn(tiny_vit(**kwargs), 1)
    model = tiny_vit(img_size=96, **kwargs)
    assert load_checkpoint(model, source.state_dict()).pos_embed_from == (1, prefix + 16, 64)
    torch.testing.assert_close(model.pos_embed.data, interpolate_grid(source.pos_embed.data, prefix, 4, 6))
    assert logits(model, torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_wrong_size_names_the_shapes():
    with pytest.raises(TokenBenchError, match=r"another size\?\): \d+ tensors differ in shape.*cls_token \(1, 1, 32\)"):
        load_checkpoint(tiny_vit(), tiny_vit(embed_dim=32).state_dict())


def test_wrong_depth_names_the_missing_keys():
    with pytest.raises(TokenBenchError, match=r"(\d+) missing keys \(blocks\.2\.norm1\.weight, .*, 0 unexpected keys"):
        load_checkpoint(tiny_vit(), tiny_vit(depth=2).state_dict())


def test_dynamicvit_checkpoint_into_a_model_without_the_method():
    checkpoint = methods.apply(tiny_vit(), "dynamicvit", locations=(1, 2)).state_dict()
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TokenBenchError) as error:
        load_checkpoint(model, {"model": checkpoint})
    message = str(error.value)
    assert "0 missing keys" in message and "20 unexpected keys (score_predictor.0.in_conv.0.weight" in message
    assert "methods.apply(model, 'dynamicvit')" in message and "\n" not in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # a refused load changes nothing


def test_plain_checkpoint_into_a_dynamicvit_model():
    model = methods.apply(tiny_vit(), "dynamicvit", locations=(1, 2))
    with pytest.raises(TokenBenchError, match=r"timm checkpoint .* 20 missing keys \(score_predictor\.0\..*DynamicViT"):
        load_checkpoint(model, tiny_vit().state_dict())
    assert not predictors_trained(model)


def test_other_stage_count_is_refused():
    checkpoint = methods.apply(tiny_vit(), "dynamicvit", locations=(1, 2, 3)).state_dict()
    model = methods.apply(tiny_vit(), "dynamicvit", locations=(1, 2))
    with pytest.raises(TokenBenchError, match=r"0 missing keys, 10 unexpected keys \(score_predictor\.2\."):
        load_checkpoint(model, checkpoint)


@pytest.mark.parametrize(
    "checkpoint,message",
    [
        ([1, 2], "must be a dict of tensors, got list"),
        ({"epoch": 3, "args": "x"}, "found no state dict.*top-level keys are epoch, args"),
        ({}, "found no state dict"),
    ],
)
def test_not_a_state_dict(checkpoint, message):
    with pytest.raises(TokenBenchError, match=message):
        load_checkpoint(tiny_vit(), checkpoint)


def test_unreadable_files(tmp_path):
    with pytest.raises(TokenBenchError, match="no checkpoint file at"):
        load_checkpoint(tiny_vit(), tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(TokenBenchError, match="cannot read checkpoint .*junk.pth"):
        load_checkpoint(tiny_vit(), junk)


def test_non_vit_model_is_refused():
    with pytest.raises(TokenBenchError, match="timm VisionTransformer"):
        load_checkpoint(torch.nn.Linear(2, 2), {"weight": torch.ones(2, 2)})
