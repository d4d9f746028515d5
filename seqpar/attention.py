"""Public API: exact softmax attention on sequence-parallel shards (see docs/softmax.md)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.comm import UspGroups, check_agreement, check_validate_mode, exclusive_use
from seqpar.softmax import STRATEGIES, SoftmaxContextParallel, build_plan

__all__ = ["attention", "STRATEGIES"]


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str,
              layout: str | None = None, group: dist.ProcessGroup | UspGroups | None = None,
              causal: bool = True, scale: float | None = None, return_lse: bool = False,
              backend: str = "auto", validate: bool | str | None = "cached",
              cu_seqlens: torch.Tensor | None = None, window: int | None = None,
              softcap: float | None = None, sinks: torch.Tensor | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of this rank's queries against the keys of the whole sequence.

    q [B, T_local, Hq, D], k / v [B, T_local, Hkv, D] (Hq % Hkv == 0) are this rank's tokens under
    ``layout`` ("contiguous" by default, "zigzag" or "striped"; shard with ``seqpar.shard``).
    ``strategy``: "ring", "allgather", "ulysses" (needs Hq % P == 0) or "usp" (``group`` must be a
    ``seqpar.comm.UspGroups``). ``group`` defaults to the default process group (or a single
    process without torch.distributed). Causal masks use global token positions.

    Masks and score changes (all off by default; every strategy, layout and backend honours them,
    see docs/masks.md):

    - ``cu_seqlens``: 1-D integer tensor ``[0, e_1, ..., T_global]`` of GLOBAL document
      boundaries of one packed row (B must be 1), the same on every rank: a query sees only keys
      of its own document.
    - ``window``: int >= 1 (needs ``causal``): query i sees keys i - window < j <= i (the
      transformers ``sliding_window`` convention). The ring visits only the ranks whose keys
      some query can see.
    - ``softcap``: float > 0: scores become softcap * tanh(s / softcap) before the mask (Gemma 2).
    - ``sinks``: tensor [Hq] of per-head logits: one term exp(sink_h) in every row's softmax
      denominator, counted once over the whole sequence (GPT-OSS). lse includes it. Its
      gradient on each rank is that rank's part: sum it over the group like any replicated
      parameter's gradient (the trainer and the adapters' gradient sync do).

    Shapes: the layout is [batch, tokens, heads, head_dim]. A [B, H, T, D] tensor (heads and tokens
    swapped, e.g. transformers' layout) is in general NOT detected: both axes are just sizes, and
    it is silently attended as H tokens of T heads. Checked here: 4 dims, equal batch, local
    length and head dim of q, k, v (so a swapped GQA input, whose "lengths" Hq != Hkv, fails as a
    local-length mismatch), Hq % Hkv == 0, the layout's and Ulysses' divisibility and, with
    ``validate``, equal shapes on all ranks. ``seqpar.model`` and the adapters in ``seqpar.integrations`` also check the head axis
    against their configured head counts. Any strided view of q, k, v is accepted (permuted,
    sliced, expanded, transposed), on every backend.

    ``validate`` (the same on every rank) checks that the ranks agree on q/k/v shapes, dtype,
    strategy, layout, causal, scale (and the UspGroups sizes), so that every rank raises the same
    ValueError when they do not (or when any rank's inputs are bad), instead of a crash, hang or
    wrong answer in the collectives. ``"cached"`` (default, also None): one small exchange the
    first time a group sees a signature, nothing on later calls with it; ``"always"`` (True): the
    exchange on every call; ``"off"`` (False): none. Local checks always run. See docs/softmax.md,
    "Ranks that disagree".

    Returns o [B, T_local, Hq, D] in q.dtype, and with ``return_lse`` also the log-sum-exp
    [B, Hq, T_local] in fp32 (fp64 for fp64 inputs). Differentiable in q, k, v (and through lse).
    """
    mode = check_validate_mode(validate)
    layout = "contiguous" if layout is None else layout
    error: Exception | None = None
    try:
        plan = build_plan(q, k, v, strategy=strategy, layout=layout, group=group, causal=causal, scale=scale,
                          backend=backend, window=window, cu_seqlens=cu_seqlens, softcap=softcap, sinks=sinks)
    except (ValueError, TypeError) as e:
        if mode == "off":
            raise
        error = e
    # one thread at a time on the group, from the agreement check to the end of the forward
    with exclusive_use(group, what="seqpar.attention"):
        if mode != "off":
            check_agreement(_signature(q, k, v, strategy, layout, causal if error else plan.causal,
                                       None if error else plan.scale, group, return_lse,
                                       None if error else plan.mask, None if error else plan.softcap, sinks),
                            group, what=f"seqpar.attention(validate={mode!r})", mode=mode, local_error=error)
        o, lse = SoftmaxContextParallel.apply(q, k, v, sinks, plan, bool(return_lse))
    return (o, lse) if return_lse else o


def _signature(q, k, v, strategy, layout, causal, scale, group, return_lse, mask=None, softcap=None,
               sinks=None) -> dict:
    """What every rank of one call must agree on (no tensor data is read besides the document
    boundaries, compared by digest). The kernel backend is a local choice and is not compared;
    ``return_lse`` is, for the strategies whose lse gradient crosses ranks (ulysses, usp)."""
    fields = dict(q=_shape(q), k=_shape(k), v=_shape(v), dtype=str(getattr(q, "dtype", None)),
                  strategy=strategy if isinstance(strategy, str) else repr(strategy),
                  layout=layout if isinstance(layout, str) else repr(layout),
                  causal=causal if isinstance(causal, bool) else repr(causal), scale=scale)
    if mask is not None:
        fields.update(window=mask.window, softcap=softcap, sinks=_shape(sinks) if sinks is not None else None,
                      documents=None if mask.documents is None else
                      f"{len(mask.documents) - 1} documents, digest {_digest(mask.documents)}")
    if isinstance(group, UspGroups):
        fields.update(ulysses_size=group.ulysses_size, ring_size=group.ring_size)
    if strategy in ("ulysses", "usp"):
        fields.update(return_lse=return_lse if isinstance(return_lse, bool) else repr(return_lse))
    return fields


def _digest(values: tuple[int, ...]) -> str:
    import hashlib

    return hashlib.sha1(",".join(map(str, values)).encode()).hexdigest()[:16]
