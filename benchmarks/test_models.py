"""The whole model, once per registered method: DeiT-S at 224, each method at its default options."""

import pytest

import methods
from benchmarks.conftest import IMG_SIZE, MODEL
from harness.models import create_model


@pytest.mark.parametrize("name", methods.list_methods())
def test_model_forward(benchmark, name, images, device, batch_size, measured):
    model = methods.apply(create_model(MODEL, IMG_SIZE), name).to(device).eval()
    benchmark.group = f"model: {MODEL} at {IMG_SIZE}, batch {batch_size}, {device}"
    benchmark.extra_info.update(method=name, batch_size=batch_size, tokens=methods.token_counts(model, IMG_SIZE))
    benchmark(measured(lambda: model(images)))
