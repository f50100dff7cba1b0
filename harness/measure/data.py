"""ImageNet-style evaluation data: a folder of class sub-folders, or a flat folder with a labels CSV.

Class folder names give class indices by the rules of `harness.measure.labels` (ImageNet synsets, integer
indices, else sorted order); hidden folders (a stray `.ipynb_checkpoints`) are not classes. An image
that cannot be read is skipped and counted, never fatal: the dataset yields None for it and
`collate_readable` drops it from the batch and says how many it dropped, which works with DataLoader
workers too. `harness.measure.decode_cache` decodes a dataset once for every configuration of a sweep.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset, default_collate

from harness.measure.labels import folder_labels, read_real_labels
from methods.errors import TokenBenchError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files

Sample = tuple[Path, int]
LABELS_HEADER = ("filename", "label")  # a labels CSV's optional first line, in any case


class Batch(NamedTuple):
    """One batch on the evaluation device: what scoring needs."""

    images: torch.Tensor | None  # [B, 3, H, W] float, normalised; None when no image was readable
    labels: torch.Tensor  # [B]
    valid: torch.Tensor | None  # [B] bool: which rows hold a readable image (None: all)
    real: torch.Tensor | None  # [B, K] ImageNet-ReaL classes padded with -1, or None without ReaL labels
    skipped: int  # unreadable images in the batch


class ImageDataset(Dataset):
    """(path, label) samples read as RGB and transformed; an unreadable file gives None.

    classes: the class folder names (None for the CSV layout); label_source: the rule that gave the
    labels (`harness.measure.labels.LABEL_SOURCES`); present_classes: the labels of the whole folder, before
    any `limit`; real_labels: ImageNet-ReaL's accepted classes per sample, or None.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable | None,
        classes: list[str] | None = None,
        *,
        label_source: str = "sorted",
        present_classes: tuple[int, ...] | None = None,
        real_labels: list[tuple[int, ...]] | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.classes = classes
        self.label_source = label_source
        self.present_classes = present_classes or tuple(sorted({label for _, label in samples}))
        self.real_labels = real_labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except UNREADABLE:
            return None
        return (self.transform(rgb) if self.transform is not None else rgb), label


def collate_readable(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(images [B, 3, H, W] or None if none was readable, labels [B], how many were unreadable)."""
    readable = [item for item in batch if item is not None]
    skipped = len(batch) - len(readable)
    if not readable:
        return None, torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(readable)
    return images, labels, skipped


def load_imagenet_folder(
    root: str | Path,
    transform: Callable | None,
    *,
    labels_csv: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    real_labels: str | Path | None = None,
) -> ImageDataset:
    """The images under `root`, labelled by class folder or by `labels_csv` (`filename,label` rows,
    filenames relative to `root`, an optional header `filename,label`). `limit`: only the first `limit` images of a
    permutation fixed by `seed` and the file names, so every run and machine takes the same subset.
    `real_labels`: ImageNet-ReaL's JSON file, one entry per image of the whole folder."""
    root = Path(root)
    if not root.is_dir():
        raise TokenBenchError(f"image folder {root} does not exist or is not a folder")
    if labels_csv is None:
        samples, classes, source = folder_samples(root)
    else:
        samples, classes, source = csv_samples(root, Path(labels_csv)), None, "csv"
    present = tuple(sorted({label for _, label in samples}))
    real = None if real_labels is None else real_labels_by_sample(samples, read_real_labels(real_labels, len(samples)))
    if limit is not None:
        chosen = seeded_indices(samples, root, limit, seed)
        samples = [samples[i] for i in chosen]
        real = None if real is None else [real[i] for i in chosen]
    return ImageDataset(samples, transform, classes, label_source=source, present_classes=present, real_labels=real)


def class_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def folder_samples(root: Path) -> tuple[list[Sample], list[str], str]:
    """The images under each class folder (folders in sorted order), labelled by `folder_labels`,
    and the label rule used."""
    classes = class_folders(root)
    if not classes:
        raise TokenBenchError(
            f"{root} has no class sub-folders; for a flat folder of images give a labels CSV (filename,label)"
        )
    labels, source = folder_labels(classes)
    samples = [(path, labels[name]) for name in classes for path in sorted((root / name).rglob("*")) if is_image(path)]
    if not samples:
        raise TokenBenchError(f"the class folders of {root} hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples, classes, source


def csv_samples(root: Path, labels_csv: Path) -> list[Sample]:
    """The `filename,label` rows of `labels_csv`, each checked, as samples under `root`."""
    samples = []
    for line, row in csv_rows(labels_csv):
        label = parse_label(row[1]) if len(row) >= 2 else None
        if label is None:
            raise TokenBenchError(
                f"{labels_csv}, line {line}: {','.join(row)!r} is not 'filename,label' with a class index >= 0 "
                f"(the first line may instead be the header {','.join(LABELS_HEADER)})"
            )
        samples.append((root / row[0].strip(), label))
    if not samples:
        raise TokenBenchError(f"labels CSV {labels_csv} lists no images")
    missing = [path for path, _ in samples if not path.is_file()]
    if missing:
        raise TokenBenchError(f"{labels_csv} names {len(missing)} file(s) not found in {root}, e.g. {missing[0].name}")
    return samples


def csv_rows(labels_csv: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a labels CSV with their line numbers, less a first row that is exactly the
    header: any other first row is data, so a malformed one is not mistaken for a header. A BOM that an
    editor wrote at the start is not part of the first file name."""
    if not labels_csv.is_file():
        raise TokenBenchError(f"labels CSV {labels_csv} does not exist")
    try:
        with labels_csv.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise TokenBenchError(f"labels CSV {labels_csv} is not a text file of filename,label rows: {error}") from None
    if rows and [cell.strip().lower() for cell in rows[0][1][:2]] == list(LABELS_HEADER):  # more columns: as data rows
        rows = rows[1:]
    return rows


def parse_label(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def real_labels_by_sample(samples: list[Sample], real: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """ReaL's entries (in sorted file-name order) rearranged to follow `samples`."""
    by_name = sorted(range(len(samples)), key=lambda i: (samples[i][0].name, samples[i][0].as_posix()))
    aligned: list[tuple[int, ...]] = [()] * len(samples)
    for position, index in enumerate(by_name):
        aligned[index] = real[position]
    return aligned


def seeded_indices(samples: list[Sample], root: Path, limit: int, seed: int) -> list[int]:
    """The positions of the first `limit` samples in the order of sha256(seed, relative path), ascending.

    Hashing names rather than shuffling positions makes the subset independent of listing order and
    of Python's or torch's random generators; a larger limit takes a superset.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise TokenBenchError(f"limit must be a positive int (images to evaluate), got {limit!r}")

    def rank(index: int) -> str:
        path = samples[index][0]
        name = (path.relative_to(root) if path.is_relative_to(root) else path).as_posix()
        return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()

    return sorted(sorted(range(len(samples)), key=rank)[:limit])


def eval_config(model: nn.Module, img_size: int | tuple[int, int]) -> dict:
    """The model's pretrained preprocessing config (interpolation, crop_pct, mean/std) at `img_size`
    (a side, or height and width)."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return resolve_data_config({"input_size": (3, height, width)}, model=model)


def eval_transform(model: nn.Module, img_size: int | tuple[int, int]) -> Callable:
    """timm's evaluation preprocessing from `eval_config`: resize to img_size / crop_pct, center-crop
    img_size, normalise."""
    return create_transform(**eval_config(model, img_size), is_training=False)
