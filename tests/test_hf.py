"""transformers integration: settings are per model, errors, no framework import from seqpar.
The sharded-equals-unsharded matrix over architectures is tests/test_hf_architectures.py."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

from distributed_pool import WorkerContext  # noqa: E402

WORLD = 2


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def case_settings_are_per_model(ctx: WorkerContext) -> bool:
    from seqpar.integrations.hf import apply_sequence_parallel, remove_sequence_parallel

    a, b = _tiny_llama(), _tiny_llama()
    apply_sequence_parallel(a, ctx.group)
    x = torch.randint(0, 64, (1, 8))
    b(input_ids=x)  # an unadapted model still runs its own attention
    remove_sequence_parallel(a)
    assert a.config._attn_implementation == "sdpa"
    torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits)
    return True


def test_settings_are_per_model(pool):
    assert all(pool.run(case_settings_are_per_model, WORLD))


def test_errors():
    from seqpar.integrations.hf import apply_sequence_parallel, seqpar_attention_forward

    model = _tiny_llama()
    with pytest.raises(ValueError, match="strategy"):
        apply_sequence_parallel(model, None, strategy="nope")
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="apply_sequence_parallel"):
        seqpar_attention_forward(attn, q, q, q, None)


def test_import_seqpar_does_not_import_frameworks():
    import subprocess
    import sys

    code = ("import sys, seqpar, seqpar.integrations; "
            "bad = [m for m in ('megatron', 'deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_trains_packed_rows_on_two_ranks():
    """examples/hf_llama.py --packed --check: packed documents through the adapter on 2 ranks give
    the loss and gradients of the unsharded model run on each document alone."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "examples/hf_llama.py", "--packed", "--check", "--steps", "2"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"check: loss sharded (\S+) unsharded (\S+), max grad diff (\S+)", proc.stdout)
    assert found, proc.stdout
    sharded, unsharded, grad_diff = map(float, found.groups())
    assert abs(sharded - unsharded) < 1e-5 and grad_diff < 1e-5, proc.stdout
