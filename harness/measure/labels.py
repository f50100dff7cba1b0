"""Class indices from the folder names evaluation sets use, and ImageNet-ReaL's re-assessed labels.

A class folder's name decides its index by the first rule that fits every folder (`label_source`):
- `synset`: ImageNet synsets (`n01440764`) take their ImageNet-1k index from timm's `ImageNetInfo`,
  so any subset of the 1000 classes (Imagenette, ImageNet-100, ImageNet-A/R) scores a 1000-class model;
- `index`: integers (ImageNetV2's `0` ... `999`) are the index itself, not their place in sorted order;
- `sorted`: any other names take their position in sorted order, which only means something when
  they are exactly the model's classes, so their count must equal the model's; synsets mixed with
  integers are refused, as sorted order would misread both.
A flat folder labelled by a CSV file is `csv`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from timm.data import ImageNetInfo
from torch import nn

from methods.errors import TokenBenchError

LABEL_SOURCES = ("synset", "index", "sorted", "csv")
CLASS_SUBSETS = ("all", "present")  # the classes a prediction is chosen from: all, or those in the data
IMAGENET_CLASSES = 1000


@functools.cache
def imagenet_synsets() -> dict[str, int]:
    """ImageNet-1k synset -> class index, in the order every ImageNet-1k classifier uses."""
    return {synset: index for index, synset in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def folder_labels(names: Sequence[str]) -> tuple[dict[str, int], str]:
    """The class index of each class folder name, and the rule that gave it (see the module doc)."""
    synsets = imagenet_synsets()
    if all(name in synsets for name in names):
        return {name: synsets[name] for name in names}, "synset"
    if all(is_index(name) for name in names):
        return {name: int(name) for name in names}, "index"
    return {name: index for index, name in enumerate(sorted(names))}, "sorted"


def check_labels_fit(source: str, classes: Sequence[str], num_classes: int) -> None:
    """Raise unless the class folders' indices mean the model's classes under rule `source`."""
    if source == "synset" and num_classes != IMAGENET_CLASSES:
        raise TokenBenchError(
            f"the class folders are ImageNet synsets, which name ImageNet-1k classes, but the model predicts "
            f"{num_classes} classes; give a 1000-class model or a labels CSV"
        )
    if source == "index" and max(int(name) for name in classes) >= num_classes:
        largest = max(classes, key=int)
        raise TokenBenchError(
            f"class folder {largest} names class {int(largest)}, beyond the model's {num_classes} classes "
            f"(integer folders are class indices, as in ImageNetV2: 0 ... {num_classes - 1})"
        )
    if source == "sorted":
        check_sorted_names(classes, num_classes)


def check_sorted_names(classes: Sequence[str], num_classes: int) -> None:
    """Names that fit no rule are read in sorted order: refuse a mix of the two layouts (a synset folder
    beside an integer one), which sorted order would silently misread, and a count that is not the model's."""
    synsets = [name for name in sorted(classes) if name in imagenet_synsets()]
    indices = sorted((name for name in classes if is_index(name)), key=int)
    others = [name for name in sorted(classes) if name not in synsets and name not in indices]
    if synsets and indices and not others:
        raise TokenBenchError(
            f"the class folder names mix two layouts: ImageNet synsets ({examples(synsets)}) and class indices "
            f"({examples(indices)}); name every folder one way"
        )
    if len(classes) != num_classes:
        raise TokenBenchError(
            f"the image folder has {len(classes)} class folders but the model predicts {num_classes} classes: "
            f"the folder names fit no rule (ImageNet synsets such as n01440764, or class indices 0 ... "
            f"{num_classes - 1}; {others[0]!r} is neither), and other names are read in sorted order, which "
            f"needs exactly one folder per class"
        )


def examples(names: Sequence[str], shown: int = 3) -> str:
    """The first few names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def is_index(name: str) -> bool:
    return name.isascii() and name.isdigit()


def check_has_classifier(model: nn.Module) -> None:
    """Top-1 needs class logits: a timm model with num_classes 0 (a headless backbone, as some default
    tags are) gives features, whose top-k would be scored as classes."""
    if getattr(model, "num_classes", None) == 0:
        raise TokenBenchError(
            f"{type(model).__name__} has no classifier (num_classes 0: a headless backbone), so top-1 means nothing; "
            f"give a model with a classification head"
        )


def check_model_classes(model: nn.Module, dataset: object) -> None:
    """`check_has_classifier`, then `check_labels_fit` for a dataset of class folders, or for one labelled
    by a CSV, that no label is beyond the model's classes (named with its image, before any decoding)."""
    check_has_classifier(model)
    classes = getattr(dataset, "classes", None)
    num_classes = getattr(model, "num_classes", None)
    if classes and num_classes:
        check_labels_fit(getattr(dataset, "label_source", "sorted"), classes, num_classes)
    samples = getattr(dataset, "samples", ())
    if not classes and num_classes and samples:
        path, label = max(samples, key=lambda sample: sample[1])
        if label >= num_classes:
            raise TokenBenchError(
                f"{path.name} is labelled {label} by the labels CSV, beyond the model's {num_classes} classes "
                f"(0 ... {num_classes - 1})"
            )


def pad_real_labels(real: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, K] long: each image's ReaL classes, padded with -1 (K >= 1; an all -1 row has none)."""
    width = max((len(labels) for labels in real), default=0) or 1
    padded = np.full((len(real), width), -1, dtype=np.int64)
    for row, labels in enumerate(real):
        padded[row, : len(labels)] = labels
    return torch.from_numpy(padded)


def read_real_labels(path: str | Path, images: int) -> list[tuple[int, ...]]:
    """ImageNet-ReaL's file: a JSON list holding, per image in sorted file-name order, the list of
    classes its re-assessment accepts (empty when none was agreed; such images are left out)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TokenBenchError(f"cannot read ReaL labels {path}: {error}") from None
    valid = isinstance(content, list) and all(
        isinstance(entry, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in entry)
        for entry in content
    )
    if not valid:
        raise TokenBenchError(f"ReaL labels {path} must be a JSON list of lists of class indices >= 0, one per image")
    if len(content) != images:
        raise TokenBenchError(
            f"ReaL labels {path} list {len(content)} images but the data folder holds {images}: the file must "
            f"have one entry per image, in sorted file-name order (ImageNet's 50,000 validation images)"
        )
    return [tuple(entry) for entry in content]
