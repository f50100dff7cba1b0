"""The whole model, once per registered method: DeiT-S at 224, each method at its default options."""

import pytest

import methods
from benchmarks.conftest import IMG_SIZE, MODEL
from harness.measure.models import create_model
from tests.test_evit import official_evit_logits


def group(batch_size: int, device: str) -> str:
    return f"model: {MODEL} at {IMG_SIZE}, batch {batch_size}, {device}"


@pytest.mark.parametrize("name", methods.list_methods())
def test_model_forward(benchmark, name, images, device, batch_size, measured):
    model = methods.apply(create_model(MODEL, IMG_SIZE), name).to(device).eval()
    benchmark.group = group(batch_size, device)
    benchmark.extra_info.update(method=name, batch_size=batch_size, tokens=methods.token_counts(model, IMG_SIZE))
    benchmark(measured(lambda: model(images)))


def test_official_style_evit_forward(benchmark, images, device, batch_size, measured):
    """EViT as the official code computes it (the full N x N attention matrix, tests/test_evit.py),
    beside `test_model_forward[evit]`: the same logits, so the comparison is of implementations."""
    model = create_model(MODEL, IMG_SIZE).to(device).eval()
    config = methods.lookup("evit").make_config()
    benchmark.group = group(batch_size, device)
    benchmark.extra_info.update(method="evit (official-style)", batch_size=batch_size)
    benchmark(measured(lambda: official_evit_logits(model, images, config.keep_rate, config.locations, True)))
