"""The `bench` CLI end to end on deit_tiny at 64x64 (16 patches): small enough to run many times."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

import methods
from bench import cli
from harness import sweep as sweep_module

FAST = ["--model", "deit_tiny_patch16_224", "--resolutions", "64", "--device", "cpu", "--batch-size", "2"]
FAST += ["--warmup", "0", "--iters", "1", "--windows", "2", "--quiet"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run(out, *args: str):
    return invoke("run", *FAST, "--out", str(out), *args)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run(out, "--methods", "evit,prune", "--keep-rates", "0.5,0.7")
    assert result.exit_code == 0, result.output
    return out


def test_list_shows_every_method_with_its_options():
    result = invoke("list")
    assert result.exit_code == 0
    for name in methods.list_methods():
        assert f"{name}:" in result.output
    assert "keep_rate = 0.7" in result.output and "locations = (3, 6, 9)" in result.output


def test_run_writes_one_row_per_configuration(small_run):
    records = pd.read_csv(small_run / "records.csv")
    assert sorted(zip(records["method"], records["keep_rate"])) == [
        ("evit", 0.5),
        ("evit", 0.7),
        ("prune", 0.5),
        ("prune", 0.7),
        ("vanilla", 1.0),
    ]
    for column in ["gmacs", "tokens_per_block", "img_per_s", "img_per_s_iqr", "speedup", "batch_size", "device_name"]:
        assert records[column].notna().all(), column
    for column in ["git_commit", "torch", "timm", "date_utc", "protocol", "method_options"]:
        assert column in records.columns, column
    vanilla = records[records["method"] == "vanilla"].iloc[0]
    assert vanilla["speedup"] == 1.0 and vanilla["tokens_per_block"] == " ".join(["17"] * 12)
    evit = records[(records["method"] == "evit") & (records["keep_rate"] == 0.5)].iloc[0]
    assert evit["tokens_per_block"].split()[3] == str(1 + 8 + 1)  # 16 patches: 8 kept + the fused token
    assert evit["gmacs"] < vanilla["gmacs"]
    assert json.loads(evit["method_options"]) == {"keep_rate": 0.5, "locations": [3, 6, 9]}


def test_report_compares_against_vanilla(small_run):
    result = invoke("report", str(small_run))
    assert result.exit_code == 0
    report = pd.read_csv(small_run / "report.csv")
    records = pd.read_csv(small_run / "records.csv")
    base = records[records["method"] == "vanilla"]["gmacs"].iloc[0]
    prune = records[(records["method"] == "prune") & (records["keep_rate"] == 0.5)]["gmacs"].iloc[0]
    row = report[(report["method"] == "prune") & (report["keep_rate"] == 0.5)].iloc[0]
    assert row["mac_reduction_pct"] == pytest.approx(100 * (1 - prune / base))
    assert row["ideal_speedup"] == pytest.approx(base / prune)
    speedup = records[(records["method"] == "prune") & (records["keep_rate"] == 0.5)]["speedup"].iloc[0]
    assert row["pct_of_ideal"] == pytest.approx(100 * speedup * prune / base)
    assert report.iloc[0]["method"] == "vanilla"
    assert "| prune" in (small_run / "report.md").read_text() and "64x64" in result.output


def test_plot_has_one_line_per_method(small_run):
    from harness.plot import trade_off_figure
    from harness.records import read_records

    result = invoke("plot", str(small_run))
    assert result.exit_code == 0
    for suffix in ("png", "svg"):
        assert (small_run / f"tradeoff_64.{suffix}").stat().st_size > 1000
    figure = trade_off_figure(read_records(small_run))
    for ax in figure.axes:
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 0]
        assert len(lines) == 2  # evit and prune, each across its two keep rates
        assert all(len(line.get_xdata()) == 2 for line in lines)
        assert ax.get_xlabel() == "keep rate"


def test_rerun_resumes_without_redoing_rows(small_run, monkeypatch):
    measured = []
    original = sweep_module.Sweeper.measure
    monkeypatch.setattr(sweep_module.Sweeper, "measure", lambda self, job: measured.append(job) or original(self, job))
    result = run(small_run, "--methods", "evit,prune", "--keep-rates", "0.5,0.7,0.9")
    assert result.exit_code == 0
    assert sorted((job.method, job.keep_rate) for job in measured) == [("evit", 0.9), ("prune", 0.9)]
    assert len(pd.read_csv(small_run / "records.csv")) == 7


def test_interrupted_sweep_keeps_finished_rows_and_resumes(tmp_path, monkeypatch):
    original = sweep_module.Sweeper.measure
    calls = []

    def dies_on_third(self, job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, job)

    monkeypatch.setattr(sweep_module.Sweeper, "measure", dies_on_third)
    interrupted = run(tmp_path, "--methods", "evit", "--keep-rates", "0.5,0.7,0.9")
    assert interrupted.exit_code == 1 and "Aborted" in interrupted.output  # what Ctrl-C shows
    assert len(pd.read_csv(tmp_path / "records.csv")) == 2
    assert not list(tmp_path.glob(".*.tmp"))

    calls.clear()
    monkeypatch.setattr(sweep_module.Sweeper, "measure", lambda self, job: calls.append(job) or original(self, job))
    assert run(tmp_path, "--methods", "evit", "--keep-rates", "0.5,0.7,0.9").exit_code == 0
    assert [job.keep_rate for job in calls] == [0.7, 0.9]  # the row being measured when it died, and the next
    assert len(pd.read_csv(tmp_path / "records.csv")) == 4


def test_check_passes_on_its_own_baseline_and_fails_on_a_planted_regression(small_run, tmp_path):
    baseline = tmp_path / "baseline.csv"
    assert invoke("check", str(small_run), "--baseline", str(baseline), "--update").exit_code == 0
    passed = invoke("check", str(small_run), "--baseline", str(baseline))
    assert passed.exit_code == 0 and "ok:" in passed.output

    planted = pd.read_csv(baseline)
    row = (planted["method"] == "evit") & (planted["keep_rate"] == 0.5)
    planted.loc[row, "speedup"] *= 1.5  # the baseline says evit was much faster than this run shows
    planted.to_csv(baseline, index=False)
    failed = invoke("check", str(small_run), "--baseline", str(baseline), "--tolerance", "0.1")
    assert failed.exit_code == 1
    regressions = [line for line in failed.output.splitlines() if line.startswith("REGRESSION")]
    assert len(regressions) == 1 and "evit keep=0.5 @64" in regressions[0]


def test_check_names_baseline_rows_the_run_lacks(small_run, tmp_path):
    baseline = tmp_path / "baseline.csv"
    invoke("check", str(small_run), "--baseline", str(baseline), "--update")
    extra = pd.read_csv(baseline)
    extra = pd.concat([extra, extra[extra["method"] == "evit"].head(1).assign(keep_rate=0.3)])
    extra.to_csv(baseline, index=False)
    result = invoke("check", str(small_run), "--baseline", str(baseline))
    assert result.exit_code == 1 and "MISSING evit keep=0.3" in result.output


def test_yaml_sweep_file_with_options_overriding_it(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("methods: [prune]\nkeep-rates: [0.5, 0.9]\nmethod_args:\n  prune:\n    locations: [1, 2]\n")
    result = run(tmp_path / "out", "--config", str(config), "--keep-rates", "0.6")
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "out" / "records.csv")
    prune = records[records["method"] == "prune"]
    assert prune["keep_rate"].tolist() == [0.6]
    assert json.loads(prune["method_options"].iloc[0])["locations"] == [1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "evit,nonexistent"], "unknown method nonexistent; known:"),
        (["--keep-rates", "0.5,abc"], "comma-separated list of keep rates"),
        (["--keep-rates", "1.5"], "keep_rate must be a number in (0, 1]"),
        (["--resolutions", "64,70"], "image size 70 is not divisible by its patch size 16x16"),
        (["--model", "resnet10t"], "VisionTransformer"),
        (["--model", "deit_nano_patch3"], "deit_nano_patch3"),
        (["--method-args", "evit:keep=0.5"], "method 'evit' has no option 'keep'"),
        (["--method-args", "evit:locations=[3, 40]"], "beyond the model's depth"),
        (["--method-args", "evit-locations"], "METHOD:key=value"),
        (["--checkpoint", "evit=/no/such/file.pth"], "checkpoint for evit not found"),
        (["--checkpoint", "evit"], "METHOD=PATH"),
        (["--data", "/no/such/folder"], "data folder not found"),
        (["--precision", "fp64"], "fp64"),
        (["--precision", "fp16"], "precision fp16 does not run on CPU; allowed on CPU: fp32, bf16"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", *FAST, "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (out / "records.csv").exists()  # nothing half-written


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["run", *FAST, "--methods", "evit", "--out", str(blocker / "run")])
    assert result.exit_code == 2 and "cannot write to output folder" in result.output


def test_viz_draws_one_figure_per_image_and_method(tmp_path):
    from PIL import Image

    photo = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), "teal").save(photo)
    args = ["viz", str(photo), "--model", "deit_tiny_patch16_224", "--methods", "evit,prune", "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match="random weights"):
        result = invoke(*args)
    assert result.exit_code == 0, result.output
    for method in ("evit", "prune"):
        assert (tmp_path / f"wide_{method}.png").stat().st_size > 1000


def test_viz_without_an_image_uses_matplotlibs_sample(tmp_path):
    with pytest.warns(UserWarning, match="random weights"):
        result = invoke("viz", "--model", "deit_tiny_patch16_224", "--methods", "prune", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grace_hopper_prune.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/photo.jpg"], "/no/such/photo.jpg"),
        (["--methods", "nonexistent"], "unknown method nonexistent"),
        (["--keep-rate", "2"], "keep"),
    ],
)
def test_viz_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["viz", "--model", "deit_tiny_patch16_224", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_each_warning_is_shown_once_per_command(tmp_path):
    """fvcore's tracing makes Python forget shown warnings; the CLI still shows each one once."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(tmp_path, "--methods", "dynamicvit", "--keep-rates", "0.5,0.7").exit_code == 0
    assert len([w for w in caught if "predictors are untrained" in str(w.message)]) == 1


def test_no_untrained_warning_when_a_dynamicvit_checkpoint_is_loaded(tmp_path):
    import warnings

    import timm
    import torch

    model = timm.create_model("deit_tiny_patch16_224", img_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = methods.apply(model, "dynamicvit").state_dict()
    torch.save({"model": weights}, tmp_path / "dynamicvit.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = [
            "--methods",
            "dynamicvit",
            "--keep-rates",
            "0.7",
            "--checkpoint",
            f"dynamicvit={tmp_path}/dynamicvit.pth",
        ]
        result = run(tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "predictors are untrained" in str(w.message)]
