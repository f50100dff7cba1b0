"""EViT and prune against an independent re-implementation of the official inference code.

The reference below follows youweiliang/evit: explicit N x N attention, top-k of the head-mean of
the CLS row, complement gathered by index, fused token = sum of complement tokens times their raw
attention. The patched timm model must give the same logits.
"""

import math

import pytest
import timm
import torch

import methods
from methods.timm_compat import take_tapped_qk
from methods.token_ops import class_attention
from tests.conftest import peaked_attention, tiny_vit


def official_evit_logits(model, images, keep_rate, locations, fuse):
    x = model._pos_embed(model.patch_embed(images))
    for i, block in enumerate(model.blocks):
        h = block.norm1(x)
        B, N, C = h.shape
        heads = block.attn.num_heads
        q, k, v = block.attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * block.attn.scale).softmax(dim=-1)
        x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        left = math.ceil(keep_rate * (N - 1))
        if i in locations and left < N - 1:
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N-1]
            idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True).indices
            non_cls = x[:, 1:]
            kept = torch.stack([non_cls[b, idx[b]] for b in range(B)])
            parts = [x[:, :1], kept]
            if fuse:
                extra = []
                for b in range(B):
                    dropped = sorted(set(range(N - 1)) - set(idx[b].tolist()))
                    extra.append((non_cls[b, dropped] * cls_attn[b, dropped, None]).sum(dim=0, keepdim=True))
                parts.append(torch.stack(extra))
            x = torch.cat(parts, dim=1)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0])


@pytest.mark.parametrize("name,fuse", [("evit", True), ("prune", False)])
@pytest.mark.parametrize("keep_rate,locations", [(0.7, (3, 6, 9)), (0.5, (3, 6, 9)), (0.6, (1, 2, 5, 10))])
def test_matches_the_official_algorithm(deit_tiny, images, name, fuse, keep_rate, locations):
    with torch.no_grad():
        expected = official_evit_logits(deit_tiny, images, keep_rate, locations, fuse)
        methods.apply(deit_tiny, name, keep_rate=keep_rate, locations=locations)
        got = deit_tiny(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_token_is_appended_last_and_competes_next_time(deit_tiny):
    methods.apply(deit_tiny, "evit", keep_rate=0.7)
    counts = methods.token_counts(deit_tiny, 224)
    # 196 -> 138 kept + 1 fused; then ceil(0.7 * 139) = 98 (+1), ceil(0.7 * 99) = 70 (+1).
    assert [counts[i] - 1 for i in (3, 6, 9)] == [139, 99, 71]


def test_only_the_class_row_is_computed(deit_tiny, images):
    """The tapped q/k give the CLS row of the full attention, without forming the N x N matrix."""
    methods.apply(deit_tiny, "evit")
    block = deit_tiny.blocks[3]
    with torch.no_grad():
        h = block.norm1(deit_tiny.blocks[:3](deit_tiny._pos_embed(deit_tiny.patch_embed(images))))
        block.attn(h)  # timm's own attention (fused SDPA) runs; the taps keep the CLS query and keys
        q_cls, k, scale = take_tapped_qk(block)
        B, N, _ = h.shape
        q, k_full, _ = block.attn.qkv(h).reshape(B, N, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        full = (q @ k_full.transpose(-2, -1) * scale).softmax(dim=-1)  # [B, H, N, N]
    assert q_cls.shape == (B, block.attn.num_heads, 1, block.attn.head_dim)
    expected = full[:, :, 0].mean(dim=1)
    torch.testing.assert_close(class_attention(q_cls, k, scale), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["evit", "prune"])
def test_distillation_token_is_never_dropped(name):
    torch.manual_seed(0)
    model = peaked_attention(timm.create_model("deit_tiny_distilled_patch16_224"))
    images = torch.randn(2, 3, 224, 224)
    methods.apply(model, name, keep_rate=0.7)
    block, captured = model.blocks[3], {}
    block.register_forward_pre_hook(lambda m, args: captured.setdefault("in", args[0]))
    block.norm2.register_forward_pre_hook(lambda m, args: captured.setdefault("selected", args[0]))
    with torch.no_grad():
        logits = model(images)
        attended = captured["in"] + block.attn(block.norm1(captured["in"]))  # [B, 198, C] before the selection
    assert logits.shape == (2, 1000)
    extra = 1 if name == "evit" else 0
    assert methods.token_counts(model, 224)[3] == 2 + 138 + extra  # ceil(0.7 * 196) of the patches, not of 197
    assert captured["selected"].shape[1] == 2 + 138 + extra
    torch.testing.assert_close(captured["selected"][:, :2], attended[:, :2])  # CLS and distillation token, in place


@pytest.mark.parametrize("kwargs", [dict(init_values=1e-1), dict(qk_norm=True), dict(init_values=0.5, qk_norm=True)])
@pytest.mark.parametrize("name", ["evit", "prune"])
def test_layerscale_and_qk_norm_blocks(kwargs, name):
    """Both keep working: at keep rate 1 the output is the stock model's, and reduction changes it."""
    reference = tiny_vit(**kwargs)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(images)
        same = methods.apply(tiny_vit(**kwargs), name, keep_rate=1.0, locations=(1, 2))(images)
        reduced_model = methods.apply(tiny_vit(**kwargs), name, keep_rate=0.5, locations=(1, 2))
        reduced = reduced_model(images)
    torch.testing.assert_close(same, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(reduced, expected, atol=1e-4)
    # 16 patches; evit: 8 kept + 1 fused, then ceil(0.5 * 9) = 5 + 1; prune: 8, then ceil(0.5 * 8) = 4.
    expected_counts = {"evit": [1 + 9, 1 + 6], "prune": [1 + 8, 1 + 4]}[name]
    assert methods.token_counts(reduced_model, 64)[1:3] == expected_counts


@pytest.mark.parametrize(
    "name,keep_rate,expected",
    [
        ("evit", 0.9, [178, 162, 147]),
        ("evit", 0.7, [139, 99, 71]),
        ("evit", 0.5, [99, 51, 27]),
        ("prune", 0.9, [177, 160, 144]),
        ("prune", 0.7, [138, 97, 68]),
        ("prune", 0.5, [98, 49, 25]),
    ],
)
def test_deit_small_token_counts_after_each_stage(name, keep_rate, expected):
    model = methods.apply(timm.create_model("deit_small_patch16_224"), name, keep_rate=keep_rate)
    counts = methods.token_counts(model, 224)
    assert [counts[i] - 1 for i in (3, 6, 9)] == expected  # non-CLS tokens, the fused token counted
