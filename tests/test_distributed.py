"""Sharded evaluation: two gloo processes on this machine count every image exactly once."""

import dataclasses
import json
import os
import socket
import time
import warnings
from dataclasses import asdict

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from harness.measure import throughput
from harness.measure.accuracy import evaluate
from harness.measure.data import eval_transform, load_imagenet_folder
from harness.measure.distributed import (
    check_device_for_ranks,
    init_from_env,
    is_main_process,
    on_main_process,
    shard_indices,
    shutdown,
    sum_across_ranks,
)
from harness.run.records import RunStore, read_records
from harness.run.sweep import run_sweep
from harness.run.sweep_config import SweepConfig
from methods import TokenBenchError
from tests.conftest import tiny_vit
from tests.test_accuracy import CLASSES, noise_tree

WORLD = 2
# fork spares each process re-importing torch and timm (seconds); like DataLoader workers, a forked
# process sets one thread before running torch ops.
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


class Recording(Dataset):
    """The dataset, noting which indices this process loads."""

    def __init__(self, inner):
        self.inner, self.classes, self.seen = inner, inner.classes, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.seen.append(index)
        return self.inner[index]


def build(root):
    model = tiny_vit(num_classes=CLASSES)
    return model, Recording(load_imagenet_folder(root, eval_transform(model, 64)))


def as_rank(rank, port, work, *args):
    """One torchrun-like process: the environment torchrun would set, then `work(rank, *args)`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    assert init_from_env()
    try:
        work(rank, *args)
    finally:
        shutdown()


def evaluate_and_record(rank, root, out):
    model, dataset = build(root)
    result = evaluate(model, dataset, batch_size=4)
    given = torch.tensor([rank, 10])
    summed = sum_across_ranks(given)
    record = {"result": asdict(result), "seen": dataset.seen, "main": is_main_process()}
    record["sum"] = {"given": given.tolist(), "summed": summed.tolist()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def evaluate_and_record_the_error(rank, root, labels, out):
    model = tiny_vit(num_classes=CLASSES)
    dataset = load_imagenet_folder(root, eval_transform(model, 64), labels_csv=labels)
    try:
        evaluate(model, dataset, batch_size=4)
    except TokenBenchError as error:
        (out / f"rank{rank}.txt").write_text(str(error))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(work, *args, timeout=120):
    context = mp.start_processes(as_rank, args=(free_port(), work, *args), nprocs=WORLD, join=False, start_method=START)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {timeout} s")


def test_two_processes_count_every_image_once_and_agree_with_one(tmp_path):
    root = noise_tree(tmp_path / "val")  # 24 readable images and 1 unreadable: 25, an odd number
    model, dataset = build(root)
    expected = evaluate(model, dataset, batch_size=4)
    assert len(dataset) == 25
    run_ranks(evaluate_and_record, root, tmp_path)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert [record["main"] for record in records] == [True, False]
    for record in records:
        assert record["result"] == asdict(expected)  # every rank holds the summed result
    seen = [index for record in records for index in record["seen"]]
    assert sorted(seen) == list(range(25))  # each image loaded by exactly one rank
    assert [len(record["seen"]) for record in records] == [13, 12]
    assert [record["sum"] for record in records] == [  # the sum, and each rank's input left as it was
        {"given": [rank, 10], "summed": [0 + 1, 10 + 10]} for rank in range(WORLD)
    ]


def test_a_bad_label_on_one_rank_is_the_same_error_on_every_rank(tmp_path):
    """Rank 1's shard alone holds the bad label; raising there alone would leave rank 0 waiting at the
    all-reduce. Every rank lists the whole folder and checks its labels before scoring its shard."""
    root = noise_tree(tmp_path / "val", corrupt=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("n00000000/img_0.JPEG,1\nn00000000/img_1.JPEG,6\n")  # index 1 goes to rank 1
    run_ranks(evaluate_and_record_the_error, root, labels, tmp_path)
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(WORLD)]
    assert errors == ["img_1.JPEG is labelled 6 by the labels CSV, beyond the model's 6 classes (0 ... 5)"] * WORLD


def sweep_on(root, labels, keep_rates):
    """evit on deit_tiny at 64x64 with accuracy on `root`: quick timing, the labels from a CSV."""
    timing = dict(device="cpu", batch_sizes=(2,), warmup=0, iters=1, windows=1, threads=1)  # as under torchrun
    return SweepConfig(
        models=("deit_tiny_patch16_224",),
        methods=("evit",),
        keep_rates=keep_rates,
        resolutions=(64,),
        data=str(root),
        labels_csv=str(labels),
        **timing,
    )


def sweep_and_record(rank, root, labels, out):
    store = RunStore.prepare(out / "run") if is_main_process() else None
    rows = list(run_sweep(sweep_on(root, labels, (0.5, 0.7)), store, progress=False))
    (out / f"rank{rank}.json").write_text(json.dumps([f"{row['method']} {row['keep_rate']}" for row in rows]))


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_a_resumed_sweep_measures_the_same_pending_jobs_on_every_rank(tmp_path):
    """Only rank 0 reads the finished rows; the other ranks must measure its pending list, or their
    accuracy all-reduces pair with other jobs' (wrong top-1, then a hang)."""
    root = noise_tree(tmp_path / "val")
    labels = tmp_path / "labels.csv"
    files = sorted(root.glob("*/*.JPEG"))
    labels.write_text("".join(f"{path.relative_to(root)},{int(path.parent.name[1:])}\n" for path in files))
    list(run_sweep(sweep_on(root, labels, (0.5,)), RunStore.prepare(tmp_path / "run"), progress=False))
    alone = list(run_sweep(sweep_on(root, labels, (0.5, 0.7)), RunStore.prepare(tmp_path / "alone"), progress=False))
    run_ranks(sweep_and_record, root, labels, tmp_path)
    measured = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert measured == [["evit 0.7"]] * WORLD
    resumed = read_records(tmp_path / "run").set_index(["method", "keep_rate"])
    assert len(resumed) == 3
    assert resumed.loc[("evit", 0.7), ["top1", "top5", "images", "skipped"]].tolist() == [
        alone[-1][key] for key in ("top1", "top5", "images", "skipped")
    ]


def sweep_timing_on_each_rank(rank, root, labels, out):
    """A sweep whose timing windows note the rank that runs them; its rows and warnings recorded."""
    timed = []
    original = throughput.time_windows

    def noting(*args, **kwargs):
        timed.append(rank)
        return original(*args, **kwargs)

    throughput.time_windows = noting
    store = RunStore.prepare(out / "run") if is_main_process() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep = dataclasses.replace(sweep_on(root, labels, (0.5,)), threads=None)  # torchrun's one thread
        rows = list(run_sweep(sweep, store, progress=False))
    speeds = [[row[key] for key in ("img_per_s", "speedup", "floor_speedup", "top1")] for row in rows]
    record = {"timed": timed, "speeds": speeds, "warnings": [str(warning.message) for warning in caught]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.filterwarnings("ignore:no checkpoint given:UserWarning")
def test_rank_0_alone_times_and_every_rank_holds_its_figures(tmp_path):
    """Processes timing at once would each time a machine the others load; the rest wait for rank 0."""
    root = noise_tree(tmp_path / "val")
    labels = tmp_path / "labels.csv"
    files = sorted(root.glob("*/*.JPEG"))
    labels.write_text("".join(f"{path.relative_to(root)},{int(path.parent.name[1:])}\n" for path in files))
    run_ranks(sweep_timing_on_each_rank, root, labels, tmp_path)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert [len(record["timed"]) for record in records] == [2, 0]  # vanilla's row, then evit's
    assert records[0]["speeds"] == records[1]["speeds"] and len(records[0]["speeds"]) == 2
    assert any("rank 0 times on 1 CPU thread" in message for message in records[0]["warnings"])


def fail_on_rank_0(rank, out):
    def compute():
        if rank == 0:
            raise ValueError("out of luck")
        return "never reached"

    try:
        on_main_process(compute)
    except Exception as error:
        (out / f"rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")


def test_an_error_of_rank_0_s_work_stops_every_rank(tmp_path):
    run_ranks(fail_on_rank_0, tmp_path)
    errors = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(WORLD)]
    assert errors == [
        "ValueError: out of luck",
        "TokenBenchError: rank 0 failed, so every rank stops: ValueError: out of luck",
    ]


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not init_from_env()
    assert is_main_process()
    assert shard_indices(5) == range(5)


def test_incomplete_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TokenBenchError, match="RANK, MASTER_ADDR, MASTER_PORT unset: start the processes with"):
        init_from_env()


def test_a_numbered_gpu_under_torchrun_is_a_clear_error(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from bench import cli

    config = tmp_path / "sweep.yaml"
    config.write_text("device: cuda:0\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "device cuda:0 under torchrun would put every process on one GPU; give cuda or auto" in result.output


def test_non_integer_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TokenBenchError, match="WORLD_SIZE must be an integer"):
        init_from_env()


def test_a_cpu_run_never_touches_cuda_even_with_fewer_gpus_than_processes(monkeypatch):
    """On a one-GPU machine, rank 1 of a two-process CPU run used to be refused: "LOCAL_RANK=1, but 1
    GPU(s) are visible". Here CUDA claims one GPU and fails if anything asks it for more."""
    import torch.distributed as dist

    def untouchable(*_args, **_kwargs):
        raise AssertionError("a CPU run touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", untouchable)
    monkeypatch.setattr(torch.cuda, "set_device", untouchable)
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    env = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert init_from_env("cpu")
    assert backends == ["gloo"]
    with pytest.raises(AssertionError, match="touched CUDA"):
        init_from_env("cuda")  # the same call on CUDA does ask for the rank's GPU


def test_one_process_under_torchrun_may_take_a_fixed_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_device_for_ranks("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TokenBenchError, match="device cuda:0 under torchrun would put every process on one GPU"):
        check_device_for_ranks("cuda:0")
