"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90) with Triton's bundled ptxas, no
GPU needed: it catches what the interpreter cannot (dtype rules of tl.dot, layouts, register and
shared-memory limits of the NVIDIA backend). Shared by the Triton kernel test files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# scalar kernel arguments that are int32 (besides the strides)
INT_ARGS = ("Tq", "Tk", "Hq", "Hkv", "G", "diag", "win", "TQ_KEY", "TK_KEY", "T", "H", "NT")


def compile_sm90(fn, ptrs: dict[str, str], consts: dict, num_warps: int, num_stages: int,
                 floats: tuple[str, ...] = ("scale",)) -> None:
    """Compile one ``@triton.jit`` kernel for sm_90. ``ptrs``: element type of each pointer argument
    (``"_"``: the default); ``consts``: the constexpr values; inner strides (``stride_*d``) are unit
    constants, as the JIT specialises them; other strides and :data:`INT_ARGS` are int32;
    ``floats`` are fp32 scalars."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, cst = {}, dict(consts)
    for name in fn.arg_names:
        if name in cst:
            sig[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name], cst[name] = "constexpr", 1
        elif name.startswith("stride") or name in INT_ARGS:
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "*" + ptrs.get(name, ptrs["_"])
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})


def check_compiles(module: str, main: str, marker: str, timeout_s: float = 600) -> None:
    """Run ``module.main()`` (a test module of this folder) in a fresh process with
    TRITON_INTERPRET=0, so that the kernels are decorated for the JIT, and assert that it exits 0
    and prints ``marker``. Skips without Triton's bundled ptxas."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas is missing")
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import {module} as m; m.{main}()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0 and marker in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
