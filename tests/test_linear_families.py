"""Every linear-attention family under every strategy and layout, with and without packed documents,
on the shared gloo pool, against the fp64 token-by-token recurrence run on each document alone.

Families: scalar per-token gates, GLA per-key gates, the delta rule (no gate, scalar gates, with
use_qk_l2norm) and KDA (per-key gates). Documents (global ``cu_seqlens``) include a 1-token
document, a boundary on a rank boundary, a document over three ranks and an empty document.
Checked on every rank: o, the final state (per document), dq, dk, dv, dg, dbeta and the sum over
ranks of d(initial_state), with and without the final state as an output. The loss weights the final state differently on every rank, so a
final-state gradient that is not summed over ranks fails. Tolerance 1e-9 (float64).

Sizes: B=1 with documents (2 without), H=2, Dk=3, Dv=4, 10 tokens per rank (zigzag: two pieces
of 5), chunk_size 4: neither pieces nor documents are multiples of the chunk.
"""
from __future__ import annotations

import pytest
import torch

from seqpar.kernels.delta_reference import gated_delta_recurrent_reference
from seqpar.kernels.gla_reference import gla_recurrent_reference
from seqpar.kernels.linear_reference import linear_attention_recurrent_reference
from seqpar.layout import balanced_layout, shard_tensor, unshard_tensor
from seqpar.linear import CommStats, linear_attention

H, DK, DV, T_LOCAL, CHUNK = 2, 3, 4, 10, 4
TOL = dict(rtol=1e-9, atol=1e-9)
# family name -> (gate shape: None / "head" / "key", beta, use_qk_l2norm)
FAMILIES = {
    "scalar": ("head", False, False),
    "gla": ("key", False, False),
    "delta": (None, True, False),
    "gated_delta": ("head", True, True),
    "kda": ("key", True, False),
}


def documents(kind: str, P: int) -> list[int] | None:
    """Global boundaries: 'none'; 'short' (a 1-token document, a boundary on the first rank
    boundary, another 1-token document); 'long' (a document over every rank, an empty document)."""
    T = T_LOCAL * P
    if kind == "none":
        return None
    if kind == "short":
        return sorted({0, 1, T_LOCAL, T_LOCAL + 1, T - 3, T}) if P > 1 else [0, 1, 2, 7, 10]
    return [0, 2, 2, T - 2, T]


def draw(family: str, docs: list[int] | None, P: int, with_h0: bool, seed: int) -> dict:
    gate, use_beta, l2 = FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    B, T = (1 if docs else 2), T_LOCAL * P
    n_states = len(docs) - 1 if docs else B
    x = dict(q=rnd(B, T, H, DK), k=rnd(B, T, H, DK), v=rnd(B, T, H, DV), g=None, beta=None,
             h0=rnd(n_states, H, DK, DV) if with_h0 else None, w_o=rnd(B, T, H, DV),
             w_f=[rnd(n_states, H, DK, DV) for _ in range(P)], docs=docs, family=family, l2=l2)
    if not l2 and use_beta:  # the delta rule wants unit keys (and is only contractive with them)
        x["q"] = torch.nn.functional.normalize(x["q"], dim=-1)
        x["k"] = torch.nn.functional.normalize(x["k"], dim=-1)
    if gate == "head":
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, T, H) + 1.5)
    elif gate == "key":
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, T, H, DK) + 1.5)
    if use_beta:
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    return x


def recurrence(x: dict, q, k, v, g, beta, h0):
    """(o, final state) of one document (or the whole batch) by the family's recurrence."""
    if x["beta"] is not None:
        return gated_delta_recurrent_reference(q, k, v, beta, g=g, initial_state=h0, output_final_state=True,
                                               use_qk_l2norm=x["l2"])
    if g is not None and g.dim() == 4:
        return gla_recurrent_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    return linear_attention_recurrent_reference(q, k, v, g=g, initial_state=h0, output_final_state=True)


def oracle(x: dict, with_final: bool = True):
    """o, final states and gradients of the loss on the unsharded sequence, document by document."""
    names = [n for n in ("q", "k", "v", "g", "beta", "h0") if x[n] is not None]
    leaves = {n: x[n].clone().requires_grad_() for n in names}
    get = lambda n: leaves.get(n)  # noqa: E731
    docs = x["docs"]
    if docs is None:
        o, S = recurrence(x, get("q"), get("k"), get("v"), get("g"), get("beta"), get("h0"))
    else:
        outs, finals = [], []
        for n in range(len(docs) - 1):
            a, b = docs[n], docs[n + 1]
            h0 = get("h0")[n:n + 1] if x["h0"] is not None else None
            if a == b:  # an empty document keeps its initial state
                finals.append(h0 if h0 is not None else torch.zeros(1, H, DK, DV, dtype=torch.float64))
                continue
            cut = lambda t: None if t is None else t[:, a:b]  # noqa: E731
            o_n, S_n = recurrence(x, cut(get("q")), cut(get("k")), cut(get("v")), cut(get("g")), cut(get("beta")), h0)
            outs.append(o_n)
            finals.append(S_n)
        o, S = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    loss = (o * x["w_o"]).sum() + (S * sum(x["w_f"])).sum() * with_final
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    return o.detach(), S.detach(), grads


def layout_for(name: str, docs: list[int] | None, P: int):
    if name != "balanced":
        return name
    return balanced_layout(docs or [0, T_LOCAL * P], P, chunks_per_rank=2)


def case_families(ctx, strategy: str, configs: list) -> list[dict]:
    r, P = ctx.rank, ctx.world_size
    results = []
    for cfg in configs:
        x, layout = cfg["x"], layout_for(cfg["layout"], cfg["x"]["docs"], P)
        loc = lambda t: None if t is None else shard_tensor(t, layout, r, P).clone().requires_grad_()  # noqa: E731
        q, k, v, g, beta = (loc(x[n]) for n in ("q", "k", "v", "g", "beta"))
        h0 = x["h0"].clone().requires_grad_() if x["h0"] is not None else None
        cu = torch.tensor(x["docs"]) if x["docs"] is not None else None
        o, S = linear_attention(q, k, v, strategy=strategy, layout=layout, group=ctx.group, g=g, beta=beta,
                                use_qk_l2norm=x["l2"], cu_seqlens=cu, initial_state=h0,
                                output_final_state=cfg["final"], chunk_size=CHUNK)
        assert (S is None) == (not cfg["final"])
        loss = (o * shard_tensor(x["w_o"], layout, r, P)).sum()
        if S is not None:
            loss = loss + (S * x["w_f"][r]).sum()
        loss.backward()
        out = dict(o=o.detach(), S=None if S is None else S.detach(), dh0=None if h0 is None else h0.grad)
        for n, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
            out["d" + n] = None if t is None else t.grad
        results.append(out)
    return results


def configs_for(P: int, strategy: str) -> list[dict]:
    """Every family x document pattern x layout; the initial state and the final state as an output
    take all four combinations along the way."""
    out = []
    for i, family in enumerate(FAMILIES):
        for j, kind in enumerate(("none", "short", "long")):
            for m, layout in enumerate(("contiguous", "zigzag", "balanced")):
                with_h0, with_final = bool((i + j + m) % 2), bool((i + j + m) // 2 % 2)
                seed = 10_000 * P + 100 * i + 10 * j + m + len(strategy)
                out.append(dict(layout=layout, final=with_final, x=draw(family, documents(kind, P), P, with_h0, seed),
                                tag=f"{strategy} P={P} {family} docs={kind} {layout} h0={with_h0} final={with_final}"))
    return out


def check(per_rank: list, configs: list, P: int) -> None:
    for i, cfg in enumerate(configs):
        x, tag = cfg["x"], cfg["tag"]
        layout = layout_for(cfg["layout"], x["docs"], P)
        got = [per_rank[r][i] for r in range(P)]
        o_ref, S_ref, grads = oracle(x, cfg["final"])
        full = lambda name: unshard_tensor([g_[name] for g_ in got], layout)  # noqa: E731
        torch.testing.assert_close(full("o"), o_ref, **TOL, msg=lambda m: f"{tag} o: {m}")
        for r in range(P if cfg["final"] else 0):
            torch.testing.assert_close(got[r]["S"], S_ref, **TOL, msg=lambda m: f"{tag} final state rank {r}: {m}")
        for name in ("q", "k", "v", "g", "beta"):
            if name in grads:
                torch.testing.assert_close(full("d" + name), grads[name], **TOL, msg=lambda m: f"{tag} d{name}: {m}")
        if "h0" in grads:
            share_sum = sum(got[r]["dh0"] for r in range(P))
            torch.testing.assert_close(share_sum, grads["h0"], **TOL, msg=lambda m: f"{tag} sum of dh0: {m}")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", ["lasp2", "lasp1"])
def test_families_documents_layouts(pool, strategy, world_size):
    configs = configs_for(world_size, strategy)
    check(pool.run(case_families, world_size, strategy=strategy, configs=configs), configs, world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_families_documents_layouts_serial_ring(pool, world_size):
    configs = configs_for(world_size, "lasp1_serial")
    check(pool.run(case_families, world_size, strategy="lasp1_serial", configs=configs), configs, world_size)


# ---------------------------------------------------------------------------------------------
# Bytes per pass: a state, plus the transition when it depends on the tokens.


def case_bytes(ctx, family: str, layout: str) -> tuple[int, int]:
    r, P = ctx.rank, ctx.world_size
    x = draw(family, None, P, False, seed=3)
    loc = lambda t: None if t is None else shard_tensor(t, layout, r, P).float()  # noqa: E731
    stats = CommStats()
    q, k, v = (loc(x[n]).requires_grad_() for n in ("q", "k", "v"))
    o, _ = linear_attention(q, k, v, layout=layout, group=ctx.group, g=loc(x["g"]), beta=loc(x["beta"]),
                            use_qk_l2norm=x["l2"], chunk_size=CHUNK, comm_stats=stats)
    o.sum().backward()
    return stats.bytes_sent("forward"), stats.bytes_sent("backward")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lasp2_bytes_per_pass(pool, family):
    """LASP-2 sends, per piece and pass, one state B*H*Dk*Dv and in forward the piece's
    transition: B*H (scalar), B*H*Dk (per-key gates) or B*H*Dk*Dk (delta rule, KDA); fp32."""
    B, P = 2, 2
    state = B * H * DK * DV * 4
    transition = {"scalar": B * H, "gla": B * H * DK, "delta": B * H * DK * DK, "gated_delta": B * H * DK * DK,
                  "kda": B * H * DK * DK}[family] * 4
    for layout, n in (("contiguous", 1), ("zigzag", 2)):
        got = pool.run(case_bytes, P, family=family, layout=layout)
        for r in range(P):
            assert got[r] == (n * (state + transition), n * state), (family, layout, r, got[r])


# ---------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_family_inputs():
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    q, k, v = t(1, 6, 2, 3), t(1, 6, 2, 3), t(1, 6, 2, 4)
    beta = torch.sigmoid(t(1, 6, 2))

    def bad(match, exc=ValueError, **kw):
        with pytest.raises(exc, match=match):
            linear_attention(q, k, v, **kw)

    bad(r"g must be \[B, T, H\] = \[1, 6, 2\].*or \[B, T, H, Dk\] = \[1, 6, 2, 3\].*got \(1, 6, 2, 4\)", g=t(1, 6, 2, 4))
    bad(r"beta must be \[B, T, H\] = \[1, 6, 2\].*got \(1, 6, 2, 1\)", beta=t(1, 6, 2, 1))
    beta_bad = torch.full((1, 6, 2), 0.5, dtype=torch.float64)
    beta_bad[0, 2, 1] = 1.5
    bad(r"beta must lie in \(0, 1\]; 1 of 12 values.*max 1\.5", beta=beta_bad, validate=True)
    bad(r"g_gamma .* not supported with the delta rule", beta=beta, g_gamma=t(2))
    bad(r"use_qk_l2norm=True applies to the delta rule", use_qk_l2norm=True)
    bad(r"use_qk_l2norm must be a bool", TypeError, beta=beta, use_qk_l2norm="yes")
    q2, k2, v2 = t(2, 6, 2, 3), t(2, 6, 2, 3), t(2, 6, 2, 4)
    with pytest.raises(ValueError, match=r"needs batch size 1, got B=2"):
        linear_attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 3, 6]))
    bad(r"cu_seqlens.*end.*6", cu_seqlens=torch.tensor([0, 3, 7]))
    bad(r"initial_state must be \[N \(documents\), H, Dk, Dv\] = \[2, 2, 3, 4\]",
        cu_seqlens=torch.tensor([0, 3, 6]), initial_state=t(1, 2, 3, 4))
    bad(r"no Triton kernel; use backend='torch'", beta=beta, g=-torch.rand(1, 6, 2, 3, dtype=torch.float64),
        backend="triton")


# ---------------------------------------------------------------------------------------------
# The Triton runs under the strategies (Triton's CPU interpreter, in a fresh process: it must
# see TRITON_INTERPRET=1 before triton is imported).

TRITON_CASES = [("gla", "lasp2", "zigzag", "short"), ("gated_delta", "lasp1", "contiguous", "short"),
                ("delta", "lasp2", "balanced", "long")]


def case_triton_families(ctx) -> dict[str, float]:
    """2 ranks, fp32, backend='triton': o, the final states and dq, dk, dv, dg, dbeta against the
    fp64 per-document recurrence, to 2e-4 of each tensor's largest value."""
    r, P = ctx.rank, ctx.world_size
    errors = {}
    for i, (family, strategy, layout_name, kind) in enumerate(TRITON_CASES):
        x = draw(family, documents(kind, P), P, True, seed=500 + i)
        layout = layout_for(layout_name, x["docs"], P)
        o_ref, S_ref, grads = oracle(x)
        loc = lambda t: None if t is None else shard_tensor(t, layout, r, P).float().requires_grad_()  # noqa: E731
        q, k, v, g, beta = (loc(x[n]) for n in ("q", "k", "v", "g", "beta"))
        h0 = x["h0"].float()
        o, S = linear_attention(q, k, v, strategy=strategy, layout=layout, group=ctx.group, g=g, beta=beta,
                                use_qk_l2norm=x["l2"], cu_seqlens=torch.tensor(x["docs"]), initial_state=h0,
                                output_final_state=True, chunk_size=16, backend="triton")
        ((o.double() * shard_tensor(x["w_o"], layout, r, P)).sum() + (S.double() * x["w_f"][r]).sum()).backward()
        pairs = [(o, shard_tensor(o_ref, layout, r, P)), (S, S_ref)]
        pairs += [(t.grad, shard_tensor(grads[n], layout, r, P))
                  for n, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)) if t is not None]
        errors[family] = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in pairs)
    assert all(e < 2e-4 for e in errors.values()), errors
    return errors


def test_triton_families_under_the_strategies_interpreted():
    """backend='triton' (GLA and delta-rule Triton runs, interpreted, fp32) under lasp2 / lasp1,
    three layouts and packed documents equals the fp64 recurrence on 2 ranks."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    from distributed_pool import run_case_interpreted

    run_case_interpreted("test_linear_families", "case_triton_families", world_size=2)
