"""Top-1 and top-5 accuracy, and ImageNet-ReaL top-1, on an image dataset, sharded over processes
when torch.distributed runs.

Two sources feed the same scoring: `DecodedImages` (harness.measure.decode_cache: pixels decoded once,
normalised on the device), which sweeps use, and any dataset of (image, label) items, read through a
DataLoader, which decodes every image again on every call. The counts stay on the device until the
end, so no batch waits for the host.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.measure.data import Batch, collate_readable
from harness.measure.decode_cache import DecodedImages
from harness.measure.distributed import shard_indices, sum_across_ranks
from harness.measure.labels import CLASS_SUBSETS, check_model_classes, pad_real_labels
from harness.measure.modes import ExecutionMode, cast_for_inference
from harness.measure.throughput import check_gpu_has_dtypes, check_positive, resolve_device
from methods.errors import TokenBenchError

# The accuracy columns of a sweep row without --data.
NO_DATA_COLUMNS = {
    "top1": None,
    "top5": None,
    "images": 0,
    "skipped": 0,
    "top1_real": None,
    "real_images": 0,
    "label_source": "",
    "class_subset": "",
    "eval_img_per_s": None,
    "decode_s": None,
}


@dataclass(frozen=True)
class AccuracyResult:
    """Percent of images whose label is the top prediction (top1) or among the top five (top5); with
    ImageNet-ReaL labels, percent of the `real_images` that have some whose top prediction is one."""

    top1: float
    top5: float
    images: int
    skipped: int
    top1_real: float | None = None
    real_images: int = 0


def evaluate(
    model: nn.Module,
    data: DecodedImages | Dataset,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
    class_subset: str = "all",
    model_dtype: str = "fp32",
) -> AccuracyResult:
    """Accuracy of `model` on `data`: decoded images, or a dataset whose items are (image, label), or
    None for an unreadable file (read with `workers` DataLoader processes).

    class_subset "present" restricts the prediction to the classes present in the data (ImageNet-A
    and -R are scored so). Under torch.distributed each rank evaluates its shard (decoded images are
    one already) and the counts are summed, so every image counts exactly once. The model is left
    as it was found. precision is autocast's dtype; model_dtype the weights' and images' (harness.measure.modes).
    """
    check_positive("batch_size", batch_size)
    check_positive("workers", workers, minimum=0)
    device = resolve_device(device)
    mode = ExecutionMode(device=device, precision=precision, model_dtype=model_dtype)
    check_gpu_has_dtypes(mode)
    dataset = data.dataset if isinstance(data, DecodedImages) else data
    check_model_classes(model, dataset)
    subset = scored_classes(model, dataset, class_subset, device)
    if isinstance(data, DecodedImages):
        batches = data.batches(batch_size, device)
    else:
        batches = loader_batches(data, batch_size, workers, device)
    counts = torch.zeros(6, dtype=torch.long, device=device)  # as count_correct
    skipped = 0
    with cast_for_inference(model, device, mode.dtype) as net, torch.inference_mode(), mode.autocast():
        for batch in batches:
            skipped += batch.skipped
            if batch.images is not None:
                logits = net(batch.images.to(mode.dtype))
                counts += count_correct(logits, batch.labels, batch.valid, batch.real, subset)
    # Bad labels are counted, not raised on the spot: every rank must reach the all-reduce, then all raise.
    totals = sum_across_ranks(torch.cat([counts.cpu(), torch.tensor([skipped])]))
    return result_from_counts(model, totals.tolist())


def result_from_counts(model: nn.Module, totals: Sequence[int]) -> AccuracyResult:
    correct1, correct5, images, out_of_range, correct_real, real_images, skipped = totals
    if out_of_range:
        raise TokenBenchError(
            f"{out_of_range} of {images} images have a label out of range: the model predicts "
            f"{getattr(model, 'num_classes', 'fewer')} classes"
        )
    if images == 0:
        raise TokenBenchError(f"no image could be evaluated: {skipped} unreadable, none readable")
    top1_real = 100 * correct_real / real_images if real_images else None
    return AccuracyResult(100 * correct1 / images, 100 * correct5 / images, images, skipped, top1_real, real_images)


def count_correct(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
    subset: torch.Tensor | None = None,
) -> torch.Tensor:
    """[correct top-1, correct top-5, images, labels out of range, ReaL-correct top-1, images with
    ReaL labels] of one batch, on the logits' device; top-5 is top-C for C < 5 classes.

    logits: [B, C], labels: [B], valid: [B] bool (rows to count; None: all), real: [B, K] ReaL classes
    padded with -1, subset: [S] the classes predictions are restricted to (None: all C).
    """
    classes = logits.shape[-1]
    if subset is not None:
        logits = logits[:, subset]  # [B, S]
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [B, 5]
    if subset is not None:
        top = subset[top]  # back to class indices
    valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid
    hits = (top == labels[:, None]) & valid[:, None]  # [B, 5]
    out_of_range = ((labels < 0) | (labels >= classes)) & valid
    if real is None:
        has_real = real_hits = torch.zeros_like(valid)
    else:
        has_real = (real >= 0).any(dim=1) & valid  # [B]
        real_hits = (real == top[:, :1]).any(dim=1) & has_real  # [B]
    return torch.stack(
        [hits[:, 0].sum(), hits.any(dim=1).sum(), valid.sum(), out_of_range.sum(), real_hits.sum(), has_real.sum()]
    )


def scored_classes(model: nn.Module, dataset: Any, class_subset: str, device: str) -> torch.Tensor | None:
    """The classes predictions are restricted to: None for all, else those present in the data."""
    if class_subset not in CLASS_SUBSETS:
        raise TokenBenchError(f"unknown class subset {class_subset!r}; allowed: {', '.join(CLASS_SUBSETS)}")
    if class_subset == "all":
        return None
    present = getattr(dataset, "present_classes", None)
    if present is None:
        raise TokenBenchError("class subset 'present' needs an image folder dataset, which knows its classes")
    num_classes = getattr(model, "num_classes", None) or max(present) + 1
    if max(present) >= num_classes:
        raise TokenBenchError(f"the data has class {max(present)}, beyond the model's {num_classes} classes")
    return torch.tensor(present, device=device)


class Numbered(Dataset):
    """The items of `dataset` at `indices`, each as (index, item): ReaL labels are found by index."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Any]:
        index = self.indices[position]
        return index, self.dataset[index]


def collate_numbered(batch: list[tuple[int, Any]]) -> tuple[torch.Tensor | None, torch.Tensor, list[int], int]:
    """`collate_readable` of the items, and the indices of the readable ones."""
    images, labels, skipped = collate_readable([item for _, item in batch])
    return images, labels, [index for index, item in batch if item is not None], skipped


def loader_batches(dataset: Dataset, batch_size: int, workers: int, device: str) -> Iterator[Batch]:
    """This rank's shard of `dataset` through a DataLoader: every item read and transformed again."""
    numbered = Numbered(dataset, shard_indices(len(dataset)))
    loader = DataLoader(
        numbered, batch_size=batch_size, num_workers=workers, collate_fn=collate_numbered, pin_memory=device != "cpu"
    )
    real = getattr(dataset, "real_labels", None)
    for images, labels, indices, skipped in loader:
        if images is None:
            yield Batch(None, labels, None, None, skipped)
            continue
        batch_real = None if real is None else pad_real_labels([real[i] for i in indices]).to(device)
        labels = labels.to(device, non_blocking=True)  # pinned by the loader: no wait for the GPU per batch
        yield Batch(images.to(device, non_blocking=True), labels, None, batch_real, skipped)


def accuracy_columns(
    model: nn.Module,
    data: DecodedImages,
    *,
    batch_size: int,
    device: str,
    precision: str,
    class_subset: str,
    model_dtype: str = "fp32",
) -> dict[str, Any]:
    """A sweep row's accuracy columns: `evaluate` timed (eval_img_per_s), and where the images came
    from (label_source, and decode_s: the decode pass, reported by the first row it served)."""
    start = time.perf_counter()
    options = dict(batch_size=batch_size, device=device, precision=precision, class_subset=class_subset)
    result = evaluate(model, data, model_dtype=model_dtype, **options)
    seconds = time.perf_counter() - start
    return {
        "top1": result.top1,
        "top5": result.top5,
        "images": result.images,
        "skipped": result.skipped,
        "top1_real": result.top1_real,
        "real_images": result.real_images,
        "label_source": data.dataset.label_source,
        "class_subset": class_subset,
        "eval_img_per_s": result.images / seconds,
        "decode_s": data.claim_decode_s(),
    }
