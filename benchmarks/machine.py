"""What every benchmark records about the machine and the code it measured (imported by the
benchmark scripts, which run as files from this folder)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def usable_cores() -> int | None:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def measured_code(untracked: bool = True) -> dict:
    """The repository's commit and the files that differ from it (``untracked``: files git does
    not track count too), so that a result names the code it measured; {} without git."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout  # noqa: E731
        status = git("status", "--porcelain", *(() if untracked else ("--untracked-files=no",)))
        return dict(git_commit=git("rev-parse", "--short", "HEAD").strip() or None,
                    git_modified_files=[ln[3:] for ln in status.splitlines() if len(ln) > 3])
    except (OSError, subprocess.SubprocessError):
        return {}
