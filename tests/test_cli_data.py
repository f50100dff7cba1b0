"""`bench run --data` end to end: the new data options, their columns, and bad input as one line, exit code 2."""

import json
import os

import pandas as pd
import pytest
import timm
import torch
from click.testing import CliRunner

from bench import cli
from harness.measure import data as data_module
from harness.measure.accuracy import accuracy_columns
from harness.run import sweep as sweep_module
from tests.test_accuracy import noise_tree
from tests.test_cli import FAST

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # ImageNet-1k classes 0, 1, 2


def synset_tree(root):
    root = noise_tree(root, classes=3, per_class=2)  # 6 readable images and a corrupt one
    for folder, synset in zip(sorted(root.iterdir()), SYNSETS):
        folder.rename(root / synset)
    return root


def run(out, *args, keep_rates="0.5"):
    return CliRunner().invoke(
        cli, ["run", *FAST, "--methods", "evit", "--keep-rates", keep_rates, "--out", str(out), *args]
    )


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_data_options_reach_the_rows(tmp_path):
    root = synset_tree(tmp_path / "val")
    (tmp_path / "real.json").write_text(json.dumps([[0], [1], [], [2], [0, 1], [999], [5]]))  # 7 files
    args = ["--data", str(root), "--cache-dir", str(tmp_path / "cache"), "--workers", "2"]
    result = run(tmp_path / "out", *args, "--class-subset", "present", "--real-labels", str(tmp_path / "real.json"))
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "out" / "records.csv")
    assert records["label_source"].tolist() == ["synset"] * 2
    assert records["class_subset"].tolist() == ["present"] * 2
    assert records[["images", "skipped", "real_images"]].values.tolist() == [[6, 1, 5]] * 2  # the corrupt one has [5]
    assert records["top1_real"].notna().all() and (records["eval_img_per_s"] > 0).all()
    assert records["decode_s"].gt(0).tolist() == [True, False]
    assert all('"class_subset": "present"' in key for key in records["config_key"])
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_a_run_folder_holds_one_data_setting_however_its_paths_are_written(tmp_path, monkeypatch):
    """Another --limit into the same folder would put two vanillas in one report group (each row then
    compared with the first); the same folder written another way is the same data and resumes."""
    root = synset_tree(tmp_path / "val")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert run(tmp_path / "out", "--data", str(root), "--limit", "4", *cache).exit_code == 0
    refused = run(tmp_path / "out", "--data", str(root), "--limit", "6", *cache)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "measured with limit=4; this run asks for limit=6: run with the folder's settings" in refused.output
    monkeypatch.chdir(tmp_path)
    again = run(tmp_path / "out", "--data", "./val/", "--limit", "4", *cache)
    assert again.exit_code == 0 and "0 new rows" in again.output
    assert len(pd.read_csv(tmp_path / "out" / "records.csv")) == 2


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_a_folder_whose_keys_hold_paths_as_typed_resumes_from_where_it_was_run(tmp_path, monkeypatch):
    """Keys written before paths were resolved (`--data val`, and no run.json) still name their rows."""
    root = synset_tree(tmp_path / "val")
    assert run(tmp_path / "out", "--data", str(root), "--cache-dir", str(tmp_path / "cache")).exit_code == 0
    records = pd.read_csv(tmp_path / "out" / "records.csv")
    records["config_key"] = [key.replace(json.dumps(str(root)), json.dumps("val")) for key in records["config_key"]]
    assert all('"data": "val"' in key for key in records["config_key"])
    records.to_csv(tmp_path / "out" / "records.csv", index=False)
    (tmp_path / "out" / "run.json").unlink()
    monkeypatch.chdir(tmp_path)
    again = run(tmp_path / "out", "--data", "val", "--cache-dir", str(tmp_path / "cache"))
    assert again.exit_code == 0 and "0 new rows" in again.output


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_evaluation_runs_under_the_runs_threads(tmp_path, monkeypatch):
    """--threads holds for the top-1 as for the timing: the model is evaluated as it was timed."""
    seen = []

    def counting(model, data, **options):
        seen.append(torch.get_num_threads())
        return accuracy_columns(model, data, **options)

    monkeypatch.setattr(sweep_module, "accuracy_columns", counting)
    threads = torch.get_num_threads()
    wanted = 1 if threads > 1 else 2
    root = synset_tree(tmp_path / "val")
    result = run(
        tmp_path / "out", "--data", str(root), "--cache-dir", str(tmp_path / "cache"), "--threads", str(wanted)
    )
    assert result.exit_code == 0, result.output
    assert seen == [wanted, wanted]  # vanilla and evit
    assert torch.get_num_threads() == threads  # and restored after


def test_a_model_without_a_classifier_is_refused_before_anything_runs(tmp_path):
    """dinov2's default tag is a headless backbone (num_classes 0): its features would be scored as classes."""
    root = synset_tree(tmp_path / "val")
    args = ["run", "--model", "vit_small_patch14_dinov2", "--resolutions", "56", "--methods", "evit", "--data"]
    result = CliRunner().invoke(cli, [*args, str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "VisionTransformer has no classifier (num_classes 0: a headless backbone)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "records.csv").exists()


def bad_real(tmp_path, root):
    (tmp_path / "real.json").write_text(json.dumps([[0]] * 3))
    return ["--data", str(root), "--real-labels", str(tmp_path / "real.json")]


def unwritable_cache(tmp_path, root):
    (tmp_path / "file").write_text("not a folder")
    return ["--data", str(root), "--cache-dir", str(tmp_path / "file" / "cache")]


def csv_naming_missing_files(tmp_path, root):
    (tmp_path / "labels.csv").write_text(f"{SYNSETS[0]}/img_0.JPEG,0\n{SYNSETS[0]}/gone.JPEG,0\n")
    return ["--data", str(root), "--labels", str(tmp_path / "labels.csv")]


def csv_label_beyond_the_classes(tmp_path, root):
    (tmp_path / "labels.csv").write_text(f"{SYNSETS[0]}/img_0.JPEG,0\n{SYNSETS[0]}/img_1.JPEG,5000\n")
    return ["--data", str(root), "--labels", str(tmp_path / "labels.csv"), "--cache-dir", str(tmp_path / "cache")]


def folders_fitting_no_rule(tmp_path, root):
    (root / "extra").mkdir()  # four folders, not all synsets: sorted, and 4 is not deit_tiny's 1000 classes
    (root / SYNSETS[0] / "img_0.JPEG").rename(root / "extra" / "img_0.JPEG")
    return ["--data", str(root), "--cache-dir", str(tmp_path / "cache")]


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
@pytest.mark.parametrize(
    "make_args,message",
    [
        (bad_real, "list 3 images but the data folder holds 7"),
        (unwritable_cache, "cannot write to cache folder"),
        (csv_naming_missing_files, "names 1 file(s) not found in"),
        (csv_label_beyond_the_classes, "img_1.JPEG is labelled 5000 by the labels CSV, beyond the model's 1000"),
        (folders_fitting_no_rule, "has 4 class folders but the model predicts 1000 classes: the folder names fit"),
        (lambda tmp_path, root: ["--real-labels", str(tmp_path / "real.json")], "need the images: give --data"),
        (lambda tmp_path, root: ["--class-subset", "some"], "'some' is not one of 'all', 'present'"),
    ],
)
def test_bad_data_input_is_one_clear_line_and_exit_code_2(tmp_path, make_args, message):
    root = synset_tree(tmp_path / "val")
    result = run(tmp_path / "out", *make_args(tmp_path, root))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "records.csv").exists()  # nothing half-written
    assert not (tmp_path / "cache").is_dir() or not any((tmp_path / "cache").iterdir())


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_images_changed_behind_the_same_path_are_another_data_setting(tmp_path):
    """Vanilla's top-1 was scored on the images as they were: a method scored on others would be compared
    with it (a file removed: 7 images against 6)."""
    root = synset_tree(tmp_path / "val")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert run(tmp_path / "out", "--data", str(root), *cache).exit_code == 0
    next(root.rglob("*.JPEG")).unlink()
    refused = run(tmp_path / "out", "--data", str(root), *cache, keep_rates="0.7")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"measured with other files behind data={str(root)!r} (images added, removed" in refused.output


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_the_same_images_copied_anew_resume_and_other_labels_are_named(tmp_path):
    """A job that stages its data again resets the files' times, not their names or sizes: the folder resumes.
    Labels changed in the CSV are named as the labels, not blamed on the images."""
    root = synset_tree(tmp_path / "val")
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{path.relative_to(root)},0\n" for path in sorted(root.rglob("img_*.JPEG"))))
    args = ["--data", str(root), "--labels", str(labels), "--cache-dir", str(tmp_path / "cache")]
    assert run(tmp_path / "out", *args).exit_code == 0
    for path in root.rglob("*"):
        os.utime(path, (1e9, 1e9))
    again = run(tmp_path / "out", *args)
    assert again.exit_code == 0 and "0 new rows" in again.output
    labels.write_text(labels.read_text().replace(",0\n", ",1\n", 1))
    refused = run(tmp_path / "out", *args)
    assert refused.exit_code == 2 and f"other files behind labels_csv={str(labels)!r}" in refused.output


def test_weights_saved_over_vanillas_checkpoint_are_another_setting(tmp_path):
    checkpoint = tmp_path / "vanilla.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=64).state_dict(), checkpoint)
    assert run(tmp_path / "out", "--checkpoint", f"vanilla={checkpoint}").exit_code == 0
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=64).state_dict(), checkpoint)
    refused = run(tmp_path / "out", "--checkpoint", f"vanilla={checkpoint}")
    assert refused.exit_code == 2
    assert f"other files behind checkpoint {checkpoint} (images added, removed" in refused.output


def test_weights_saved_over_a_methods_checkpoint_are_another_setting(tmp_path):
    """evit's rows at 0.5 ran on the weights as they were: 0.7 on others would sit beside them as one method."""
    checkpoint = tmp_path / "evit.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=64).state_dict(), checkpoint)
    assert run(tmp_path / "out", "--checkpoint", f"evit={checkpoint}").exit_code == 0
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=64).state_dict(), checkpoint)
    refused = run(tmp_path / "out", "--checkpoint", f"evit={checkpoint}", keep_rates="0.5,0.7")
    assert refused.exit_code == 2 and f"other files behind checkpoint {checkpoint}" in refused.output


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_a_run_lists_the_data_folder_once_however_many_resolutions(tmp_path, monkeypatch):
    """The checks of the options, the fingerprint and the decodes (here two, one per resolution) share one
    listing. Each listing of ImageNet's 50,000 files takes a while."""
    listings = []
    folder_samples = data_module.folder_samples
    monkeypatch.setattr(data_module, "folder_samples", lambda root: listings.append(root) or folder_samples(root))
    root = synset_tree(tmp_path / "val")
    args = ["--data", str(root), "--cache-dir", str(tmp_path / "cache"), "--resolutions", "64,96"]
    assert run(tmp_path / "out", *args).exit_code == 0
    assert len(listings) == 1
