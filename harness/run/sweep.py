"""A sweep: the grid of (model, resolution, batch size, method, keep rate) configurations, measured one
row at a time, each method timed interleaved with its floor twin and the vanilla reference."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import methods
from harness.measure.accuracy import NO_DATA_COLUMNS, accuracy_columns
from harness.measure.decode_cache import check_data_options, decode_for_model, preprocessing_for
from harness.measure.distributed import is_distributed, on_main_process
from harness.measure.labels import check_has_classifier
from harness.measure.macs import count_macs
from harness.measure.models import create_model
from harness.measure.provenance import provenance, utc_now
from harness.measure.throughput import ThroughputConfig, measure_interleaved, measure_throughput, run_settings
from harness.run.records import REFERENCE, RunStore
from methods.config import check_keep_rate
from methods.errors import TokenBenchError, UntrainedWeightsWarning
from methods.timm_compat import num_prefix_tokens

# Where a sweep does not say: on CPU a short protocol, so the default sweep takes minutes (the
# speedups are still interleaved ratios); on GPU timm's benchmark habits at batch 256 (ToMe's and
# timm's yardstick), short enough that the default sweep reports in about two minutes.
TIMING_DEFAULTS = {
    "cpu": {"warmup": 1, "iters": 2, "windows": 5},
    "cuda": {"warmup": 10, "iters": 10, "windows": 5},
}
DEFAULT_BATCH_SIZES = {"cpu": (8,), "cuda": (256,)}
SEARCHED = "max"  # the batch size searched on GPU: the largest power of two that fits
EVAL_BATCH = {"cpu": 64, "cuda": 256}  # images per batch for accuracy: it does not change top-1

BatchSize = int | str


def default_methods() -> tuple[str, ...]:
    return tuple(name for name in methods.list_methods() if name != REFERENCE)


def check_batch_sizes(batch_sizes: tuple[BatchSize, ...], device: str) -> None:
    for batch in batch_sizes:
        if batch == SEARCHED:
            if device == "cpu":
                raise TokenBenchError(f"batch size {SEARCHED} (searched) is for GPUs; on CPU give ints >= 1")
        elif isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise TokenBenchError(f"batch sizes must be ints >= 1 or {SEARCHED!r} (GPU), got {batch!r}")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise TokenBenchError(f"batch sizes repeat: {', '.join(map(str, batch_sizes))}")


@dataclass(frozen=True)
class SweepConfig:
    """Everything that decides what a sweep measures; the CLI and YAML sweep files fill it.

    The grid is models x resolutions x batch sizes x (vanilla, then methods x keep rates), in one
    execution mode (precision or model_dtype, cuda_graphs, compile). batch_sizes None: the
    device's default (DEFAULT_BATCH_SIZES).
    """

    models: tuple[str, ...] = ("deit_small_patch16_224",)
    methods: tuple[str, ...] = field(default_factory=default_methods)
    keep_rates: tuple[float, ...] = (0.5, 0.7, 0.9)
    resolutions: tuple[int, ...] = (224,)
    batch_sizes: tuple[BatchSize, ...] | None = None
    device: str = "cpu"
    precision: str = "fp32"
    model_dtype: str = "fp32"
    cuda_graphs: bool = False
    compile: bool = False
    warmup: int | None = None
    iters: int | None = None
    windows: int | None = None
    threads: int | None = None
    data: str | None = None
    labels_csv: str | None = None
    limit: int | None = None
    cache_dir: str | None = None
    workers: int | None = None
    class_subset: str = "all"
    real_labels: str | None = None
    checkpoints: Mapping[str, str] = field(default_factory=dict)
    method_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("data", "labels_csv", "real_labels"):  # one file, one key, however it was written
            if getattr(self, name) is not None:
                object.__setattr__(self, name, absolute(getattr(self, name)))
        object.__setattr__(self, "checkpoints", {name: absolute(path) for name, path in self.checkpoints.items()})
        for name in (*self.methods, *self.checkpoints, *self.method_args):
            methods.lookup(name)
        for name, options in self.method_args.items():
            if "keep_rate" in options:
                raise TokenBenchError(
                    f"keep_rate is the sweep's axis (keep_rates), not an option of {name}; give the keep rates there"
                )
        for keep_rate in self.keep_rates:
            check_keep_rate(keep_rate)
        if not self.models or not self.keep_rates or not self.resolutions or not self.methods:
            raise TokenBenchError("a sweep needs at least one model, method, keep rate and resolution")
        for name in ("models", "methods", "keep_rates", "resolutions"):
            values = getattr(self, name)
            if len(set(values)) != len(values):  # each would be measured twice, its rows side by side
                raise TokenBenchError(f"{name.replace('_', ' ')} repeat: {', '.join(map(str, values))}")
        if any(not isinstance(r, int) or r <= 0 for r in self.resolutions):
            raise TokenBenchError(f"resolutions must be positive ints, got {self.resolutions}")
        check_batch_sizes(self.batch_sizes or (), self.device)
        if self.batch_sizes == ():
            raise TokenBenchError("a sweep needs at least one batch size")
        for batch in self.batch_sizes_or_default():
            self.throughput_config(batch)  # device, modes (no fp16 on CPU), timing counts, threads
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise TokenBenchError(f"limit must be a positive int, got {self.limit!r}")
        if self.checkpoints and len(self.models) > 1:
            raise TokenBenchError("checkpoints fit one model: give one model with --checkpoint, not several")
        for name, path in self.checkpoints.items():
            if not Path(path).is_file():
                raise TokenBenchError(f"checkpoint for {name} not found: {path}")
        if self.data is not None and not Path(self.data).is_dir():
            raise TokenBenchError(f"data folder not found: {self.data}")
        check_data_options(
            self.data, self.labels_csv, self.limit, self.real_labels, self.cache_dir, self.workers, self.class_subset
        )
        for job in self.jobs():
            job.make_config()  # every method option is checked before anything runs
        for name, options in self.method_args.items():
            if name not in self.methods:  # not run here (a sweep file's options for every method): still checked
                methods.lookup(name).make_config(**options)
        unused = sorted(set(self.checkpoints) - {REFERENCE, *self.methods})
        if unused:
            warnings.warn(f"checkpoints for {', '.join(unused)} are not used: not among the methods run", stacklevel=2)

    def batch_sizes_or_default(self) -> tuple[BatchSize, ...]:
        return self.batch_sizes or DEFAULT_BATCH_SIZES["cpu" if self.device == "cpu" else "cuda"]

    def jobs(self) -> list[Job]:
        """The grid, group by group: each (model, resolution, batch size) has its reference first, then
        every method and keep rate, so that a group's reference is measured before its methods."""
        grid = []
        for model in self.models:
            for resolution in self.resolutions:
                for batch in self.batch_sizes_or_default():
                    grid.append(self.reference_job(model, resolution, batch))
                    for name in self.methods:
                        if name == REFERENCE:
                            continue
                        options = dict(self.method_args.get(name, {}))
                        grid.extend(Job(model, name, k, resolution, batch, options) for k in self.keep_rates_for(name))
        return grid

    def keep_rates_for(self, name: str) -> tuple[float | None, ...]:
        """The keep rates `name` runs at: the sweep's; the reference's 1.0; or one run, None, where its
        options set how much it reduces instead (ToMe's r)."""
        if name == REFERENCE:
            return (1.0,)
        options = self.method_args.get(name, {})
        if any(options.get(option) is not None for option in methods.lookup(name).config_cls.replaces_keep_rate):
            return (None,)
        return self.keep_rates

    def reference_job(self, model: str, resolution: int, batch_size: BatchSize) -> Job:
        options = dict(self.method_args.get(REFERENCE, {}))
        return Job(model, REFERENCE, self.keep_rates_for(REFERENCE)[0], resolution, batch_size, options)

    def shared_settings(self) -> dict[str, Any]:
        """What every row of a run folder shares beside the report's axes (model, resolution, batch size,
        device and mode): the data and how it is scored, vanilla's weights, and the timing protocol as it
        takes effect (the device's defaults, torch's threads where none are given). Rows that differed in
        these would be compared with another setting's vanilla, and taken for one another on resume."""
        timing = self.throughput_config(self.batch_sizes_or_default()[0])
        return {
            "data": self.data,
            "labels_csv": self.labels_csv,
            "limit": self.limit,
            "class_subset": self.class_subset,
            "real_labels": self.real_labels,
            "reference_checkpoint": self.checkpoint_for(REFERENCE),
            "threads": self.cpu_threads(),
            "warmup": timing.warmup,
            "iters": timing.iters,
            "windows": timing.windows,
        }

    def cpu_threads(self) -> int | None:
        """The threads a CPU run times on: those given, else torch's (1 under torchrun); None on a GPU,
        whose timing they do not decide."""
        if self.device != "cpu":
            return None
        return torch.get_num_threads() if self.threads is None else self.threads

    def checkpoint_for(self, method: str) -> str | None:
        """A method without its own checkpoint runs on the reference's weights (off the shelf)."""
        return self.checkpoints.get(method, self.checkpoints.get(REFERENCE))

    def throughput_config(self, batch_size: BatchSize) -> ThroughputConfig:
        """Timing settings at one batch size: those given, else the device's defaults (TIMING_DEFAULTS)."""
        defaults = TIMING_DEFAULTS["cpu" if self.device == "cpu" else "cuda"]
        timing = {name: defaults[name] if getattr(self, name) is None else getattr(self, name) for name in defaults}
        return ThroughputConfig(
            device=self.device,
            batch_size=None if batch_size == SEARCHED else batch_size,
            precision=self.precision,
            model_dtype=self.model_dtype,
            cuda_graphs=self.cuda_graphs,
            compile=self.compile,
            threads=self.threads,
            **timing,
        )


@dataclass(frozen=True)
class Job:
    model: str
    method: str
    keep_rate: float | None  # None: the options set how much the method reduces (SweepConfig.keep_rates_for)
    resolution: int
    batch_size: BatchSize
    options: dict[str, Any]

    def method_kwargs(self) -> dict[str, Any]:
        return self.options if self.keep_rate is None else {"keep_rate": self.keep_rate, **self.options}

    def make_config(self) -> methods.AppliedMethod:
        config = methods.lookup(self.method).make_config(**self.method_kwargs())
        return methods.AppliedMethod(self.method, config)

    def label(self) -> str:
        amount = (
            " ".join(f"{k}={v}" for k, v in self.options.items())
            if self.keep_rate is None
            else f"keep={self.keep_rate:g}"
        )
        return f"{self.model} {self.method} {amount} @{self.resolution} batch {self.batch_size}"


PATH_FIELDS = ("data", "labels_csv", "real_labels", "checkpoint")  # the `config_key` fields that name files


def config_key(sweep: SweepConfig, job: Job) -> str:
    """What identifies a finished row: the same key is not measured again when a run resumes."""
    return json.dumps(
        {
            "model": job.model,
            "method": job.method,
            "options": config_options(job),
            "resolution": job.resolution,
            "batch_size": job.batch_size,
            "device": sweep.device,
            "precision": sweep.precision,
            "model_dtype": sweep.model_dtype,
            "cuda_graphs": sweep.cuda_graphs,
            "compile": sweep.compile,
            "data": sweep.data,
            "limit": sweep.limit,
            "labels_csv": sweep.labels_csv,
            "class_subset": sweep.class_subset,
            "real_labels": sweep.real_labels,
            "checkpoint": sweep.checkpoint_for(job.method),
        },
        sort_keys=True,
    )


def build_model(sweep: SweepConfig, job: Job, device: str) -> nn.Module:
    """The model of `job`, with its method applied and its checkpoint loaded, on `device`.

    That a method's own parameters are untrained matters to accuracy only: a checkpoint loaded next
    answers it, and a throughput-only sweep does not need to hear it.
    """
    model = create_model(job.model, img_size=job.resolution)
    checkpoint = sweep.checkpoint_for(job.method)
    with warnings.catch_warnings():
        if checkpoint is not None or sweep.data is None:
            warnings.simplefilter("ignore", UntrainedWeightsWarning)
        methods.apply(model, job.method, **job.method_kwargs())
    if checkpoint is not None:
        methods.load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def floor_twin(reference: nn.Module, counts: methods.BlockTokenCounts) -> nn.Module:
    """The reference model sliced to a method's token counts (methods.floor), with its own weights."""
    return methods.apply_floor(copy.deepcopy(reference), counts)


def absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def pending_jobs(sweep: SweepConfig, store: RunStore | None) -> list[Job]:
    """The jobs `store` has no row for, once its folder is known to hold this sweep's shared settings."""
    if store is None:
        return sweep.jobs()
    store.check_settings(sweep.shared_settings())
    done = {with_absolute_paths(key) for key in store.done_keys()}
    return [job for job in sweep.jobs() if config_key(sweep, job) not in done]


def with_absolute_paths(key: str) -> str:
    """A stored `config_key` with its paths resolved, as keys are now made: rows of a folder written
    before paths were resolved (`./val/`, `ck.pth`) are found by the same command run from the same folder."""
    try:
        fields = json.loads(key)
        for name in PATH_FIELDS:
            if isinstance(fields.get(name), str):
                fields[name] = absolute(fields[name])
    except (TypeError, ValueError, AttributeError, RuntimeError):  # not one of our keys: compared as it is
        return key
    return json.dumps(fields, sort_keys=True)


class Sweeper:
    """Measures the rows of one sweep, keeping per (model, resolution) the reference model and the dataset."""

    def __init__(self, sweep: SweepConfig, progress: bool = True) -> None:
        self.sweep = sweep
        self.device = sweep.device
        self.progress = progress
        self.references: dict[tuple[str, int], nn.Module] = {}
        self.datasets: dict[Any, Any] = {}
        self.counted: dict[str, tuple[float, methods.BlockTokenCounts]] = {}
        self.provenance = provenance(sweep.device)

    def reference(self, model: str, resolution: int) -> nn.Module:
        if (model, resolution) not in self.references:
            job = self.sweep.reference_job(model, resolution, SEARCHED)
            self.references[model, resolution] = build_model(self.sweep, job, self.device)
        return self.references[model, resolution]

    def dataset(self, model: nn.Module, resolution: int) -> Any:
        """The images decoded once per preprocessing (the model's at `resolution`), for every row."""
        key = preprocessing_for(model, resolution)
        if key not in self.datasets:
            sweep = self.sweep
            self.datasets[key] = decode_for_model(
                model,
                resolution,
                sweep.data,
                labels_csv=sweep.labels_csv,
                limit=sweep.limit,
                real_labels=sweep.real_labels,
                cache_dir=sweep.cache_dir,
                workers=sweep.workers,
                device=self.device,
                progress=self.progress,
            )
        return self.datasets[key]

    def throughput(self, job: Job, model: nn.Module, counts: methods.BlockTokenCounts) -> dict[str, Any]:
        """The model's throughput, its floor twin's and the reference's, timed interleaved (A B C A B C);
        the reference row is timed alone and is its own floor. Under torchrun rank 0 alone times, while
        the other processes wait, so that the machine is timed as one process would have it."""
        return on_main_process(lambda: self.time(job, model, counts))

    def time(self, job: Job, model: nn.Module, counts: methods.BlockTokenCounts) -> dict[str, Any]:
        config = self.sweep.throughput_config(job.batch_size)
        reference = self.reference(job.model, job.resolution)
        if model is reference:
            result = measure_throughput(model, job.resolution, config)
            return {"method": result, "floor": result, "reference": result}
        models = {"method": model, "floor": floor_twin(reference, counts), "reference": reference}
        return measure_interleaved(models, job.resolution, config)

    def measure(self, job: Job) -> dict[str, Any]:
        reference = self.reference(job.model, job.resolution)
        model = reference if job.method == REFERENCE else build_model(self.sweep, job, self.device)
        macs, counts = self.count(job, model)
        timed = self.throughput(job, model, counts)
        speed, floor, base = timed["method"], timed["floor"], timed["reference"]
        row = {
            "model": job.model,
            "method": job.method,
            "keep_rate": patches_left(model, counts) if job.keep_rate is None else job.keep_rate,
            "method_options": json.dumps(config_options(job), sort_keys=True),
            "resolution": job.resolution,
            "device": self.device,
            "precision": self.sweep.precision,
            "model_dtype": self.sweep.model_dtype,
            "cuda_graphs": self.sweep.cuda_graphs,
            "compile": self.sweep.compile,
            "mode": self.sweep.throughput_config(job.batch_size).mode.describe(),
            "batch_size_requested": str(job.batch_size),
            "batch_size": speed.batch_size,
            "oom_halvings": speed.oom_halvings,
            "macs": macs,
            "gmacs": macs / 1e9,
            "tokens_per_block": " ".join(map(str, counts.ffn)),
            "attention_tokens_per_block": " ".join(map(str, counts.attention)),
            "img_per_s": speed.img_per_s,
            "img_per_s_min": speed.img_per_s_min,
            "img_per_s_max": speed.img_per_s_max,
            "img_per_s_iqr": speed.img_per_s_iqr,
            "reference_img_per_s": base.img_per_s,
            "speedup": speed.img_per_s / base.img_per_s,
            "floor_img_per_s": floor.img_per_s,
            "floor_speedup": floor.img_per_s / base.img_per_s,
            "checkpoint": self.sweep.checkpoint_for(job.method) or "",
            "device_name": speed.device_name,
            "protocol": json.dumps(speed.protocol, sort_keys=True, default=str),
        }
        row.update(self.accuracy(model, job))
        row.update(self.provenance, date_utc=utc_now())  # when this row was measured, not when the run began
        return row

    def count(self, job: Job, model: nn.Module) -> tuple[float, methods.BlockTokenCounts]:
        """MACs and token counts, which depend on the model, method and resolution but not on the batch
        size or mode: counted once for all batch sizes of a sweep (fvcore's trace takes seconds)."""
        key = json.dumps([job.model, job.method, config_options(job), job.resolution])
        if key not in self.counted:
            self.counted[key] = count_macs(model, job.resolution), methods.block_token_counts(model, job.resolution)
        return self.counted[key]

    def accuracy(self, model: nn.Module, job: Job) -> dict[str, Any]:
        """Top-1 of the model as it was timed: under the run's CPU threads and, on CUDA, its TF32 setting
        (both recorded in the row's protocol), which torch's defaults would not give."""
        if self.sweep.data is None:
            return dict(NO_DATA_COLUMNS)
        data = self.dataset(model, job.resolution)  # decoded (once) outside: the settings are the model's
        with run_settings(self.device, self.sweep.throughput_config(job.batch_size)):
            return accuracy_columns(
                model,
                data,
                batch_size=EVAL_BATCH["cpu" if self.device == "cpu" else "cuda"],
                device=self.device,
                precision=self.sweep.precision,
                model_dtype=self.sweep.model_dtype,
                class_subset=self.sweep.class_subset,
            )


def patches_left(model: nn.Module, counts: methods.BlockTokenCounts) -> float:
    """The share of the input's patch tokens that leave the last block: the keep rate of a method whose
    options set its reduction (ToMe's keep_rate is defined so: patch tokens left after its last merge)."""
    prefix = num_prefix_tokens(model)
    return (counts.ffn[-1] - prefix) / (counts.entering - prefix)


def config_options(job: Job) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(job.make_config().config).items()}


def run_sweep(sweep: SweepConfig, store: RunStore | None, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Measure each configuration not yet in `store`, append its row, and yield it.

    `store` is None on the ranks of a distributed run that do not write. Every rank measures rank 0's
    list of pending jobs, so that their accuracy all-reduces pair up; only rank 0 keeps the rows. A
    store whose folder holds rows of other shared settings (`SweepConfig.shared_settings`) is refused.
    """
    todo = on_main_process(lambda: pending_jobs(sweep, store))
    if sweep.data is not None and not sweep.checkpoints:
        warnings.warn("no checkpoint given: the top-1 of randomly initialised models means nothing", stacklevel=2)
    if is_distributed() and sweep.device == "cpu" and sweep.threads is None and torch.get_num_threads() == 1:
        warnings.warn(
            "rank 0 times on 1 CPU thread (torchrun sets OMP_NUM_THREADS=1 where it is unset); give --threads N "
            "to time on N: the other processes wait while rank 0 times",
            stacklevel=2,
        )
    sweeper = Sweeper(sweep, progress=progress)
    bar = tqdm(todo, unit="config", disable=not progress, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.label())
        row = sweeper.measure(job)
        row["config_key"] = config_key(sweep, job)
        if store is not None:
            store.append(row)
        yield row


def preflight(sweep: SweepConfig) -> None:
    """Build every model at every resolution and every method with its checkpoint once, on CPU, so
    that a bad model name, resolution, option or checkpoint fails before anything is measured or
    written (and, with data, a model without a classifier). Models are built on the meta device where no
    weights are loaded: only shapes matter."""
    for model in sweep.models:
        for resolution in sweep.resolutions[1:]:
            with torch.device("meta"):
                create_model(model, img_size=resolution)
        resolution = sweep.resolutions[0]
        for name in dict.fromkeys((REFERENCE, *sweep.methods)):
            options = dict(sweep.method_args.get(name, {}))
            job = Job(model, name, sweep.keep_rates_for(name)[0], resolution, SEARCHED, options)
            built = build_model(sweep, job, "cpu")
            if sweep.data is not None:
                check_has_classifier(built)
