"""The import names of a regular and an editable install: seqpar, seqpar.comm, seqpar.kernels
(from the top-level comm/ and kernels/ folders), and never the bare names comm / kernels."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = (
    "import importlib.util, seqpar, seqpar.comm, seqpar.kernels\n"
    "assert importlib.util.find_spec('comm') is None, 'bare comm importable'\n"
    "assert importlib.util.find_spec('kernels') is None, 'bare kernels importable'\n"
    "print(seqpar.__file__, seqpar.comm.__file__, seqpar.kernels.__file__)\n"
)


def _run_check(cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_regular_install_imports_all_packages(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    printed = _run_check(tmp_path, env)
    assert str(target) in printed and str(REPO) not in printed
    for folder in ("comm", "kernels"):
        assert (target / "seqpar" / folder / "__init__.py").exists()
        assert not (target / folder).exists(), f"bare {folder}/ installed at the top level"


def test_current_install_imports_outside_the_repo(tmp_path):
    """The install this suite runs on (editable in the README's setup) works from any folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    printed = _run_check(tmp_path, env)
    assert "seqpar" in printed
