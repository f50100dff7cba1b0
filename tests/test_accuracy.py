"""evaluate, from decoded images and from a dataset, against the predictions counted by hand on the
same transformed images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from harness.measure.accuracy import evaluate
from harness.measure.data import eval_transform, load_imagenet_folder
from harness.measure.decode_cache import Preprocessing, decode
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


def logits_by_hand(model, dataset):
    """(sample index, label, logits) of `model` for every readable image, one image at a time."""
    found = []
    with torch.no_grad():
        for index, (path, label) in enumerate(dataset.samples):
            try:
                image = Image.open(path).convert("RGB")
            except OSError:
                continue
            found.append((index, label, model(dataset.transform(image)[None])[0]))
    return found


def counted_by_hand(model, dataset, classes=None):
    """Top-1 and top-5 hits of `model` on every readable image, predicting among `classes` (default: all)."""
    top1 = top5 = images = 0
    for _, label, logits in logits_by_hand(model, dataset):
        allowed = torch.tensor(classes if classes is not None else range(len(logits)))
        ranking = allowed[torch.argsort(logits[allowed], descending=True)]
        top1 += int(ranking[0] == label)
        top5 += int(label in ranking[:5].tolist())
        images += 1
    return top1, top5, images


def decoded(dataset):
    """`dataset` decoded once, in memory: what evaluate gets in a sweep."""
    return decode(dataset, range(len(dataset)), Preprocessing.of(dataset.transform))


@pytest.fixture
def model():
    return tiny_vit(num_classes=CLASSES)


@pytest.fixture(params=["dataset", "decoded"])
def dataset(request, tmp_path, model):
    """The same images through a DataLoader and decoded once; `.dataset` is the ImageDataset either way."""
    images = load_imagenet_folder(noise_tree(tmp_path), eval_transform(model, 64))
    return images if request.param == "dataset" else decoded(images)


def samples_of(data):
    return getattr(data, "dataset", data)


def test_accuracy_equals_the_predictions_counted_by_hand(model, dataset):
    top1, top5, images = counted_by_hand(model, samples_of(dataset))
    result = evaluate(model, dataset, batch_size=5)
    assert (result.images, result.skipped) == (images, 1) == (24, 1)
    assert result.top1 == pytest.approx(100 * top1 / images)
    assert result.top5 == pytest.approx(100 * top5 / images)
    assert 0 < top1 < top5 < images  # the comparison can tell top-1 from top-5 from everything


def test_batch_size_and_workers_do_not_change_the_result(model, dataset):
    assert evaluate(model, dataset, batch_size=64) == evaluate(model, dataset, batch_size=3, workers=2)


def test_class_subset_present_predicts_among_the_classes_in_the_data(tmp_path):
    """ImageNet-A/R style: three integer folders of a ten-class model, the argmax over those three logits."""
    model = tiny_vit(num_classes=10)
    root = noise_tree(tmp_path, classes=3, per_class=6, corrupt=False)
    for folder, index in zip(sorted(root.iterdir()), ["1", "4", "7"]):
        folder.rename(root / index)
    dataset = load_imagenet_folder(root, eval_transform(model, 64))
    present, everything = counted_by_hand(model, dataset, [1, 4, 7]), counted_by_hand(model, dataset)
    assert present[0] != everything[0]  # the subset changes what is counted
    for data in (dataset, decoded(dataset)):
        for subset, (top1, top5, images) in [("present", present), ("all", everything)]:
            result = evaluate(model, data, batch_size=5, class_subset=subset)
            assert (result.top1, result.top5) == pytest.approx((100 * top1 / images, 100 * top5 / images))
    assert present[1] == present[2]  # top-5 of three classes holds every label


def test_real_top1_counts_the_images_with_real_labels(tmp_path, model):
    """A hand-made ReaL file: the top prediction accepted, refused, or no labels (left out)."""
    root = noise_tree(tmp_path / "val", per_class=3, corrupt=False)
    for k, path in enumerate(sorted(root.rglob("*.JPEG"))):
        path.rename(path.with_name(f"val_{7 * k % 18:02d}.JPEG"))  # file-name order differs from folder order
    dataset = load_imagenet_folder(root, eval_transform(model, 64))
    top = {index: int(logits.argmax()) for index, _, logits in logits_by_hand(model, dataset)}
    by_name = sorted(range(len(dataset.samples)), key=lambda i: dataset.samples[i][0].name)

    def entry(rank, index):  # accepted (the prediction second of two labels), no labels (left out), refused
        return [[(top[index] + 2) % CLASSES, top[index]], [], [(top[index] + 1) % CLASSES]][rank % 3]

    real = [entry(rank, index) for rank, index in enumerate(by_name)]
    (tmp_path / "real.json").write_text(json.dumps(real))
    dataset = load_imagenet_folder(root, eval_transform(model, 64), real_labels=tmp_path / "real.json")
    for data in (dataset, decoded(dataset)):
        result = evaluate(model, data, batch_size=4)
        assert (result.real_images, result.top1_real) == (12, pytest.approx(50.0))
        assert result.images == 18


def test_unknown_class_subset(model, dataset):
    with pytest.raises(TokenBenchError, match="unknown class subset 'some'; allowed: all, present"):
        evaluate(model, dataset, class_subset="some")


def test_mode_is_restored(model, dataset):
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, _args: seen.append(m.training))
    evaluate(model, dataset, batch_size=8)
    assert model.training and not any(seen)


def test_bf16_evaluates_every_image(model, dataset):
    result = evaluate(model, dataset, batch_size=8, precision="bf16")
    assert (result.images, result.skipped) == (24, 1)


def test_bf16_weights_evaluate_in_bf16_and_leave_the_model_as_it_was(model, dataset):
    dtypes = []
    hook = model.head.register_forward_hook(lambda _m, _args, out: dtypes.append(out.dtype))
    result = evaluate(model, dataset, batch_size=4, model_dtype="bf16")
    hook.remove()
    assert result.images == len(dataset) - 1 and set(dtypes) == {torch.bfloat16}  # the corrupt image skipped
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fewer_than_five_classes_makes_top5_everything(tmp_path):
    model = tiny_vit(num_classes=3)
    dataset = load_imagenet_folder(noise_tree(tmp_path, classes=3, corrupt=False), eval_transform(model, 64))
    assert evaluate(model, dataset).top5 == evaluate(model, decoded(dataset)).top5 == 100


def test_class_folders_must_match_the_model_classes(tmp_path):
    model = tiny_vit(num_classes=10)
    dataset = load_imagenet_folder(noise_tree(tmp_path), eval_transform(model, 64))
    for data in (dataset, decoded(dataset)):
        with pytest.raises(TokenBenchError, match="has 6 class folders but the model predicts 10 classes"):
            evaluate(model, data)


def test_a_label_beyond_the_model_classes(tmp_path, model):
    noise_tree(tmp_path / "val", corrupt=False)
    (tmp_path / "labels.csv").write_text("n00000000/img_0.JPEG,1\nn00000000/img_1.JPEG,6\n")
    dataset = load_imagenet_folder(tmp_path / "val", eval_transform(model, 64), labels_csv=tmp_path / "labels.csv")
    for data in (dataset, decoded(dataset)):
        with pytest.raises(TokenBenchError, match="img_1.JPEG is labelled 6 by the labels CSV, beyond the model's 6"):
            evaluate(model, data)


def test_nothing_readable_is_a_clear_error(tmp_path, model):
    (tmp_path / "n00000000").mkdir()
    (tmp_path / "n00000000" / "bad.JPEG").write_bytes(b"garbage")
    dataset = load_imagenet_folder(tmp_path, eval_transform(model, 64))
    dataset.classes = None  # one folder for a 6-class model: only the unreadable image is under test
    for data in (dataset, decoded(dataset)):
        with pytest.raises(TokenBenchError, match="no image could be evaluated: 1 unreadable"):
            evaluate(model, data)


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
