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
        ("checkpoint: {evit: 5}", "checkpoint must map method names to file paths"),
        ("labels: 5", "labels must be a file path, got 5"),
        ("labels: a.csv\nlabels_csv: b.csv", "give labels or labels_csv, not both"),
        ("quiet: true", "unknown keys quiet; allowed: .*, labels, .*, checkpoint, method_args"),
    ],
)
def test_a_wrong_type_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(TokenBenchError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_sweep_file(sweep_file(tmp_path, text))


def test_names_are_the_options_and_sweep_configs_older_ones_still_read(tmp_path):
    text = "labels: a.csv\ncheckpoint: {vanilla: v.pth}\nmethod-args: {evit: {locations: [2]}}\n"
    options = {"evit": {"locations": (2,)}}
    expected = {"labels_csv": "a.csv", "checkpoints": {"vanilla": "v.pth"}, "method_args": options}
    assert read_sweep_file(sweep_file(tmp_path, text)) == expected
    older = text.replace("labels:", "labels_csv:").replace("checkpoint:", "checkpoints:")
    assert read_sweep_file(sweep_file(tmp_path, older)) == expected


@pytest.mark.parametrize(
    "content,message",
    [
        (b"model: [a\n", "sweep.yaml, line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing"),
        (b"a: b\n c: d\n", "sweep.yaml, line 2, column 3: mapping values are not allowed here"),
        (b"a: \x07\n", "sweep.yaml: unacceptable character #x0007: special characters are not allowed"),
        (b"\x87\x8a-\xbe|r", "sweep.yaml is not UTF-8 text: invalid start byte at byte 0"),
    ],
)
def test_a_file_that_is_not_yaml_is_one_line_naming_it_and_where(tmp_path, content, message):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)
    with pytest.raises(TokenBenchError) as error:
        read_sweep_file(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_cli_says_it_in_one_line(tmp_path):
    path = sweep_file(tmp_path, "resolutions: 64\nmethods: evit\nkeep_rates: 0.5\nmodel: [deit_tiny_patch16_224]\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model must be a timm model name, got ['deit_tiny_patch16_224']" in result.output
