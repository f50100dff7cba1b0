"""tokenbench's command line: list | run | report | plot | check | viz | cache (see `bench --help`).

This module parses options and calls the harness; it measures nothing itself.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click
import yaml

import methods
from methods.errors import TokenBenchError

if TYPE_CHECKING:
    from harness.measure.cache_folders import CacheFolder

DEFAULT_OUT = "results/run"
DEFAULT_CACHE_DIR = "[default: $XDG_CACHE_HOME/tokenbench, else ~/.cache/tokenbench]"


class InputError(click.ClickException):
    """Bad input found by the library: `Error: MESSAGE`, one line, exit code 2 as for a bad option, without
    the usage banner (most are not about the command line: a folder, a file, a model)."""

    exit_code = 2


def user_errors(command: Callable) -> Callable:
    """Turn the library's TokenBenchError into one error line (exit code 2), and show warnings as plain
    lines while the command runs."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings_as_plain_lines():
                return command(*args, **kwargs)
        except TokenBenchError as error:
            raise InputError(str(error)) from None

    return wrapper


@contextlib.contextmanager
def warnings_as_plain_lines() -> Iterator[None]:
    """While a command runs, print each distinct warning once, as one line `warning: MESSAGE` on
    stderr: a user needs the message, not the file, line number and source line of Python's format.
    Python's own memory of shown warnings is cleared whenever the filters change, which fvcore's
    tracing does for every MAC count of a sweep, so "once" is kept here. Under torchrun only rank 0
    prints them: every rank runs the same sweep and would say the same. Library callers (outside
    the CLI) keep Python's warnings as they are."""
    shown: set[tuple[str, type]] = set()
    show = warnings.showwarning
    other_rank = os.environ.get("RANK", "0") != "0"

    def show_once(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if not other_rank and (str(message), category) not in shown:
            shown.add((str(message), category))
            click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show_once
    try:
        yield
    finally:
        warnings.showwarning = show


def split_list(value: str, convert: Callable[[str], Any], what: str) -> tuple:
    items = [item.strip() for item in value.split(",")]
    if not any(items):
        raise click.BadParameter(f"expected a comma-separated list of {what}, got {value!r}")
    if "" in items:  # a typo (0.5,,0.7) rather than a list meant shorter
        raise click.BadParameter(f"an empty item in {value!r}: expected a comma-separated list of {what}")
    try:
        return tuple(convert(item) for item in items)
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of {what}, got {value!r}") from None


def parse_methods(value: str) -> tuple[str, ...]:
    names = split_list(value, str, "method names")
    unknown = [name for name in names if name not in methods.list_methods()]
    if unknown:
        raise click.BadParameter(f"unknown method {', '.join(unknown)}; known: {', '.join(methods.list_methods())}")
    return names


def parse_batch_size(text: str) -> int | str:
    """An int >= 1, or "max" (searched on GPU)."""
    if text == "max":
        return text
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def parse_option_value(key: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise click.BadParameter(f"cannot read {key}={text}: expected a YAML scalar or [list]") from None
    return tuple(value) if isinstance(value, list) else value


def parse_method_args(values: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`METHOD:key=value,key=value`; values are YAML scalars or [lists]."""
    parsed: dict[str, dict[str, Any]] = {}
    for value in values:
        method, sep, rest = value.partition(":")
        pairs = re.split(r",(?![^\[]*\])", rest)  # commas outside [...]
        if not sep or not all("=" in pair for pair in pairs):
            raise click.BadParameter(f"expected METHOD:key=value[,key=value...], got {value!r}")
        options = parsed.setdefault(method.strip(), {})
        for pair in pairs:
            key, _, text = pair.partition("=")
            if key.strip() in options:  # else the last would silently win
                raise click.BadParameter(f"{method.strip()}:{key.strip()} is given twice; give each option once")
            options[key.strip()] = parse_option_value(key.strip(), text.strip())
    return parsed


def parse_checkpoints(values: tuple[str, ...]) -> dict[str, str]:
    checkpoints: dict[str, str] = {}
    for value in values:
        method, sep, path = (part.strip() for part in value.partition("="))
        if not sep or not method or not path:
            raise click.BadParameter(f"expected METHOD=PATH, got {value!r}")
        if method in checkpoints:  # else the last would silently win
            raise click.BadParameter(f"{method} is given twice ({checkpoints[method]}, {path}); one per method")
        checkpoints[method] = path
    return checkpoints


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Compare token-reduction methods for Vision Transformers on equal terms."""


@cli.command("list")
def list_command() -> None:
    """The registered methods with their options and defaults."""
    for name in methods.list_methods():
        spec = methods.lookup(name)
        click.echo(f"{name}: {spec.summary}")
        docs = spec.option_docs()
        for option, default in spec.defaults().items():
            click.echo(f"    {option} = {default!r}")
            if option in docs:
                click.echo(textwrap.fill(docs[option], width=100, initial_indent=" " * 8, subsequent_indent=" " * 8))


# The one-value forms of list options: `model: X` is `models: [X]`, `batch_size: 8` is `batch_sizes: [8]`.
SINGULAR = {"model": "models", "batch_size": "batch_sizes"}


@cli.command("run")
@click.option("--methods", "method_list", help="Comma-separated methods; default: every registered method.")
@click.option("--model", help="A timm ViT name.  [default: deit_small_patch16_224]")
@click.option("--models", help="Comma-separated timm ViT names: several models in one run.")
@click.option("--keep-rates", help="Comma-separated keep rates in (0, 1].  [default: 0.5,0.7,0.9]")
@click.option("--resolutions", help="Comma-separated input sizes, multiples of the patch size.  [default: 224]")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where to measure (auto: cuda if a GPU is seen).  [default: auto]",
)
@click.option("--batch-size", help="One batch size: an int, or max (searched, GPU).  [default: 256 on GPU, 8 on CPU]")
@click.option(
    "--batch-sizes", help="Comma-separated batch sizes: ints, or max (the largest power of two that fits, GPU)."
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Autocast dtype.  [default: fp32]")
@click.option(
    "--model-dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    help="Weights and input in this dtype, no autocast (not with --precision).  [default: fp32]",
)
@click.option("--cuda-graphs/--no-cuda-graphs", default=None, help="Replay each forward from a CUDA graph (GPU only).")
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=None,
    help="torch.compile the models (with --cuda-graphs: reduce-overhead).",
)
@click.option("--warmup", type=click.IntRange(min=0), help="Warm-up iterations.  [default: 1 on CPU, 10 on GPU]")
@click.option(
    "--iters", type=click.IntRange(min=1), help="Timed iterations per window.  [default: 2 on CPU, 10 on GPU]"
)
@click.option("--windows", type=click.IntRange(min=1), help="Timing windows (median over them).  [default: 5]")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads.")
@click.option(
    "--data", type=click.Path(), help="ImageNet validation folder (class sub-folders, or flat with --labels)."
)
@click.option("--labels", "labels_csv", type=click.Path(), help="CSV of filename,label for a flat --data folder.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate the first N of a fixed, seeded subset.")
@click.option("--cache-dir", type=click.Path(), help=f"Where decoded images are kept for reuse.  {DEFAULT_CACHE_DIR}")
@click.option("--workers", type=click.IntRange(min=1), help="Decode threads.  [default: the cores, at most 16]")
@click.option(
    "--class-subset",
    type=click.Choice(["all", "present"]),
    help="Predict among all classes or only those in the data (ImageNet-A/R).  [default: all]",
)
@click.option("--real-labels", type=click.Path(), help="ImageNet-ReaL's real.json: adds top1_real.")
@click.option("--checkpoint", "checkpoint_args", multiple=True, help="METHOD=PATH, repeatable.")
@click.option(
    "--method-args",
    "method_args_args",
    multiple=True,
    help="METHOD:key=value[,key=value], repeatable. An option that sets how much a method reduces "
    "(tome:r=8) runs it once per group instead of at each keep rate.",
)
@click.option("--config", "config_file", type=click.Path(), help="A YAML sweep file; options override it.")
@click.option("--out", help=f"Run folder; the same command resumes it.  [default: {DEFAULT_OUT}]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def run_command(config_file: str | None, quiet: bool, **options: Any) -> None:
    """Measure MACs, token counts, throughput and (with --data) top-1 over a grid of configurations.

    Vanilla is measured once per (model, resolution, batch size) as the reference; each method's
    speedup is timed interleaved with it and with the method's floor twin (the same token counts,
    selected by a slice). Rows are written as they are measured; rerunning resumes.
    """
    from harness.measure.distributed import check_device_for_ranks, init_from_env, is_main_process, shutdown
    from harness.measure.throughput import resolve_device
    from harness.run.records import RunStore
    from harness.run.report import write_report
    from harness.run.sweep import preflight, run_sweep
    from harness.run.sweep_config import SweepConfig
    from harness.run.sweep_file import read_sweep_file

    settings = one_value_forms(read_sweep_file(config_file) if config_file else {})
    settings.update(one_value_forms(cli_settings(options)))
    out = settings.pop("out", None) or DEFAULT_OUT
    device = settings.pop("device", None) or "auto"
    check_device_for_ranks(device)
    device = resolve_device(device)
    sweep = SweepConfig(device=device, **settings)
    preflight(sweep)
    init_from_env(device)
    store = RunStore.prepare(out) if is_main_process() else None
    rows = sum(1 for _ in run_sweep(sweep, store, progress=not quiet and is_main_process()))
    if store is not None:
        click.echo(f"{rows} new rows in {store.path} ({len(store.done_keys())} in all)")
        click.echo(write_report(out))
    shutdown()


def one_value_forms(settings: dict[str, Any]) -> dict[str, Any]:
    """`model` and `batch_size` as one-element `models` and `batch_sizes`; giving both forms is an error."""
    for one, many in SINGULAR.items():
        if one in settings:
            if many in settings:
                raise TokenBenchError(f"give {one} or {many}, not both")
            settings[many] = (settings.pop(one),)
    return settings


def cli_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line, parsed, under SweepConfig's names."""
    parsers = {
        "method_list": ("methods", parse_methods),
        "models": ("models", lambda v: split_list(v, str, "timm model names")),
        "batch_size": ("batch_size", parse_batch_size_option),
        "batch_sizes": ("batch_sizes", lambda v: split_list(v, parse_batch_size, "batch sizes (ints >= 1, or max)")),
        "keep_rates": ("keep_rates", lambda v: split_list(v, float, "keep rates")),
        "resolutions": ("resolutions", lambda v: split_list(v, int, "resolutions (ints)")),
        "checkpoint_args": ("checkpoints", parse_checkpoints),
        "method_args_args": ("method_args", parse_method_args),
        "compile_": ("compile", bool),
    }
    settings = {}
    for name, value in options.items():
        if value is None or value == ():
            continue
        key, parse = parsers.get(name, (name, lambda v: v))
        try:
            settings[key] = parse(value)
        except click.BadParameter as error:  # name the option, as Click does for its own checks
            error.ctx = click.get_current_context()
            error.param = next(param for param in error.ctx.command.params if param.name == name)
            raise
    return settings


def parse_batch_size_option(value: str) -> int | str:
    try:
        return parse_batch_size(value.strip())
    except ValueError:
        raise click.BadParameter(f"expected a batch size (an int >= 1, or max), got {value!r}") from None


@cli.command("report")
@click.argument("run", type=click.Path())
@user_errors
def report_command(run: str) -> None:
    """Per resolution: speedup and MAC reduction against vanilla, top-1 change (CSV + Markdown).

    RUN is a run folder, or a records CSV given directly; the files are written beside it, named after
    it unless it is records.csv (gpu.csv: gpu.report.csv, gpu.tradeoff_224.png).
    """
    from harness.run.report import write_report

    click.echo(write_report(run))


@cli.command("plot")
@click.argument("run", type=click.Path())
@user_errors
def plot_command(run: str) -> None:
    """Trade-off figures (PNG and SVG): top-1 vs throughput and vs GMACs, or cost vs keep rate.

    RUN is a run folder, or a records CSV given directly; the files are written beside it, named after
    it unless it is records.csv (gpu.csv: gpu.report.csv, gpu.tradeoff_224.png).
    """
    from harness.run.plot import plot_run

    for path in plot_run(run):
        click.echo(path)


@cli.command("check")
@click.argument("run", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(), help="The committed baseline CSV.")
@click.option("--tolerance", default=0.10, show_default=True, type=float, help="Allowed relative drop in speedup.")
@click.option("--update", is_flag=True, help="Write the run's speedups as the baseline instead of checking.")
@user_errors
def check_command(run: str, baseline: str, tolerance: float, update: bool) -> None:
    """Compare each method's speedup over vanilla with a baseline; exit 1 on a regression.

    RUN is a run folder, or a records CSV given directly.
    """
    from harness.run.check import check_run, update_baseline

    if update:
        click.echo(f"wrote {update_baseline(run, baseline)} rows to {baseline}")
        return
    result = check_run(run, baseline, tolerance)
    for line in result.regressions + result.missing:
        click.echo(f"REGRESSION {line}" if line in result.regressions else f"MISSING {line}")
    if not result.passed:
        raise SystemExit(1)
    click.echo(f"ok: {result.compared} speedups within {tolerance:.0%} of the baseline")


@cli.command("viz")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--methods", "method_list", default="evit,prune", show_default=True, help="Comma-separated methods.")
@click.option("--keep-rate", default=0.7, show_default=True, type=float, help="Keep rate in (0, 1].")
@click.option("--model", default="deit_small_patch16_224", show_default=True, help="A timm ViT name.")
@click.option("--resolution", default=224, show_default=True, type=click.IntRange(min=1), help="Input size.")
@click.option("--checkpoint", "checkpoint_args", multiple=True, help="METHOD=PATH, repeatable.")
@click.option("--out", default="results/viz", show_default=True, help="Folder for the figures.")
@user_errors
def viz_command(
    images: tuple[str, ...],
    method_list: str,
    keep_rate: float,
    model: str,
    resolution: int,
    checkpoint_args: tuple[str, ...],
    out: str,
) -> None:
    """Which patches each method keeps at each stage (no IMAGE: matplotlib's sample photograph)."""
    from harness.run.viz import visualise

    paths = visualise(
        images or None,
        parse_methods(method_list),
        keep_rate,
        model_name=model,
        checkpoints=parse_checkpoints(checkpoint_args),
        out_dir=out,
        img_size=resolution,
    )
    for path in paths:
        click.echo(path)


@cli.group("cache")
def cache_group() -> None:
    """The decoded images `bench run --data` keeps for reuse: list them, remove them."""


CACHE_DIR_OPTION = click.option(
    "--cache-dir", type=click.Path(), help=f"The cache folder, as given to bench run.  {DEFAULT_CACHE_DIR}"
)


@cache_group.command("list")
@CACHE_DIR_OPTION
@user_errors
def cache_list_command(cache_dir: str | None) -> None:
    """Each cache, most recently used first: size, images, last use, the images' folder and preprocessing."""
    from harness.measure.cache_folders import list_caches
    from harness.measure.decode_cache import cache_dir_or_default

    folder = cache_dir_or_default(cache_dir)
    caches = list_caches(folder)
    for cache in caches:
        click.echo(f"{cache.path.name}  {describe_cache(cache)}  {cache.root}  {' '.join(cache.preprocessing.split())}")
    click.echo(f"{len(caches)} caches, {sum(cache.bytes for cache in caches) / 1e9:.2f} GB in {folder}")


@cache_group.command("clear")
@CACHE_DIR_OPTION
@click.option("--unused-for", type=click.FloatRange(min=0), help="Only the caches not used for this many days.")
@user_errors
def cache_clear_command(cache_dir: str | None, unused_for: float | None) -> None:
    """Remove the caches (all, or those unused for --unused-for days) and what killed decodes left."""
    from harness.measure.cache_folders import remove_caches
    from harness.measure.decode_cache import cache_dir_or_default

    removed = remove_caches(cache_dir_or_default(cache_dir), unused_for)
    for cache in removed:
        click.echo(f"removed {cache.path}  {describe_cache(cache)}")
    click.echo(f"removed {len(removed)} caches, {sum(cache.bytes for cache in removed) / 1e9:.2f} GB")


def describe_cache(cache: CacheFolder) -> str:
    """A `CacheFolder`'s size, images and last use, for a line of `bench cache`."""
    last_used = datetime.datetime.fromtimestamp(cache.last_used).strftime("%Y-%m-%d %H:%M")
    return f"{cache.bytes / 1e9:.2f} GB  {cache.images} images  used {last_used}"


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
