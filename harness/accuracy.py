"""Top-1 and top-5 accuracy on an image dataset, sharded over processes when torch.distributed runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from harness.data import collate_readable
from harness.distributed import shard_indices, sum_across_ranks
from harness.throughput import autocast, check_device_precision, check_positive, prepared_for_inference, resolve_device
from methods.errors import TokenBenchError


@dataclass(frozen=True)
class AccuracyResult:
    """Percent of images whose label is the top prediction (top1) or among the top five (top5)."""

    top1: float
    top5: float
    images: int
    skipped: int


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
) -> AccuracyResult:
    """Accuracy of `model` on `dataset`, whose items are (image, label), or None for an unreadable file.

    Under torch.distributed each rank evaluates the images i with i % world == rank and the counts
    are summed over ranks, so every image counts exactly once. The model is left as it was found.
    """
    check_positive("batch_size", batch_size)
    check_positive("workers", workers, minimum=0)
    device = resolve_device(device)
    check_device_precision(device, precision)
    check_class_count(model, dataset)
    shard = Subset(dataset, shard_indices(len(dataset)))
    loader = DataLoader(
        shard, batch_size=batch_size, num_workers=workers, collate_fn=collate_readable, pin_memory=device != "cpu"
    )
    counts = torch.zeros(5, dtype=torch.long)  # correct top-1, correct top-5, images, labels out of range, skipped
    with prepared_for_inference(model, device) as net, torch.inference_mode(), autocast(device, precision):
        for images, labels, skipped in loader:
            counts[4] += skipped
            if images is not None:
                counts[:4] += count_correct(net(images.to(device, non_blocking=True)), labels)
    # Bad labels are counted, not raised on the spot: every rank must reach the all-reduce, then all raise.
    correct1, correct5, images, out_of_range, skipped = sum_across_ranks(counts).tolist()
    if out_of_range:
        raise TokenBenchError(
            f"{out_of_range} of {images} images have a label out of range: the model predicts "
            f"{getattr(model, 'num_classes', 'fewer')} classes"
        )
    if images == 0:
        raise TokenBenchError(f"no image could be evaluated: {skipped} unreadable, none readable")
    return AccuracyResult(top1=100 * correct1 / images, top5=100 * correct5 / images, images=images, skipped=skipped)


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[correct top-1, correct top-5, images, labels out of range] of one batch; top-5 is top-C for C < 5
    classes.

    logits: [B, C], labels: [B]
    """
    classes = logits.shape[-1]
    top = logits.topk(min(5, classes), dim=-1).indices.cpu()  # [B, 5]
    hits = top == labels[:, None]  # [B, 5]
    out_of_range = int(((labels < 0) | (labels >= classes)).sum())
    return torch.tensor([int(hits[:, 0].sum()), int(hits.any(dim=1).sum()), len(labels), out_of_range])


def check_class_count(model: nn.Module, dataset: Dataset) -> None:
    """Class folders must match the model's classes one to one, or the indices mean other classes."""
    classes = getattr(dataset, "classes", None)
    num_classes = getattr(model, "num_classes", None)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise TokenBenchError(
            f"the image folder has {len(classes)} class folders but the model predicts {num_classes} classes: "
            f"labels would name other classes (ImageNet needs all 1000 synset folders)"
        )
