"""Where a row comes from: git revision of the harness, package versions, host, and the time stamps and one-line
errors every row builder writes. The one place that asks git for the revision.
"""
from __future__ import annotations

import datetime as _dt
import functools
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "now", "one_line"]


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def one_line(err: BaseException) -> str:
    """``Type: message`` of an exception, first line only, at most 500 characters (a row's ``reason``)."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Git revision (and whether the tree is dirty) of the harness source, package versions, host."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("torchvision", "torch-pruning", "ptflops", "numpy"):
        try:
            versions[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_rev": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "versions": versions, "hostname": socket.gethostname()}
