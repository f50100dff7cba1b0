"""Decode once: an evaluation set's images decoded and preprocessed once per preprocessing, then
served to every configuration of a sweep and to a resumed run.

What is kept is what timm's evaluation transform holds just before `ToTensor`: the resized,
centre-cropped RGB pixels, uint8 [N, 3, H, W] (150 KB an image at 224). The rest of the transform,
ToTensor's division by 255 and Normalize's mean and std, maps each uint8 value of a channel to one
float32: a table of 3 x 256 floats computed by the transform's own ToTensor and Normalize, applied
on the device by look-up. Cached and uncached inputs are therefore the same bits on any device
(recomputing the arithmetic there would not be: CUDA divides by a scalar as a multiplication by its
reciprocal, which differs in the last bit for some values).

On disk a cache is a folder named by a hash of the files (path, size, modification time) and of the
preprocessing, so a changed file or transform gets a new folder and is never served stale (the folder
it supersedes is removed, `cache_folders`). It is decoded into a temporary folder and renamed into
place once complete, so a partial cache is never served; the temporary folder of a run killed
mid-decode goes at the next decode of that cache.
Evaluation reads it into memory (pinned for a GPU) when it fits a memory budget, and otherwise
through a memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import Compose, Normalize, ToTensor
from tqdm import tqdm

from harness.measure.cache_folders import (
    INDEX,
    PARTIAL,
    PIXELS,
    mark_used,
    partial_folder_prefix,
    remove_abandoned,
    remove_superseded,
)
from harness.measure.data import UNREADABLE, Batch, ImageDataset, eval_transform, load_imagenet_folder
from harness.measure.distributed import env_int, shard_indices, usable_cores
from harness.measure.labels import CLASS_SUBSETS, check_model_classes, pad_real_labels
from methods.errors import TokenBenchError

CACHE_VERSION = 1  # bump when the layout of a cache folder changes
MAX_WORKERS = 16
CHUNK = 16  # images per decode task: few enough tasks to schedule, enough for a smooth progress bar


@dataclass(frozen=True)
class Preprocessing:
    """An evaluation transform split where the pixels are final: `resize_crop` (PIL to PIL, what comes
    before ToTensor) and `table` ([3, 256] float32, ToTensor and Normalize of each channel value).
    Equal (and hashable) by `description`, which names both, with the Pillow and torchvision versions."""

    resize_crop: Callable = field(compare=False, repr=False)
    table: torch.Tensor = field(compare=False, repr=False)
    size: tuple[int, int]  # (height, width)
    description: str

    @staticmethod
    def of(transform: Callable) -> Preprocessing:
        steps = list(getattr(transform, "transforms", ()))
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            raise TokenBenchError(f"cannot cache the pixels of {transform!r}: it must end with ToTensor, Normalize")
        resize_crop, to_float = Compose(steps[:-2]), Compose(steps[-2:])
        ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]: every value
        table = to_float(Image.fromarray(ramp))[:, 0, :].contiguous()  # [3, 256]
        width, height = resize_crop(Image.new("RGB", (97, 89))).size
        digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]
        versions = f"Pillow {PIL.__version__}, torchvision {torchvision.__version__}"
        return Preprocessing(resize_crop, table, (height, width), f"{resize_crop!r} | table {digest} | {versions}")

    def pixels(self, image: Image.Image) -> np.ndarray:
        """[3, H, W] uint8: the image resized and cropped, as ToTensor would receive it."""
        return np.asarray(self.resize_crop(image)).transpose(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] uint8 -> float32 on the pixels' device, bit for bit what ToTensor and Normalize give."""
        return look_up(pixels, self.table.to(pixels.device))


def look_up(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[c, pixels[:, c]] for each channel c: [B, 3, H, W] uint8 and [3, 256] float -> [B, 3, H, W] float."""
    offsets = torch.arange(3, dtype=torch.int32, device=pixels.device).view(1, 3, 1, 1) * 256
    index = (pixels.to(torch.int32) + offsets).flatten()  # [B * 3 * H * W] into the flattened table
    return table.flatten().index_select(0, index).view(pixels.shape)  # index_select: twice [] indexing's speed


def preprocessing_for(model: nn.Module, img_size: int | tuple[int, int]) -> Preprocessing:
    return Preprocessing.of(eval_transform(model, img_size))


class DecodedImages:
    """Some samples of an ImageDataset (`rows`, in order) as uint8 pixels [len(rows), 3, H, W] on the
    host, all zeros where a file was unreadable (`unreadable` marks them, [len(rows)] bool)."""

    def __init__(
        self,
        dataset: ImageDataset,
        rows: Sequence[int],
        pixels: torch.Tensor,
        unreadable: np.ndarray,
        preprocessing: Preprocessing,
        decode_s: float,
    ) -> None:
        self.dataset, self.rows, self.pixels, self.unreadable = dataset, list(rows), pixels, unreadable
        self.preprocessing = preprocessing
        self.decode_s = decode_s
        self.unreported_decode_s = decode_s

    def __len__(self) -> int:
        return len(self.rows)

    def claim_decode_s(self) -> float:
        """The decode pass's seconds to the first evaluation it serves, 0 to the others: summed over
        a run's rows, decode_s is the time spent decoding."""
        seconds, self.unreported_decode_s = self.unreported_decode_s, 0.0
        return seconds

    def batches(self, batch_size: int, device: str) -> Iterator[Batch]:
        """Slices of the pixels, copied to `device` and normalised there; no per-batch host work but
        a slice (and on a memory map, the read)."""
        labels = torch.tensor([self.dataset.samples[row][1] for row in self.rows]).to(device)  # [N]
        valid = torch.from_numpy(~self.unreadable).to(device)  # [N]
        real = self.dataset.real_labels
        real = None if real is None else pad_real_labels([real[row] for row in self.rows]).to(device)  # [N, K]
        table = self.preprocessing.table.to(device)  # [3, 256]
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            pixels = self.pixels[start:stop].to(device, non_blocking=True)  # [B, 3, H, W] uint8
            yield Batch(
                look_up(pixels, table),
                labels[start:stop],
                valid[start:stop],
                None if real is None else real[start:stop],
                int(self.unreadable[start:stop].sum()),
            )


def decode_for_model(
    model: nn.Module,
    img_size: int,
    data: str | Path,
    *,
    labels_csv: str | Path | None = None,
    limit: int | None = None,
    real_labels: str | Path | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    listed: ImageDataset | None = None,
) -> DecodedImages:
    """This process's shard of the image folder `data`, decoded with `model`'s preprocessing at
    `img_size` into (or read from) the cache folder. The labels are checked against the model first,
    so a wrong folder fails before a long decode. `listed`: the folder as a caller already listed it
    with these options (a listing of ImageNet's 50,000 files takes a while), else listed here."""
    dataset = (
        listed
        if listed is not None
        else load_imagenet_folder(data, None, labels_csv=labels_csv, limit=limit, real_labels=real_labels)
    )
    check_model_classes(model, dataset)
    return decode(
        dataset,
        shard_indices(len(dataset)),
        preprocessing_for(model, img_size),
        cache_dir=cache_dir_or_default(cache_dir),
        workers=default_workers() if workers is None else workers,
        pin=str(device).startswith("cuda"),
        progress=progress,
    )


def check_data_options(
    data: str | Path | None,
    labels_csv: str | Path | None,
    limit: int | None,
    real_labels: str | Path | None,
    cache_dir: str | Path | None,
    workers: int | None,
    class_subset: str,
) -> None:
    """Raise on any bad option of `decode_for_model` before anything runs: labels or a subset without images,
    a cache folder that cannot be written, the workers, the subset. The folder and its labels are checked by
    listing them (`load_imagenet_folder`), which the caller does once and keeps."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise TokenBenchError(f"workers must be a positive int (decode threads), got {workers!r}")
    if class_subset not in CLASS_SUBSETS:
        raise TokenBenchError(f"unknown class subset {class_subset!r}; allowed: {', '.join(CLASS_SUBSETS)}")
    if data is None:
        if real_labels is not None or labels_csv is not None:
            raise TokenBenchError("labels (a CSV or ReaL file) need the images: give --data")
        if limit is not None or class_subset != "all":
            raise TokenBenchError("a limit or a class subset of the images needs the images: give --data")
        return
    check_cache_dir(cache_dir)


def decode(
    dataset: ImageDataset,
    rows: Sequence[int],
    preprocessing: Preprocessing,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    memory_budget: int | None = None,
    pin: bool = False,
    progress: bool = False,
) -> DecodedImages:
    """The samples `rows` of `dataset` as uint8 pixels: from the cache folder if it holds them, else
    decoded with `workers` threads (0: in this thread) and, with a cache folder, kept there.
    Without a cache folder the pixels live in memory only."""
    files = [dataset.samples[row][0] for row in rows]
    shape = (len(files), 3, *preprocessing.size)
    start = time.perf_counter()
    if cache_dir is None:
        pixels = torch.zeros(shape, dtype=torch.uint8, pin_memory=pin)
        unreadable = decode_into(pixels.numpy(), files, preprocessing, workers, progress)
        return DecodedImages(dataset, rows, pixels, unreadable, preprocessing, time.perf_counter() - start)
    key, source = cache_keys(files, preprocessing)
    folder = check_cache_dir(cache_dir) / key
    decode_s = 0.0
    if not is_complete(folder, shape):
        write_cache(folder, source, files, preprocessing, workers, progress)
        decode_s = time.perf_counter() - start
    budget = default_memory_budget() if memory_budget is None else memory_budget
    try:
        pixels, unreadable = read_cache(folder, budget, pin)
    except FileNotFoundError:  # removed since it was found complete (`bench cache clear` meanwhile): decode again
        write_cache(folder, source, files, preprocessing, workers, progress)
        decode_s = time.perf_counter() - start
        pixels, unreadable = read_cache(folder, budget, pin)
    return DecodedImages(dataset, rows, pixels, unreadable, preprocessing, decode_s)


def read_pixels(path: Path, preprocessing: Preprocessing) -> np.ndarray | None:
    """[3, H, W] uint8, or None for a file that cannot be read (as `ImageDataset` does)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except UNREADABLE:
        return None
    return preprocessing.pixels(rgb)


def decode_into(
    out: np.ndarray, files: Sequence[Path], preprocessing: Preprocessing, workers: int, progress: bool
) -> np.ndarray:
    """Decode `files` into `out` [N, 3, H, W] with `workers` threads (Pillow decodes and resizes
    without the GIL); returns which were unreadable, [N] bool."""
    unreadable = np.zeros(len(files), dtype=bool)

    def work(chunk: range) -> int:
        for i in chunk:
            pixels = read_pixels(files[i], preprocessing)
            if pixels is None:
                unreadable[i] = True
            else:
                out[i] = pixels
        return len(chunk)

    chunks = [range(start, min(start + CHUNK, len(files))) for start in range(0, len(files), CHUNK)]
    bar = tqdm(total=len(files), unit="img", desc="decode", disable=None if progress else True, dynamic_ncols=True)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for done in pool.map(work, chunks) if pool is not None else map(work, chunks):
            bar.update(done)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # on Ctrl-C, drop the queued chunks rather than finish them
        bar.close()
    return unreadable


def cache_keys(files: Sequence[Path], preprocessing: Preprocessing) -> tuple[str, str]:
    """Hashes of what decides the pixels: the key names the cache (each file's path, size and modification
    time, and the preprocessing); the source leaves out sizes and times, so it names every cache the same
    files and preprocessing ever had, and a new cache removes the ones it supersedes."""
    paths = [os.path.abspath(path) for path in files]
    entries = [(path, stat.st_size, stat.st_mtime_ns) for path, stat in zip(paths, map(os.stat, files))]
    key = {"version": CACHE_VERSION, "preprocessing": preprocessing.description, "files": entries}
    return digest(key), digest({**key, "files": paths})


def digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def is_complete(folder: Path, shape: tuple[int, ...]) -> bool:
    """Whether `folder` is a finished cache of pixels of `shape` (the index is the last thing written)."""
    try:
        return (folder / INDEX).is_file() and np.load(folder / PIXELS, mmap_mode="r").shape == shape
    except (OSError, ValueError):
        return False


def write_cache(
    folder: Path, source: str, files: Sequence[Path], preprocessing: Preprocessing, workers: int, progress: bool
) -> None:
    """Decode into a private temporary folder, then rename it to `folder` in one step. The folders that
    killed runs left for the same cache go first; once it is in place, the caches of the same `source`
    (`cache_keys`) that it supersedes go."""
    remove_abandoned(folder)
    partial = folder.parent / f"{partial_folder_prefix(folder)}{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL}"
    partial.mkdir()
    try:
        shape = (len(files), 3, *preprocessing.size)
        pixels = np.lib.format.open_memmap(partial / PIXELS, mode="w+", dtype=np.uint8, shape=shape)
        unreadable = decode_into(pixels, files, preprocessing, workers, progress)
        pixels.flush()
        del pixels
        index = {"images": len(files), "unreadable": np.flatnonzero(unreadable).tolist(), "source": source}
        index["host"] = socket.gethostname()  # whose copy of the files it holds (`remove_superseded`)
        root = os.path.commonpath([os.path.abspath(path) for path in files]) if files else ""
        (partial / INDEX).write_text(json.dumps({**index, "root": root, "preprocessing": preprocessing.description}))
        if not is_complete(folder, shape):  # else another process finished the same cache meanwhile
            shutil.rmtree(folder, ignore_errors=True)  # a cache is_complete refused (torn by hand): replace it
            try:
                partial.rename(folder)
            except OSError:
                if not is_complete(folder, shape):  # else another process renamed the same cache first
                    raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    remove_superseded(folder, source)


def read_cache(folder: Path, memory_budget: int, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """The pixels (in memory if they fit `memory_budget` bytes, else memory-mapped) and the unreadable mask."""
    index = json.loads((folder / INDEX).read_text())
    mark_used(folder)
    unreadable = np.zeros(index["images"], dtype=bool)
    unreadable[index["unreadable"]] = True
    mapped = np.load(folder / PIXELS, mmap_mode="c")  # copy-on-write: writable for torch, the file untouched
    if mapped.nbytes > memory_budget:
        return torch.from_numpy(mapped), unreadable
    pixels = torch.empty(mapped.shape, dtype=torch.uint8, pin_memory=pin)
    for start in range(0, len(mapped), 1024):
        pixels.numpy()[start : start + 1024] = mapped[start : start + 1024]
    return pixels, unreadable


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tokenbench, else ~/.cache/tokenbench: outside any run folder, shared by runs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenbench"


def cache_dir_or_default(path: str | Path | None) -> Path:
    """`path` as given (--cache-dir), else the default cache folder."""
    return Path(path) if path else default_cache_dir()


def check_cache_dir(path: str | Path | None) -> Path:
    """The cache folder (`path`, else the default), created and checked writable."""
    folder = cache_dir_or_default(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
    except OSError as error:
        raise TokenBenchError(
            f"cannot write to cache folder {folder}: {error.strerror}; give --cache-dir a writable folder"
        ) from None
    return folder


def default_workers() -> int:
    """The cores this process may use, shared by the processes torchrun starts on the machine, at most 16."""
    return max(1, min(MAX_WORKERS, usable_cores() // max(1, env_int("LOCAL_WORLD_SIZE", 1))))


def default_memory_budget() -> int:
    """Half the memory available now, shared by the processes torchrun starts on the machine."""
    return available_memory() // 2 // max(1, env_int("LOCAL_WORLD_SIZE", 1))


def available_memory() -> int:
    """MemAvailable: free memory plus the page cache the kernel can drop. Free memory alone shrinks
    as soon as the cache files are written, and would send a large set to the slower memory map."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30
