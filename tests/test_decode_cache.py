"""The decode cache: the same input bits as timm's transform, each file opened once, never stale or partial."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from harness.measure import decode_cache
from harness.measure.accuracy import evaluate
from harness.measure.data import eval_transform, load_imagenet_folder
from harness.measure.decode_cache import Preprocessing, decode, decode_for_model, preprocessing_for
from harness.run.records import RunStore
from harness.run.sweep import run_sweep
from harness.run.sweep_config import SweepConfig
from methods import TokenBenchError
from tests.conftest import tiny_vit
from tests.test_accuracy import CLASSES, noise_tree
from tests.test_distributed import WORLD, run_ranks


@pytest.fixture
def opened(monkeypatch):
    """Counts of Image.open per file path, wherever it is called from."""
    counts = Counter()
    original = Image.open

    def counting(path, *args, **kwargs):
        counts[os.fspath(path)] += 1
        return original(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return counts


def varied_images(root):
    """JPEG noise of several sizes and aspect ratios, a grey-scale PNG and an RGBA PNG: what resizing sees."""
    rng = np.random.default_rng(3)
    folder = root / "n00000000"
    folder.mkdir(parents=True)
    for i, (height, width) in enumerate([(375, 500), (500, 333), (64, 64), (41, 97), (300, 300)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8)).save(folder / "rgba.png")
    return root


TRANSFORMS = {
    "tiny_vit": lambda: eval_transform(tiny_vit(), 64),
    "deit (bicubic, crop 0.9) at 96": lambda: eval_transform(timm.create_model("deit_tiny_patch16_224"), 96),
    "mean/std 0.5, bilinear, no crop": lambda: create_transform(
        input_size=(3, 48, 80), interpolation="bilinear", crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3
    ),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_cached_pixels_normalise_to_the_bits_of_the_transform(tmp_path, name):
    transform = TRANSFORMS[name]()
    dataset = load_imagenet_folder(varied_images(tmp_path / "val"), transform)
    decoded = decode(dataset, range(len(dataset)), Preprocessing.of(transform), cache_dir=tmp_path / "cache")
    uncached = torch.stack([dataset[i][0] for i in range(len(dataset))])  # [N, 3, H, W]: PIL, then the transform
    cached = decoded.preprocessing.normalize(decoded.pixels)
    assert cached.dtype == uncached.dtype == torch.float32
    assert torch.equal(cached, uncached)


def test_deit_preprocessing_is_bicubic_at_crop_0_9(deit_tiny):
    assert "Resize(size=320, interpolation=bicubic" in preprocessing_for(deit_tiny, 288).description


def logits_of(model, run):
    seen = []
    handle = model.register_forward_hook(lambda _m, _args, output: seen.append(output.clone()))
    result = run()
    handle.remove()
    return result, torch.cat(seen)


def mapped_file(tensor):
    """The file a tensor's memory is mapped from (Linux), or None."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.parametrize("budget", [None, 0])  # in memory, and memory-mapped
def test_cached_and_uncached_evaluation_give_the_same_logits(tmp_path, budget):
    model = tiny_vit(num_classes=CLASSES)
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val", corrupt=False), eval_transform(model, 64))
    decoded = decode(dataset, range(24), preprocessing_for(model, 64), cache_dir=tmp_path, memory_budget=budget)
    assert (mapped_file(decoded.pixels) or "").endswith("pixels.npy") == (budget == 0)
    uncached, uncached_logits = logits_of(model, lambda: evaluate(model, dataset, batch_size=5))
    cached, cached_logits = logits_of(model, lambda: evaluate(model, decoded, batch_size=5))
    assert cached == uncached
    assert torch.equal(cached_logits, uncached_logits)


def test_an_unreadable_image_is_a_left_out_row_of_the_cache(tmp_path):
    model = tiny_vit(num_classes=CLASSES)
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val"), eval_transform(model, 64))
    decoded = decode(dataset, range(25), preprocessing_for(model, 64), cache_dir=tmp_path)
    assert decoded.unreadable.tolist() == [path.name == "img_9.JPEG" for path, _ in dataset.samples]
    assert not decoded.pixels[torch.from_numpy(decoded.unreadable)].any()
    assert evaluate(model, decoded, batch_size=5) == evaluate(model, dataset, batch_size=5)


def test_threads_decode_the_same_pixels(tmp_path):
    dataset = load_imagenet_folder(varied_images(tmp_path / "val"), None)
    preprocessing = preprocessing_for(tiny_vit(), 64)
    alone = decode(dataset, range(len(dataset)), preprocessing, workers=0)
    threads = decode(dataset, range(len(dataset)), preprocessing, workers=3)
    assert torch.equal(alone.pixels, threads.pixels) and alone.pixels.any()


def test_a_second_decode_reads_the_cache_without_opening_a_file(tmp_path, opened):
    root = noise_tree(tmp_path / "val")
    dataset = load_imagenet_folder(root, None)
    preprocessing = preprocessing_for(tiny_vit(num_classes=CLASSES), 64)
    first = decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    assert len(opened) == 25 and set(opened.values()) == {1}  # the corrupt file too, once
    second = decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    assert sum(opened.values()) == 25
    assert first.decode_s > 0 and second.decode_s == 0
    assert torch.equal(first.pixels, second.pixels) and second.unreadable.tolist() == first.unreadable.tolist()
    assert first.unreadable.sum() == 1


def decoded_once(tmp_path):
    """24 readable images, decoded into tmp_path/cache once: (dataset, preprocessing)."""
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val", corrupt=False), None)
    preprocessing = preprocessing_for(tiny_vit(num_classes=CLASSES), 64)
    decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    return dataset, preprocessing


def test_a_changed_file_is_not_served_stale(tmp_path, opened):
    dataset, preprocessing = decoded_once(tmp_path)
    path, _ = dataset.samples[5]
    stat = path.stat()
    Image.fromarray(np.full((50, 50, 3), 7, dtype=np.uint8)).save(path, format="JPEG")  # new size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    opened.clear()
    fresh = decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    assert sum(opened.values()) == 24 and fresh.decode_s > 0  # the whole list again: its key changed
    expected = preprocessing.pixels(Image.open(path).convert("RGB"))
    assert torch.equal(fresh.pixels[5], torch.from_numpy(np.ascontiguousarray(expected)))


def test_a_same_size_rewrite_is_caught_by_its_time(tmp_path, opened):
    dataset, preprocessing = decoded_once(tmp_path)
    path, _ = dataset.samples[0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    opened.clear()
    decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    assert sum(opened.values()) == 24


@pytest.mark.parametrize("tear", ["index removed", "pixels cut short"])
def test_a_cache_torn_by_hand_is_decoded_again_in_its_place(tmp_path, opened, tear):
    dataset, preprocessing = decoded_once(tmp_path)
    (folder,) = (tmp_path / "cache").iterdir()
    whole = np.load(folder / decode_cache.PIXELS).copy()
    if tear == "index removed":
        (folder / decode_cache.INDEX).unlink()
    else:
        with open(folder / decode_cache.PIXELS, "r+b") as pixels:
            pixels.truncate(1000)
    opened.clear()
    again = decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    assert sum(opened.values()) == 24 and again.decode_s > 0
    assert [entry.name for entry in (tmp_path / "cache").iterdir()] == [folder.name]
    assert np.array_equal(np.load(folder / decode_cache.PIXELS), whole) and (folder / decode_cache.INDEX).is_file()


def test_an_interrupted_decode_leaves_no_cache_to_serve(tmp_path, monkeypatch):
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val", corrupt=False), None)
    preprocessing = preprocessing_for(tiny_vit(num_classes=CLASSES), 64)
    original, calls = decode_cache.read_pixels, []

    def dies_on_the_tenth(path, prep):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(path, prep)

    monkeypatch.setattr(decode_cache, "read_pixels", dies_on_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache", workers=2)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial folder left behind, none renamed
    monkeypatch.setattr(decode_cache, "read_pixels", original)
    again = decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    assert again.decode_s > 0 and not again.unreadable.any()


def test_a_killed_decode_s_folder_is_removed_by_the_next_decode_of_the_same_cache(tmp_path):
    """A run killed mid-decode leaves its temporary folder; the next decode of that cache removes it when
    its process is gone on this host, and keeps those of live processes, other hosts and other caches."""
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val", corrupt=False), None)
    preprocessing = preprocessing_for(tiny_vit(num_classes=CLASSES), 64)
    cache = tmp_path / "cache"
    cache.mkdir()
    files = [dataset.samples[row][0] for row in range(len(dataset))]
    name, host = decode_cache.cache_keys(files, preprocessing)[0], socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a process that has exited: its pid is free (reused at worst, then kept)
    abandoned = cache / f".{name}.{host}.{dead}.0a1b2c3d.partial"
    kept = [
        cache / f".{name}.{host}.{os.getpid()}.0a1b2c3d.partial",  # a live process: may still be writing
        cache / f".{name}.another-host.{dead}.0a1b2c3d.partial",  # its pid means nothing here
        cache / f".{'0' * 32}.{host}.{dead}.0a1b2c3d.partial",  # another cache's: left to its own decode
    ]
    for folder in (abandoned, *kept):
        folder.mkdir()
        (folder / decode_cache.PIXELS).write_bytes(b"torn")
    decode(dataset, range(len(dataset)), preprocessing, cache_dir=cache)
    assert not abandoned.exists() and all(folder.exists() for folder in kept)
    assert (cache / name).is_dir()


def test_an_unwritable_cache_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val"), None)
    with pytest.raises(TokenBenchError, match="cannot write to cache folder .*; give --cache-dir a writable folder"):
        decode(dataset, range(3), preprocessing_for(tiny_vit(), 64), cache_dir=blocker / "cache")


def test_a_transform_without_to_tensor_and_normalize_cannot_be_cached():
    with pytest.raises(TokenBenchError, match="must end with ToTensor, Normalize"):
        Preprocessing.of(create_transform(input_size=(3, 64, 64), is_training=False, no_aug=True, normalize=False))


def small_sweep(root, cache, keep_rates, resolutions=(64, 96)):
    return SweepConfig(
        models=("deit_tiny_patch16_224",),
        methods=("evit",),
        keep_rates=keep_rates,
        resolutions=resolutions,
        device="cpu",
        batch_sizes=(4,),
        warmup=0,
        iters=1,
        windows=1,
        data=str(root),
        cache_dir=str(cache),
        workers=2,
    )


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_a_sweep_opens_each_image_once_per_resolution_and_a_resumed_one_not_at_all(tmp_path, opened):
    root = noise_tree(tmp_path / "val", classes=3, per_class=2)  # 6 readable images and 1 corrupt one
    for folder, synset in zip(sorted(root.iterdir()), ["n01440764", "n01443537", "n01484850"]):
        folder.rename(root / synset)  # the ImageNet-1k classes 0, 1, 2 for deit_tiny's 1000
    store = RunStore.prepare(tmp_path / "run")
    rows = list(run_sweep(small_sweep(root, tmp_path / "cache", (0.5,)), store, progress=False))
    assert len(rows) == 4  # per resolution: vanilla and evit 0.5
    assert len(opened) == 7 and set(opened.values()) == {2}  # once per resolution, the corrupt file too
    assert [row["decode_s"] > 0 for row in rows] == [True, False] * 2
    assert all(row["eval_img_per_s"] > 0 and row["images"] == 6 and row["skipped"] == 1 for row in rows)
    assert {row["label_source"] for row in rows} == {"synset"} and {row["class_subset"] for row in rows} == {"all"}

    opened.clear()
    resumed = list(run_sweep(small_sweep(root, tmp_path / "cache", (0.5, 0.7)), store, progress=False))
    assert [(row["method"], row["keep_rate"]) for row in resumed] == [("evit", 0.7)] * 2
    assert sum(opened.values()) == 0 and [row["decode_s"] for row in resumed] == [0, 0]


def test_decode_for_model_checks_the_labels_before_decoding(tmp_path, opened):
    root = noise_tree(tmp_path / "val")  # 6 folders of made-up names: sorted, for a 6-class model only
    with pytest.raises(TokenBenchError, match="has 6 class folders but the model predicts 10 classes"):
        decode_for_model(tiny_vit(num_classes=10), 64, root, cache_dir=tmp_path / "cache")
    assert not opened


def test_the_cache_index_names_its_preprocessing(tmp_path):
    dataset = load_imagenet_folder(noise_tree(tmp_path / "val"), None)
    preprocessing = preprocessing_for(tiny_vit(), 64)
    decode(dataset, range(len(dataset)), preprocessing, cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    index = json.loads((folder / "index.json").read_text())
    assert index["images"] == 25 and len(index["unreadable"]) == 1
    assert index["preprocessing"] == preprocessing.description


def decode_shard_and_record(rank, root, cache, out):
    """One rank: decode its shard through the cache, note the files it opened, evaluate."""
    opened, original = [], Image.open
    Image.open = lambda path, *args, **kwargs: opened.append(os.fspath(path)) or original(path, *args, **kwargs)
    model = tiny_vit(num_classes=CLASSES)
    decoded = decode_for_model(model, 64, root, cache_dir=cache, workers=2, progress=False)
    result = evaluate(model, decoded, batch_size=4)
    record = {"opened": opened, "rows": decoded.rows, "result": asdict(result)}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def test_each_rank_caches_only_its_shard(tmp_path):
    root = noise_tree(tmp_path / "val")  # 25 images, one unreadable
    run_ranks(decode_shard_and_record, root, tmp_path / "cache", tmp_path)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert [record["rows"] for record in records] == [list(range(0, 25, 2)), list(range(1, 25, 2))]
    files = [str(path) for path, _ in load_imagenet_folder(root, None).samples]
    assert [sorted(record["opened"]) for record in records] == [sorted(files[0::2]), sorted(files[1::2])]
    caches = [json.loads((folder / "index.json").read_text()) for folder in (tmp_path / "cache").iterdir()]
    assert sorted(cache["images"] for cache in caches) == [12, 13]
    model = tiny_vit(num_classes=CLASSES)
    alone = evaluate(model, decode_for_model(model, 64, root, cache_dir=tmp_path / "alone"), batch_size=4)
    assert [record["result"] for record in records] == [asdict(alone)] * WORLD
