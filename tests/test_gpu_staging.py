"""Several gloo ranks sharing ONE GPU: CUDA tensors through every strategy.

NCCL refuses two ranks on one GPU, so multi-rank runs on a one-GPU machine use gloo, and
``seqpar.comm`` stages gloo traffic of CUDA tensors through host memory
(``_needs_host_staging``). These tests run each strategy forward + backward with CUDA tensors on
2 and 4 gloo processes that all use cuda:0, in bf16 and fp32, and compare o and dq / dk / dv
(and dg) with the single-device fp64 reference computed on the GPU.

Strategies: softmax ring (zigzag), allgather (zigzag), ulysses (contiguous; Hq 4 / Hkv 2, so
P = 4 runs the KV-head fallback); linear lasp2 (zigzag, per-head decay g_gamma) and lasp1
(contiguous, data-dependent gates g). Kernel backend "auto" (Triton on CUDA).

Error measure: max |x - ref| / max |ref| per tensor. Tolerances: fp32 2e-3 (allows TF32-class
matmul rounding in the kernels), bf16 6e-2 (as tests/test_triton_kernels.py). A staging bug
(a lost, stale or misplaced buffer) gives errors of order 1.

Without CUDA the GPU tests skip; ``test_harness_on_cpu`` runs the same harness (case function,
sharding, reference, comparison) once with CPU tensors on the shared gloo pool, at tiny sizes:
the full CPU coverage of the strategies is in test_softmax_attention.py / test_linear_attention.py.
The GPU pool (4 spawned gloo processes on cuda:0) is started once for this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import seqpar
from distributed_pool import GlooPool
from seqpar.kernels import attention_reference
from seqpar.kernels.linear_reference import linear_attention_recurrent_reference
from seqpar.layout import shard_tensor, unshard_tensor

CUDA = torch.cuda.is_available()
TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2}


@dataclass(frozen=True)
class Spec:
    """One strategy run: family, strategy, layout and (linear) gate."""

    family: str
    strategy: str
    layout: str
    gate: str = ""


SPECS = (Spec("softmax", "ring", "zigzag"), Spec("softmax", "allgather", "zigzag"),
         Spec("softmax", "ulysses", "contiguous"), Spec("linear", "lasp2", "zigzag", "g_gamma"),
         Spec("linear", "lasp1", "contiguous", "g"))


@dataclass(frozen=True)
class Sizes:
    batch: int
    local_len: int
    heads: int
    kv_heads: int
    head_dim: int
    chunk_size: int


CPU_SIZES = Sizes(batch=1, local_len=8, heads=4, kv_heads=2, head_dim=16, chunk_size=4)
GPU_SIZES = Sizes(batch=1, local_len=128, heads=4, kv_heads=2, head_dim=64, chunk_size=64)


def make_inputs(spec: Spec, sizes: Sizes, world_size: int, dtype: torch.dtype, seed: int) -> dict:
    """Full-sequence CPU inputs (rounded to ``dtype``) and loss weights of one spec."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, D = sizes.batch, sizes.local_len * world_size, sizes.heads, sizes.head_dim
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if spec.family == "softmax":
        x = dict(q=rnd(B, T, H, D), k=rnd(B, T, sizes.kv_heads, D), v=rnd(B, T, sizes.kv_heads, D))
    else:
        x = dict(q=rnd(B, T, H, D) * D ** -0.5, k=rnd(B, T, H, D) * D ** -0.5, v=rnd(B, T, H, D))
        if spec.gate == "g":
            x["g"] = torch.nn.functional.logsigmoid(rnd(B, T, H) + 3.0)
    x = {n: t.to(dtype) for n, t in x.items()}
    if spec.gate == "g":
        x["g"] = x["g"].float()  # gates stay fp32, as a model keeps them
    extra = dict(w_o=rnd(B, T, H, D))
    if spec.gate == "g_gamma":
        extra["g_gamma"] = torch.log1p(-torch.pow(2.0, -4.0 - torch.arange(H, dtype=torch.float64))).float()
    return dict(tensors=x, **extra)


def reference(spec: Spec, inputs: dict, device: str) -> dict[str, torch.Tensor]:
    """o and the gradients of sum(w_o * o), single device, fp64, on ``device``; returned on CPU."""
    leaves = {n: t.to(device=device, dtype=torch.float64).requires_grad_() for n, t in inputs["tensors"].items()}
    if spec.family == "softmax":
        o, _ = attention_reference(leaves["q"], leaves["k"], leaves["v"], causal=True)
    else:
        g_gamma = inputs.get("g_gamma")
        o, _ = linear_attention_recurrent_reference(
            leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
            g_gamma=None if g_gamma is None else g_gamma.to(device=device, dtype=torch.float64))
    names = list(leaves)
    grads = torch.autograd.grad((o * inputs["w_o"].to(device)).sum(), [leaves[n] for n in names])
    out = dict(o=o.detach())
    out.update({f"d{n}": gr for n, gr in zip(names, grads)})
    return {n: t.cpu() for n, t in out.items()}


def case_staged(ctx, device: str, runs: list[tuple[Spec, dict, int]]) -> list[dict[str, torch.Tensor]]:
    """On every rank: shard each run's inputs, move them to ``device``, run the strategy forward and
    backward on the gloo group, return the local o and gradients on CPU (fp32)."""
    rank, P = ctx.rank, ctx.world_size
    results = []
    for spec, inputs, chunk_size in runs:
        local = {n: shard_tensor(t, spec.layout, rank, P).to(device).requires_grad_()
                 for n, t in inputs["tensors"].items()}
        w_o = shard_tensor(inputs["w_o"], spec.layout, rank, P).to(device)
        if spec.family == "softmax":
            o = seqpar.attention(local["q"], local["k"], local["v"], strategy=spec.strategy, layout=spec.layout,
                                 group=ctx.group, causal=True)
        else:
            g_gamma = inputs.get("g_gamma")
            o, _ = seqpar.linear_attention(local["q"], local["k"], local["v"], strategy=spec.strategy,
                                           layout=spec.layout, group=ctx.group, g=local.get("g"),
                                           g_gamma=None if g_gamma is None else g_gamma.to(device),
                                           chunk_size=chunk_size)
        assert o.device.type == torch.device(device).type and o.dtype == local["q"].dtype
        (o.float() * w_o.float()).sum().backward()
        out = dict(o=o.detach())
        out.update({f"d{n}": t.grad for n, t in local.items()})
        results.append({n: t.float().cpu() for n, t in out.items()})
    return results


def check_strategies(pool: GlooPool, world_size: int, dtype: torch.dtype, device: str, sizes: Sizes,
                     specs: tuple[Spec, ...] = SPECS) -> dict[str, float]:
    """Run ``specs`` on ``world_size`` ranks of ``pool`` with tensors on ``device``; assert each
    result is within TOL[dtype] of the fp64 reference (on ``device``). Returns the errors."""
    inputs = [make_inputs(s, sizes, world_size, dtype, seed=100 + i) for i, s in enumerate(specs)]
    per_rank = pool.run(case_staged, world_size, device=device,
                        runs=[(s, x, sizes.chunk_size) for s, x in zip(specs, inputs)])
    errors, failures = {}, []
    for i, spec in enumerate(specs):
        expected = reference(spec, inputs[i], device)
        for name, ref in expected.items():
            got = unshard_tensor([per_rank[r][i][name] for r in range(world_size)], spec.layout)
            err = float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            key = f"{spec.strategy}:{spec.layout}:{name}"
            errors[key] = err
            if not err <= TOL[dtype]:  # also catches NaN
                failures.append(f"{key} relative error {err:.3g} > {TOL[dtype]:g}")
    assert not failures, f"P={world_size} {dtype} on {device}:\n" + "\n".join(failures)
    return errors


def test_harness_on_cpu(pool):
    """The harness itself, with CPU tensors on the shared gloo pool (2 ranks, fp32, tiny)."""
    errors = check_strategies(pool, 2, torch.float32, "cpu", CPU_SIZES)
    assert len(errors) == 3 * 4 + 4 + 5  # o, dq, dk, dv of 3 softmax specs and lasp2; lasp1 also dg
    assert max(errors.values()) < 1e-4


@pytest.fixture(scope="module")
def gpu_pool():
    """4 gloo processes, every one on cuda:0, started once for this module."""
    if not CUDA:
        pytest.skip("needs CUDA: several gloo ranks staged through host memory on one GPU")
    p = GlooPool(size=4, timeout_s=240.0)
    yield p
    p.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_strategies_staged_on_one_gpu(gpu_pool, world_size, dtype):
    errors = check_strategies(gpu_pool, world_size, dtype, "cuda:0", GPU_SIZES)
    print(f"P={world_size} {dtype}: max relative error {max(errors.values()):.3g} "
          f"({max(errors, key=errors.get)})")
