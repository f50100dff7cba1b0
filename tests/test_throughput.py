"""Throughput on CPU: the protocol runs, leaves the model and torch as it found them, and backs off on OOM."""

import subprocess
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

from harness.measure import throughput
from harness.measure.provenance import cpu_name, git_state, provenance, utc_now
from harness.measure.throughput import (
    ThroughputConfig,
    is_out_of_memory,
    measure_interleaved,
    measure_throughput,
    resolve_device,
)
from methods import TokenBenchError
from tests.conftest import tiny_vit

QUICK = dict(batch_size=4, warmup=1, iters=2, windows=3)


def test_positive_figures_and_the_protocol_recorded():
    result = measure_throughput(tiny_vit(), 64, ThroughputConfig(**QUICK))
    assert result.img_per_s_min <= result.img_per_s <= result.img_per_s_max
    assert result.img_per_s_min > 0 and result.img_per_s_iqr >= 0
    assert result.batch_size == 4 and result.oom_halvings == 0
    assert result.device_name
    protocol = result.protocol
    assert protocol["device"] == "cpu" and protocol["precision"] == "fp32" and protocol["img_size"] == 64
    assert (protocol["warmup"], protocol["iters"], protocol["windows"]) == (1, 2, 3)
    assert protocol["torch"] == torch.__version__ and "timm" in protocol and protocol["tf32"] is None


def test_each_window_runs_iters_forward_passes_on_one_batch():
    model = tiny_vit()
    batches = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(args[0]))
    measure_throughput(model, 64, ThroughputConfig(**QUICK))
    assert len(batches) == 1 + 3 * 2  # warm-up, then windows x iters
    assert all(batch is batches[0] for batch in batches)  # created once
    assert batches[0].shape == (4, 3, 64, 64)


def test_default_cpu_batch_is_32():
    result = measure_throughput(tiny_vit(), 64, ThroughputConfig(warmup=0, iters=1, windows=1))
    assert result.batch_size == 32 and result.protocol["batch_size_requested"] is None


def test_modes_and_thread_count_are_restored():
    model = tiny_vit().train()
    model.blocks[1].eval()
    threads = torch.get_num_threads()
    seen = {}
    model.register_forward_pre_hook(lambda m, _args: seen.update(training=m.training, threads=torch.get_num_threads()))
    result = measure_throughput(model, 64, ThroughputConfig(**QUICK, threads=1))
    assert seen == {"training": False, "threads": 1}
    assert result.protocol["threads"] == 1
    assert torch.get_num_threads() == threads
    assert model.training and not model.blocks[1].training and model.blocks[2].training


def test_bf16_autocast_runs_on_cpu():
    model = tiny_vit()
    dtypes = []
    model.head.register_forward_hook(lambda _m, _args, out: dtypes.append(out.dtype))
    result = measure_throughput(model, 64, ThroughputConfig(**QUICK, precision="bf16"))
    assert result.img_per_s > 0 and set(dtypes) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32


def test_interleaved_gives_one_result_per_model_timed_in_turn():
    order = []
    models = {name: tiny_vit() for name in ("a", "b")}
    for name, model in models.items():
        model.register_forward_pre_hook(lambda _m, _args, name=name: order.append(name))
    results = measure_interleaved(models, 64, ThroughputConfig(**QUICK))
    assert set(results) == {"a", "b"}
    assert all(r.img_per_s > 0 and r.batch_size == 4 and r.protocol["interleaved"] == 2 for r in results.values())
    timed = order[2:]  # after one warm-up pass each
    assert timed == ["a", "a", "b", "b"] * 3  # window by window: a's iters, then b's


def test_figures_are_the_median_and_spread_of_each_windows_images_per_second(monkeypatch):
    """With a scripted clock, window w of model m lasting SECONDS[m][w]: each window's rate is batch * iters
    / its seconds (here 12 images / s), worked by hand below; img_per_s is their median, not their mean."""
    seconds = {"a": [1.0, 4.0, 2.0, 0.5, 8.0], "b": [1.0, 1.5, 0.5, 4.0, 3.0]}  # rates a: 12 3 6 24 1.5; b: 12 8 24 3 4
    ticks = iter([t for w in range(5) for m in "ab" for t in (0.0, seconds[m][w])])  # a window reads start, end
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    config = ThroughputConfig(batch_size=4, warmup=0, iters=3, windows=5)
    results = measure_interleaved({name: tiny_vit() for name in "ab"}, 64, config)
    a, b = results["a"], results["b"]
    assert (a.img_per_s, a.img_per_s_min, a.img_per_s_max, a.img_per_s_iqr) == (6.0, 1.5, 24.0, 12.0 - 3.0)
    assert (b.img_per_s, b.img_per_s_min, b.img_per_s_max, b.img_per_s_iqr) == (8.0, 3.0, 24.0, 12.0 - 4.0)


def compiler_failure_from_oom():
    """What torch.compile raises when its backend runs out of memory: its own error, `from None`."""
    from torch._dynamo.exc import BackendCompilerFailed

    oom = torch.cuda.OutOfMemoryError("out of device memory (simulated, worded unlike torch)")
    raise BackendCompilerFailed(lambda: None, oom, None) from None


OUT_OF_MEMORY = {
    "oom": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
    "cublas": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
}


def oom_above(model, limit, kind="oom"):
    forward = model.forward

    def guarded(x):
        if x.shape[0] > limit:
            if kind == "compiler":
                compiler_failure_from_oom()
            raise OUT_OF_MEMORY[kind]()
        return forward(x)

    model.forward = guarded
    return model


@pytest.mark.parametrize("kind", ["oom", "cublas", "compiler"])
def test_out_of_memory_halves_the_batch_and_counts_it(kind):
    """torch's OOM error, cuBLAS's failed allocation, and an OOM wrapped by torch.compile all halve."""
    model = oom_above(tiny_vit(), 4, kind)
    result = measure_throughput(model, 64, ThroughputConfig(**{**QUICK, "batch_size": 16}))
    assert result.batch_size == 4 and result.oom_halvings == 2
    assert result.protocol["batch_size_requested"] == 16


def test_interleaved_models_share_the_batch_that_fits_all():
    models = {"small": oom_above(tiny_vit(), 8), "large": oom_above(tiny_vit(), 2)}
    results = measure_interleaved(models, 64, ThroughputConfig(**{**QUICK, "batch_size": 8}))
    assert {(r.batch_size, r.oom_halvings) for r in results.values()} == {(2, 2)}


def test_an_error_raised_while_handling_an_out_of_memory_counts_as_one():
    """A CUDA graph capture broken by an allocation raises its own error with the OOM as its context."""
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("operation not permitted when stream is capturing")  # noqa: B904
    except RuntimeError as error:
        assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("operation not permitted when stream is capturing"))


def test_other_errors_are_not_taken_for_out_of_memory():
    model = tiny_vit()
    model.forward = lambda x: torch.ones(2, 3) @ torch.ones(4, 5)  # a shape error
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        measure_throughput(model, 64, ThroughputConfig(**QUICK))


def test_out_of_memory_at_batch_one_is_a_clear_error():
    model = oom_above(tiny_vit().train(), 0)
    with pytest.raises(TokenBenchError, match="out of memory .* even at batch size 1"):
        measure_throughput(model, 64, ThroughputConfig(**QUICK))
    assert model.training


@pytest.fixture
def compiled_graphs(monkeypatch):
    """torch.compile with a backend that runs each graph as traced and records it, under a recompile
    limit of 2 (the setting's name depends on the torch version)."""
    import torch._dynamo

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(example_inputs)
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_(model, backend=backend, **options))
    limit = "recompile_limit" if "recompile_limit" in torch._dynamo.config.get_config_copy() else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 2}):
        yield graphs


def test_compile_compiles_every_model_of_a_sweep_however_many(compiled_graphs):
    """Each patched model adds guards to ViT's shared forward; without a fresh start, models past the
    recompile limit would be timed eagerly while the protocol says compiled."""
    import methods

    config = ThroughputConfig(**{**QUICK, "compile": True, "warmup": 3, "windows": 1, "iters": 1})
    for keep_rate in (0.5, 0.6, 0.7, 0.8):
        before = len(compiled_graphs)
        measure_throughput(methods.apply(tiny_vit(), "evit", keep_rate=keep_rate, locations=(1, 2)), 64, config)
        assert len(compiled_graphs) > before, f"keep rate {keep_rate} ran without compiling"


def test_compile_after_halved_batches_still_compiles(compiled_graphs):
    config = ThroughputConfig(**{**QUICK, "batch_size": 64, "compile": True, "warmup": 3, "windows": 1, "iters": 1})
    result = measure_throughput(oom_above(tiny_vit(), 4), 64, config)
    assert (result.batch_size, result.oom_halvings) == (4, 4)
    batches = {inputs[0].shape[0] for inputs in compiled_graphs if isinstance(inputs[0], torch.Tensor)}
    assert 4 in batches  # the batch that fitted ran compiled, after four attempts that did not


def test_compile_hides_torchs_warning_about_its_own_code(monkeypatch):
    """Inductor lowers diagonal through torch._prims_common.check, which torch deprecates; a backend
    calling it stands in for inductor (minutes on CPU)."""
    import torch._prims_common

    def backend(graph, example_inputs):
        torch._prims_common.check(True, lambda: "")
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_(model, backend=backend, **options))
    config = ThroughputConfig(**{**QUICK, "compile": True, "warmup": 3, "windows": 1, "iters": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measure_throughput(tiny_vit(), 64, config)
        torch._prims_common.check(True, lambda: "")  # outside the measurement it still warns
    assert len(caught) == 1 and str(caught[0].message).startswith("`torch._prims_common.check` is deprecated")


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(precision="fp8"), "unknown precision 'fp8'; allowed: fp32, fp16, bf16"),
        (dict(precision="fp16"), "does not run on CPU; allowed on CPU: fp32, bf16"),
        (dict(device="tpu"), "unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N"),
        (dict(batch_size=0), "batch_size must be an int >= 1 or None"),
        (dict(iters=0), "iters must be an int >= 1"),
        (dict(compile=True, warmup=1), "compile needs warmup >= 3"),
        (dict(device="cuda", compile=True, cuda_graphs=True, warmup=2), "compile needs warmup >= 3"),
        (dict(max_batch=1000), "max_batch must be a power of two"),
    ],
)
def test_bad_configuration_is_a_clear_error(options, message):
    with pytest.raises(TokenBenchError, match=message):
        ThroughputConfig(**options)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TokenBenchError, match="allowed: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(TokenBenchError, match="torch sees no CUDA GPU"):
        measure_throughput(tiny_vit(), 64, ThroughputConfig(device="cuda"))


def test_image_size_is_checked_against_the_model():
    with pytest.raises(TokenBenchError, match="not divisible by the patch size"):
        measure_throughput(tiny_vit(), 70, ThroughputConfig(**QUICK))


def test_provenance_names_the_commit_versions_and_device(tmp_path):
    root = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    record = provenance("cpu")
    assert record["git_commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert record["torch"] == torch.__version__ and record["timm"] == timm.__version__
    assert record["device"] == "cpu" and record["device_name"] == cpu_name()
    assert datetime.fromisoformat(utc_now()).utcoffset() == timedelta(0)
    assert git_state(tmp_path) == ("unknown", None)  # not a checkout


def test_git_state_is_of_the_codes_own_checkout_and_ignores_untracked_files(tmp_path):
    """An untracked file (a results folder, a scratch script) does not make the code dirty; a checkout that
    merely contains the code (installed into some other repository) is not the code's commit."""

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    (tmp_path / "untracked.csv").write_text("a\n")
    assert git_state(tmp_path.resolve()) == (commit.stdout.strip(), False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path.resolve()) == (commit.stdout.strip(), True)
    (tmp_path / "package").mkdir()
    assert git_state((tmp_path / "package").resolve()) == ("unknown", None)
