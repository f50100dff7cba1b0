import pytest
import torch

from harness.measure.launches import device_launches, dispatched_ops, launches


def test_views_and_allocations_do_not_count_and_copies_do():
    x = torch.randn(4, 6)
    assert sum(dispatched_ops(lambda: x.view(6, 4).t().unsqueeze(0)).values()) == 0
    assert sum(dispatched_ops(lambda: torch.empty(3)).values()) == 0
    ops = dispatched_ops(lambda: x.t().contiguous())  # the view that has to copy: counts as the copy
    assert sum(ops.values()) == 1 and "aten::clone" in ops


def test_an_op_counts_once_not_with_the_ops_it_calls():
    x = torch.randn(4, 6)
    ops = dispatched_ops(lambda: (x * 2).softmax(dim=-1).sum())
    assert ops == {"aten::mul": 1, "aten::softmax": 1, "aten::sum": 1}  # not softmax's _softmax inside


def test_cpu_launches_are_the_dispatched_ops():
    x = torch.randn(4, 6)
    assert launches(lambda: x.exp().add_(1), "cpu") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA only")
def test_no_device_launches_without_a_gpu():
    assert device_launches(lambda: torch.randn(3).exp()) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_launches_count_kernels():
    x = torch.randn(64, 64, device="cuda")
    x.exp()  # the first call may load kernels; the count is of the next
    assert device_launches(lambda: x.exp().add_(1)) == 2
