"""Class indices from folder names (synsets, integers, sorted), checked against the model, and ReaL files."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from timm.data import ImageNetInfo

from harness.measure.data import load_imagenet_folder, real_labels_by_sample
from harness.measure.labels import check_model_classes, folder_labels, pad_real_labels, read_real_labels
from methods import TokenBenchError

# ImageNet-1k indices as every ImageNet classifier numbers them (tench, goldfish, golden retriever,
# tabby cat, toilet tissue), written out rather than read from the code under test.
KNOWN = {"n01440764": 0, "n01443537": 1, "n02099601": 207, "n02123045": 281, "n15075141": 999}


def folders(root, names, per_folder=2):
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_folder):
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(root / name / f"{name}_{i}.png")
    return root


def test_known_synsets_agree_with_timms_class_descriptions():
    info = ImageNetInfo()
    assert [info.index_to_description(index) for index in KNOWN.values()] == [
        "tench, Tinca tinca",
        "goldfish, Carassius auratus",
        "golden retriever",
        "tabby, tabby cat",
        "toilet tissue, toilet paper, bathroom tissue",
    ]


def test_a_subset_of_synset_folders_takes_their_imagenet_indices(tmp_path):
    dataset = load_imagenet_folder(folders(tmp_path, reversed(list(KNOWN))), None)
    assert dataset.label_source == "synset"
    assert {(path.parent.name, label) for path, label in dataset.samples} == set(KNOWN.items())
    assert dataset.present_classes == tuple(sorted(KNOWN.values()))
    check_model_classes(SimpleNamespace(num_classes=1000), dataset)  # five folders fit a 1000-class model


def test_integer_folders_are_class_indices_not_sorted_positions(tmp_path):
    dataset = load_imagenet_folder(folders(tmp_path, ["0", "1", "2", "10"]), None)
    assert dataset.label_source == "index"
    assert {(path.parent.name, label) for path, label in dataset.samples} == {("0", 0), ("1", 1), ("2", 2), ("10", 10)}


def test_other_names_take_their_sorted_position():
    assert folder_labels(["cat", "ant", "bee"]) == ({"ant": 0, "bee": 1, "cat": 2}, "sorted")
    assert folder_labels(["n01440764", "n00000001"])[1] == "sorted"  # n00000001 is no ImageNet-1k synset
    assert folder_labels(["3", "cat"])[1] == "sorted"


@pytest.mark.parametrize(
    "names,num_classes,message",
    [
        (["ant", "bee", "cat"], 10, "has 3 class folders but the model predicts 10 classes: the folder names fit"),
        (["n00000000", "n00000001"], 3, "'n00000000' is neither"),
        (["n01440764", "n01443537"], 10, "the class folders are ImageNet synsets, which name ImageNet-1k classes"),
        (["0", "3", "10"], 10, "class folder 10 names class 10, beyond the model's 10 classes"),
        (["3", "n01440764"], 1000, "mix two layouts: ImageNet synsets \\(n01440764\\) and class indices \\(3\\)"),
        (["3", "n01440764", "n01443537"], 3, "mix two layouts"),  # sorted order would fit the count, wrongly
        (["3", "cat", "n01440764"], 10, "'cat' is neither"),
    ],
)
def test_folders_that_do_not_fit_the_model_are_clear_errors(tmp_path, names, num_classes, message):
    dataset = load_imagenet_folder(folders(tmp_path, names, per_folder=1), None)
    with pytest.raises(TokenBenchError, match=message):
        check_model_classes(SimpleNamespace(num_classes=num_classes), dataset)


def test_a_headless_model_is_refused_whatever_the_labels(tmp_path):
    """A CSV's labels would fit any width: num_classes 0 must be refused before the folders are looked at."""
    dataset = load_imagenet_folder(folders(tmp_path, ["0", "1"], per_folder=1), None)
    for data in (dataset, None):
        with pytest.raises(TokenBenchError, match=r"has no classifier \(num_classes 0"):
            check_model_classes(SimpleNamespace(num_classes=0), data)
    check_model_classes(SimpleNamespace(num_classes=2), dataset)
    check_model_classes(SimpleNamespace(), dataset)  # not a timm model: nothing to go by


def test_real_labels_follow_sorted_file_names_across_folders(tmp_path):
    """ReaL lists images by file name; the class folders list them folder by folder."""
    samples = [(Path("b/val_3.JPEG"), 0), (Path("b/val_1.JPEG"), 0), (Path("a/val_2.JPEG"), 1)]
    real = [(1,), (2,), (3, 4)]  # val_1, val_2, val_3
    assert real_labels_by_sample(samples, real) == [(3, 4), (1,), (2,)]


def test_real_labels_survive_a_limit(tmp_path):
    root = folders(tmp_path / "val", ["ant", "bee"], per_folder=3)
    names = sorted(path.name for path in root.rglob("*.png"))
    (tmp_path / "real.json").write_text(json.dumps([[i] for i in range(len(names))]))
    dataset = load_imagenet_folder(root, None, limit=4, real_labels=tmp_path / "real.json")
    assert len(dataset.samples) == 4
    assert [real[0] for real in dataset.real_labels] == [names.index(path.name) for path, _ in dataset.samples]


@pytest.mark.parametrize(
    "content,message",
    [
        ("[[1], [2]", "cannot read ReaL labels"),
        ('{"a": 1}', "must be a JSON list of lists of class indices"),
        ("[[1], [-2], []]", "must be a JSON list of lists of class indices"),
        ("[[1], [2]]", "list 2 images but the data folder holds 3"),
    ],
)
def test_bad_real_files(tmp_path, content, message):
    (tmp_path / "real.json").write_text(content)
    with pytest.raises(TokenBenchError, match=message):
        read_real_labels(tmp_path / "real.json", 3)


def test_missing_real_file(tmp_path):
    with pytest.raises(TokenBenchError, match="cannot read ReaL labels"):
        read_real_labels(tmp_path / "real.json", 3)


def test_padded_real_labels():
    assert pad_real_labels([(3,), (), (1, 2)]).tolist() == [[3, -1], [-1, -1], [1, 2]]
    assert pad_real_labels([]).shape == (0, 1)
