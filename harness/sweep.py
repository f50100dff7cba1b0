"""A sweep: the grid of (method, keep rate, resolution) configurations, measured one row at a time."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

import methods
from harness.accuracy import NO_DATA_COLUMNS, accuracy_columns
from harness.decode_cache import check_data_options, decode_for_model, preprocessing_for
from harness.distributed import from_main_process
from harness.macs import count_macs
from harness.models import create_model
from harness.provenance import provenance
from harness.records import REFERENCE, RunStore
from harness.throughput import ThroughputConfig, measure_interleaved, measure_throughput
from methods.config import check_keep_rate
from methods.errors import TokenBenchError

# Where a sweep does not say: on CPU a short protocol, so the default sweep takes minutes (the
# speedups are still interleaved ratios); on GPU timm's benchmark habits and a searched batch.
TIMING_DEFAULTS = {
    "cpu": {"batch_size": 8, "warmup": 1, "iters": 2, "windows": 5},
    "cuda": {"batch_size": None, "warmup": 10, "iters": 20, "windows": 5},
}


def default_methods() -> tuple[str, ...]:
    return tuple(name for name in methods.list_methods() if name != REFERENCE)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that decides what a sweep measures; the CLI and YAML sweep files fill it."""

    model: str = "deit_small_patch16_224"
    methods: tuple[str, ...] = field(default_factory=default_methods)
    keep_rates: tuple[float, ...] = (0.5, 0.7, 0.9)
    resolutions: tuple[int, ...] = (224,)
    device: str = "cpu"
    batch_size: int | None = None
    precision: str = "fp32"
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
        for name in (*self.methods, *self.checkpoints, *self.method_args):
            methods.lookup(name)
        for keep_rate in self.keep_rates:
            check_keep_rate(keep_rate)
        if not self.keep_rates or not self.resolutions or not self.methods:
            raise TokenBenchError("a sweep needs at least one method, keep rate and resolution")
        if any(not isinstance(r, int) or r <= 0 for r in self.resolutions):
            raise TokenBenchError(f"resolutions must be positive ints, got {self.resolutions}")
        self.throughput_config()  # device, precision (no fp16 on CPU), batch, timing counts, threads
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise TokenBenchError(f"limit must be a positive int, got {self.limit!r}")
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

    def jobs(self) -> list[Job]:
        """The grid: the reference once per resolution, first, then every method and keep rate."""
        grid = []
        for resolution in self.resolutions:
            grid.append(self.reference_job(resolution))
            for name in self.methods:
                if name == REFERENCE:
                    continue
                for keep_rate in self.keep_rates:
                    grid.append(Job(name, keep_rate, resolution, dict(self.method_args.get(name, {}))))
        return grid

    def reference_job(self, resolution: int) -> Job:
        return Job(REFERENCE, 1.0, resolution, dict(self.method_args.get(REFERENCE, {})))

    def checkpoint_for(self, method: str) -> str | None:
        """A method without its own checkpoint runs on the reference's weights (off the shelf)."""
        return self.checkpoints.get(method, self.checkpoints.get(REFERENCE))

    def throughput_config(self) -> ThroughputConfig:
        """Timing settings: those given, else the device's defaults (TIMING_DEFAULTS)."""
        defaults = TIMING_DEFAULTS["cpu" if self.device == "cpu" else "cuda"]
        timing = {name: defaults[name] if getattr(self, name) is None else getattr(self, name) for name in defaults}
        return ThroughputConfig(
            device=self.device, precision=self.precision, compile=self.compile, threads=self.threads, **timing
        )


@dataclass(frozen=True)
class Job:
    method: str
    keep_rate: float
    resolution: int
    options: dict[str, Any]

    def make_config(self) -> methods.AppliedMethod:
        config = methods.lookup(self.method).make_config(keep_rate=self.keep_rate, **self.options)
        return methods.AppliedMethod(self.method, config)

    def label(self) -> str:
        return f"{self.method} keep={self.keep_rate:g} @{self.resolution}"


def config_key(sweep: SweepConfig, job: Job) -> str:
    """What identifies a finished row: the same key is not measured again when a run resumes."""
    return json.dumps(
        {
            "model": sweep.model,
            "method": job.method,
            "options": config_options(job),
            "resolution": job.resolution,
            "device": sweep.device,
            "precision": sweep.precision,
            "batch_size": sweep.throughput_config().batch_size,
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
    """The model of `job`, with its method applied and its checkpoint loaded, on `device`."""
    model = create_model(sweep.model, img_size=job.resolution)
    checkpoint = sweep.checkpoint_for(job.method)
    with warnings.catch_warnings():
        if checkpoint is not None:  # what apply says of untrained weights, the checkpoint loaded next answers
            warnings.simplefilter("ignore", UserWarning)
        methods.apply(model, job.method, keep_rate=job.keep_rate, **job.options)
    if checkpoint is not None:
        methods.load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def pending_jobs(sweep: SweepConfig, store: RunStore) -> list[Job]:
    done = store.done_keys()
    return [job for job in sweep.jobs() if config_key(sweep, job) not in done]


class Sweeper:
    """Measures the rows of one sweep, keeping per resolution the reference model and the dataset."""

    def __init__(self, sweep: SweepConfig, progress: bool = True) -> None:
        self.sweep = sweep
        self.device = sweep.device
        self.progress = progress
        self.references: dict[int, nn.Module] = {}
        self.datasets: dict[Any, Any] = {}
        self.provenance = provenance(sweep.device)

    def reference(self, resolution: int) -> nn.Module:
        if resolution not in self.references:
            self.references[resolution] = build_model(self.sweep, self.sweep.reference_job(resolution), self.device)
        return self.references[resolution]

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

    def throughput(self, model: nn.Module, reference: nn.Module, resolution: int) -> tuple[Any, Any]:
        """The model's throughput and the reference's, timed interleaved (A B A B) in this process."""
        config = self.sweep.throughput_config()
        if model is reference:
            result = measure_throughput(model, resolution, config)
            return result, result
        results = measure_interleaved({"method": model, "reference": reference}, resolution, config)
        return results["method"], results["reference"]

    def measure(self, job: Job) -> dict[str, Any]:
        reference = self.reference(job.resolution)
        model = reference if job.method == REFERENCE else build_model(self.sweep, job, self.device)
        macs = count_macs(model, job.resolution)
        counts = methods.token_counts(model, job.resolution)
        speed, reference_speed = self.throughput(model, reference, job.resolution)
        row = {
            "model": self.sweep.model,
            "method": job.method,
            "keep_rate": job.keep_rate,
            "method_options": json.dumps(config_options(job), sort_keys=True),
            "resolution": job.resolution,
            "device": self.device,
            "precision": self.sweep.precision,
            "batch_size": speed.batch_size,
            "oom_halvings": speed.oom_halvings,
            "macs": macs,
            "gmacs": macs / 1e9,
            "tokens_per_block": " ".join(map(str, counts)),
            "img_per_s": speed.img_per_s,
            "img_per_s_min": speed.img_per_s_min,
            "img_per_s_max": speed.img_per_s_max,
            "img_per_s_iqr": speed.img_per_s_iqr,
            "reference_img_per_s": reference_speed.img_per_s,
            "speedup": speed.img_per_s / reference_speed.img_per_s,
            "checkpoint": self.sweep.checkpoint_for(job.method) or "",
            "device_name": speed.device_name,
            "protocol": json.dumps(speed.protocol, sort_keys=True, default=str),
        }
        row.update(self.accuracy(model, job.resolution))
        row.update(self.provenance)
        return row

    def accuracy(self, model: nn.Module, resolution: int) -> dict[str, Any]:
        if self.sweep.data is None:
            return dict(NO_DATA_COLUMNS)
        batch = self.sweep.batch_size or 64
        return accuracy_columns(
            model,
            self.dataset(model, resolution),
            batch_size=batch,
            device=self.device,
            precision=self.sweep.precision,
            class_subset=self.sweep.class_subset,
        )


def config_options(job: Job) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(job.make_config().config).items()}


def run_sweep(sweep: SweepConfig, store: RunStore | None, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Measure each configuration not yet in `store`, append its row, and yield it.

    `store` is None on the ranks of a distributed run that do not write. Every rank measures rank 0's
    list of pending jobs, so that their accuracy all-reduces pair up; only rank 0 keeps the rows.
    """
    todo = from_main_process(pending_jobs(sweep, store) if store is not None else sweep.jobs())
    if sweep.data is not None and not sweep.checkpoints:
        warnings.warn("no checkpoint given: the top-1 of randomly initialised models means nothing", stacklevel=2)
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
    """Build the model at every resolution and every method with its checkpoint once, on CPU, so that
    a bad model name, resolution, option or checkpoint fails before anything is measured or written."""
    for resolution in sweep.resolutions[1:]:
        create_model(sweep.model, img_size=resolution)
    resolution = sweep.resolutions[0]
    for name in dict.fromkeys((REFERENCE, *sweep.methods)):
        job = (
            sweep.reference_job(resolution)
            if name == REFERENCE
            else Job(name, sweep.keep_rates[0], resolution, dict(sweep.method_args.get(name, {})))
        )
        build_model(sweep, job, "cpu")
