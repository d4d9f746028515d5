"""The README's quick start is examples/quickstart.py verbatim, and it runs: 2 gloo processes
under torchrun, softmax and linear attention with gradients against single-device references."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_TOL = 1e-5  # largest error / largest value, fp32 on CPU


def test_readme_shows_the_quickstart_verbatim():
    code = (ROOT / "examples" / "quickstart.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{code}```" in readme, "README's quick-start block differs from examples/quickstart.py"


def test_quickstart_runs_on_two_ranks():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "examples/quickstart.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es), 256 tokens (128 per rank, layout zigzag)" in proc.stdout, proc.stdout
    errors = [float(e) for e in re.findall(r"(?:output and gradients|output and final state): (\S+)", proc.stdout)]
    assert len(errors) == 2 and all(e < QUICKSTART_TOL for e in errors), proc.stdout


def test_docs_stand_on_their_own():
    """Every relative link in README.md, docs/ and benchmarks/README.md names a file of the
    repository, and no doc cites design notes kept outside it."""
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert (ROOT / "docs" / "design.md").is_file()
    for doc in docs:
        text = doc.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
