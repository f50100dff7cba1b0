"""Execution modes: low-precision weights, CUDA graphs, compile's mode, and what each refuses.

CUDA graphs and fp16 weights need a GPU: those tests are skipped without one and run where it is.
"""

import pytest
import torch

from harness.measure.modes import ExecutionMode, capture_graph, cast_for_inference
from harness.measure.throughput import ThroughputConfig, measure_interleaved, measure_throughput
from methods import TokenBenchError
from tests.conftest import tiny_vit

QUICK = dict(batch_size=4, warmup=1, iters=2, windows=3)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(model_dtype="fp16"), "fp16 weights do not run on CPU; allowed on CPU: fp32, bf16"),
        (dict(model_dtype="int8"), "unknown model dtype 'int8'; allowed: fp32, fp16, bf16"),
        (dict(precision="bf16", model_dtype="bf16"), "precision bf16 (autocast) and model dtype bf16 (weights)"),
        (dict(device="cuda", precision="fp16", model_dtype="bf16"), "contradict each other"),
        (dict(cuda_graphs=True), "CUDA graphs need a CUDA device"),
    ],
)
def test_contradictory_or_impossible_modes_are_one_clear_error(options, message):
    with pytest.raises(TokenBenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ThroughputConfig(**options)


def test_compile_with_cuda_graphs_is_reduce_overhead_mode():
    """torch.compile captures its own graphs in "reduce-overhead" mode: capturing again would nest."""
    both = ExecutionMode(device="cuda", cuda_graphs=True, compile=True)
    assert both.compile_mode == "reduce-overhead" and not both.captures_graphs
    assert ExecutionMode(device="cuda", cuda_graphs=True).captures_graphs
    assert ExecutionMode(device="cuda", compile=True).compile_mode == "default"
    assert ExecutionMode().compile_mode is None


def test_bf16_weights_run_without_autocast_and_the_model_is_left_bit_for_bit():
    model = tiny_vit()
    model.register_buffer("marker", torch.arange(3.0))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    storages = {name: p.data_ptr() for name, p in model.named_parameters()}
    seen = []
    model.blocks[0].register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].dtype, torch.is_autocast_enabled()))
    )
    model.head.register_forward_hook(lambda _m, _args, out: seen.append(out.dtype))
    result = measure_throughput(model, 64, ThroughputConfig(**QUICK, model_dtype="bf16"))
    assert set(seen) == {(torch.bfloat16, False), torch.bfloat16}
    assert result.protocol["model_dtype"] == "bf16" and result.protocol["precision"] == "fp32"
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storages  # the very tensors


def test_cast_for_inference_restores_buffers_and_modes():
    model = tiny_vit().train()
    model.register_buffer("marker", torch.linspace(0, 1, 7))
    marker = model.marker
    with cast_for_inference(model, "cpu", torch.bfloat16) as cast:
        assert cast.marker.dtype == torch.bfloat16 and not cast.training
    assert model.marker is marker and model.training


def test_the_protocol_records_the_mode():
    protocol = measure_throughput(tiny_vit(), 64, ThroughputConfig(**QUICK)).protocol
    assert protocol["model_dtype"] == "fp32" and protocol["cuda_graphs"] is False
    assert protocol["compile_mode"] is None
    assert protocol["cudnn_benchmark"] is None  # not a CPU setting


def test_describe_names_dtype_and_execution():
    assert ExecutionMode(device="cuda", precision="fp16", cuda_graphs=True).describe() == "fp16 autocast, CUDA graphs"
    assert ExecutionMode(model_dtype="bf16").describe() == "bf16 weights, eager"


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the context is only built here, never entered
@pytest.mark.parametrize("cuda_graphs,compile,cached", [(True, False, False), (False, False, True), (True, True, True)])
def test_autocast_caches_its_casts_except_while_we_capture_graphs(cuda_graphs, compile, cached):
    """A cached cast is a tensor from outside the graph's memory pool, which a replay must not read.
    Compiled (reduce-overhead), the casts are traced into the graphs torch.compile captures itself."""
    mode = ExecutionMode(device="cuda", precision="fp16", cuda_graphs=cuda_graphs, compile=compile)
    autocast = mode.autocast()
    assert autocast.fast_dtype == torch.float16 and autocast._cache_enabled is cached


@needs_cuda
def test_cuda_graph_replays_compute_what_eager_computes_on_new_input():
    model = tiny_vit().cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    outputs = []
    with torch.inference_mode():
        model(images)  # warm-up, as the timing does before capturing
        replay = capture_graph(lambda x: outputs.append(model(x)), images)
        images.copy_(torch.randn_like(images))  # the graph reads its input buffer afresh on each replay
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(outputs[-1], model(images))


@needs_cuda
def test_cuda_graphs_time_every_model_interleaved():
    config = ThroughputConfig(device="cuda", cuda_graphs=True, precision="fp16", **QUICK)
    results = measure_interleaved({"a": tiny_vit(), "b": tiny_vit()}, 64, config)
    assert all(r.img_per_s > 0 and r.protocol["cuda_graphs"] for r in results.values())


@needs_cuda
def test_fp16_weights_on_gpu():
    model = tiny_vit()
    dtypes = []
    model.head.register_forward_hook(lambda _m, _args, out: dtypes.append(out.dtype))
    result = measure_throughput(model, 64, ThroughputConfig(device="cuda", model_dtype="fp16", **QUICK))
    assert result.img_per_s > 0 and set(dtypes) == {torch.float16}
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"


@needs_cuda
def test_cudnn_benchmark_is_on_while_timing_and_restored_after():
    seen = []
    model = tiny_vit()
    model.register_forward_pre_hook(lambda _m, _args: seen.append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    measure_throughput(model, 64, ThroughputConfig(device="cuda", **QUICK))
    assert set(seen) == {True} and torch.backends.cudnn.benchmark == before
