"""What a sweep measures: its configuration (SweepConfig, checked whole before anything runs), the jobs of
its grid, and the keys that identify their rows in a run folder."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import methods
from harness.measure.data import ImageDataset, load_imagenet_folder
from harness.measure.decode_cache import check_data_options
from harness.measure.distributed import usable_cores
from harness.measure.fingerprint import content_digest, files_fingerprint
from harness.measure.throughput import COMPILE_WARMUP, ThroughputConfig
from harness.run.records import CHECKPOINT_FILES, FINGERPRINTS, REFERENCE
from methods.config import check_keep_rate
from methods.errors import TokenBenchError

# Where a sweep does not say: on CPU a short protocol, so the default sweep takes minutes (the
# speedups are still interleaved ratios); on GPU timm's benchmark habits at batch 256 (ToMe's and
# timm's yardstick), short enough that the default sweep reports in about two minutes.
TIMING_DEFAULTS = {
    "cpu": {"warmup": 1, "iters": 2, "windows": 5},
    "cuda": {"warmup": 10, "iters": 10, "windows": 5},
}
DEFAULT_BATCH_SIZES = {"cpu": (8,), "cuda": (256,)}
SEARCHED = "max"  # the batch size searched on GPU: the largest power of two that fits

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
        if self.device == "cpu" and self.threads is not None and self.threads > (cores := usable_cores()):
            warnings.warn(
                f"threads {self.threads} is more than the {cores} cores this process may use: the threads "
                f"would take turns, and the timing would measure that",
                stacklevel=2,
            )
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
        self.images  # noqa: B018  (lists the folder and its labels, checking them, once for the whole run)
        for job in self.jobs():
            job.make_config()  # every method option is checked before anything runs
        for name, options in self.method_args.items():
            if name not in self.methods:  # not run here (a sweep file's options for every method): still checked
                methods.lookup(name).make_config(**options)
        for what, given in (("checkpoints", self.checkpoints), ("method args", self.method_args)):
            unused = sorted(set(given) - {REFERENCE, *self.methods})
            if unused:
                warnings.warn(f"{what} for {', '.join(unused)} are not used: not among the methods run", stacklevel=2)

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
        these would be compared with another setting's vanilla, and taken for one another on resume. The
        files behind the paths count too (`FINGERPRINTS`, `CHECKPOINT_FILES`): images added, removed or
        resized, or labels or weights saved over, are another setting under the same path."""
        timing = self.throughput_config(self.batch_sizes_or_default()[0])
        label_files = {"labels_csv": self.labels_csv, "real_labels": self.real_labels}  # small: their bytes
        fingerprints = {FINGERPRINTS[name]: content_digest(path) for name, path in label_files.items() if path}
        if self.images is not None:  # those the limit picks
            fingerprints[FINGERPRINTS["data"]] = files_fingerprint((path for path, _ in self.images.samples), self.data)
        return {
            "data": self.data,
            "labels_csv": self.labels_csv,
            "limit": self.limit,
            "class_subset": self.class_subset,
            "real_labels": self.real_labels,
            "reference_checkpoint": self.checkpoint_for(REFERENCE),
            **fingerprints,
            CHECKPOINT_FILES: {path: content_digest(path) for path in sorted(set(self.checkpoints.values()))},
            "threads": self.cpu_threads(),
            "warmup": timing.warmup,
            "iters": timing.iters,
            "windows": timing.windows,
        }

    @functools.cached_property
    def images(self) -> ImageDataset | None:
        """The data's images and labels, listed once (not decoded): the checks before a run and the
        fingerprint of the data it records are of the same listing."""
        if self.data is None:
            return None
        return load_imagenet_folder(
            self.data, None, labels_csv=self.labels_csv, limit=self.limit, real_labels=self.real_labels
        )

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
        """Timing settings at one batch size: those given, else the device's defaults (TIMING_DEFAULTS; with
        compile, at least COMPILE_WARMUP warm-up calls)."""
        defaults = dict(TIMING_DEFAULTS["cpu" if self.device == "cpu" else "cuda"])
        if self.compile:
            defaults["warmup"] = max(defaults["warmup"], COMPILE_WARMUP)
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


def absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


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


def config_options(job: Job) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(job.make_config().config).items()}
