"""YAML sweep files: values as the command line gives them, and a wrong type as one clear error."""

import pytest
from click.testing import CliRunner

from bench import cli
from harness.run.sweep_file import read_sweep_file
from methods import TokenBenchError


def sweep_file(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_lists_take_one_value_or_a_comma_separated_string(tmp_path):
    text = "methods: evit, prune\nmodels: deit_tiny_patch16_224\nkeep-rates: 0.5,0.7\nresolutions: [64, 96]\n"
    assert read_sweep_file(sweep_file(tmp_path, text + "batch_size: 2\n")) == {
        "methods": ("evit", "prune"),
        "models": ("deit_tiny_patch16_224",),
        "keep_rates": (0.5, 0.7),
        "resolutions": (64, 96),
        "batch_size": 2,
    }


def test_null_leaves_an_option_unset(tmp_path):
    assert read_sweep_file(sweep_file(tmp_path, "limit: null\ndata:\nmethods: evit\n")) == {"methods": ("evit",)}


def test_method_options_keep_their_lists_as_tuples(tmp_path):
    text = "method_args:\n  evit:\n    locations: [1, 2]\n  prune:\ncheckpoints:\n  evit: /x.pth\n"
    settings = read_sweep_file(sweep_file(tmp_path, text))
    assert settings == {"method_args": {"evit": {"locations": (1, 2)}, "prune": {}}, "checkpoints": {"evit": "/x.pth"}}


@pytest.mark.parametrize(
    "text,message",
    [
        ("resolutions: [224, x]", "resolutions must be a list of ints, got [224, 'x']"),
        ("keep_rates: [true]", "keep_rates must be a list of numbers, got [True]"),
        ("models: [[a]]", "models must be a list of timm model names"),
        ("model: [x]", "model must be a timm model name, got ['x']"),
        ("model: 5", "model must be a timm model name, got 5"),
        ("threads: true", "threads must be an int, got True"),
        ("cuda_graphs: 1", "cuda_graphs must be true or false, got 1"),
        ("data: 5", "data must be a folder path, got 5"),
        ("method_args: {evit: 5}", "method_args must map method names to options, got {'evit': 5}"),
        ("method_args: [evit]", "method_args must map method names to options"),
        ("checkpoints: {evit: 5}", "checkpoints must map method names to file paths"),
        ("methods: []", "methods must be a list of method names, got []"),
        ("colour: red", "unknown keys colour; allowed: models, methods"),
        ("[1, 2]", "must hold a mapping of option names to values"),
        ("a: [", "cannot read sweep file"),
    ],
)
def test_a_wrong_type_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(TokenBenchError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_sweep_file(sweep_file(tmp_path, text))


def test_the_cli_says_it_in_one_line(tmp_path):
    path = sweep_file(tmp_path, "resolutions: 64\nmethods: evit\nkeep_rates: 0.5\nmodel: [deit_tiny_patch16_224]\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model must be a timm model name, got ['deit_tiny_patch16_224']" in result.output
