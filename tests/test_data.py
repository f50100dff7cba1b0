"""Image folders: class indices, the CSV layout, seeded subsets, unreadable files, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from harness.measure.data import collate_readable, eval_transform, load_imagenet_folder
from methods import TokenBenchError
from tests.conftest import tiny_vit

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # sorted: label = position


def write_image(path, value, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path, format="JPEG")


def make_tree(root, per_class=3, corrupt=True):
    """ImageNet-like: one folder per synset, written out of order; plus a corrupt file and a non-image."""
    for label, synset in reversed(list(enumerate(SYNSETS))):
        for i in range(per_class):
            write_image(root / synset / f"{synset}_{i}.JPEG", 40 * label + i)
    if corrupt:
        (root / SYNSETS[1] / "broken.JPEG").write_bytes(b"not an image at all")
    (root / SYNSETS[0] / "notes.txt").write_text("ignored")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def test_class_indices_follow_sorted_folder_names(tmp_path):
    dataset = load_imagenet_folder(make_tree(tmp_path, corrupt=False), transform=None)
    assert dataset.classes == SYNSETS
    assert len(dataset) == 9
    for path, label in dataset.samples:
        assert path.parent.name == SYNSETS[label]
    image, label = dataset[0]
    assert image.mode == "RGB" and label == 0


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    dataset = load_imagenet_folder(make_tree(tmp_path), transform=eval_transform(tiny_vit(), 64))
    assert len(dataset) == 10
    assert dataset.samples[3][0].name == "broken.JPEG"  # sorts first in class 1
    assert dataset[3] is None
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_readable))
    assert [(len(labels), skipped) for _, labels, skipped in batches] == [(3, 1), (4, 0), (2, 0)]
    images, labels, _ = batches[0]
    assert images.shape == (3, 3, 64, 64) and labels.tolist() == [0, 0, 0]


def test_a_batch_of_only_unreadable_images():
    images, labels, skipped = collate_readable([None, None])
    assert images is None and labels.numel() == 0 and skipped == 2


def test_skip_counts_survive_worker_processes(tmp_path):
    dataset = load_imagenet_folder(make_tree(tmp_path), transform=eval_transform(tiny_vit(), 64))
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_readable)
    assert sum(skipped for _, _, skipped in loader) == 1


def test_flat_folder_with_labels_csv(tmp_path):
    for i in range(4):
        write_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 10 * i)
    rows = ["filename,label"] + [f"ILSVRC2012_val_{i:08d}.JPEG,{7 * i}" for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n\n")
    dataset = load_imagenet_folder(tmp_path / "val", transform=None, labels_csv=tmp_path / "labels.csv")
    assert dataset.classes is None
    assert [(path.name, label) for path, label in dataset.samples] == [
        (f"ILSVRC2012_val_{i:08d}.JPEG", 7 * i) for i in range(4)
    ]
    headless = tmp_path / "headless.csv"
    headless.write_text("\n".join(rows[1:]))
    assert load_imagenet_folder(tmp_path / "val", None, labels_csv=headless).samples == dataset.samples


def test_a_labels_csv_header_is_exactly_filename_label_and_a_bom_is_no_part_of_a_name(tmp_path):
    for name in ("a.JPEG", "b.JPEG"):
        write_image(tmp_path / "val" / name, 0)
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeff Filename , Label\r\na.JPEG,1\r\nb.JPEG,2\r\n".encode())
    samples = load_imagenet_folder(tmp_path / "val", None, labels_csv=labels).samples
    assert [(path.name, label) for path, label in samples] == [("a.JPEG", 1), ("b.JPEG", 2)]
    labels.write_bytes("\ufeffa.JPEG,1\nb.JPEG,2\n".encode())
    assert load_imagenet_folder(tmp_path / "val", None, labels_csv=labels).samples == samples
    labels.write_text("filename,label,name\na.JPEG,1,goldfish\nb.JPEG,2,shark\n")  # more columns, as the rows have
    assert load_imagenet_folder(tmp_path / "val", None, labels_csv=labels).samples == samples


@pytest.mark.parametrize(
    "content,message",
    [
        (b"a.JPEG,-1\nb.JPEG,3\n", "labels.csv, line 1: 'a.JPEG,-1' is not 'filename,label' with a class index"),
        (b"b.JPEG,3\na.JPEG,-1\n", "labels.csv, line 2: 'a.JPEG,-1' is not 'filename,label' with a class index"),
        (b"file,class\na.JPEG,1\n", "line 1: 'file,class' is not .* the header filename,label"),
        (b"\x97\xeeK\x8f\xccRJP}|\xaf", "labels.csv is not a text file of filename,label rows"),
    ],
)
def test_every_labels_csv_row_but_an_exact_header_is_checked(tmp_path, content, message):
    for name in ("a.JPEG", "b.JPEG"):
        write_image(tmp_path / "val" / name, 0)
    (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(TokenBenchError, match=message):
        load_imagenet_folder(tmp_path / "val", None, labels_csv=tmp_path / "labels.csv")


def test_limit_takes_a_fixed_seeded_subset(tmp_path):
    root = make_tree(tmp_path, per_class=6, corrupt=False)
    full = load_imagenet_folder(root, None).samples
    first = load_imagenet_folder(root, None, limit=5).samples
    assert len(first) == 5 and set(first) <= set(full)
    assert load_imagenet_folder(root, None, limit=5).samples == first  # the same every time
    assert set(first) <= set(load_imagenet_folder(root, None, limit=9).samples)  # a larger limit adds to it
    others = [load_imagenet_folder(root, None, limit=5, seed=seed).samples for seed in (1, 2, 3)]
    assert any(set(other) != set(first) for other in others)
    assert first != full[:5]  # a permutation, not the listing order
    assert load_imagenet_folder(root, None, limit=100).samples == full


def test_transform_follows_the_pretrained_config_at_the_size_asked():
    transform = eval_transform(tiny_vit(), 64)
    image = Image.fromarray(np.full((100, 80, 3), 255, dtype=np.uint8))
    tensor = transform(image)
    assert tensor.shape == (3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # timm's ImageNet defaults
    torch.testing.assert_close(tensor[:, 0, 0], (1 - mean) / std)


def test_crop_pct_from_the_model_config(deit_tiny):
    """timm's DeiT config: bicubic, crop_pct 0.9; at 288 the shorter side is resized to 288 / 0.9 = 320."""
    resize, crop = eval_transform(deit_tiny, 288).transforms[:2]
    assert resize.size == 320 and tuple(crop.size) == (288, 288)
    assert resize.interpolation.value == "bicubic"


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing", "does not exist or is not a folder"),
        ("empty", "has no class sub-folders"),
        ("no images", "hold no images"),
        ("missing csv", "labels CSV .* does not exist"),
        ("csv names missing files", "names 1 file\\(s\\) not found in .*, e.g. gone.JPEG"),
        ("bad label", "is not 'filename,label' with a class index >= 0"),
    ],
)
def test_bad_folders_are_clear_errors(tmp_path, layout, message):
    root, labels_csv = tmp_path / "val", None
    if layout != "missing":
        root.mkdir()
    if layout == "no images":
        (root / SYNSETS[0]).mkdir()
        (root / SYNSETS[0] / "readme.txt").write_text("no images here")
    if layout in ("missing csv", "csv names missing files", "bad label"):
        write_image(root / "here.JPEG", 0)
        labels_csv = tmp_path / "labels.csv"
        if layout == "csv names missing files":
            labels_csv.write_text("here.JPEG,1\ngone.JPEG,2\n")
        if layout == "bad label":
            labels_csv.write_text("here.JPEG,1\nthere.JPEG,n01440764\n")
    with pytest.raises(TokenBenchError, match=message):
        load_imagenet_folder(root, None, labels_csv=labels_csv)


@pytest.mark.parametrize("limit", [0, -1, 2.5])
def test_limit_must_be_positive(tmp_path, limit):
    with pytest.raises(TokenBenchError, match="limit must be a positive int"):
        load_imagenet_folder(make_tree(tmp_path), None, limit=limit)


def test_label_source_and_the_classes_present_before_a_limit(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=4, corrupt=False)
    limited = load_imagenet_folder(root, None, limit=2)
    assert limited.label_source == "synset" and limited.present_classes == (0, 1, 2)  # the folder's, not the 2 taken
    write_image(tmp_path / "flat" / "a.JPEG", 0)
    (tmp_path / "labels.csv").write_text("a.JPEG,7\n")
    flat = load_imagenet_folder(tmp_path / "flat", None, labels_csv=tmp_path / "labels.csv")
    assert flat.label_source == "csv" and flat.present_classes == (7,)
