"""The hybrid model's new linear-attention families: gated delta-rule layers (pattern letter 'D',
Gated DeltaNet as in Qwen3-Next), GLA per-key gates on linear layers (linear_decay='gla'), and
packed documents (cu_seqlens) through linear and delta-rule layers.

* The single-device mixers and a whole GatedDeltaNet layer equal a token-by-token fp64 recurrence
  written out here (tolerance 1e-12 relative to the largest entry): the oracle of the rest.
* One training step (forward, backward, gradient sync) on 1, 2 and 4 gloo ranks, zigzag and
  contiguous layouts, lasp2 and lasp1, equals the unsharded single-device model (fp64: loss
  within 1e-10, every parameter gradient within 1e-8 of its largest reference entry; the cases
  of tests/test_model.py).
* With documents (a 1-token document, an empty one, one spanning ranks) the sharded step equals
  the unsharded one given the same cu_seqlens AND the model run on each document separately.
* Bad configuration values raise errors naming them; the qwen3next presets train on 2 ranks.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqpar.config import MODEL_PRESETS, TRAIN_PRESETS, ModelConfig, SequenceParallelConfig, check_compatible, preset
from seqpar.model import GatedDeltaNet, HybridLM, LinearAttention, rope_cos_sin

from test_model import _check, _documents_batch, _tiny_config, case_documents, case_step

# fla's l2norm (use_qk_l2norm_in_kernel): x / sqrt(sum x^2 + 1e-6)
L2NORM_EPS = 1e-6
MIX_TOL = 1e-12  # fp64 mixer / layer against the recurrence, relative to the largest entry


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                g_gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None, l2norm: bool = False,
                bounds: list[int] | None = None) -> torch.Tensor:
    """o [B, T, H, Dv] of S_t = decay_t S_{t-1} + k_t v_t^T (beta None) or of the gated delta rule
    S_t = decay_t S_{t-1} + beta_t k_t (v_t - (decay_t S_{t-1})^T k_t)^T, o_t = Dk^-1/2 S_t^T q_t,
    one token at a time; decay_t = exp(g_t) (per head [B, T, H] or per key channel [B, T, H, Dk])
    or exp(g_gamma) [H]. The state restarts from zero at every start in ``bounds``."""
    B, T, H, Dk = q.shape
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    starts = set(bounds[:-1]) if bounds is not None else {0}
    S = None
    outs = []
    for t in range(T):
        if t in starts or S is None:
            S = q.new_zeros(B, H, Dk, v.shape[-1])
        if g is not None:
            decay = g[:, t].exp()
            S = S * (decay[..., None, None] if g.dim() == 3 else decay[..., None])
        elif g_gamma is not None:
            S = S * g_gamma.exp()[None, :, None, None]
        if beta is None:
            S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        else:
            err = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
            S = S + (beta[:, t, :, None] * k[:, t])[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * Dk ** -0.5)
    return torch.stack(outs, dim=1)


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = float((got - want).abs().max())
    scale = float(want.abs().max()) or 1.0
    assert err <= MIX_TOL * scale, f"{what}: max error {err:.3g} (largest entry {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# Single device: the mixers and a whole delta-rule layer against the recurrence.


@pytest.mark.parametrize("family,bounds", [
    ("gla", None), ("gla", [0, 1, 30, 30, 31, 77]), ("gate", [0, 1, 30, 30, 31, 77]),
    ("fixed", [0, 64, 77]), ("none", [0, 13, 77]), ("delta", None), ("delta", [0, 1, 30, 30, 31, 77]),
])
def test_single_device_mixers_match_the_recurrence(family, bounds):
    """The single-device mixers (the oracle of the sharded tests): GLA's per-key gates, the
    per-head gate, the fixed decay and no decay, and the gated delta rule with q / k L2-normalised
    inside, with and without documents (a 1-token document, an empty one, a boundary at a chunk
    edge), in output and in gradients of q, k, v and the gates."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, Dk, Dv = 1, 77, 3, 8, 12
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if family == "delta":
        cfg = _tiny_config(pattern="D", delta_heads=H, delta_head_dim=Dk, delta_value_dim=Dv)
        layer = GatedDeltaNet(cfg).double()
        q, k, v = rand(B, T, H, Dk), rand(B, T, H, Dk), rand(B, T, H, Dv)
        gates = dict(g=-F.softplus(rand(B, T, H)) * 0.5, beta=torch.sigmoid(rand(B, T, H)))
    else:
        cfg = _tiny_config(pattern="L", linear_decay=family, n_heads=H, n_kv_heads=H, dim=H * Dk)
        layer = LinearAttention(cfg).double()
        q, k, v = rand(B, T, H, Dk), rand(B, T, H, Dk), rand(B, T, H, Dk)
        g_shape = {"gla": (B, T, H, Dk), "gate": (B, T, H)}.get(family)
        gates = dict(g=F.logsigmoid(rand(*g_shape)) / 4 if g_shape else None,
                     g_gamma=-torch.rand(H, generator=gen, dtype=torch.float64) if family == "fixed" else None)
    inputs = {"q": q, "k": k, "v": v, **{n: t for n, t in gates.items() if t is not None and n != "g_gamma"}}
    for t in inputs.values():
        t.requires_grad_(True)
    w = rand(B, T, H, v.shape[-1])
    extra = () if bounds is None else (bounds,)
    o = layer.mix(q, k, v, *gates.values(), *extra)
    ref = _recurrence(q, k, v, **gates, l2norm=family == "delta", bounds=bounds)
    _assert_close(o.detach(), ref.detach(), "o")
    grads = torch.autograd.grad((o * w).sum(), list(inputs.values()))
    ref_grads = torch.autograd.grad((ref * w).sum(), list(inputs.values()))
    for name, got, want in zip(inputs, grads, ref_grads):
        _assert_close(got, want, f"d{name}")


def test_gated_delta_net_layer_matches_its_formula():
    """A whole 'D' layer in fp64 (Dk != Dv, delta_heads != n_heads) equals its definition written
    out: SiLU projections, beta = sigmoid(W_b x), g = -exp(A_log) softplus(W_a x + dt_bias), the
    delta rule on L2-normalised q / k, per-head gated RMSNorm, output projection; in output and
    in the gradients of the input and of every parameter."""
    cfg = _tiny_config(pattern="DS", delta_heads=3, delta_head_dim=8, delta_value_dim=12)
    torch.manual_seed(0)
    layer = GatedDeltaNet(cfg).double()
    with torch.no_grad():  # a strong, varied decay and a non-trivial norm weight
        layer.out_norm.weight.uniform_(0.5, 1.5)
        for p in (layer.wq.weight, layer.wk.weight, layer.wv.weight, layer.w_beta.weight, layer.w_decay.weight):
            p.mul_(10.0)
    B, T, H, Dk, Dv = 1, 45, 3, 8, 12
    x = torch.randn(B, T, cfg.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, cfg.dim, dtype=torch.float64)
    out = layer(x, None, None)
    assert out.shape == (B, T, cfg.dim) and out.dtype == torch.float64
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((out * w).sum(), [x, *params.values()])

    def formula(x, p):
        q = F.silu(x @ p["wq.weight"].T).view(B, T, H, Dk)
        k = F.silu(x @ p["wk.weight"].T).view(B, T, H, Dk)
        v = F.silu(x @ p["wv.weight"].T).view(B, T, H, Dv)
        beta = torch.sigmoid(x @ p["w_beta.weight"].T)
        g = -p["A_log"].exp() * F.softplus(x @ p["w_decay.weight"].T + p["dt_bias"])
        o = _recurrence(q, k, v, g=g, beta=beta, l2norm=True)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * p["out_norm.weight"]
        o = o * F.silu(x @ p["w_gate.weight"].T).view(B, T, H, Dv)
        return o.reshape(B, T, H * Dv) @ p["wo.weight"].T

    ref = formula(x, params)
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, *params.values()])
    _assert_close(out.detach(), ref.detach(), "output")
    for name, got, want in zip(["x", *params], grads, ref_grads):
        _assert_close(got, want, f"d{name}")
    with torch.no_grad():
        g, beta = layer.gates(x)
    assert float(g.min()) < -0.05 and float(g.max()) <= 0 and 0 < float(beta.min()) and float(beta.max()) < 1


def test_gla_gates_and_delta_initialisation():
    """GLA gates are [B, T, H, head_dim] = logsigmoid(low-rank projection) / gate_normalizer, one
    per key channel; the delta layers' A_log / dt_bias start as Mamba2's (A in [1, 16],
    softplus(dt_bias) in [1e-3, 0.1]) after HybridLM's reset, not as 1-D norm weights / biases."""
    cfg = _tiny_config(pattern="LD", linear_decay="gla", gate_rank=5, gate_normalizer=8.0)
    torch.manual_seed(0)
    model = HybridLM(cfg).double()
    lin, delta = model.attention_modules()
    assert isinstance(lin, LinearAttention) and isinstance(delta, GatedDeltaNet)
    assert lin.gate[0].weight.shape == (5, cfg.dim) and lin.gate[1].weight.shape == (cfg.n_heads * cfg.head_dim, 5)
    A = delta.A_log.detach().exp()
    dt = F.softplus(delta.dt_bias.detach())
    assert bool(((A >= 1) & (A <= 16)).all()) and A.std() > 0, A
    assert bool(((dt >= 1e-3 - 1e-12) & (dt <= 0.1 + 1e-12)).all()) and dt.std() > 0, dt
    # the gate the layer hands to the mixer
    seen = {}
    original = lin.mix

    def recording(q, k, v, g, g_gamma, *rest):
        seen["g"], seen["g_gamma"] = g, g_gamma
        return original(q, k, v, g, g_gamma, *rest)

    lin.mix = recording
    x = torch.randn(2, 9, cfg.dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(9), cfg.head_dim, cfg.rope_theta, torch.float64)
    lin(x, cos, sin)
    expected = F.logsigmoid(lin.gate[1](lin.gate[0](x))).view(2, 9, cfg.n_heads, cfg.head_dim) / 8.0
    assert seen["g_gamma"] is None and seen["g"].shape == (2, 9, cfg.n_heads, cfg.head_dim)
    torch.testing.assert_close(seen["g"], expected, rtol=0, atol=0)


def test_delta_mix_rejects_a_head_token_swap():
    """Under context parallelism (one process, no group) the delta layer's mixer checks the head
    axis against delta_heads: [B, H, T, D] tensors raise a ValueError naming both layouts."""
    from seqpar.model import ContextParallel

    layer = GatedDeltaNet(_tiny_config(pattern="D", delta_heads=3, delta_head_dim=8, delta_value_dim=12)).double()
    layer.context_parallel = ContextParallel(group=None, strategy="lasp2", validate=False)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 10, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 10, 3, 12, generator=gen, dtype=torch.float64)
    g, beta = -torch.rand(1, 10, 3, dtype=torch.float64), torch.full((1, 10, 3), 0.5, dtype=torch.float64)
    _assert_close(layer.mix(q, k, v, g, beta), _recurrence(q, k, v, g=g, beta=beta, l2norm=True), "o")
    with pytest.raises(ValueError, match=r"GatedDeltaNet.mix: expected query \[b, s, 3, d\].*\(1, 3, 10, 8\)"):
        layer.mix(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g, beta)


def test_documents_change_the_model_and_one_document_changes_nothing():
    """cu_seqlens changes the logits of models whose only document-aware layers are delta-rule or
    GLA layers (so the document cases below can fail), and a row of one document equals no
    cu_seqlens."""
    bounds = [0, 1, 13, 13, 14, 24]
    for kw in (dict(pattern="D", n_layers=2), dict(pattern="L", linear_decay="gla")):
        torch.manual_seed(0)
        model = HybridLM(_tiny_config(**kw)).double()
        tokens, _ = _documents_batch(24, bounds, model.config.vocab_size)
        with torch.no_grad():
            plain = model(tokens)
            packed = model(tokens, cu_seqlens=torch.tensor(bounds))
            assert float((packed - plain).abs().max()) > 1e-4, kw
            torch.testing.assert_close(packed[:, :1], model(tokens[:, :1]), rtol=0, atol=1e-12)
            torch.testing.assert_close(model(tokens, cu_seqlens=[0, 24]), plain, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Sequence parallel: one training step equals the unsharded model.

DDDS = dict(pattern="DDDS", n_layers=4)
GLA = dict(pattern="LS", linear_decay="gla")
MIXED = dict(pattern="DLS", n_layers=3, linear_decay="gla", delta_heads=2, delta_head_dim=8, delta_value_dim=12)

STEP_CASES = [
    # world, model overrides, sequence-parallel config
    (1, DDDS, dict(layout="contiguous", linear_strategy="lasp2")),
    (1, GLA, dict(layout="contiguous", linear_strategy="lasp1")),
    (2, DDDS, dict(layout="zigzag", linear_strategy="lasp2")),
    (2, DDDS, dict(layout="contiguous", linear_strategy="lasp1")),
    (2, GLA, dict(layout="zigzag", linear_strategy="lasp1")),
    (2, GLA, dict(layout="contiguous", linear_strategy="lasp2")),
    (4, DDDS, dict(layout="zigzag", linear_strategy="lasp1", softmax_strategy="allgather")),
    (4, DDDS, dict(layout="contiguous", linear_strategy="lasp2")),
    (4, GLA, dict(layout="zigzag", linear_strategy="lasp2")),
    (4, GLA, dict(layout="contiguous", linear_strategy="lasp1", softmax_strategy="ulysses")),
    (4, MIXED, dict(layout="zigzag", linear_strategy="lasp2")),
]


def _ids(cases) -> list[str]:
    return [f"w{w}-{m['pattern']}-{m.get('linear_decay', '')}-{s.get('layout')}-{s.get('linear_strategy')}"
            for w, m, s, *_ in cases]


@pytest.mark.parametrize("world,model_kw,sp_kw", STEP_CASES, ids=_ids(STEP_CASES))
def test_step_matches_unsharded(pool, world, model_kw, sp_kw):
    _check(pool.run(case_step, world, model_kw=model_kw, sp_kw=sp_kw))


def test_step_with_activation_checkpointing(pool):
    """Recomputing the delta-rule layers in backward re-runs their collectives and changes nothing."""
    _check(pool.run(case_step, 2, model_kw=DDDS, sp_kw=dict(layout="zigzag"), activation_checkpointing=True))


# a 1-token document, one that spans ranks (in every layout and world size below), an empty
# one, another 1-token one, and a last one
DOCUMENT_BOUNDS = [0, 1, 13, 13, 14, 24]

DOCUMENT_CASES = [
    (1, DDDS, dict(linear_strategy="lasp2")),
    (1, GLA, dict(linear_strategy="lasp1")),
    (2, DDDS, dict(layout="zigzag", linear_strategy="lasp2")),
    (2, DDDS, dict(layout="contiguous", linear_strategy="lasp1")),
    (2, GLA, dict(layout="zigzag", linear_strategy="lasp1")),
    (4, DDDS, dict(layout="zigzag", linear_strategy="lasp1")),
    (4, DDDS, dict(layout="contiguous", linear_strategy="lasp2")),
    (4, GLA, dict(layout="contiguous", linear_strategy="lasp2")),
    (4, MIXED, dict(layout="zigzag", linear_strategy="lasp2")),
]


@pytest.mark.parametrize("world,model_kw,sp_kw", DOCUMENT_CASES, ids=_ids(DOCUMENT_CASES))
def test_documents_match_unsharded_and_separate_documents(pool, world, model_kw, sp_kw):
    """With cu_seqlens the delta-rule and GLA layers reset their state at every document start:
    the sharded step equals the unsharded one with the same cu_seqlens, and both equal the model
    run on each document on its own."""
    _check(pool.run(case_documents, world, model_kw=model_kw, sp_kw=dict(sp_kw), bounds=DOCUMENT_BOUNDS))


# ---------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(pattern="DS", delta_heads=0), ValueError, "delta_heads must be >= 1 or None, got 0"),
    (dict(pattern="DS", delta_head_dim=-4), ValueError, "delta_head_dim must be >= 1 or None, got -4"),
    (dict(pattern="DS", delta_value_dim=2.5), TypeError, "delta_value_dim must be an int >= 1 or None, got float 2.5"),
    (dict(pattern="DS", delta_heads=True), TypeError, "delta_heads must be an int"),
    (dict(pattern="LS", delta_heads=2), ValueError,
     r"delta_heads=2 applies to gated delta-rule layers \('D'\), but pattern 'LS' has none over 2 layers"),
    (dict(pattern="SSD", n_layers=2, delta_head_dim=8), ValueError, "pattern 'SSD' has none over 2 layers"),
    (dict(pattern="DX"), ValueError, r"unknown layer kinds \['X'\]; use 'S' \(softmax\), 'L' \(linear\) and 'D'"),
    (dict(linear_decay="GLA"), ValueError, "unknown linear_decay 'GLA'"),
])
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelConfig(**kwargs)


def test_config_dims_and_compatibility():
    """delta_dims resolves the defaults; 'D' layers are linear-attention recurrences for the
    layout rules (no striped layout), and a 'DS' model takes ulysses like any hybrid."""
    cfg = ModelConfig(dim=64, n_heads=4, pattern="DDDS", n_layers=4)
    assert cfg.layer_kinds == ["delta", "delta", "delta", "softmax"] and cfg.has_linear and cfg.has_delta
    assert cfg.delta_dims == (4, 16, 16)
    assert ModelConfig(pattern="D", delta_heads=2, delta_head_dim=8).delta_dims == (2, 8, 8)
    assert ModelConfig(pattern="D", delta_value_dim=24).delta_dims == (4, 16, 24)
    assert not ModelConfig(pattern="LS").has_delta
    with pytest.raises(ValueError, match=r"striped.*linear-attention layers \(pattern 'DS'\)"):
        check_compatible(ModelConfig(pattern="DS"), SequenceParallelConfig(sp_size=2, layout="striped"))
    with torch.device("meta"):
        model = HybridLM(ModelConfig(dim=64, n_heads=4, pattern="D", n_layers=1, delta_heads=2, delta_head_dim=8,
                                     delta_value_dim=12))
    layer = model.layers[0].attention
    assert isinstance(layer, GatedDeltaNet) and layer.kind == "linear"
    assert layer.wq.weight.shape == (16, 64) and layer.wv.weight.shape == (24, 64) and layer.wo.weight.shape == (64, 24)
    assert layer.A_log.shape == layer.dt_bias.shape == (2,) and layer.out_norm.weight.shape == (12,)


@pytest.mark.parametrize("name", ["qwen3next-tiny", "qwen3next-small"])
def test_qwen3next_presets(name):
    """The presets exist for model and training, use three delta-rule layers per softmax layer,
    and build."""
    assert name in MODEL_PRESETS and name in TRAIN_PRESETS
    cfg = preset(name)
    assert cfg.model.pattern == "DDDS" and cfg.model.layer_kinds.count("delta") == 3 * cfg.model.n_layers // 4
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    assert sum(isinstance(m, GatedDeltaNet) for m in model.attention_modules()) == 3 * cfg.model.n_layers // 4


# ---------------------------------------------------------------------------------------------
# The trainer.


def case_train_preset(ctx, run_dir: str, name: str, steps: int):
    """Train the preset ``name`` on the pool's ranks (sp = world); the train losses."""
    from seqpar.comm.groups import SequenceParallelGroups
    from seqpar.train import train

    torch.set_num_threads(1)
    groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    cfg = preset(name, run_dir=run_dir, steps=steps, seq_len=64, batch_size=4, lr=5e-3, warmup_steps=2,
                 max_corpus_bytes=300_000, progress=False, eval_batches=1, plot=False, keep_checkpoints=0,
                 sp=dict(sp_size=ctx.world_size, layout="zigzag"))
    result = train(cfg, groups)
    return [h["loss"] for h in result.history if h["kind"] == "train"]


def test_qwen3next_tiny_trains_on_two_ranks(pool, tmp_path):
    """The 'DDDS' preset learns the stdlib bytes on 2 sequence-parallel ranks: the loss starts at
    about log(256) = 5.55 and falls by more than 1 within 20 steps."""
    losses = pool.run(case_train_preset, 2, run_dir=str(tmp_path / "qwen3next"), name="qwen3next-tiny", steps=20)
    assert losses[0] == losses[1] and len(losses[0]) == 20
    first, last = losses[0][0], sum(losses[0][-5:]) / 5
    assert first > 5.0 and all(math.isfinite(x) for x in losses[0]), losses[0]
    assert last < first - 1.0, (first, last)
