"""The `bench` CLI end to end on deit_tiny at 64x64 (16 patches): small enough to run many times."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from click.testing import CliRunner

import methods
from bench import cli
from harness.measure.throughput import ThroughputResult
from harness.run import sweep as sweep_module
from harness.run.records import RECORD_COLUMNS
from harness.run.sweep_config import with_absolute_paths
from methods.timm_compat import applied_method
from tests.test_accuracy import noise_tree

TIMING = ["--resolutions", "64", "--device", "cpu", "--warmup", "0", "--iters", "1", "--windows", "2", "--quiet"]
FAST = ["--model", "deit_tiny_patch16_224", "--batch-size", "2", *TIMING]


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
    listed = " ".join(result.output.split())
    assert "variant = 'paper' \"paper\" (representative token" in listed
    assert "r = None tokens merged at each location" in listed


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


def test_plot_has_one_line_per_method_and_the_ideal_beside_throughput(small_run):
    from harness.run.plot import IDEAL_LABEL, trade_off_figure
    from harness.run.records import read_records

    result = invoke("plot", str(small_run))
    assert result.exit_code == 0
    for suffix in ("png", "svg"):
        assert (small_run / f"tradeoff_64.{suffix}").stat().st_size > 1000
    records = read_records(small_run)
    figure = trade_off_figure(records)
    panels = {(ax.get_xlabel(), ax.get_ylabel()): ax for ax in figure.axes}
    throughput = "throughput (img/s): vanilla's x speedup"
    assert set(panels) == {("keep rate", throughput), ("keep rate", "GMACs"), ("GMACs", throughput)}
    for ax in panels.values():
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
        assert len(lines) == 2  # evit and prune, each across its two keep rates
    ideal = [line for line in panels["GMACs", throughput].get_lines() if line.get_label() == IDEAL_LABEL]
    vanilla = records[records["method"] == "vanilla"].iloc[0]
    base = records["reference_img_per_s"].median()
    x, y = ideal[0].get_xdata(), ideal[0].get_ydata()
    assert y[x.argmax()] == pytest.approx(base)  # at vanilla's GMACs, vanilla's img/s
    assert y[x.argmin()] == pytest.approx(base * vanilla["gmacs"] / records["gmacs"].min())


def test_plotted_throughput_follows_the_speedups_not_each_rows_own_windows():
    """evit 0.7's own windows ran on a machine twice as fast (225 img/s) as vanilla's own row (100): plotted
    at the vanilla img/s (the median of the vanilla runs timed beside each row: 100, 200, 100) x its
    speedup, it sits where its speedup says, 1.125 x vanilla, not 2.25 x."""
    from harness.run.plot import trade_off_figure

    group = pd.DataFrame(
        {
            "method": ["vanilla", "evit", "evit"],
            "keep_rate": [1.0, 0.7, 0.5],
            "img_per_s": [100.0, 225.0, 150.0],
            "reference_img_per_s": [100.0, 200.0, 100.0],
            "speedup": [1.0, 1.125, 1.5],
            "gmacs": [4.6, 3.0, 2.3],
            "top1": [float("nan")] * 3,
            **{"device": "cpu", "model": "deit_small_patch16_224", "resolution": 224, "batch_size": 8},
            **{"batch_size_requested": "8", "mode": "fp32 weights, eager"},
        }
    )
    panels = {(ax.get_xlabel(), ax.get_ylabel()): ax for ax in trade_off_figure(group).axes}
    ax = panels["keep rate", "throughput (img/s): vanilla's x speedup"]
    (evit,) = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
    assert sorted(zip(evit.get_xdata(), evit.get_ydata())) == [(0.5, 150.0), (0.7, 112.5)]


def test_the_report_carries_real_top1_and_its_change_against_vanilla(small_run):
    from harness.run.records import read_records
    from harness.run.report import build_report

    records = read_records(small_run)
    assert build_report(records)["top1_real"].isna().all()  # measured without --real-labels
    assert build_report(records.drop(columns=["top1_real"]))["top1_real_delta"].isna().all()  # older records
    by_hand = [90.0 if method == "vanilla" else 80.0 + keep for method, keep in records[["method", "keep_rate"]].values]
    records["top1_real"], records["top1"] = by_hand, [value - 10 for value in by_hand]
    report = build_report(records)
    row = report[(report["method"] == "evit") & (report["keep_rate"] == 0.5)].iloc[0]
    assert row["top1_real"] == 80.5 and row["top1_real_delta"] == pytest.approx(-9.5)
    assert row["top1"] == 70.5 and row["top1_delta"] == pytest.approx(-9.5)  # method minus vanilla
    order = [(method, keep) for method, keep in report[["method", "keep_rate"]].values]
    assert order == [("vanilla", 1.0), ("evit", 0.7), ("evit", 0.5), ("prune", 0.7), ("prune", 0.5)]


def test_report_and_plot_take_a_records_csv_and_write_beside_it(small_run, tmp_path):
    loose = tmp_path / "loose.csv"
    loose.write_bytes((small_run / "records.csv").read_bytes())
    assert invoke("report", str(loose)).exit_code == 0 and invoke("report", str(small_run)).exit_code == 0
    assert pd.read_csv(tmp_path / "loose.report.csv").equals(pd.read_csv(small_run / "report.csv"))
    assert invoke("plot", str(loose)).exit_code == 0 and (tmp_path / "loose.tradeoff_64.png").is_file()
    assert "RUN is a run folder, or a records CSV" in invoke("report", "--help").output
    assert invoke("report", str(small_run / "records.csv")).exit_code == 0  # a run's own: the run's names
    assert sorted(path.name for path in small_run.glob("report.*")) == ["report.csv", "report.md"]


def test_two_records_csvs_in_one_folder_keep_their_own_report_and_figures(small_run, tmp_path):
    records = pd.read_csv(small_run / "records.csv")
    records.to_csv(tmp_path / "cpu.csv", index=False)
    records[records["method"].isin(["vanilla", "evit"])].to_csv(tmp_path / "gpu.csv", index=False)
    for name in ("cpu", "gpu"):
        assert invoke("plot", str(tmp_path / f"{name}.csv")).exit_code == 0
        assert invoke("report", str(tmp_path / f"{name}.csv")).exit_code == 0
    assert (tmp_path / "cpu.tradeoff_64.png").is_file() and (tmp_path / "gpu.tradeoff_64.png").is_file()
    assert set(pd.read_csv(tmp_path / "cpu.report.csv")["method"]) == {"vanilla", "evit", "prune"}
    assert set(pd.read_csv(tmp_path / "gpu.report.csv")["method"]) == {"vanilla", "evit"}


def timed_at(img_per_s: float) -> ThroughputResult:
    return ThroughputResult(img_per_s, img_per_s, img_per_s, 0.0, 2, 0, "cpu (fake)", {"fake": True})


def test_each_speedup_is_its_model_over_the_vanilla_timed_with_it(tmp_path, monkeypatch):
    """Fake timings by role (method 30 img/s, floor twin 40, vanilla 20; vanilla's own row 25): a row's
    figures are those ratios, and each role was timed on its own model: the method as applied, the twin at
    the method's token counts, vanilla."""
    rates = {"method": 30.0, "floor": 40.0, "reference": 20.0}

    def interleaved(models, img_size, config):
        assert applied_method(models["method"]).name == "evit"
        twin = applied_method(models["floor"])
        assert twin.counts == methods.block_token_counts(models["method"], img_size)
        assert applied_method(models["reference"]).name == "vanilla"
        return {role: timed_at(rates[role]) for role in models}

    monkeypatch.setattr(sweep_module, "measure_interleaved", interleaved)
    monkeypatch.setattr(sweep_module, "measure_throughput", lambda model, img_size, config: timed_at(25.0))
    assert run(tmp_path, "--methods", "evit", "--keep-rates", "0.5").exit_code == 0
    records = pd.read_csv(tmp_path / "records.csv").set_index("method")
    evit, vanilla = records.loc["evit"], records.loc["vanilla"]
    assert (evit["img_per_s"], evit["reference_img_per_s"], evit["floor_img_per_s"]) == (30.0, 20.0, 40.0)
    assert (evit["speedup"], evit["floor_speedup"]) == (1.5, 2.0)
    assert (vanilla["img_per_s"], vanilla["speedup"], vanilla["floor_speedup"]) == (25.0, 1.0, 1.0)


def test_macs_and_token_counts_are_counted_at_each_resolution(tmp_path):
    result = invoke(
        "run", *FAST, "--out", str(tmp_path), "--methods", "evit", "--keep-rates", "0.5", "--resolutions", "64,96"
    )
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "records.csv")
    for method, patches in (("vanilla", (16, 36)), ("evit", (16, 36))):
        rows = records[records["method"] == method].set_index("resolution")
        assert [int(rows.loc[size, "tokens_per_block"].split()[0]) for size in (64, 96)] == [1 + p for p in patches]
        assert rows.loc[96, "gmacs"] > rows.loc[64, "gmacs"]


def test_rerun_resumes_without_redoing_rows(small_run, monkeypatch):
    measured = []
    original = sweep_module.Sweeper.measure
    monkeypatch.setattr(sweep_module.Sweeper, "measure", lambda self, job: measured.append(job) or original(self, job))
    result = run(small_run, "--methods", "evit,prune", "--keep-rates", "0.5,0.7,0.9")
    assert result.exit_code == 0
    assert sorted((job.method, job.keep_rate) for job in measured) == [("evit", 0.9), ("prune", 0.9)]
    assert len(pd.read_csv(small_run / "records.csv")) == 7


def test_each_row_is_dated_when_it_was_measured(tmp_path, monkeypatch):
    """Not when the run began: a sweep can take hours, and a resumed one days."""
    times = iter(f"2026-12-03T10:00:0{second}+00:00" for second in range(9))
    monkeypatch.setattr(sweep_module, "utc_now", lambda: next(times))
    assert run(tmp_path / "out", "--methods", "evit", "--keep-rates", "0.5,0.7").exit_code == 0
    dates = pd.read_csv(tmp_path / "out" / "records.csv")["date_utc"].tolist()
    assert dates == [f"2026-12-03T10:00:0{second}+00:00" for second in range(3)]  # vanilla, evit 0.5, evit 0.7


def test_a_rerun_with_another_timing_protocol_is_refused_not_taken_for_done(small_run):
    """Its rows would be skipped as measured, though measured otherwise."""
    before = (small_run / "records.csv").read_text()
    threads = json.loads((small_run / "run.json").read_text())["threads"]  # torch's, as none was given
    assert threads == torch.get_num_threads()
    for args, change in [(["--threads", str(threads + 1)], f"threads={threads}"), (["--windows", "5"], "windows=2")]:
        result = CliRunner().invoke(cli, ["run", *FAST, "--out", str(small_run), "--methods", "evit", *args])
        assert result.exit_code == 2 and f"holds rows measured with {change}; this run asks" in result.output
    assert (small_run / "records.csv").read_text() == before
    assert json.loads((small_run / "run.json").read_text())["windows"] == 2
    args = ["run", *FAST, "--out", str(small_run), "--methods", "evit", "--keep-rates", "0.5"]
    same = CliRunner().invoke(cli, [*args, "--threads", str(threads)])
    assert same.exit_code == 0 and "0 new rows" in same.output  # torch's count given explicitly: the same protocol


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


@pytest.mark.parametrize("factor,regressed", [(1.05, False), (1.15, True)])
def test_check_allows_ten_percent_by_default(small_run, tmp_path, factor, regressed):
    baseline = tmp_path / "baseline.csv"
    invoke("check", str(small_run), "--baseline", str(baseline), "--update")
    planted = pd.read_csv(baseline)
    planted.loc[planted["method"] == "prune", "speedup"] *= factor  # 0.95 or 0.87 of it measured
    planted.to_csv(baseline, index=False)
    result = invoke("check", str(small_run), "--baseline", str(baseline))
    assert result.exit_code == (1 if regressed else 0), result.output


def test_a_tolerance_that_would_pass_everything_is_refused(small_run, tmp_path):
    baseline = tmp_path / "baseline.csv"
    invoke("check", str(small_run), "--baseline", str(baseline), "--update")
    result = invoke("check", str(small_run), "--baseline", str(baseline), "--tolerance", "1.0")
    assert result.exit_code == 2 and "tolerance must be in [0, 1), got 1.0" in result.output


def test_check_matches_rows_that_differ_by_checkpoint_each_to_its_own(small_run, tmp_path):
    """A folder where evit ran on vanilla's weights and, in a later run, on a checkpoint of its own: the
    baseline written from it keeps the two apart, and a regression names the weights it was measured on."""
    run_dir, baseline = tmp_path / "run", tmp_path / "baseline.csv"
    run_dir.mkdir()
    records = pd.read_csv(small_run / "records.csv")
    evit = records[(records["method"] == "evit") & (records["keep_rate"] == 0.5)]
    records = pd.concat([records, evit.assign(checkpoint="/w/evit.pth", speedup=evit["speedup"] * 2)])
    records.to_csv(run_dir / "records.csv", index=False)
    assert invoke("check", str(run_dir), "--baseline", str(baseline), "--update").exit_code == 0
    assert invoke("check", str(run_dir), "--baseline", str(baseline)).exit_code == 0
    planted = pd.read_csv(baseline)
    planted.loc[planted["checkpoint"] == "/w/evit.pth", "speedup"] *= 1.5
    planted.to_csv(baseline, index=False)
    failed = invoke("check", str(run_dir), "--baseline", str(baseline))
    regressions = [line for line in failed.output.splitlines() if line.startswith("REGRESSION")]
    assert failed.exit_code == 1 and len(regressions) == 1 and "weights evit.pth" in regressions[0]
    elsewhere = pd.read_csv(baseline).replace("/w/evit.pth", "/home/alice/evit.pth")  # committed on another machine
    elsewhere.loc[elsewhere["checkpoint"] == "/home/alice/evit.pth", "speedup"] /= 1.5
    elsewhere.to_csv(baseline, index=False)
    assert invoke("check", str(run_dir), "--baseline", str(baseline)).exit_code == 0


def test_yaml_sweep_file_with_options_overriding_it(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("methods: [prune]\nkeep-rates: [0.5, 0.9]\nmethod_args:\n  prune:\n    locations: [1, 2]\n")
    result = run(tmp_path / "out", "--config", str(config), "--keep-rates", "0.6")
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "out" / "records.csv")
    prune = records[records["method"] == "prune"]
    assert prune["keep_rate"].tolist() == [0.6]
    assert json.loads(prune["method_options"].iloc[0])["locations"] == [1, 2]


def test_tome_given_r_runs_once_per_group_at_the_share_of_patches_it_leaves(tmp_path, monkeypatch):
    """r sets how much ToMe merges, so the keep rates do not apply to it: one row, whose keep_rate is what
    ToMe's keep_rate means (patch tokens left after the last merge): r = 1 in each of 12 blocks leaves 4 of 16."""
    args = ["--methods", "tome,prune", "--keep-rates", "0.5,0.7", "--method-args", "tome:r=1"]
    result = run(tmp_path, *args)
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "records.csv")
    assert sorted(zip(records["method"], records["keep_rate"])) == [
        ("prune", 0.5),
        ("prune", 0.7),
        ("tome", 0.25),
        ("vanilla", 1.0),
    ]
    tome = records[records["method"] == "tome"].iloc[0]
    assert tome["tokens_per_block"].split() == [str(1 + 16 - block) for block in range(1, 13)]
    assert json.loads(tome["method_options"])["r"] == 1 and json.loads(tome["method_options"])["keep_rate"] is None
    monkeypatch.setattr(sweep_module.Sweeper, "measure", lambda self, job: pytest.fail(f"re-measured {job}"))
    assert run(tmp_path, *args).exit_code == 0  # resumed: every row is done


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
        (["--method-args", "evit:keep_rate=0.3"], "keep_rate is the sweep's axis (keep_rates), not an option of evit"),
        (["--checkpoint", "evit=/no/such/file.pth"], "checkpoint for evit not found"),
        (["--checkpoint", "evit"], "METHOD=PATH"),
        (["--data", "/no/such/folder"], "data folder not found"),
        (["--precision", "fp64"], "fp64"),
        (["--precision", "fp16"], "precision fp16 does not run on CPU; allowed on CPU: fp32, bf16"),
        (["--keep-rates", "0.7,0.70"], "keep rates repeat: 0.7, 0.7"),
        (["--methods", "evit,evit"], "methods repeat: evit, evit"),
        (["--resolutions", "64,64"], "resolutions repeat: 64, 64"),
        (["--method-args", "evit:locations={"], "cannot read locations={: expected a YAML scalar or [list]"),
        (["--method-args", "tome:r=abc"], "r must be a non-negative int"),  # tome is not run: still checked
        (["--limit", "5"], "a limit or a class subset of the images needs the images: give --data"),
        (["--keep-rates", "0.5,,0.7"], "Invalid value for '--keep-rates': an empty item in '0.5,,0.7'"),
        (["--resolutions", "64,"], "Invalid value for '--resolutions': an empty item in '64,'"),
        (["--checkpoint", "evit=a.pth", "--checkpoint", "evit = b.pth"], "evit is given twice (a.pth, b.pth)"),
        (["--method-args", "evit:locations=[3],locations=[4]"], "evit:locations is given twice"),
        (["--class-subset", "present"], "a limit or a class subset of the images needs the images: give --data"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", *FAST, "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (out / "records.csv").exists()  # nothing half-written


def test_a_checkpoint_for_a_method_not_run_is_named_in_a_warning(tmp_path):
    (tmp_path / "tome.pth").write_bytes(b"never read")
    result = run(
        tmp_path / "out", "--methods", "evit", "--keep-rates", "0.5", "--checkpoint", f"tome={tmp_path}/tome.pth"
    )
    assert result.exit_code == 0, result.output
    assert "warning: checkpoints for tome are not used: not among the methods run" in result.output


@pytest.mark.parametrize("threads,warned", [(2, False), (3, True)])
def test_more_threads_than_cores_is_warned_of(monkeypatch, threads, warned):
    from harness.run import sweep_config

    monkeypatch.setattr(sweep_config, "usable_cores", lambda: 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep_config.SweepConfig(device="cpu", methods=("evit",), threads=threads)
    messages = [str(warning.message) for warning in caught]
    assert (
        "threads 3 is more than the 2 cores this process may use: the threads would take turns" in " ".join(messages)
    ) == warned, messages


def test_method_args_for_a_method_not_run_are_named_in_a_warning(tmp_path):
    result = run(tmp_path / "out", "--methods", "evit", "--keep-rates", "0.5", "--method-args", "tome:r=8")
    assert result.exit_code == 0, result.output
    assert "warning: method args for tome are not used: not among the methods run" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-sizes", "0"], "comma-separated list of batch sizes (ints >= 1, or max)"),
        (["--batch-sizes", "2,abc"], "comma-separated list of batch sizes (ints >= 1, or max)"),
        (["--batch-sizes", "2,max"], "batch size max (searched) is for GPUs; on CPU give ints >= 1"),
        (["--batch-size", "0"], "expected a batch size (an int >= 1, or max)"),
        (["--batch-size", "2", "--batch-sizes", "2,4"], "give batch_size or batch_sizes, not both"),
        (["--models", "deit_tiny_patch16_224,no_such_vit"], "timm has no model 'no_such_vit'"),
        (["--model", "deit_tiny_patch16_224", "--models", "vit_tiny_patch16_224"], "give model or models, not both"),
        (["--cuda-graphs"], "CUDA graphs need a CUDA device; on CPU run without --cuda-graphs"),
        (["--model-dtype", "fp16"], "fp16 weights do not run on CPU; allowed on CPU: fp32, bf16"),
        (["--precision", "bf16", "--model-dtype", "bf16"], "precision bf16 (autocast) and model dtype bf16 (weights)"),
    ],
)
def test_bad_axes_and_modes_are_one_clear_line_and_exit_code_2(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", *TIMING, "--methods", "evit", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # Click may wrap a long line
    assert "Traceback" not in result.output and not out.exists()


AXES = ["--models", "deit_tiny_patch16_224,vit_tiny_patch16_224", "--methods", "evit", "--keep-rates", "0.5"]


@pytest.fixture(scope="module")
def axes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("axes")
    result = invoke("run", *TIMING, *AXES, "--batch-sizes", "1,2", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_models_and_batch_sizes_are_axes_each_group_led_by_its_reference(axes_run):
    records = pd.read_csv(axes_run / "records.csv")
    groups = [(m, b) for m in ("deit_tiny_patch16_224", "vit_tiny_patch16_224") for b in (1, 2)]
    assert list(zip(records["model"], records["batch_size"], records["method"])) == [
        (model, batch, method) for model, batch in groups for method in ("vanilla", "evit")
    ]
    assert records["config_key"].nunique() == len(records) == 8
    assert (records["floor_img_per_s"] > 0).all() and (records["floor_speedup"] > 0).all()
    vanilla = records[records["method"] == "vanilla"]
    assert (vanilla["floor_speedup"] == 1.0).all() and (vanilla["speedup"] == 1.0).all()
    evit = records[records["method"] == "evit"]
    assert (evit["speedup"] == evit["img_per_s"] / evit["reference_img_per_s"]).all()
    assert (evit["floor_speedup"] == evit["floor_img_per_s"] / evit["reference_img_per_s"]).all()
    assert set(records["mode"]) == {"fp32 weights, eager"} and set(records["model_dtype"]) == {"fp32"}
    assert set(records["batch_size_requested"].astype(str)) == {"1", "2"}


def test_the_resume_key_holds_model_and_batch_size(axes_run, monkeypatch):
    measured = []
    original = sweep_module.Sweeper.measure
    monkeypatch.setattr(sweep_module.Sweeper, "measure", lambda self, job: measured.append(job) or original(self, job))
    result = invoke("run", *TIMING, *AXES, "--batch-sizes", "1,2,4", "--out", str(axes_run))
    assert result.exit_code == 0, result.output
    assert sorted((job.model, job.batch_size, job.method) for job in measured) == [
        (model, 4, method)
        for model in ("deit_tiny_patch16_224", "vit_tiny_patch16_224")
        for method in ("evit", "vanilla")
    ]


def test_report_groups_by_model_resolution_batch_and_mode_with_the_floor(axes_run):
    result = invoke("report", str(axes_run))
    assert result.exit_code == 0
    report = pd.read_csv(axes_run / "report.csv")
    records = pd.read_csv(axes_run / "records.csv")
    assert "## vit_tiny_patch16_224 at 64x64, batch 2, fp32 weights, eager" in result.output
    merged = report.merge(records, on=["model", "batch_size", "method"], suffixes=("", "_record"))
    assert merged["reference_img_per_s"].tolist() == merged["reference_img_per_s_record"].tolist()
    evit = merged[merged["method"] == "evit"]
    assert evit["pct_of_floor"].tolist() == pytest.approx((100 * evit["speedup"] / evit["floor_speedup"]).tolist())


def test_speedup_against_batch_size_with_the_floor_dashed_and_no_gain_marked(axes_run):
    from harness.run.plot import speedup_vs_batch_figure

    result = invoke("plot", str(axes_run))
    assert result.exit_code == 0, result.output
    for model in ("deit_tiny_patch16_224", "vit_tiny_patch16_224"):
        assert (axes_run / f"speedup_vs_batch_{model}_64.png").stat().st_size > 1000
        assert (axes_run / f"tradeoff_{model}_64_b1.png").is_file()
    records = pd.read_csv(axes_run / "records.csv")
    ax = speedup_vs_batch_figure(records[records["model"] == "vit_tiny_patch16_224"]).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["evit 0.5 floor"].get_linestyle() == "--" and lines["evit 0.5"].get_linestyle() == "-"
    assert sorted(lines["evit 0.5"].get_xdata()) == [1, 2, 4] and ax.get_xscale() == "log"
    assert list(lines["vanilla (no gain)"].get_ydata()) == [1.0, 1.0]


def test_bf16_weights_on_cpu_are_recorded_as_the_mode(tmp_path):
    result = run(tmp_path, "--methods", "prune", "--keep-rates", "0.7", "--model-dtype", "bf16")
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "records.csv")
    assert set(records["model_dtype"]) == {"bf16"} and set(records["mode"]) == {"bf16 weights, eager"}
    assert json.loads(records["protocol"].iloc[1])["model_dtype"] == "bf16"


def test_yaml_takes_the_list_forms_of_models_and_batch_sizes(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("models: [vit_tiny_patch16_224]\nbatch_sizes: [1, 2]\nmethods: [prune]\nkeep_rates: [0.7]\n")
    result = invoke("run", *TIMING, "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    records = pd.read_csv(tmp_path / "out" / "records.csv")
    assert set(records["model"]) == {"vit_tiny_patch16_224"} and sorted(set(records["batch_size"])) == [1, 2]


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
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    # One line for the methods without weights, not one per method.
    assert result.output.count("warning:") == 1, result.output
    assert "warning: no checkpoint for evit, prune, so deit_tiny_patch16_224 has random weights" in result.output
    for method in ("evit", "prune"):
        assert (tmp_path / f"wide_{method}.png").stat().st_size > 1000


def test_viz_without_an_image_uses_matplotlibs_sample(tmp_path):
    result = invoke("viz", "--model", "deit_tiny_patch16_224", "--methods", "prune", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output
    assert (tmp_path / "grace_hopper_prune.png").is_file()


@pytest.mark.parametrize("rank,warned", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_warnings(tmp_path, monkeypatch, rank, warned):
    """Every rank runs the same sweep and would say the same; rank 0 says it."""
    monkeypatch.setenv("RANK", rank)
    result = invoke("viz", "--model", "deit_tiny_patch16_224", "--methods", "prune", "--out", str(tmp_path))
    assert result.exit_code == 0 and ("warning: no checkpoint for prune" in result.output) == warned, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/photo.jpg"], "/no/such/photo.jpg"),
        (["--methods", "nonexistent"], "unknown method nonexistent"),
        (["--keep-rate", "2"], "keep"),
        (["/tmp"], "/tmp is a folder: give image files"),
    ],
)
def test_viz_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["viz", "--model", "deit_tiny_patch16_224", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.filterwarnings("default:dynamicvit:UserWarning")  # pyproject ignores it elsewhere
def test_warnings_are_one_plain_line_each_shown_once_per_command(tmp_path):
    """fvcore's tracing makes Python forget shown warnings; the CLI still shows each one once, as
    `warning: MESSAGE`, without Python's file:line prefix and source line."""
    result = run(tmp_path / "out", "--methods", "dynamicvit", "--keep-rates", "0.5,0.7", *labelled_data(tmp_path))
    assert result.exit_code == 0, result.output
    untrained = [line for line in result.output.splitlines() if "predictors are untrained" in line]
    assert len(untrained) == 1
    assert untrained[0].startswith("warning: dynamicvit: the score predictors are untrained")
    assert "UserWarning" not in result.output and ".py:" not in result.output


@pytest.mark.filterwarnings("default:dynamicvit:UserWarning")
def test_library_callers_keep_pythons_warnings():
    with pytest.warns(UserWarning, match="predictors are untrained"):
        methods.apply(timm.create_model("deit_tiny_patch16_224"), "dynamicvit")


@pytest.mark.filterwarnings("default:dynamicvit:UserWarning")
def test_a_throughput_only_sweep_does_not_warn_of_untrained_predictors(tmp_path):
    """Which tokens are kept does not change the timing: the warning is for accuracy (and pictures)."""
    result = run(tmp_path, "--methods", "dynamicvit", "--keep-rates", "0.7")
    assert result.exit_code == 0, result.output
    assert "predictors are untrained" not in result.output


@pytest.mark.filterwarnings("default:dynamicvit:UserWarning")
def test_no_untrained_warning_when_a_dynamicvit_checkpoint_is_loaded(tmp_path):
    import warnings

    import torch

    model = timm.create_model("deit_tiny_patch16_224", img_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = methods.apply(model, "dynamicvit").state_dict()
    torch.save({"model": weights}, tmp_path / "dynamicvit.pth")
    checkpoint = f"dynamicvit={tmp_path}/dynamicvit.pth"
    args = ["--methods", "dynamicvit", "--keep-rates", "0.7", "--checkpoint", checkpoint, *labelled_data(tmp_path)]
    result = run(tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    assert "predictors are untrained" not in result.output


def labelled_data(tmp_path) -> list[str]:
    """--data and --labels for a few noise images labelled for a 1000-class model."""
    root = noise_tree(tmp_path / "val")
    labels = tmp_path / "labels.csv"
    files = sorted(root.glob("*/*.JPEG"))
    labels.write_text("".join(f"{path.relative_to(root)},{int(path.parent.name[1:])}\n" for path in files))
    return ["--data", str(root), "--labels", str(labels)]


def test_check_matches_each_batch_size_against_its_own_baseline(axes_run, tmp_path):
    baseline = tmp_path / "baseline.csv"
    assert invoke("check", str(axes_run), "--baseline", str(baseline), "--update").exit_code == 0
    planted = pd.read_csv(baseline)
    assert {"batch_size_requested", "model_dtype", "cuda_graphs"} <= set(planted.columns)
    row = (planted["method"] == "evit") & (planted["batch_size_requested"] == 1)
    row &= planted["model"] == "vit_tiny_patch16_224"
    planted.loc[row, "speedup"] *= 1.5
    planted.to_csv(baseline, index=False)
    failed = invoke("check", str(axes_run), "--baseline", str(baseline))
    regressions = [line for line in failed.output.splitlines() if line.startswith("REGRESSION")]
    assert failed.exit_code == 1 and len(regressions) == 1 and "evit keep=0.5 @64 batch 1 cpu" in regressions[0]


def test_a_baseline_without_the_batch_column_is_refused_against_a_run_of_several_batches(axes_run, tmp_path):
    """Written before batch sizes were an axis, it would match each of its rows to every batch size."""
    baseline = tmp_path / "baseline.csv"
    assert invoke("check", str(axes_run), "--baseline", str(baseline), "--update").exit_code == 0
    old = pd.read_csv(baseline)
    old[old["batch_size_requested"] == 1].drop(columns=["batch_size_requested"]).to_csv(baseline, index=False)
    result = CliRunner().invoke(cli, ["check", str(axes_run), "--baseline", str(baseline)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "to several rows of the run (it lacks the columns batch_size_requested)" in result.output


def test_the_report_refuses_two_vanillas_in_one_group(small_run, tmp_path):
    """A folder from before run.json may hold runs of other data: each row would meet the first vanilla."""
    records = pd.read_csv(small_run / "records.csv")
    pd.concat([records, records[records["method"] == "vanilla"]]).to_csv(tmp_path / "records.csv", index=False)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "2 vanilla rows for deit_tiny_patch16_224 at 64x64" in result.output


def foreign_records(folder):
    (folder / "records.csv").write_text("a,b\n1,2\n")
    return "lack the columns model, method"


def empty_records(folder):
    (folder / "records.csv").write_text("")
    return "cannot read records"


def header_only_records(folder):
    (folder / "records.csv").write_text(",".join(RECORD_COLUMNS) + "\n")
    return "no rows in records"


def text_in_a_number(folder):
    vanilla = "m,vanilla,1.0,64,cpu,fp32,2,1.2,10.0,1.0,k1"
    (folder / "records.csv").write_text(f"{','.join(RECORD_COLUMNS)}\n{vanilla}\n{vanilla.replace('1.2', 'x')}\n")
    return "column gmacs holds 'x' on line 3, not a number"


@pytest.mark.parametrize("make", [foreign_records, empty_records, header_only_records, text_in_a_number])
@pytest.mark.parametrize("command", [["report"], ["plot"], ["check", "--baseline", "results/baselines/cpu-ci.csv"]])
def test_a_malformed_records_file_is_one_clear_line(tmp_path, make, command):
    message = make(tmp_path)
    result = CliRunner().invoke(cli, [command[0], str(tmp_path), *command[1:]])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_malformed_baseline_or_a_folder_for_one_is_one_clear_line(small_run, tmp_path):
    (tmp_path / "baseline.csv").write_text("model,speedup\nx,1\n")
    result = CliRunner().invoke(cli, ["check", str(small_run), "--baseline", str(tmp_path / "baseline.csv")])
    assert result.exit_code == 2 and "lack the columns method, method_options" in result.output
    result = CliRunner().invoke(cli, ["check", str(small_run), "--baseline", str(tmp_path), "--update"])
    assert result.exit_code == 2 and "is a folder: give the path of a CSV file" in result.output
    baseline = pd.read_csv("results/baselines/cpu-ci.csv")
    baseline["speedup"] = baseline["speedup"].astype(object)
    baseline.loc[1, "speedup"] = "abc"
    baseline.to_csv(tmp_path / "baseline.csv", index=False)
    result = CliRunner().invoke(cli, ["check", str(small_run), "--baseline", str(tmp_path / "baseline.csv")])
    assert result.exit_code == 2 and "column speedup holds 'abc' on line 3, not a number" in result.output


def test_macs_are_counted_once_for_all_batch_sizes(tmp_path, monkeypatch):
    counted = []
    original = sweep_module.count_macs
    monkeypatch.setattr(sweep_module, "count_macs", lambda model, size: counted.append(size) or original(model, size))
    args = ["--model", "deit_tiny_patch16_224", "--methods", "prune", "--keep-rates", "0.7", "--batch-sizes", "1,2,3"]
    result = invoke("run", *TIMING, *args, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "records.csv")) == 6 and len(counted) == 2  # vanilla and prune, once each


def test_stored_keys_that_are_not_ours_are_compared_as_they_are():
    nan = float("nan")  # an empty cell
    assert with_absolute_paths(nan) is nan
    for key in ["not json", "[1]", '{"data": 5}']:
        assert with_absolute_paths(key) == key
    resolved = json.loads(with_absolute_paths('{"data": "val", "checkpoint": null}'))
    assert resolved == {"data": str(Path("val").resolve()), "checkpoint": None}


def test_an_error_of_the_library_is_one_line_without_the_usage_banner(tmp_path):
    missing = tmp_path / "nothing"
    result = CliRunner().invoke(cli, ["report", str(missing)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: no records at {missing}: run `bench run --out {missing}` first"
    ]


def test_the_report_names_the_weights_of_each_row(small_run, tmp_path):
    """Two evit rows that differ only by checkpoint (a later run gave evit weights of its own) look alike
    unless the report says which weights each ran on."""
    records = pd.read_csv(small_run / "records.csv")
    evit = records[(records["method"] == "evit") & (records["keep_rate"] == 0.5)]
    pd.concat([records, evit.assign(checkpoint="/w/evit.pth")]).to_csv(tmp_path / "records.csv", index=False)
    assert invoke("report", str(tmp_path / "records.csv")).exit_code == 0
    report = pd.read_csv(tmp_path / "report.csv")
    rows = report[(report["method"] == "evit") & (report["keep_rate"] == 0.5)]
    assert sorted(rows["checkpoint"].fillna("")) == ["", "/w/evit.pth"]


def test_checkpoints_fit_one_model_only(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"never read")
    models = "deit_tiny_patch16_224,vit_tiny_patch16_224"
    result = invoke(
        "run", *TIMING, "--models", models, "--checkpoint", f"vanilla={tmp_path}/w.pth", "--out", str(tmp_path)
    )
    assert result.exit_code == 2 and "checkpoints fit one model: give one model with --checkpoint" in result.output


def test_another_mode_or_checkpoint_is_measured_not_taken_for_done(tmp_path):
    """The resume key holds the mode and each row's weights: a rerun in another mode measures every row
    again, one with a checkpoint for evit measures evit's rows only; a method without a checkpoint of its own
    runs on vanilla's and says so."""
    checkpoint = tmp_path / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=64).state_dict(), checkpoint)
    out, evit = tmp_path / "out", ["--methods", "evit", "--keep-rates", "0.5"]
    assert "2 new rows" in run(out, *evit).output
    assert "2 new rows" in run(out, *evit, "--model-dtype", "bf16").output
    assert "2 new rows" in run(out, *evit, "--precision", "bf16").output
    assert "1 new rows" in run(out, *evit, "--checkpoint", f"evit={checkpoint}").output
    records = pd.read_csv(out / "records.csv")
    assert records["checkpoint"].fillna("").tolist() == [""] * 6 + [str(checkpoint)]
    assert run(tmp_path / "other", *evit, "--checkpoint", f"vanilla={checkpoint}").exit_code == 0
    assert pd.read_csv(tmp_path / "other" / "records.csv")["checkpoint"].tolist() == [str(checkpoint)] * 2


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_say_when_top1_is_of_random_weights(small_run, tmp_path, command):
    records = pd.read_csv(small_run / "records.csv").assign(top1=50.0)
    records.to_csv(tmp_path / "records.csv", index=False)
    untrained = invoke(command, str(tmp_path / "records.csv"))
    assert untrained.exit_code == 0
    assert "warning: no checkpoint given: the top-1 of randomly initialised models means nothing" in untrained.output
    some = records.assign(checkpoint=["" if method == "vanilla" else "/w/evit.pth" for method in records["method"]])
    some.to_csv(tmp_path / "records.csv", index=False)
    partly = invoke(command, str(tmp_path / "records.csv"))
    vanillas = int((records["method"] == "vanilla").sum())
    assert f"warning: {vanillas} of {len(records)} rows hold the top-1 of randomly initialised" in partly.output
    records.assign(checkpoint="/w/deit_tiny.pth").to_csv(tmp_path / "records.csv", index=False)
    trained = invoke(command, str(tmp_path / "records.csv"))
    assert trained.exit_code == 0 and "randomly initialised" not in trained.output


def test_a_plot_removes_the_figures_its_last_plot_wrote_that_it_no_longer_writes(small_run, tmp_path):
    """Once a run gains a mode its figures' names carry the mode: the old tradeoff_64 would show stale rows.
    A figure the tool did not write stays, whatever its name."""
    records = pd.read_csv(small_run / "records.csv")
    records.to_csv(tmp_path / "records.csv", index=False)
    assert invoke("plot", str(tmp_path)).exit_code == 0 and (tmp_path / "tradeoff_64.png").is_file()
    (tmp_path / "tradeoff_mine.png").write_bytes(b"a user's own figure")
    bf16 = records.assign(mode="bf16 autocast, eager", precision="bf16")
    pd.concat([records, bf16]).to_csv(tmp_path / "records.csv", index=False)
    assert invoke("plot", str(tmp_path)).exit_code == 0
    figures = sorted(path.name for path in tmp_path.glob("tradeoff_*.png"))
    assert len(figures) == 3 and "tradeoff_64.png" not in figures and "tradeoff_mine.png" in figures
    assert not list(tmp_path.glob("tradeoff_64.*"))


def test_compile_warms_up_past_its_compilations_by_default():
    """The CPU default of one warm-up call left compilations inside the timed windows."""
    from harness.run.sweep_config import SweepConfig

    assert SweepConfig(device="cpu", compile=True).throughput_config(8).warmup == 3
    assert SweepConfig(device="cpu").throughput_config(8).warmup == 1
    assert SweepConfig(device="cpu", compile=True, warmup=5).throughput_config(8).warmup == 5


def test_a_method_that_reduces_nothing_at_this_size_says_so(tmp_path):
    """ToMe at keep rate 0.7 on 16 patches: r = round(0.3 * 16 / 12) = 0 in every block."""
    result = run(tmp_path / "out", "--methods", "tome,evit", "--keep-rates", "0.7")
    assert result.exit_code == 0
    quiet = [line for line in result.output.splitlines() if "reduces no token" in line]
    assert len(quiet) == 1 and "tome keep=0.7 @64 batch 2 reduces no token (17 in every block)" in quiet[0]


def test_plot_removes_only_files_of_the_folder_its_manifest_names(small_run, tmp_path):
    """A manifest naming a path out of the folder (edited by hand, or copied) removes nothing there."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "records.csv").write_bytes((small_run / "records.csv").read_bytes())
    (tmp_path / "victim.png").write_bytes(b"keep me")
    (run_dir / ".figures.json").write_text('["../victim.png", "tradeoff_old.png"]')
    (run_dir / "tradeoff_old.png").write_bytes(b"stale")
    assert invoke("plot", str(run_dir)).exit_code == 0
    assert (tmp_path / "victim.png").is_file() and not (run_dir / "tradeoff_old.png").exists()


def test_older_records_plot_their_vanilla_as_img_per_s_over_speedup():
    from harness.run.plot import THROUGHPUT, with_comparable_throughput

    group = pd.DataFrame({"img_per_s": [100.0, 300.0], "speedup": [1.0, 1.5], "reference_img_per_s": [None, None]})
    plotted = with_comparable_throughput(group)[THROUGHPUT].tolist()  # vanillas 100 and 200: median 150
    assert plotted == [150.0, 225.0]


@pytest.mark.parametrize("command", ["list", "clear"])
def test_a_cache_folder_that_is_a_file_is_one_clear_line(tmp_path, command):
    (tmp_path / "file").write_text("not a folder")
    result = invoke("cache", command, "--cache-dir", str(tmp_path / "file"))
    assert result.exit_code == 2 and f"cache folder {tmp_path / 'file'} is a file" in result.output


def test_the_cache_commands_default_to_the_folder_their_help_names(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert invoke("cache", "list").output.strip().endswith(f"0 caches, 0.00 GB in {tmp_path / 'tokenbench'}")
    for command in (["cache", "list"], ["run"]):
        help_text = " ".join(invoke(*command, "--help").output.split())
        assert "[default: $XDG_CACHE_HOME/tokenbench, else ~/.cache/tokenbench]" in help_text
