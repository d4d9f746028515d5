"""The benchmark scripts run end to end at tiny CPU sizes (subprocesses, a few seconds each).

bench_strategies.py: one rank of a 4-rank job on torch's fake process group, every default
strategy configuration, forward and forward+backward; it must exit 0 and write a JSON and a
markdown table with a measured row per configuration and mode, each with the cost model's
estimate. cost_model.py: the cost-model table. Both also run the skip paths that a GPU session
relies on (a configuration the shape rejects becomes a row with a note, not a crash).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(seq_len=256, world_size=4, heads=4, kv_heads=2, head_dim=16, dtype="float32", device="cpu", warmup=0,
            repeats=1, threads=1)


def tiny(**overrides) -> list[str]:
    """Command-line flags of the tiny CPU configuration, with ``overrides`` (names with _ for -)."""
    flags = []
    for name, value in {**TINY, **overrides}.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags

DEFAULT_CONFIGS = ("ring:contiguous", "ring:zigzag", "ring:striped", "allgather:zigzag", "ulysses:contiguous",
                   "usp:zigzag", "lasp2:g_gamma:contiguous", "lasp2:g:contiguous", "lasp1:g_gamma:contiguous",
                   "lasp1:g:contiguous")


def _run(script: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _table_rows(md: str) -> list[list[str]]:
    """Data rows of the markdown table (cells stripped), header and rule excluded."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_bench_strategies_tiny_cpu(tmp_path):
    out = tmp_path / "strategies_cpu"
    proc = _run("bench_strategies.py", *tiny(), "--out", str(out))
    expected = {(c, m) for c in DEFAULT_CONFIGS for m in ("fwd", "fwd+bwd")}

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["complete"] and data["setup"]["rank"] == 3 and data["setup"]["world_size"] == 4
    rows = {(r["config"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == expected and len(data["rows"]) == len(expected)
    for key, r in rows.items():
        assert r["ms"] is not None and r["ms"] > 0, (key, r["note"])
        assert r["model_fwd_ms"] is not None and r["model_fwd_ms"] > 0, key
        assert r["model_serial_steps"] is not None, key
        assert r["max_rss_mib"] is not None and r["peak_mib"] is None  # CPU: no allocator statistics
        if r["family"] == "softmax":
            assert r["tflops"] is not None and r["tflops"] > 0, key

    md = out.with_suffix(".md").read_text()
    assert "rank 3 of P=4" in md and "fake process group" in md
    table = {(c[0], c[1]) for c in _table_rows(md)}
    assert table == expected
    assert "ring:zigzag" in proc.stdout  # the table is also printed


def test_bench_strategies_skips_what_the_shape_rejects(tmp_path):
    """2 query heads on 4 ranks: Ulysses cannot split them; its rows carry the reason, the rest run."""
    out = tmp_path / "s"
    _run("bench_strategies.py", *tiny(heads=2, kv_heads=2), "--configs", "ulysses:contiguous", "ring:contiguous", "lasp1_serial:none",
         "--modes", "fwd", "--rank", "0", "--out", str(out))
    rows = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["ulysses:contiguous"]["ms"] is None and "skipped" in rows["ulysses:contiguous"]["note"]
    assert rows["ring:contiguous"]["ms"] > 0 and rows["lasp1_serial:none:contiguous"]["ms"] > 0


@pytest.mark.parametrize("bad", [["--configs", "nope:zigzag"], ["--seq-len", "255"], ["--rank", "4"]])
def test_bench_strategies_rejects_bad_arguments(bad):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_strategies.py"), *tiny(), *bad,
                           "--out", "/dev/null/never"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def test_cost_model_script(tmp_path):
    out = tmp_path / "cost_model.md"
    _run("cost_model.py", "--seq-len", "65536", "--world-sizes", "4", "8", "--out", str(out))
    rows = _table_rows(out.read_text())
    strategies = {(c[0], c[1], c[2]) for c in rows}
    for P in ("4", "8"):
        for s, layout in [("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"), ("allgather", "zigzag"),
                          ("ulysses", "contiguous"), ("lasp2", "contiguous"), ("lasp1", "contiguous")]:
            assert (P, s, layout) in strategies, (P, s, layout)


def test_agreement_overhead_benchmark_runs():
    """benchmarks/agreement_overhead.py at tiny sizes on 2 gloo processes: exit 0 and the table's
    rows, each with a number (the full-size figures are in README.md)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "agreement_overhead.py"), "--seq-len", "64",
                          "--heads", "2", "--head-dim", "8", "--repeats", "1", "--calls", "50", "--tiny-blocks", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) == 8, out.stdout
    for row in rows:
        assert any(ch.isdigit() for ch in row.split("|")[2]), row
    assert "tiny model preset step" in out.stdout and "% |" in out.stdout


OVERHEAD_ROWS = ("linear-fwdbwd", "linear-fwd", "linear-fwd-loop", "lasp2-contiguous", "lasp2-zigzag", "lasp1-contiguous",
                 "lasp1-zigzag", "softmax-128", "softmax-256", "eff-ring-zigzag", "eff-allgather-zigzag",
                 "eff-ulysses-contiguous", "trainer", "trainer-long")


def test_overhead_benchmark_quick(tmp_path):
    """benchmarks/overhead.py --quick (tiny sizes; 2 gloo ranks and four short trainer runs): exit 0, every
    row of the table printed with a finite positive ratio, and the JSON / markdown written. Only runs;
    the ratios at tiny sizes say nothing about the targets."""
    out = tmp_path / "overhead"
    proc = _run("overhead.py", "--quick", "--out", str(out), timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["quick"] and data["machine"]["threads_per_process"] == 1 and data["machine"]["torch"]
    rows = {r["id"]: r for r in data["rows"]}
    assert tuple(rows) == OVERHEAD_ROWS
    for rid, r in rows.items():
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0, (rid, r["note"])
        assert r["a_ms"] > 0 and r["b_ms"] > 0, rid
        assert (r["holds"] is None) == (r["target"] is None), rid
    printed = _table_rows(proc.stdout)
    assert len(printed) == len(OVERHEAD_ROWS), proc.stdout
    for cells in printed:
        ratio = float(cells[1].rstrip("x"))
        assert math.isfinite(ratio) and ratio > 0, cells
        assert cells[3] in ("yes", "NO", "-"), cells
    assert "1 torch thread per process" in proc.stdout and "torch " in proc.stdout
    assert len(_table_rows(out.with_suffix(".md").read_text())) == len(OVERHEAD_ROWS)
    # the trainer row's ceiling: sp=1 step / (copies at T/P + the rank's other attention pairs)
    ceiling = rows["trainer"]["details"]["ceiling"]
    bound_ms = ceiling["copies_step_ms"] + ceiling["extra_pairs_ms"]
    assert ceiling["copies_step_ms"] > 0 and ceiling["extra_pairs_ms"] > 0, ceiling
    assert math.isclose(ceiling["ratio"], rows["trainer"]["b_ms"] / bound_ms, rel_tol=1e-9), ceiling
    assert "ceiling with free communication" in rows["trainer"]["note"]
    # 2-rank rows divide by the slower rank's baseline; the mean-baseline ratio is kept beside it
    lasp2 = rows["lasp2-contiguous"]["details"]
    assert rows["lasp2-contiguous"]["b_ms"] == max(x["wall"] for x in lasp2["per_rank_ms"]["kernel"])
    assert math.isfinite(lasp2["ratio_vs_mean_baseline"])


def test_linear_families_tiny_cpu(tmp_path):
    """benchmarks/linear_families.py at tiny sizes: every family x T x mode timed (positive ms and a
    ratio to the scalar family, printed and in the JSON), and the bytes of lasp2 / lasp1 per rank and
    pass on the fake process group equal to docs/linear.md's formula on every rank (the script exits
    non-zero otherwise); a few formula values are recomputed here by hand."""
    out = tmp_path / "lf.json"
    proc = _run("linear_families.py", "--T", "50", "--heads", "2", "--dk", "8", "--dv", "12", "--repeats", "1",
                "--warmup", "0", "--bytes-world-sizes", "2", "3", "--bytes-heads", "2", "--bytes-dk", "8",
                "--bytes-dv", "4", "--bytes-local-len", "4", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["machine"]["torch_threads"] == 1 and data["machine"]["cpu"]
    timing = {(r["family"], r["T"], r["mode"]): r for r in data["timing"]}
    assert set(timing) == {(f, 50, m) for f in ("scalar", "gla", "delta", "kda") for m in ("fwd", "fwd+bwd")}
    for key, r in timing.items():
        assert r["impl"] == "seqpar" and r["backend"] == "torch", key
        assert r["ms"] > 0 and r["cpu_ms"] > 0 and r["mtok_s"] > 0 and r["ratio_to_scalar"] > 0, (key, r["note"])
    assert len([c for c in _table_rows(proc.stdout) if c[1] == "seqpar"]) == len(timing)

    rows = {(r["family"], r["strategy"], r["layout"], r["P"]): r for r in data["bytes"]}
    assert set(rows) == {(f, s, lay, P) for f in ("scalar", "scalar-g_gamma", "gla", "delta", "kda")
                         for s in ("lasp2", "lasp1") for lay in ("contiguous", "zigzag") for P in (2, 3)}
    for key, r in rows.items():
        assert r["match"] is True and r["measured"] == r["formula"], key
        assert len(r["measured"]["forward"]) == key[3], key
    state = 2 * 8 * 4 * 4  # B H Dk Dv fp32
    a = {"scalar": 2 * 4, "scalar-g_gamma": 0, "gla": 2 * 8 * 4, "delta": 2 * 8 * 8 * 4, "kda": 2 * 8 * 8 * 4}
    for family, trans in a.items():
        assert rows[(family, "lasp2", "zigzag", 3)]["measured"]["forward"] == [2 * (state + trans)] * 3, family
        assert rows[(family, "lasp2", "contiguous", 2)]["measured"]["backward"] == [2 * state] * 2, family
    assert rows[("delta", "lasp1", "contiguous", 3)]["measured"] == {"forward": [2 * state, 2 * state, state],
                                                                     "backward": [state, 2 * state, 2 * state]}
    assert rows[("kda", "lasp1", "zigzag", 3)]["measured"]["backward"] == [2 * state, 3 * state, 2 * state]
    assert "fake process group" in proc.stdout
