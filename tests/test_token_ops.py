import math

import pytest
import torch

from methods import token_ops


def test_keep_count_is_the_official_ceiling():
    assert token_ops.keep_count(0.7, 196) == 138  # 137.2 -> 138
    assert token_ops.keep_count(0.7, 139) == 98  # 97.3 -> 98
    assert token_ops.keep_count(0.5, 196) == 98
    assert token_ops.keep_count(1.0, 196) == 196
    assert token_ops.keep_count(0.01, 3) == 1


def test_class_attention_equals_the_row_of_the_explicit_attention():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 5, generator=generator)  # [B, H, N, D]
    k = torch.randn(2, 3, 7, 5, generator=generator)
    scale = 5**-0.5
    full = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # [B, H, N, N], what the official code builds
    for prefix in (1, 2):
        expected = full[:, :, 0, prefix:].mean(dim=1)
        got = token_ops.class_attention(q[:, :, :1], k, scale, prefix)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_class_attention_by_hand():
    # One head, D = 1, scale 1: logits are q*k = [0, ln 2, ln 3] -> softmax = [1, 2, 3] / 6.
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(2), math.log(3)]).view(1, 1, 3, 1)
    got = token_ops.class_attention(q, k, scale=1.0, prefix=1)
    torch.testing.assert_close(got, torch.tensor([[2 / 6, 3 / 6]]))


def test_top_k_is_sorted_highest_first():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9]])
    assert token_ops.top_k_indices(scores, 3).tolist() == [[3, 1, 2]]


def test_gather_and_fuse_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]])  # [1, 4, 2]
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    kept = token_ops.top_k_indices(scores, 2)  # tokens 0 and 2
    assert token_ops.gather_tokens(x, kept).tolist() == [[[1.0, 0.0], [2.0, 2.0]]]
    # Dropped: token 1 (weight 0.1) and token 3 (weight 0.2): 0.1*[0,1] + 0.2*[3,-1] = [0.6, -0.1].
    torch.testing.assert_close(token_ops.fuse_dropped(x, scores, kept), torch.tensor([[[0.6, -0.1]]]))


@pytest.mark.parametrize("prefix", [1, 2])
def test_split_prefix(prefix):
    x = torch.arange(10.0).view(1, 5, 2)
    head, rest = token_ops.split_prefix(x, prefix)
    assert head.shape[1] == prefix and rest.shape[1] == 5 - prefix
    assert torch.equal(torch.cat([head, rest], dim=1), x)
