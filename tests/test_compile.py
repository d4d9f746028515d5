"""The block kernels as torch custom ops (seqpar.kernels.custom_ops): FakeTensor tracing of a
training step and torch.compile of the hybrid model.

1. ``torch.library.opcheck`` of the ``seqpar::`` ops (schema and mutation declarations, fake
   against real outputs: shapes, dtypes, strides, devices): the softmax block ops on the torch
   and sdpa backends in process (also AOT dispatch); every Triton op (softmax forward / backward
   / fused accumulate, and each linear launch of the scalar, GLA and delta-rule kernels) with the
   arguments a real step gives it, in a subprocess under Triton's CPU interpreter (their AOT
   dispatch: the fullgraph compile checks of 2.). The forward block op's autograd formula
   against autograd through the reference (fp64, 1e-12).
2. FakeTensor tracing: one training step (forward + backward) of a small ``HybridLM`` on rank 0
   of torch's fake process group (world 4, 8, 2 and 1), ``backend="triton"``, every softmax
   strategy (ring, allgather, ulysses, usp), lasp2 and lasp1, contiguous and zigzag, scalar, GLA
   and delta-rule layers, with and without packed documents, with a window and a softcap, under
   ``FakeTensorMode``; every gradient must come back with its parameter's shape and the Triton
   ops must be the kernels that ran (no launch, no host read).
   Also in that subprocess: torch.compile with ``fullgraph=True`` of the single-device Triton
   paths (chunked linear attention with its backward, the softmax block calls) against eager.
   The device is "cpu": a CPU-only torch build cannot run autograd on fake CUDA tensors (see
   :func:`fake_training_step`); where a GPU is present the same cases also run on "cuda".
   In a subprocess, so that the fake process group does not leak into other tests.
3. torch.compile: a compiled fp32 model (pattern "LSD": softmax, linear and gated delta-rule
   layers; CPU kernels, i.e. the "sdpa" backend) gives the loss and gradients of the same model
   in eager mode, on 1 and on 2 gloo ranks (zigzag; ring or allgather + lasp2), with and without
   documents. Backend "inductor" when a C++ compiler is found, else "aot_eager"; dynamic=False.
   Tolerances (fp32): loss 1e-5 relative, each gradient 1e-4 of its largest eager entry.
   Every graph break must be a sequence-parallel call (``seqpar.model._eager``: one per attention
   layer, which dynamo counts once per enclosing frame it splits: 11 for the 3 layers here).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar.config import ModelConfig, SequenceParallelConfig
from seqpar.kernels import custom_ops
from seqpar.model import HybridLM
from seqpar.parallelize import parallelize_model, shard_batch, token_loss_sum

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4

SOFTMAX_OPS = ("attention_block_forward", "attention_block_backward", "attention_block_accumulate_triton")
ALL_OPS = SOFTMAX_OPS + tuple(custom_ops.LINEAR_TRITON_OPS)


class SeqparOpLog(TorchDispatchMode):
    """Records every ``seqpar::`` op call (name, backend argument, and optionally its arguments)."""

    def __init__(self, keep_args: bool = False):
        super().__init__()
        self.calls: list[tuple[str, str | None]] = []
        self.args: dict[str, tuple] = {}
        self.keep_args = keep_args

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.name().split("::") if "::" in func.name() else ("", func.name())
        if namespace == "seqpar":
            name = name.split(".")[0]
            backend = next((a for a in args if isinstance(a, str)), None)
            self.calls.append((name, backend))
            if self.keep_args and name not in self.args:
                self.args[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **kwargs)


def test_ops_registered():
    """Every op has a schema in the seqpar namespace and a fake implementation."""
    for name in ALL_OPS:
        op = getattr(torch.ops.seqpar, name).default
        assert op._schema.name == f"seqpar::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), name
    assert [a.name for a in torch.ops.seqpar.attention_block_accumulate_triton.default._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write] == ["o_acc", "lse_acc"]


def _softmax_inputs(tq: int, tk: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, tq, 4, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(1, tk, 2, 16, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, torch.randn(1, tq, 4, 16, generator=g, dtype=dtype)


# opcheck's tests but the dynamic-shape one (slow on the reference's loops; compile runs dynamic=False)
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("mask", [(None, None, None), (-3, None, None), (0, -4, None), (2, None, 0.7)],
                         ids=lambda m: f"m{m[0]}-w{m[1]}-cap{m[2]}")
def test_opcheck_softmax_cpu(backend, mask):
    """The softmax block ops on the CPU backends: schema, fake vs real outputs (the sdpa op's
    strided outputs included: its ops return [B, T, H, D] transposes), AOT dispatch."""
    diag, win, cap = mask
    q, k, v, do = _softmax_inputs(12, 10)
    kv_view = torch.randn(1, 10, 2, 2, 16).select(3, 1)  # a strided view, as the drivers pass them
    args = (q, k, kv_view, backend, 0.25, diag, win, cap)
    torch.library.opcheck(torch.ops.seqpar.attention_block_forward.default, args, test_utils=OPCHECKS)
    o, lse = custom_ops.attention_block_forward(*args)
    delta = (o * do).sum(-1).transpose(1, 2).contiguous()
    for d, out in ((delta, o), (None, o)) if backend == "sdpa" else ((delta, None),):
        torch.library.opcheck(torch.ops.seqpar.attention_block_backward.default,
                              (do, q, k, kv_view, lse, d, out, backend, 0.25, diag, win, cap), test_utils=OPCHECKS)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("use_lse", [False, True])
def test_block_forward_autograd(backend, use_lse):
    """The forward op is differentiable (through the backward op), as the plain torch backends were:
    fp64 gradients of sum(o * w) (+ sum(lse * w')) against autograd through the reference's torch
    ops, to 1e-12, with a causal window band."""
    from seqpar.kernels.softmax import attention_block_forward
    from seqpar.kernels.softmax_reference import attention_block_forward_reference

    q, k, v, w = _softmax_inputs(12, 10, torch.float64)
    w_lse = torch.randn(1, 4, 12, dtype=torch.float64)
    grads = []
    for fn in (attention_block_forward, attention_block_forward_reference):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        kw = dict(backend=backend) if fn is attention_block_forward else {}
        o, lse = fn(*xs, scale=0.3, diagonal_offset=2, window_offset=-5, **kw)
        loss = (o * w).sum() + ((torch.nan_to_num(lse, neginf=0.0) * w_lse).sum() if use_lse else 0)
        loss.backward()
        grads.append([x.grad for x in xs])
    for name, a, b in zip("qkv", *grads):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), name


# ----------------------------------------------------------------------------------------------
# In a subprocess (Triton's interpreter; torch's fake process group): opcheck of the Triton ops,
# FakeTensor tracing of training steps.


def _capture_triton_op_args() -> dict[str, tuple]:
    """Real (interpreted) calls of every Triton op with the arguments a step gives them."""
    from seqpar.kernels.linear import chunk_linear_attention
    from seqpar.kernels.softmax import attention_block_accumulate_
    import seqpar

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, T, H, D = 1, 24, 2, 16
    log = SeqparOpLog(keep_args=True)
    with log:
        q, k, v = (rnd(B, T, H, D).requires_grad_() for _ in range(3))
        o = seqpar.attention(q, k, v, strategy="ring", backend="triton", window=9, softcap=3.0)
        o.sum().backward()
        o_acc, lse_acc = torch.zeros(B, T, H, D), torch.full((B, H, T), float("-inf"))
        attention_block_accumulate_(q.detach(), k.detach(), v.detach(), o_acc, lse_acc, scale=0.25,
                                    diagonal_offset=0, backend="triton")
        gates = dict(scalar=dict(g=torch.nn.functional.logsigmoid(rnd(B, T, H)).requires_grad_()),
                     gla=dict(g=torch.nn.functional.logsigmoid(rnd(B, T, H, D)).requires_grad_()),
                     delta=dict(g=torch.nn.functional.logsigmoid(rnd(B, T, H)).requires_grad_(),
                                beta=torch.rand(B, T, H, generator=g).requires_grad_(), use_qk_l2norm=True))
        for kw in gates.values():
            h0 = rnd(B, H, D, D).requires_grad_()
            o, final = chunk_linear_attention(q, k, v, initial_state=h0, output_final_state=True, backend="triton",
                                              chunk_size=16, **kw)
            (o.sum() + final.sum()).backward()
    return log.args


def opcheck_triton_ops() -> dict[str, str]:
    """{op name: "ok" or the failure} for every Triton op (needs TRITON_INTERPRET=1 on CPU)."""
    results = {}
    captured = _capture_triton_op_args()
    for name in ALL_OPS:
        if name not in captured:
            results[name] = "not called"
            continue
        op = getattr(torch.ops.seqpar, name).default
        try:
            # AOT dispatch of these ops: compile_triton_checks runs every one of them under aot_eager
            torch.library.opcheck(op, captured[name], test_utils=("test_schema", "test_faketensor"))
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            results[name] = f"{type(e).__name__}: {str(e)[:2000]}"
    return results


def compile_triton_checks() -> dict[str, dict]:
    """torch.compile (aot_eager, fullgraph=True: no graph break allowed) of the single-device Triton
    paths -- chunk_linear_attention (autograd included) for the scalar, GLA and delta-rule families,
    and the softmax block calls of the drivers (forward, fused accumulate, backward; MQA, causal
    offsets, windows, softcap) -- against eager: {name:
    {"err": largest |difference| of the loss and gradients, relative to the largest eager value,
    or "error": ...}}. The seqpar:: ops are traced through their fake implementations and run
    (interpreted) at run time."""
    import torch._dynamo
    from seqpar.kernels.linear import chunk_linear_attention
    from seqpar.kernels.softmax import attention_block_accumulate_, attention_block_backward, attention_block_forward

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, T, H, D = 1, 24, 2, 16
    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    gates = {"linear_scalar": dict(g=torch.nn.functional.logsigmoid(rnd(B, T, H))),
             "linear_gla": dict(g=torch.nn.functional.logsigmoid(rnd(B, T, H, D))),
             "linear_delta": dict(g=torch.nn.functional.logsigmoid(rnd(B, T, H)),
                                  beta=torch.rand(B, T, H, generator=g))}

    def linear(q, k, v, g, beta=None):
        kw = dict(g=g) if beta is None else dict(g=g, beta=beta, use_qk_l2norm=True)
        o, final = chunk_linear_attention(q, k, v, backend="triton", output_final_state=True, chunk_size=16, **kw)
        return o.square().sum() + final.sum()

    def softmax_blocks(q, k, v):
        """Two blocks of one query block (the second merged by the fused accumulate, an op that
        writes its arguments), then both blocks' backward: the dispatcher calls of the drivers."""
        k, v = k[:, :, :1], v[:, :, :1]  # MQA
        kw = dict(scale=0.25, backend="triton", softcap=3.0)
        n = q.shape[1] // 2  # queries [n, 2n) against keys [n, 2n) (causal, window 9), then keys [0, n)
        q = q[:, n:]
        o, lse = attention_block_forward(q, k[:, n:], v[:, n:], diagonal_offset=0, window_offset=-8, **kw)
        o, lse = o.clone(), lse.clone()
        attention_block_accumulate_(q, k[:, :n], v[:, :n], o, lse, diagonal_offset=n, window_offset=n - 8, **kw)
        do = torch.cos(o)
        delta = (o * do).sum(-1).transpose(1, 2).contiguous()
        grads = [attention_block_backward(do, q, k[:, a:b], v[:, a:b], lse, delta, diagonal_offset=m, window_offset=w,
                                          **kw) for a, b, m, w in ((n, 2 * n, 0, -8), (0, n, n, n - 8))]
        return [o, lse] + [x for g in grads for x in g]

    cases = {name: (linear, (q, k, v, *kw.values()), True) for name, kw in gates.items()}
    cases["softmax_blocks"] = (softmax_blocks, (q, k, v), False)
    out = {}
    for name, (fn, inputs, differentiable) in cases.items():
        try:
            torch._dynamo.reset()
            results = []
            for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
                if not differentiable:
                    results.append(f(*inputs))
                    continue
                xs = [x.clone().requires_grad_() for x in inputs]
                loss = f(*xs)
                loss.backward()
                results.append([loss.detach()] + [x.grad for x in xs])
            finite = lambda x: torch.nan_to_num(x, neginf=0.0)  # noqa: E731 - lse of rows that see no key
            out[name] = {"err": max(float((finite(c) - finite(e)).abs().max() / finite(e).abs().max().clamp_min(1e-30))
                                    for e, c in zip(*results))}
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:3000]}"}
    return out


FAKE_CASES = [
    # world, pattern, softmax strategy, linear strategy, layout, documents ("tuple": cu_seqlens as a
    # tuple of ints; "tensor": a real CPU tensor made outside the mode), model overrides
    (4, "LS", "ring", "lasp2", "zigzag", None, {}),
    (4, "LS", "ring", "lasp2", "zigzag", "tuple", {}),
    (4, "DS", "allgather", "lasp1", "zigzag", None, {}),
    (4, "DDDS", "allgather", "lasp2", "zigzag", "tensor", {}),
    (4, "LS", "ulysses", "lasp2", "zigzag", "tuple", dict(linear_decay="gla", window=48, softcap=20.0)),
    (4, "LS", "usp", "lasp2", "zigzag", "tuple", {}),
    (4, "LDS", "ring", "lasp1", "contiguous", "tuple", dict(linear_decay="fixed", window=48)),
    (8, "LDS", "ring", "lasp2", "zigzag", "tuple", {}),
    (2, "LDS", "allgather", "lasp1", "contiguous", None, dict(softcap=20.0)),
    (1, "LS", "ring", "lasp2", "zigzag", None, {}),
    (1, "DS", "ring", "lasp2", "zigzag", "tuple", {}),
]


def fake_training_step(world_size: int, pattern: str, softmax_strategy: str, linear_strategy: str, layout: str,
                       documents: str | None, model_kw: dict, device: str = "cpu", tokens_per_rank: int = 64) -> dict:
    """One forward + backward of a small HybridLM under ``FakeTensorMode`` as rank 0 of a fake
    process group of ``world_size`` ranks, with the Triton kernels (their fake implementations).

    The recipe (docs: /tmp/spec/compile.md): build the model on the meta device, enter
    ``FakeTensorMode(allow_non_fake_inputs=True)``, ``to_empty(device=...)``, parallelize, and pass
    ``cu_seqlens`` as a tuple of ints or a real CPU tensor made outside the mode (a fake tensor's
    values cannot be read). On a CPU-only torch
    build ``device`` must be "cpu": there fake CUDA tensors support factories and some ops, but
    Python indexing raises "PyTorch is not linked with support for cuda devices" and autograd
    aborts the process (no CUDA device guard)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from seqpar.comm import build_usp_groups

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        cfg = ModelConfig(**{**dict(vocab_size=64, dim=64, n_layers=len(pattern), n_heads=4, n_kv_heads=2,
                                    pattern=pattern, gate_rank=8, linear_decay="gate"), **model_kw})
        with torch.device("meta"):
            model = HybridLM(cfg)
        T = tokens_per_rank * world_size
        cu = None if documents is None else (0, T // 3, T // 2, T)
        if documents == "tensor":
            cu = torch.tensor(cu, dtype=torch.int32)  # a real tensor: FakeTensorMode keeps its values
        usp = softmax_strategy == "usp"
        group = build_usp_groups(list(range(world_size)), 2, sp_group=dist.group.WORLD) if usp else dist.group.WORLD
        log = SeqparOpLog()
        with FakeTensorMode(allow_non_fake_inputs=True), log:
            model = model.to_empty(device=device)
            sp = SequenceParallelConfig(sp_size=world_size, layout=layout, softmax_strategy=softmax_strategy,
                                        linear_strategy=linear_strategy, backend="triton", ulysses_size=2 if usp else 1)
            parallelize_model(model, sp, group)
            tokens = torch.zeros(1, tokens_per_rank, dtype=torch.long, device=device)
            logits = model(tokens, cu_seqlens=cu)
            token_loss_sum(logits, torch.zeros_like(tokens)).backward()
            bad = [n for n, p in model.named_parameters()
                   if p.grad is None or p.grad.shape != p.shape or p.grad.device != p.device]
        return dict(bad_grads=bad, ops=sorted({f"{n}[{b}]" if b else n for n, b in log.calls}))
    finally:
        dist.destroy_process_group()


def _subprocess_main() -> None:
    """Entry point of the subprocess: prints one JSON line of results."""
    out = {"opcheck": opcheck_triton_ops(), "compile": compile_triton_checks(), "fake": {}}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for case in FAKE_CASES:
        for device in devices:
            key = f"{device}:{_fake_id(case)}"
            try:
                out["fake"][key] = fake_training_step(*case, device=device)
            except Exception:  # noqa: BLE001 - reported to the parent test
                import traceback

                out["fake"][key] = {"error": traceback.format_exc()[-3000:]}
    print("RESULTS " + json.dumps(out))


def _fake_id(case) -> str:
    world, pattern, softmax, linear, layout, docs, kw = case
    extra = "".join(f"-{k}={v}" for k, v in kw.items())
    return f"w{world}-{pattern}-{softmax}-{linear}-{layout}-{'docs-' + docs if docs else 'nodocs'}{extra}"


@pytest.fixture(scope="module")
def triton_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "import test_compile as t; t._subprocess_main()"], cwd=TESTS_DIR,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck_triton_ops(triton_results, name):
    assert triton_results["opcheck"][name] == "ok", triton_results["opcheck"][name]


@pytest.mark.parametrize("name", ["linear_scalar", "linear_gla", "linear_delta", "softmax_blocks"])
def test_compile_triton_fullgraph(triton_results, name):
    """The Triton paths compile into one graph (the ops' fakes trace) and give eager's numbers."""
    res = triton_results["compile"][name]
    assert "error" not in res, res.get("error")
    assert res["err"] < 1e-6, res


@pytest.mark.parametrize("case", FAKE_CASES, ids=_fake_id)
def test_fake_training_step(triton_results, case):
    """Forward + backward under FakeTensorMode on a fake process group: every gradient has its
    parameter's shape, and the Triton ops are what ran."""
    runs = {key: res for key, res in triton_results["fake"].items() if key.split(":", 1)[1] == _fake_id(case)}
    assert runs, sorted(triton_results["fake"])
    for key, res in runs.items():
        assert "error" not in res, res.get("error")
        assert res["bad_grads"] == [], res["bad_grads"]
        ops = set(res["ops"])
        world, pattern = case[0], case[1]
        expected = {"attention_block_forward[triton]", "attention_block_backward[triton]"}
        if "L" in pattern:
            expected |= ({"gla_triton_state", "gla_triton_fwd_o", "gla_triton_bwd"}
                         if case[6].get("linear_decay") == "gla" else
                         {"linear_triton_fwd_h", "linear_triton_fwd_o", "linear_triton_bwd_dh", "linear_triton_bwd"})
        if "D" in pattern:
            expected |= {"delta_triton_wy", "delta_triton_fwd_h", "delta_triton_fwd_o", "delta_triton_bwd_dv_local",
                         "delta_triton_bwd_dh", "delta_triton_bwd_dqk", "delta_triton_bwd_wy"}
        if world > 1 and case[2] == "ring" and case[4] == "zigzag":  # rank 0 sees several K/V blocks
            expected.add("attention_block_accumulate_triton")
        assert expected <= ops, f"{key}: missing {sorted(expected - ops)}; ran {sorted(ops)}"
        assert not any("[torch]" in op or "[sdpa]" in op for op in ops), ops


# ----------------------------------------------------------------------------------------------
# torch.compile against eager, on the gloo pool


def compile_backend() -> str:
    """"inductor" when a C++ compiler is found (inductor's CPU code generation needs one), else
    "aot_eager" (AOT autograd's graphs, run by eager kernels)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
    except Exception:  # noqa: BLE001 - no compiler found
        return "aot_eager"
    return "inductor" if shutil.which(cxx) else "aot_eager"


def _compile_model() -> HybridLM:
    # softmax (GQA), linear (per-head decay) and gated delta-rule (data-dependent gates, beta) layers;
    # no more layers or gate networks than that: cold inductor compiles cost ~1 s per fused kernel
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, pattern="LSD",
                      linear_decay="fixed", linear_output_norm=False)
    torch.manual_seed(0)
    return HybridLM(cfg)


def case_compile(ctx, softmax_strategy: str, documents: bool, backend: str, tokens_per_rank: int = 16) -> dict:
    """Loss and gradients of one step of a compiled model against the same model in eager mode,
    on this rank (the gradients before any sync are per rank: compared as they are)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _compile_model()
    compiled = copy.deepcopy(eager)
    sp = SequenceParallelConfig(sp_size=ctx.world_size, layout="zigzag", softmax_strategy=softmax_strategy,
                                linear_strategy="lasp2", backend="sdpa")
    for m in (eager, compiled):
        parallelize_model(m, sp, ctx.group)
    T = tokens_per_rank * ctx.world_size
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 64, (1, T + 1), generator=gen)
    batch = shard_batch(seq[:, :-1], seq[:, 1:], "zigzag", ctx.group)
    cu = (0, 5, T // 2 + 3, T) if documents else None
    fn = torch.compile(compiled, backend=backend, dynamic=False)
    losses = []
    try:
        for model in (eager, fn):
            loss = token_loss_sum(model(batch.tokens, cu_seqlens=cu), batch.labels) / T
            loss.backward()
            losses.append(float(loss))
        counters = torch._dynamo.utils.counters
        breaks, graphs = dict(counters["graph_break"]), int(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()  # the pool's processes run other tests next
    worst, worst_name = 0.0, ""
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled.named_parameters()):
        err = float((p_c.grad - p_e.grad).abs().max() / p_e.grad.abs().max().clamp_min(1e-30))
        if err > worst:
            worst, worst_name = err, name
    return dict(loss=losses, loss_err=abs(losses[1] - losses[0]) / abs(losses[0]), grad_err=worst,
                grad_worst=worst_name, graph_breaks=breaks, graphs=graphs)


COMPILE_CASES = [(1, "ring", False), (1, "ring", True), (2, "ring", False), (2, "allgather", True)]


@pytest.mark.parametrize("world,strategy,documents", COMPILE_CASES,
                         ids=[f"w{w}-{s}-{'docs' if d else 'nodocs'}" for w, s, d in COMPILE_CASES])
def test_compile_matches_eager(pool, world, strategy, documents):
    backend = compile_backend()
    for rank, res in enumerate(pool.run(case_compile, world, softmax_strategy=strategy, documents=documents,
                                        backend=backend)):
        assert res["loss_err"] < LOSS_RTOL, f"rank {rank} ({backend}): loss {res['loss']}"
        assert res["grad_err"] < GRAD_RTOL, f"rank {rank} ({backend}): {res['grad_worst']} off by {res['grad_err']:.2e}"
        # the graph breaks are the sequence-parallel calls (seqpar.model._eager: torch.compiler.disable)
        reasons = list(res["graph_breaks"])
        assert reasons and all("torch.compiler.disable" in r and "seqpar" in r for r in reasons), res["graph_breaks"]
