"""The hybrid model under sequence parallelism: one training step (forward + backward + gradient
sync) on 1, 2 and 4 gloo ranks gives the loss and parameter gradients of the unsharded model on
one process, for every softmax strategy, both linear strategies, both decay kinds and the token
layouts; the softmax layers' sliding window and softcap, and packed documents (cu_seqlens) in
softmax-only models; plus the configuration errors. The gated delta-rule layers ('D'), GLA gates
and documents through linear layers are in tests/test_hybrid_families.py (which reuses the cases
here).

Tolerances: everything runs in float64, so the sharded and the unsharded step agree to
rounding (loss within 1e-10 absolute, every gradient within 1e-8 of the largest reference
gradient entry). The reference uses independent single-device mixers (torch SDPA and a chunked
PyTorch linear attention), not the seqpar strategies.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import pytest
import torch

from seqpar.comm.groups import SequenceParallelGroups, make_data_sequence_groups
from seqpar.config import MODEL_PRESETS, ModelConfig, SequenceParallelConfig, TrainConfig, check_compatible, preset
from seqpar.model import (FeedForward, HybridLM, LinearAttention, PhaseTimer, SoftmaxAttention, attach_timer,
                          local_softmax_attention)
from seqpar.parallelize import (parallelize_model, sequence_parallel_loss, shard_batch, sync_gradients,
                                token_loss_sum, unparallelize_model)

from mask_reference import global_mask, masked_attention

LOSS_TOL = 1e-10
GRAD_TOL = 1e-8


def _tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS", gate_rank=8,
                feature_map="elu1", tie_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def _batch(B: int, T: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(0, vocab, (B, T + 1), generator=g)
    tokens, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    labels[0, 3] = -100  # ignored labels make the per-rank token counts differ
    labels[-1, T - 2] = -100
    return tokens, labels


def _reference(model: HybridLM, tokens: torch.Tensor, labels: torch.Tensor):
    ref = copy.deepcopy(model)
    logits = ref(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def _compare(model: HybridLM, loss: float, ref_loss: float, ref_grads: dict) -> dict:
    errs = {"loss": abs(loss - ref_loss)}
    worst = 0.0
    for n, p in model.named_parameters():
        g_ref = ref_grads[n]
        scale = float(g_ref.abs().max()) or 1.0
        worst = max(worst, float((p.grad - g_ref).abs().max()) / scale)
    errs["grad"] = worst
    return errs


def case_step(ctx, model_kw: dict, sp_kw: dict, B: int = 2, T: int = 16, dp: int = 1, default_positions: bool = False,
              activation_checkpointing: bool = False, known_count: bool = False):
    """One step on the pool ranks; returns the loss / gradient errors against the unsharded model."""
    torch.manual_seed(0)
    model = HybridLM(_tiny_config(**model_kw)).double()
    tokens, labels = _batch(B, T, model.config.vocab_size)
    ref_loss, ref_grads = _reference(model, tokens, labels)
    sp_size = ctx.world_size // dp
    if dp > 1:
        groups = make_data_sequence_groups(sp_size)
        per = B // dp
        tokens, labels = tokens[groups.dp_rank * per:(groups.dp_rank + 1) * per], labels[groups.dp_rank * per:(groups.dp_rank + 1) * per]
    else:
        groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    cfg = SequenceParallelConfig(sp_size=sp_size, **sp_kw)
    attn_group = groups.sp
    if cfg.softmax_strategy == "usp":
        attn_group = ctx.usp_groups[(cfg.ulysses_size, cfg.ring_size)]
    parallelize_model(model, cfg, attn_group)
    model.activation_checkpointing = activation_checkpointing
    sb = shard_batch(tokens, labels, cfg.layout, groups.sp)
    logits = model(sb.tokens) if default_positions else model(sb.tokens, sb.positions)
    if known_count:  # the trainer's path: the global count from the data, the loss sum with the gradients
        count = int((_batch(B, T, model.config.vocab_size)[1] != -100).sum())
        local_sum = token_loss_sum(logits, sb.labels)
        (local_sum / count).backward()
        loss = sync_gradients(model.parameters(), groups, extra=local_sum.detach().reshape(1))[0] / count
    else:
        share, loss = sequence_parallel_loss(logits, sb.labels, groups)
        share.backward()
        sync_gradients(model.parameters(), groups)
    return _compare(model, float(loss), ref_loss, ref_grads)


def _check(results: list[dict]) -> None:
    for rank, errs in enumerate(results):
        assert errs["loss"] < LOSS_TOL, f"rank {rank}: loss differs by {errs['loss']:.3g}"
        assert errs["grad"] < GRAD_TOL, f"rank {rank}: gradients differ by {errs['grad']:.3g} (relative to max)"


STEP_CASES = [
    # world, model overrides, sequence-parallel config
    (1, dict(linear_decay="fixed"), dict(layout="contiguous", softmax_strategy="ring", linear_strategy="lasp2")),
    (2, dict(linear_decay="fixed"), dict(layout="contiguous", softmax_strategy="ring", linear_strategy="lasp2")),
    (2, dict(linear_decay="gate"), dict(layout="zigzag", softmax_strategy="ring", linear_strategy="lasp2")),
    (2, dict(linear_decay="gate"), dict(layout="contiguous", softmax_strategy="allgather", linear_strategy="lasp1")),
    (2, dict(linear_decay="fixed", tie_embeddings=True), dict(layout="contiguous", softmax_strategy="ulysses", linear_strategy="lasp1")),
    (4, dict(linear_decay="fixed"), dict(layout="zigzag", softmax_strategy="ring", linear_strategy="lasp2")),
    (4, dict(linear_decay="gate"), dict(layout="contiguous", softmax_strategy="allgather", linear_strategy="lasp2")),
    (4, dict(linear_decay="gate", feature_map="silu"), dict(layout="contiguous", softmax_strategy="ulysses", linear_strategy="lasp1")),
    (4, dict(linear_decay="fixed"), dict(layout="zigzag", softmax_strategy="usp", ulysses_size=2, linear_strategy="lasp2")),
    (4, dict(pattern="S", n_layers=2), dict(layout="striped", softmax_strategy="ring")),
    # the softmax layers' sliding window (5 < T = 16: it cuts across the ranks' chunks) and softcap
    (2, dict(linear_decay="gate", window=5), dict(layout="zigzag", softmax_strategy="ring", linear_strategy="lasp2")),
    (2, dict(linear_decay="fixed", window=5, softcap=0.5), dict(layout="contiguous", softmax_strategy="ulysses",
                                                               linear_strategy="lasp1")),
    (4, dict(linear_decay="fixed", window=3, softcap=0.5), dict(layout="zigzag", softmax_strategy="allgather",
                                                               linear_strategy="lasp2")),
]


@pytest.mark.parametrize("world,model_kw,sp_kw", STEP_CASES,
                         ids=[f"w{w}-{s.get('layout')}-{s.get('softmax_strategy')}-{s.get('linear_strategy', '')}-"
                              f"{m.get('linear_decay', m.get('pattern'))}"
                              + (f"-window{m['window']}" if "window" in m else "")
                              + (f"-softcap{m['softcap']}" if "softcap" in m else "") for w, m, s in STEP_CASES])
def test_step_matches_unsharded(pool, world, model_kw, sp_kw):
    _check(pool.run(case_step, world, model_kw=model_kw, sp_kw=sp_kw))


def test_step_default_positions(pool):
    """Without explicit positions the model derives RoPE positions from its context_parallel."""
    _check(pool.run(case_step, 2, model_kw=dict(linear_rope=True), sp_kw=dict(layout="zigzag"), default_positions=True))


def test_step_activation_checkpointing(pool):
    """Recomputing each layer in backward re-runs its collectives and changes nothing."""
    _check(pool.run(case_step, 2, model_kw=dict(linear_decay="gate"), sp_kw=dict(layout="zigzag", softmax_strategy="allgather"),
                    activation_checkpointing=True))


def test_step_data_and_sequence_parallel(pool):
    """dp=2 x sp=2: gradients summed over sp and dp equal the unsharded gradient of the whole batch."""
    _check(pool.run(case_step, 4, model_kw=dict(linear_decay="gate"), sp_kw=dict(layout="zigzag"), dp=2))


@pytest.mark.parametrize("world,dp", [(2, 1), (4, 2)])
def test_step_with_the_token_count_known_and_the_loss_summed_with_the_gradients(pool, world, dp):
    """The trainer's one-collective step (share = local loss sum / global count known from the
    data; the loss sum travels in the gradient all-reduce) equals the unsharded step too."""
    _check(pool.run(case_step, world, model_kw=dict(linear_decay="gate"), sp_kw=dict(layout="zigzag"), dp=dp,
                    known_count=True))


def test_window_and_softcap_change_the_model():
    """The window and softcap cases above can fail: each changes the unsharded model's logits
    (the weights are scaled up so that the softcap bites)."""
    torch.manual_seed(0)
    base = HybridLM(_tiny_config(linear_decay="gate")).double()
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(20.0)
    tokens, _ = _batch(2, 16, base.config.vocab_size)
    ref = base(tokens)
    for kw in (dict(window=5), dict(softcap=0.5)):
        other = HybridLM(_tiny_config(linear_decay="gate", **kw)).double()
        other.load_state_dict(base.state_dict())
        assert float((other(tokens) - ref).detach().abs().max()) > 1e-3, kw


@pytest.mark.parametrize("window,softcap,cu_seqlens", [
    (None, None, None), (4, None, None), (1, None, None), (40, None, None), (None, 0.7, None), (5, 0.7, None),
    (None, None, [0, 9, 9, 20, 31]), (4, 0.7, [0, 9, 9, 20, 31]), (3, None, [0, 31]),
])
def test_single_device_softmax_mixer_matches_the_dense_oracle(window, softcap, cu_seqlens):
    """The single-device softmax mixer (the oracle of the sharded tests) equals dense fp64
    attention with the explicit token-by-token mask of tests/mask_reference.py, in output and
    gradients, for windows, softcaps and packed documents."""
    g = torch.Generator().manual_seed(1)
    T = 31
    q = torch.randn(1, T, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(1, T, 4, 8, generator=g, dtype=torch.float64)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    o = local_softmax_attention(q, k, v, window=window, softcap=softcap, cu_seqlens=cu)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    pos = torch.arange(T)
    mask = global_mask(pos, pos, causal=True, window=window, cu_seqlens=cu_seqlens)
    ref, _ = masked_attention(q, k, v, mask, scale=8 ** -0.5, softcap=softcap)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Packed documents (cu_seqlens): softmax-only models.


def _documents_batch(T: int, bounds: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row [1, T]; the label of each document's last token is ignored (-100), as
    packed data does (it would be the next document's first token)."""
    tokens, labels = _batch(1, T, vocab)
    for end in bounds[1:]:
        labels[0, end - 1] = -100
    return tokens, labels


def _per_document_reference(model: HybridLM, tokens: torch.Tensor, labels: torch.Tensor, bounds: list[int]):
    """Loss and gradients of the model run on each document on its own (positions 0.., no
    cu_seqlens), the token losses summed over the documents and divided by the row's count."""
    ref = copy.deepcopy(model)
    total = sum(token_loss_sum(ref(tokens[:, a:b]), labels[:, a:b]) for a, b in zip(bounds, bounds[1:]) if b > a)
    loss = total / int((labels != -100).sum())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters()}


@contextlib.contextmanager
def _recorded_rope_positions():
    """The positions every call of seqpar.model.rope_cos_sin gets, while the context is open."""
    import seqpar.model

    calls, original = [], seqpar.model.rope_cos_sin

    def recording(positions, *args, **kwargs):
        calls.append(positions.tolist())
        return original(positions, *args, **kwargs)

    seqpar.model.rope_cos_sin = recording
    try:
        yield calls
    finally:
        seqpar.model.rope_cos_sin = original


def case_documents(ctx, model_kw: dict, sp_kw: dict, bounds: list[int], T: int = 24, default_positions: bool = False,
                   activation_checkpointing: bool = False, layout_object: bool = False):
    """One step of a model (softmax-only unless ``model_kw`` names a pattern) on one packed row
    with documents ``bounds`` on the pool ranks; the loss / gradient errors against (a) the
    unsharded model given the same cu_seqlens and (b) the unsharded model run on each document
    separately."""
    torch.manual_seed(0)
    model = HybridLM(_tiny_config(**{"pattern": "S", **model_kw})).double()
    tokens, labels = _documents_batch(T, bounds, model.config.vocab_size)
    cu = torch.tensor(bounds)
    ref = copy.deepcopy(model)
    ref_loss_t = token_loss_sum(ref(tokens, cu_seqlens=cu), labels) / int((labels != -100).sum())
    ref_loss_t.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    doc_loss, doc_grads = _per_document_reference(model, tokens, labels, bounds)
    groups = SequenceParallelGroups(None, ctx.group, 1, ctx.world_size, 0, ctx.rank)
    layout = sp_kw.pop("layout", "contiguous")
    if layout_object:
        from seqpar.layout import balanced_layout

        layout = balanced_layout(cu, ctx.world_size)
    cfg = SequenceParallelConfig(sp_size=ctx.world_size, layout=layout, **sp_kw)
    parallelize_model(model, cfg, groups.sp)
    model.activation_checkpointing = activation_checkpointing
    sb = shard_batch(tokens, labels, cfg.layout, groups.sp)
    with _recorded_rope_positions() as rope_positions:
        logits = model(sb.tokens, None if default_positions else sb.positions, cu_seqlens=cu)
    # RoPE restarts at each document (invisible in the losses: RoPE scores depend only on
    # position differences within a document)
    starts = torch.tensor(bounds)[torch.bucketize(sb.positions, torch.tensor(bounds[1:]), right=True)]
    assert rope_positions == [(sb.positions - starts).tolist()], (rope_positions, sb.positions.tolist())
    share, loss = sequence_parallel_loss(logits, sb.labels, groups)
    share.backward()
    sync_gradients(model.parameters(), groups)
    errs = _compare(model, float(loss), ref_loss_t.item(), ref_grads)
    docs = _compare(model, float(loss), doc_loss, doc_grads)
    return {"loss": max(errs["loss"], docs["loss"]), "grad": max(errs["grad"], docs["grad"])}


DOCUMENT_BOUNDS = [0, 5, 5, 14, 24]  # an empty document; boundaries inside the ranks' chunks

DOCUMENT_CASES = [
    # world, model overrides, sequence-parallel config, forward options
    (1, dict(), dict(), dict()),
    (2, dict(), dict(layout="zigzag", softmax_strategy="ring"), dict()),
    (2, dict(window=4), dict(layout="contiguous", softmax_strategy="ulysses"), dict(default_positions=True)),
    (2, dict(softcap=0.5), dict(layout="striped", softmax_strategy="allgather"), dict(activation_checkpointing=True)),
]


@pytest.mark.parametrize("world,model_kw,sp_kw,options", DOCUMENT_CASES,
                         ids=[f"w{w}-{s.get('layout', 'contiguous')}-{s.get('softmax_strategy', 'ring')}"
                              + "".join(f"-{k}" for k in (*m, *o)) for w, m, s, o in DOCUMENT_CASES])
def test_documents_match_unsharded_and_separate_documents(pool, world, model_kw, sp_kw, options):
    """A softmax-only model given cu_seqlens: the sharded step equals the unsharded one, and both
    equal running each document on its own with positions from 0 (RoPE restarts per document)."""
    _check(pool.run(case_documents, world, model_kw=model_kw, sp_kw=dict(sp_kw), bounds=DOCUMENT_BOUNDS, **options))


def test_documents_with_a_balanced_layout(pool):
    """The model runs on a seqpar.layout.BalancedLayout (a layout object, not a name) built from
    the row's cu_seqlens."""
    import seqpar.layout

    if not hasattr(seqpar.layout, "balanced_layout"):
        pytest.skip("seqpar.layout.balanced_layout is not there yet")
    _check(pool.run(case_documents, 2, model_kw=dict(window=6), sp_kw=dict(softmax_strategy="ring"),
                    bounds=[0, 3, 20, 24], layout_object=True))


def test_documents_change_the_model():
    """cu_seqlens changes the logits (so the document cases above can fail) and a row of one
    document equals no cu_seqlens."""
    torch.manual_seed(0)
    model = HybridLM(_tiny_config(pattern="S")).double()
    tokens, _ = _documents_batch(24, DOCUMENT_BOUNDS, model.config.vocab_size)
    with torch.no_grad():
        plain = model(tokens)
        with _recorded_rope_positions() as positions:
            packed = model(tokens, cu_seqlens=torch.tensor(DOCUMENT_BOUNDS))
        assert float((packed - plain).abs().max()) > 1e-3
        assert positions == [list(range(5)) + list(range(9)) + list(range(10))]
        torch.testing.assert_close(model(tokens, cu_seqlens=[0, 24]), plain, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["S", "SL"])
def test_document_errors(pattern):
    """cu_seqlens needs one packed row whose boundaries end at the global length, in softmax-only
    models and in models with linear layers alike (which take documents: see
    tests/test_hybrid_families.py)."""
    tokens = torch.zeros(1, 16, dtype=torch.long)
    model = HybridLM(_tiny_config(pattern=pattern))
    with pytest.raises(ValueError, match=r"ONE packed row.*\(2, 16\)"):
        model(torch.zeros(2, 16, dtype=torch.long), cu_seqlens=torch.tensor([0, 8, 16]))
    with pytest.raises(ValueError, match="must end at the global sequence length 16"):
        model(tokens, cu_seqlens=torch.tensor([0, 8, 12]))
    with pytest.raises(ValueError, match="must not decrease"):
        model(tokens, cu_seqlens=[0, 9, 8, 16])


# ---------------------------------------------------------------------------------------------
# Timing the token mixing (the trainer's step-time breakdown).


class _SleepInBackward(torch.autograd.Function):
    """Identity that sleeps ``seconds`` in forward and ``2 * seconds`` in backward."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class _SlowMixSoftmax(SoftmaxAttention):
    def mix(self, q, k, v):
        return _SleepInBackward.apply(local_softmax_attention(q, k, v), 0.02)


class _SlowFeedForward(FeedForward):
    def forward(self, x):
        return _SleepInBackward.apply(super().forward(x), 0.025)


def _untimed_and_timed_steps(model, tokens, labels, before=None):
    """One forward + backward without a timer, then one with a PhaseTimer attached: ({False:
    grads, True: grads}, the timer, the timed step's wall time). ``before(timed)`` runs first."""
    grads = {}
    for timed in (False, True):
        if before is not None:
            before(timed)
        timer = PhaseTimer()
        attach_timer(model, timer if timed else None)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        token_loss_sum(model(tokens), labels).backward()
        step = time.perf_counter() - t0
        grads[timed] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, timer, step


@pytest.fixture
def one_thread():
    """One intra-op thread while a timing test runs: on a busy 2-core machine (other processes,
    the gloo pool starting) a second thread that is descheduled stalls each parallel op for a
    time slice, ~100 ms per step, which is not what these tests measure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_phase_timer_times_the_mixing_forward_and_backward_and_nothing_else(one_thread):
    """The softmax layer's mixing sleeps 20 ms in forward and 40 ms in backward; the feed-forward
    blocks sleep 50 ms in backward. The timer's "softmax" total holds the mixing's 60 ms (plus its
    real work) but none of the feed-forward's sleep, and the gradients are those of an untimed run."""
    torch.manual_seed(0)
    cfg = _tiny_config(pattern="LS")
    model = HybridLM(cfg)
    for block in model.layers:  # the same layers, with sleeps
        slow_ffn = _SlowFeedForward(cfg.dim, cfg.hidden_dim)
        slow_ffn.load_state_dict(block.feed_forward.state_dict())
        block.feed_forward = slow_ffn
        if isinstance(block.attention, SoftmaxAttention):
            slow_attention = _SlowMixSoftmax(cfg)
            slow_attention.load_state_dict(block.attention.state_dict())
            block.attention = slow_attention
    tokens, labels = _batch(2, 16, model.config.vocab_size)
    grads, timer, step = _untimed_and_timed_steps(model, tokens, labels)
    totals = timer.collect()
    assert set(totals) == {"softmax", "linear"}
    assert 0.06 <= totals["softmax"] < 0.06 + 0.045, totals  # 2 x 50 ms of feed-forward sleep are not in it
    assert 0 < totals["linear"] < 0.045, totals
    assert totals["softmax"] + totals["linear"] <= step
    assert timer.collect() == {}  # collect resets
    for n, g in grads[True].items():
        assert torch.equal(g, grads[False][n]), n
    # without autograd (evaluation) only the forward is timed; a disabled timer times nothing
    with torch.no_grad():
        model(tokens)
    assert 0.02 <= timer.collect()["softmax"] < 0.02 + 0.045
    timer.enabled = False
    model(tokens).sum().backward()
    assert timer.collect() == {}
    attach_timer(model, None)
    assert all(m.timer is None for m in model.attention_modules())


def test_phase_timer_with_activation_checkpointing(one_thread):
    """Recomputed layers time their mixing again (forward) and the backward once; the
    gradients are unchanged."""
    torch.manual_seed(0)
    model = HybridLM(_tiny_config(pattern="LS")).double()
    tokens, labels = _batch(2, 16, model.config.vocab_size)

    def checkpoint_when_timed(timed: bool) -> None:
        model.activation_checkpointing = timed

    grads, timer, step = _untimed_and_timed_steps(model, tokens, labels, before=checkpoint_when_timed)
    totals = timer.collect()
    assert totals["softmax"] > 0 and totals["linear"] > 0 and sum(totals.values()) <= step
    for n, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][n], rtol=0, atol=1e-12)


def test_unparallelize_and_single_device_linear_mixer():
    """unparallelize restores single-device mixing; the single-device linear mixer equals the
    token-by-token recurrence (so the unsharded model is a valid oracle for the tests above)."""
    model = HybridLM(_tiny_config())
    parallelize_model(model, SequenceParallelConfig(sp_size=1), None)
    assert all(m.context_parallel is not None for m in model.attention_modules())
    unparallelize_model(model)
    assert all(m.context_parallel is None for m in model.attention_modules()) and model.context_parallel is None
    layer = next(m for m in model.attention_modules() if isinstance(m, LinearAttention))
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 77, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    o = layer.mix(q, k, v, gate, None)
    state = torch.zeros(B, H, D, D, dtype=torch.float64)
    for t in range(T):
        state = gate[:, t, :, None, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        torch.testing.assert_close(o[:, t], torch.einsum("bhkv,bhk->bhv", state, q[:, t]) * D ** -0.5)


def test_fixed_decay_linear_layer_keeps_fp64_accuracy():
    """The linear layer with the fixed RetNet decay, in fp64, equals projections + feature map +
    the token-by-token fp64 recurrence with the decay log(1 - 2^(-5-h)) written out here + RMSNorm +
    output projection, in output and input gradient, to rounding (an fp32 decay gave ~1e-7)."""
    from seqpar.kernels.linear_reference import linear_attention_recurrent_reference
    from seqpar.model import rope_cos_sin

    cfg = _tiny_config(linear_decay="fixed", feature_map="elu1")
    torch.manual_seed(0)
    layer = LinearAttention(cfg).double()
    B, T, H, Hkv, D = 2, 37, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = torch.randn(B, T, cfg.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, cfg.dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(T), D, cfg.rope_theta, torch.float64)
    out = layer(x, cos, sin)
    assert out.dtype == torch.float64
    (dx,) = torch.autograd.grad((out * w).sum(), x)

    phi = lambda t: torch.nn.functional.elu(t) + 1.0  # noqa: E731
    q = phi(x @ layer.wq.weight.T).view(B, T, H, D)
    k = phi(x @ layer.wk.weight.T).view(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
    v = (x @ layer.wv.weight.T).view(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
    log_decay = torch.log(1.0 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
    o, _ = linear_attention_recurrent_reference(q, k, v, g_gamma=log_decay)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.out_norm.weight
    ref = o.reshape(B, T, H * D) @ layer.wo.weight.T
    (ref_dx,) = torch.autograd.grad((ref * w).sum(), x)
    for got, want in ((out.detach(), ref.detach()), (dx, ref_dx)):
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


# ---------------------------------------------------------------------------------------------
# Configuration errors.


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, n_heads=4), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(dim=12, n_heads=4, n_kv_heads=4), "must be even for RoPE"),
    (dict(pattern="LSX"), "unknown layer kinds"),
    (dict(pattern="DSd"), r"unknown layer kinds \['d'\]"),
    (dict(pattern=""), "non-empty"),
    (dict(linear_decay="exp"), r"unknown linear_decay 'exp'; expected one of \('fixed', 'gate', 'gla', 'none'\)"),
    (dict(feature_map="tanh"), "unknown feature_map"),
    (dict(window=0), "window must be >= 1"),
    (dict(window=-3), "window must be >= 1"),
    (dict(softcap=0.0), "softcap must be a finite number > 0"),
    (dict(pattern="L", window=8), "window=8 applies to softmax-attention layers, but pattern 'L' has none"),
    (dict(pattern="L", softcap=30.0), "softcap=30.0 applies to softmax-attention layers"),
])
def test_model_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_model_config_window_types():
    """window is an int (numpy / tensor ints are taken as ints) or None; other types are a TypeError naming it."""
    assert ModelConfig(window=torch.tensor(7)).window == 7 and type(ModelConfig(window=torch.tensor(7)).window) is int
    assert ModelConfig(softcap=30).softcap == 30.0
    with pytest.raises(TypeError, match="window must be an int >= 1 or None"):
        ModelConfig(window=2.5)
    with pytest.raises(TypeError, match="window must be an int >= 1 or None"):
        ModelConfig(window=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="diagonal"), "unknown layout"),
    (dict(softmax_strategy="tree"), "unknown softmax_strategy"),
    (dict(linear_strategy="lasp3"), "unknown linear_strategy"),
    (dict(sp_size=4, softmax_strategy="usp", ulysses_size=3), "does not divide sp_size"),
    (dict(sp_size=4, ulysses_size=2), "only used by softmax_strategy='usp'"),
    (dict(sp_size=0), "sp_size must be >= 1"),
])
def test_sequence_parallel_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequenceParallelConfig(**kwargs)


def test_compatibility_errors():
    hybrid = _tiny_config(pattern="LLLS", n_layers=4)
    with pytest.raises(ValueError, match="striped.*linear-attention"):
        check_compatible(hybrid, SequenceParallelConfig(sp_size=2, layout="striped"))
    check_compatible(_tiny_config(pattern="S"), SequenceParallelConfig(sp_size=2, layout="striped"))
    with pytest.raises(ValueError, match="ulysses.*n_heads \\(4\\).*sp_size \\(8\\)"):
        check_compatible(hybrid, SequenceParallelConfig(sp_size=8, softmax_strategy="ulysses"))
    with pytest.raises(ValueError, match="seq_len 100 is not divisible by 8"):
        check_compatible(hybrid, SequenceParallelConfig(sp_size=4, layout="zigzag"), seq_len=100)
    with pytest.raises(ValueError, match="striped"):
        TrainConfig(model=_tiny_config(pattern="LLLS", n_layers=4, vocab_size=256),
                    sp=SequenceParallelConfig(sp_size=2, layout="striped"))
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        TrainConfig(model=_tiny_config())
    with pytest.raises(ValueError, match="group has 1 ranks but config.sp_size is 2"):
        parallelize_model(HybridLM(_tiny_config()), SequenceParallelConfig(sp_size=2), None)
    with pytest.raises(ValueError, match="striped"):
        parallelize_model(HybridLM(hybrid), SequenceParallelConfig(layout="striped"), None)
    with pytest.raises(ValueError, match="usp.*UspGroups"):
        parallelize_model(HybridLM(_tiny_config()), SequenceParallelConfig(softmax_strategy="usp"), None)
    with pytest.raises(ValueError, match="tokens .* and labels .* differ"):
        shard_batch(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), "contiguous", None)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets(name):
    """Every preset validates and builds (on the meta device: no memory); 1b is about 0.97B parameters."""
    cfg = preset(name)
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    n = model.num_params()
    assert n > 0
    if name == "1b":
        assert 0.9e9 < n < 1.1e9, n


def test_seeded_initialisation_does_not_depend_on_device_or_order():
    """reset_parameters(seed): a model materialised from the meta device gets exactly the values
    of one built on the CPU, each parameter by its own rules (norm weights 1, Mamba2 decays in
    range), and another seed gives other values."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, pattern="LDSL")
    cpu = HybridLM(cfg)
    cpu.reset_parameters(seed=3)
    with torch.device("meta"):
        meta = HybridLM(cfg)
    meta.to_empty(device="cpu")
    meta.reset_parameters(seed=3)
    for (name, a), (_, b) in zip(cpu.named_parameters(), meta.named_parameters()):
        assert torch.equal(a, b), name
    other = HybridLM(cfg)
    other.reset_parameters(seed=4)
    assert not torch.equal(other.tok_embeddings.weight, cpu.tok_embeddings.weight)
    assert torch.equal(cpu.norm.weight, torch.ones_like(cpu.norm.weight))
    a_log = [p for n, p in cpu.named_parameters() if n.endswith("A_log")]
    assert a_log and all(bool(((p >= 0) & (p <= math.log(16.0) + 1e-6)).all()) for p in a_log)
    std = cpu.layers[0].feed_forward.w1.weight.std().item()
    assert abs(std - cfg.init_std) < 0.2 * cfg.init_std, std
