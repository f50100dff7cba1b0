"""A YAML sweep file: `bench run`'s options by name, each value checked for its type, as SweepConfig's settings.

Names are the options' (`labels`, `checkpoint`, `method-args`), with `_` or `-` (keep_rates, keep-rates);
`labels_csv` and `checkpoints`, SweepConfig's names, are read too. A list option takes a YAML list, or one value (or a
string of comma-separated items, as on the command line: `keep_rates: 0.5,0.7`). A value of the wrong
type is one clear error, not a TypeError from deep inside the sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from methods.errors import TokenBenchError

NUMBER = (int, float)
# name: (the types of each item, what they are, in words)
LISTS = {
    "models": (str, "timm model names"),
    "methods": (str, "method names"),
    "keep_rates": (NUMBER, "numbers"),
    "resolutions": (int, "ints"),
    "batch_sizes": ((int, str), "ints or max"),
}
SCALARS = {
    "model": (str, "a timm model name"),
    "batch_size": ((int, str), "an int or max"),
    "device": (str, "a device name"),
    "precision": (str, "a precision name"),
    "model_dtype": (str, "a dtype name"),
    "cuda_graphs": (bool, "true or false"),
    "compile": (bool, "true or false"),
    "warmup": (int, "an int"),
    "iters": (int, "an int"),
    "windows": (int, "an int"),
    "threads": (int, "an int"),
    "data": (str, "a folder path"),
    "labels": (str, "a file path"),
    "limit": (int, "an int"),
    "cache_dir": (str, "a folder path"),
    "workers": (int, "an int"),
    "class_subset": (str, "a subset name"),
    "real_labels": (str, "a file path"),
    "out": (str, "a folder path"),
}
MAPPINGS = ("checkpoint", "method_args")
SWEEP_KEYS = [*LISTS, *SCALARS, *MAPPINGS]
SWEEP_CONFIG_NAMES = {"labels": "labels_csv", "checkpoint": "checkpoints"}  # option name -> SweepConfig's
SPELLINGS = {config_name: option for option, config_name in SWEEP_CONFIG_NAMES.items()}  # also read


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """The file's settings under SweepConfig's names (lists as tuples), each checked for its type."""
    content = load_yaml(path)
    if not isinstance(content, dict):
        raise TokenBenchError(f"sweep file {path} must hold a mapping of option names to values")
    written = {str(key).replace("-", "_"): value for key, value in content.items()}
    unknown = sorted(key for key in written if key not in SWEEP_KEYS and key not in SPELLINGS)
    if unknown:
        raise TokenBenchError(f"sweep file {path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(SWEEP_KEYS)}")
    for spelling, option in SPELLINGS.items():
        if spelling in written and option in written:
            raise TokenBenchError(f"sweep file {path}: give {option} or {spelling}, not both (one setting)")
    settings = {}
    for key, value in written.items():
        option = SPELLINGS.get(key, key)
        if value is not None:  # null: unset
            settings[SWEEP_CONFIG_NAMES.get(option, option)] = checked(key, value, path)
    return settings


def load_yaml(path: str | Path) -> Any:
    """The file's YAML; any reason it cannot be read is one line naming the file (and where yaml says)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TokenBenchError(f"sweep file {path} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    except OSError as error:
        raise TokenBenchError(f"cannot read sweep file {path}: {error.strerror}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({error.context})" if error.context else ""
        raise TokenBenchError(f"cannot read sweep file {path}{where}: {error.problem}{context}") from None
    except yaml.YAMLError as error:  # a character YAML refuses; its message's first line names it
        raise TokenBenchError(f"cannot read sweep file {path}: {str(error).splitlines()[0]}") from None


def checked(key: str, value: Any, path: str | Path) -> Any:
    """`value` checked for option `key` (as the file spells it), in the form SweepConfig takes."""
    option = SPELLINGS.get(key, key)
    if option in LISTS:
        types, what = LISTS[option]
        items = [yaml.safe_load(item) for item in value.split(",")] if isinstance(value, str) else value
        items = items if isinstance(items, list) else [items]
        if not items or not all(is_a(item, types) for item in items):
            raise TokenBenchError(f"sweep file {path}: {key} must be a list of {what}, got {value!r}")
        return tuple(items)
    if option in SCALARS:
        types, what = SCALARS[option]
        if not is_a(value, types):
            raise TokenBenchError(f"sweep file {path}: {key} must be {what}, got {value!r}")
        return value
    if option == "checkpoint":
        if not is_mapping(value, lambda path_value: isinstance(path_value, str)):
            raise TokenBenchError(f"sweep file {path}: {key} must map method names to file paths, got {value!r}")
        return value
    if not is_mapping(value, lambda options: options is None or isinstance(options, dict)):
        raise TokenBenchError(f"sweep file {path}: method_args must map method names to options, got {value!r}")
    return {
        method: {str(k): tuple(v) if isinstance(v, list) else v for k, v in (options or {}).items()}
        for method, options in value.items()
    }


def is_a(value: Any, types: type | tuple[type, ...]) -> bool:
    """isinstance, but a YAML true/false is no int or number."""
    allowed = types if isinstance(types, tuple) else (types,)
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def is_mapping(value: Any, valid: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) and valid(item) for key, item in value.items())
