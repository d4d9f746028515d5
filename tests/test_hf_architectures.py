"""The tested architecture table of docs/integrations.md: each transformers architecture, with and
without its sliding window / softcap / sinks, sharded over 2 gloo ranks with seqpar attention,
gives the logits, loss and every gradient (sinks included) of the unsharded eager model; packed
rows (DataCollatorWithFlattening) become documents; what cannot be honoured is refused."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import hf_architectures as archs  # noqa: E402
from distributed_pool import WorkerContext  # noqa: E402

WORLD = 2
T = 32  # zigzag on 2 ranks: chunks of 8, so the window of 5 crosses chunk and rank boundaries
RTOL, ATOL = 1e-4, 2e-5  # fp32 models: seqpar and eager attention round differently


def _group(ctx: WorkerContext, strategy: str):
    return ctx.usp_groups[(1, WORLD)] if strategy == "usp" else ctx.group


def _compare(ctx: WorkerContext, reference, model, ref_out, out, layout: str, documents=None) -> None:
    """Logits of this rank's tokens, the summed loss and every summed gradient equal the reference's."""
    from seqpar.integrations.hf import row_layout
    from seqpar.layout import shard_tensor

    split = row_layout(layout, documents, T, WORLD)
    torch.testing.assert_close(out.logits, shard_tensor(ref_out.logits.detach(), split, ctx.rank, WORLD),
                               rtol=RTOL, atol=ATOL)
    total = out.loss.detach().clone()
    torch.distributed.all_reduce(total, group=ctx.group)
    torch.testing.assert_close(total, ref_out.loss.detach(), rtol=1e-5, atol=1e-6)
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if ref_grads[name].grad is None:
            assert p.grad is None, name
            continue
        g = p.grad.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        torch.testing.assert_close(g, ref_grads[name].grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def case_architecture(ctx: WorkerContext, name: str, strategy: str, layout: str) -> bool:
    from seqpar.integrations.hf import apply_sequence_parallel, shard_batch

    group = _group(ctx, strategy)
    reference = archs.build(name)
    model = apply_sequence_parallel(copy.deepcopy(reference), group, strategy=strategy, layout=layout)
    torch.manual_seed(1)
    input_ids = torch.randint(3, 64, (2, T))
    labels = input_ids.clone()
    labels[0, 3] = -100
    ref_out = reference(input_ids=input_ids, labels=labels)
    ref_out.loss.backward()
    out = model(**shard_batch(input_ids, labels, group=group, layout=layout))
    out.loss.backward()
    _compare(ctx, reference, model, ref_out, out, layout)
    return True


def _packed_batch():
    """One row of four documents of 1, 13, 11 and 7 tokens from DataCollatorWithFlattening (the
    second crosses the zigzag chunk boundary at 8, the third rank 1's end at 24)."""
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(2)
    features = [{"input_ids": torch.randint(3, 64, (n,), generator=generator).tolist()} for n in (1, 13, 11, 7)]
    for f in features:
        f["labels"] = list(f["input_ids"])
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features, return_tensors="pt")
    assert batch["input_ids"].shape == (1, T)
    return batch


class _PerDocumentOutput:
    """logits / loss of the reference run on each document alone (what packing means: no token
    sees another document, positions restart); GPT-OSS's eager mask ignores packed position ids,
    transformers' flash-attention paths and seqpar do not."""

    def __init__(self, reference, batch) -> None:
        ends = batch["cu_seq_lens_q"].tolist()
        count = int((batch["labels"][:, 1:] != -100).sum())
        logits, loss = [], 0.0
        for a, b in zip(ends[:-1], ends[1:]):
            out = reference(input_ids=batch["input_ids"][:, a:b], labels=batch["labels"][:, a:b],
                            num_items_in_batch=count)
            logits.append(out.logits)
            loss = loss + out.loss
        self.logits, self.loss = torch.cat(logits, dim=1), loss


def case_packed(ctx: WorkerContext, name: str, strategy: str, layout: str, boundaries: str) -> bool:
    """A packed row through the adapter equals the unsharded eager model run on each document.
    ``boundaries``: "shard_batch" (global cu_seq_lens from shard_batch), "collator" (the
    collator's own cu_seq_lens_q/k, passed as given) or "position_ids" (only the local position
    ids: the pre-hook gathers them)."""
    from seqpar.integrations.hf import apply_sequence_parallel, shard_batch
    from seqpar.layout import shard_tensor

    group = _group(ctx, strategy)
    reference = archs.build(name)
    model = apply_sequence_parallel(copy.deepcopy(reference), group, strategy=strategy, layout=layout)
    batch = _packed_batch()
    ref_out = _PerDocumentOutput(reference, batch)
    ref_out.loss.backward()
    local = shard_batch(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], group=group,
                        layout=layout)
    assert local["cu_seq_lens_q"].tolist() == [0, 1, 14, 25, 32]
    if boundaries == "collator":
        local.update(cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                     max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"])
    elif boundaries == "position_ids":
        del local["cu_seq_lens_q"], local["cu_seq_lens_k"]
        if layout == "balanced":  # the split depends on the boundaries: refused without them
            with pytest.raises(ValueError, match=r"layout='balanced' needs its global boundaries"):
                model(**local)
            return True
        assert torch.equal(local["position_ids"], shard_tensor(batch["position_ids"], layout, ctx.rank, WORLD))
    out = model(**local)
    out.loss.backward()
    _compare(ctx, reference, model, ref_out, out, layout, batch["cu_seq_lens_q"])
    return True


def case_missing_position_ids(ctx: WorkerContext) -> str:
    from seqpar.integrations.hf import apply_sequence_parallel

    model = apply_sequence_parallel(archs.build("llama"), ctx.group)
    with pytest.raises(ValueError, match=r"needs position_ids") as e:
        model(input_ids=torch.randint(3, 64, (1, 8)))
    return str(e.value)


# Every row with the default ring / zigzag; a few rows also with the other strategies and layouts.
_MATRIX = [(name, "ring", "zigzag") for name in archs.NAMES] + [
    ("mistral-window", "allgather", "contiguous"), ("gemma2-softcap-window", "ulysses", "striped"),
    ("gpt-oss-window", "usp", "zigzag"), ("qwen3-window", "allgather", "striped"),
    ("gpt-oss", "ulysses", "contiguous"), ("qwen2-window", "ring", "balanced"), ("llama", "ulysses", "balanced")]


@pytest.mark.parametrize("name,strategy,layout", _MATRIX)
def test_architecture_sharded_equals_unsharded(pool, name, strategy, layout):
    assert all(pool.run(case_architecture, WORLD, name=name, strategy=strategy, layout=layout))


@pytest.mark.parametrize("name,strategy,layout,boundaries", [
    ("llama", "ring", "zigzag", "shard_batch"), ("llama", "ring", "zigzag", "position_ids"),
    ("qwen2", "allgather", "contiguous", "collator"), ("mistral-window", "ring", "zigzag", "position_ids"),
    ("gemma2-softcap-window", "ulysses", "zigzag", "shard_batch"), ("gpt-oss-window", "ring", "striped", "collator"),
    ("llama", "ring", "balanced", "shard_batch"), ("gpt-oss-window", "usp", "balanced", "collator"),
    ("mistral-window", "allgather", "balanced", "shard_batch"), ("llama", "ring", "balanced", "position_ids")])
def test_packed_rows_become_documents(pool, name, strategy, layout, boundaries):
    assert all(pool.run(case_packed, WORLD, name=name, strategy=strategy, layout=layout, boundaries=boundaries))


def test_missing_position_ids_are_refused_on_several_ranks(pool):
    assert all("LlamaForCausalLM" in m for m in pool.run(case_missing_position_ids, WORLD))


@pytest.mark.parametrize("name", sorted(archs.CONTROLS))
def test_each_feature_changes_the_reference(name):
    """The rows test something: without its window / softcap / sinks (same weights) the eager
    model's logits differ, so a dropped feature could not pass the table's tests."""
    control, feature = archs.CONTROLS[name]
    x = torch.randint(3, 64, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        featured = archs.build(name)(input_ids=x).logits
        plain = archs.build(control, sinks=feature != "sinks")(input_ids=x).logits
    assert (featured - plain).abs().max() > 1e-3, f"{name}: the {feature} does not change the logits"


# ---- refusals (one process) ----

def _attention_module(name: str = "llama"):
    from seqpar.integrations.hf import apply_sequence_parallel

    model = apply_sequence_parallel(archs.build(name), None)
    return model, model.model.layers[0].self_attn


def test_unknown_attention_arguments_are_refused():
    from seqpar.integrations.hf import seqpar_attention_forward

    _, attn = _attention_module()
    q, kv = torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"LlamaAttention.*unknown keyword argument alibi_slopes=tensor of shape \(4,\)"):
        seqpar_attention_forward(attn, q, kv, kv, None, alibi_slopes=torch.ones(4))
    with pytest.raises(ValueError, match=r"LlamaAttention.*unknown keyword argument chunk_size=16"):
        seqpar_attention_forward(attn, q, kv, kv, None, chunk_size=16)
    with pytest.raises(ValueError, match=r"output_attentions=True"):
        seqpar_attention_forward(attn, q, kv, kv, None, output_attentions=True)
    with pytest.raises(ValueError, match=r"dropout=0.1"):
        seqpar_attention_forward(attn, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match=r"attention masks.*\(1, 1, 8, 8\)"):
        seqpar_attention_forward(attn, q, kv, kv, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"cu_seq_lens_q \[0, 3, 8\] != cu_seq_lens_k \[0, 4, 8\]"):
        seqpar_attention_forward(attn, q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 3, 8]),
                                 cu_seq_lens_k=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match=r"given together"):
        seqpar_attention_forward(attn, q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 3, 8]))
    # None / False values of unknown arguments and the passive ones are accepted
    o, weights = seqpar_attention_forward(attn, q, kv, kv, None, chunk_size=None, return_dict=True, max_length_q=8,
                                          num_items_in_batch=3, use_cache=False, output_attentions=False)
    assert o.shape == (1, 8, 4, 8) and weights is None


def test_model_level_refusals():
    model, _ = _attention_module()
    x = torch.randint(3, 64, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, :2] = 0
    with pytest.raises(ValueError, match=r"padding masks.*\(2, 8\) has 2 zeros"):
        model(input_ids=x, position_ids=pos, attention_mask=padding)
    with pytest.raises(ValueError, match=r"custom masks"):
        model(input_ids=x, position_ids=pos, attention_mask=torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"use_cache=True"):
        model(input_ids=x, position_ids=pos, use_cache=True)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match=r"batch size 1.*got 2 rows of which 1 are packed"):
        model(input_ids=x, position_ids=packed)
    model(input_ids=x, position_ids=pos, attention_mask=torch.ones(2, 8, dtype=torch.long))  # all ones: accepted


def test_windows_need_causal_attention():
    from seqpar.integrations.hf import seqpar_attention_forward

    _, attn = _attention_module("mistral-window")
    q, kv = torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"window"):
        seqpar_attention_forward(attn, q, kv, kv, None, sliding_window=3, is_causal=False)


def test_documents_from_position_ids():
    from seqpar.integrations.hf import documents_from_position_ids

    assert documents_from_position_ids(torch.arange(6)[None]) is None
    assert documents_from_position_ids(torch.arange(3, 9)[None]) is None  # offset, still one document
    got = documents_from_position_ids(torch.tensor([[0, 0, 1, 2, 0, 1]]))
    assert got.tolist() == [0, 1, 4, 6]
    assert documents_from_position_ids(torch.tensor([0, 1, 5, 6])).tolist() == [0, 2, 4]  # a jump starts one too
