"""evaluate against the same predictions counted by hand on the same transformed images."""

import numpy as np
import pytest
import torch
from PIL import Image

from harness.accuracy import evaluate
from harness.data import eval_transform, load_imagenet_folder
from methods import TokenBenchError
from tests.conftest import tiny_vit

CLASSES = 6


def noise_tree(root, classes=CLASSES, per_class=4, corrupt=True, seed=0):
    """Class folders of random-noise images (varied enough that a random model's predictions vary)."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(48 + 8 * i, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", format="JPEG")
    if corrupt:
        (root / "n00000002" / "img_9.JPEG").write_bytes(b"\x00garbage" * 10)
    return root


def counted_by_hand(model, dataset):
    """Top-1 and top-5 hits of `model` on every readable image, one image at a time."""
    top1 = top5 = images = 0
    with torch.no_grad():
        for path, label in dataset.samples:
            try:
                image = Image.open(path).convert("RGB")
            except OSError:
                continue
            logits = model(dataset.transform(image)[None])[0]
            ranking = torch.argsort(logits, descending=True)
            top1 += int(ranking[0] == label)
            top5 += int(label in ranking[:5].tolist())
            images += 1
    return top1, top5, images


@pytest.fixture
def model():
    return tiny_vit(num_classes=CLASSES)


@pytest.fixture
def dataset(tmp_path, model):
    return load_imagenet_folder(noise_tree(tmp_path), eval_transform(model, 64))


def test_accuracy_equals_the_predictions_counted_by_hand(model, dataset):
    top1, top5, images = counted_by_hand(model, dataset)
    result = evaluate(model, dataset, batch_size=5)
    assert (result.images, result.skipped) == (images, 1) == (24, 1)
    assert result.top1 == pytest.approx(100 * top1 / images)
    assert result.top5 == pytest.approx(100 * top5 / images)
    assert 0 < top1 < top5 < images  # the comparison can tell top-1 from top-5 from everything


def test_batch_size_and_workers_do_not_change_the_result(model, dataset):
    assert evaluate(model, dataset, batch_size=64) == evaluate(model, dataset, batch_size=3, workers=2)


def test_mode_is_restored(model, dataset):
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, _args: seen.append(m.training))
    evaluate(model, dataset, batch_size=8)
    assert model.training and not any(seen)


def test_bf16_evaluates_every_image(model, dataset):
    result = evaluate(model, dataset, batch_size=8, precision="bf16")
    assert (result.images, result.skipped) == (24, 1)


def test_fewer_than_five_classes_makes_top5_everything(tmp_path):
    model = tiny_vit(num_classes=3)
    dataset = load_imagenet_folder(noise_tree(tmp_path, classes=3, corrupt=False), eval_transform(model, 64))
    assert evaluate(model, dataset).top5 == 100


def test_class_folders_must_match_the_model_classes(tmp_path):
    model = tiny_vit(num_classes=10)
    dataset = load_imagenet_folder(noise_tree(tmp_path), eval_transform(model, 64))
    with pytest.raises(TokenBenchError, match="has 6 class folders but the model predicts 10 classes"):
        evaluate(model, dataset)


def test_a_label_beyond_the_model_classes(tmp_path, model):
    noise_tree(tmp_path / "val", corrupt=False)
    (tmp_path / "labels.csv").write_text("n00000000/img_0.JPEG,1\nn00000000/img_1.JPEG,6\n")
    dataset = load_imagenet_folder(tmp_path / "val", eval_transform(model, 64), labels_csv=tmp_path / "labels.csv")
    with pytest.raises(TokenBenchError, match="1 of 2 images have a label out of range: the model predicts 6 classes"):
        evaluate(model, dataset)


def test_nothing_readable_is_a_clear_error(tmp_path, model):
    (tmp_path / "n00000000").mkdir()
    (tmp_path / "n00000000" / "bad.JPEG").write_bytes(b"garbage")
    dataset = load_imagenet_folder(tmp_path, eval_transform(model, 64))
    dataset.classes = None  # one folder for a 6-class model: only the unreadable image is under test
    with pytest.raises(TokenBenchError, match="no image could be evaluated: 1 unreadable"):
        evaluate(model, dataset)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(precision="fp16"), "allowed on CPU: fp32, bf16"),
        (dict(device="npu"), "unknown device"),
        (dict(batch_size=0), "batch_size must be"),
    ],
)
def test_bad_options(model, dataset, options, message):
    with pytest.raises(TokenBenchError, match=message):
        evaluate(model, dataset, **options)
