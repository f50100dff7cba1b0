"""Where a result came from: code version, software versions, machine and date, for every record."""

from __future__ import annotations

import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch

CODE_ROOT = Path(__file__).resolve().parents[2]  # harness/measure/provenance.py -> the project root


def git_state(root: Path = CODE_ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout the code runs from; ("unknown", None) outside one.

    A checkout that merely contains the code (an installed package inside some other repository)
    does not count: its top level must be `root` itself.
    """
    try:
        top, commit = _git(root, "rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() != root:
            return "unknown", None
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown", None
    return commit, dirty


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU model."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def provenance(device: str) -> dict[str, Any]:
    """Everything a record needs to say how and where it was made, besides its own configuration and
    when (`utc_now`): the code's commit and state as the process loaded it, versions and machine.
    CUDA is asked about only for a CUDA device: a CPU run never initialises it."""
    commit, dirty = git_state()
    cuda = device.startswith("cuda")
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": device,
        "device_name": device_name(device),
        "hostname": socket.gethostname(),
    }


def utc_now() -> str:
    """When a record was measured: the time now, UTC, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
