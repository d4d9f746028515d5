"""Import a script of examples/ as a module, so that tests run the example's own code."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """The module of ``examples/<name>.py`` (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"seqpar_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
