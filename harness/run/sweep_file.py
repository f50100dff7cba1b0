"""A YAML sweep file: `bench run`'s options by name, each value checked for its type, as SweepConfig's settings.

Names take `_` or `-` (keep_rates, keep-rates). A list option takes a YAML list, or one value (or a
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
    "labels_csv": (str, "a file path"),
    "limit": (int, "an int"),
    "cache_dir": (str, "a folder path"),
    "workers": (int, "an int"),
    "class_subset": (str, "a subset name"),
    "real_labels": (str, "a file path"),
    "out": (str, "a folder path"),
}
MAPPINGS = ("checkpoints", "method_args")
SWEEP_KEYS = [*LISTS, *SCALARS, *MAPPINGS]


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """The file's settings under SweepConfig's names (lists as tuples), each checked for its type."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise TokenBenchError(f"cannot read sweep file {path}: {error}") from None
    if not isinstance(content, dict):
        raise TokenBenchError(f"sweep file {path} must hold a mapping of option names to values")
    settings = {str(key).replace("-", "_"): value for key, value in content.items()}
    unknown = sorted(set(settings) - set(SWEEP_KEYS))
    if unknown:
        raise TokenBenchError(f"sweep file {path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(SWEEP_KEYS)}")
    return {key: checked(key, value, path) for key, value in settings.items() if value is not None}  # null: unset


def checked(key: str, value: Any, path: str | Path) -> Any:
    if key in LISTS:
        types, what = LISTS[key]
        items = [yaml.safe_load(item) for item in value.split(",")] if isinstance(value, str) else value
        items = items if isinstance(items, list) else [items]
        if not items or not all(is_a(item, types) for item in items):
            raise TokenBenchError(f"sweep file {path}: {key} must be a list of {what}, got {value!r}")
        return tuple(items)
    if key in SCALARS:
        types, what = SCALARS[key]
        if not is_a(value, types):
            raise TokenBenchError(f"sweep file {path}: {key} must be {what}, got {value!r}")
        return value
    if key == "checkpoints":
        if not is_mapping(value, lambda path_value: isinstance(path_value, str)):
            raise TokenBenchError(f"sweep file {path}: checkpoints must map method names to file paths, got {value!r}")
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
