"""A sweep: the grid of (model, resolution, batch size, method, keep rate) configurations (`sweep_config`),
measured one row at a time, each method timed interleaved with its floor twin and the vanilla reference."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import methods
from harness.measure.accuracy import NO_DATA_COLUMNS, accuracy_columns
from harness.measure.decode_cache import decode_for_model, preprocessing_for
from harness.measure.distributed import is_distributed, on_main_process
from harness.measure.labels import check_model_classes
from harness.measure.macs import count_macs
from harness.measure.models import create_model
from harness.measure.provenance import provenance, utc_now
from harness.measure.throughput import measure_interleaved, measure_throughput, run_settings
from harness.run.records import REFERENCE, RunStore
from harness.run.report import UNTRAINED_TOP1
from harness.run.sweep_config import (
    SEARCHED,
    Job,
    SweepConfig,
    config_key,
    config_options,
    with_absolute_paths,
)
from methods.errors import UntrainedWeightsWarning
from methods.timm_compat import num_prefix_tokens

EVAL_BATCH = {"cpu": 64, "cuda": 256}  # images per batch for accuracy: it does not change top-1


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


def pending_jobs(sweep: SweepConfig, store: RunStore | None) -> list[Job]:
    """The jobs `store` has no row for, once this process holds its folder (`RunStore.claim`, until the sweep's
    end) and knows that it holds this sweep's shared settings."""
    if store is None:
        return sweep.jobs()
    store.claim()
    store.check_settings(sweep.shared_settings())
    done = {with_absolute_paths(key) for key in store.done_keys()}
    return [job for job in sweep.jobs() if config_key(sweep, job) not in done]


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
                listed=sweep.images,
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
        if job.method != REFERENCE and max(counts.ffn) == min(counts.ffn) == counts.exiting == counts.entering:
            warnings.warn(
                f"{job.label()} reduces no token ({counts.entering} in every block): its row is vanilla's (a keep "
                f"rate too close to 1 for so few patches?)",
                stacklevel=2,
            )
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


def run_sweep(sweep: SweepConfig, store: RunStore | None, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Measure each configuration not yet in `store`, append its row, and yield it.

    `store` is None on the ranks of a distributed run that do not write. Every rank measures rank 0's
    list of pending jobs, so that their accuracy all-reduces pair up; only rank 0 keeps the rows. A
    store whose folder holds rows of other shared settings (`SweepConfig.shared_settings`) is refused.
    """
    try:
        yield from measure_pending(sweep, store, progress)
    finally:
        if store is not None:
            store.release()


def measure_pending(sweep: SweepConfig, store: RunStore | None, progress: bool) -> Iterator[dict[str, Any]]:
    todo = on_main_process(lambda: pending_jobs(sweep, store))
    if sweep.data is not None and not sweep.checkpoints:
        warnings.warn(UNTRAINED_TOP1, stacklevel=2)
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
    written (and, with data, a model without a classifier or whose classes the labels do not fit). Models
    are built on the meta device where no weights are loaded: only shapes matter."""
    for model in sweep.models:
        for resolution in sweep.resolutions[1:]:
            with torch.device("meta"):
                create_model(model, img_size=resolution)
        resolution = sweep.resolutions[0]
        for name in dict.fromkeys((REFERENCE, *sweep.methods)):
            options = dict(sweep.method_args.get(name, {}))
            job = Job(model, name, sweep.keep_rates_for(name)[0], resolution, SEARCHED, options)
            built = build_model(sweep, job, "cpu")
            if sweep.images is not None:
                check_model_classes(built, sweep.images)
