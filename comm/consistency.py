"""Cross-rank agreement: every rank of a group compares a few descriptive fields of its call
(shapes, dtype, options...) with every other rank's, and all ranks raise the same ValueError when
they differ, instead of crashing or hanging inside a later collective or silently computing a
wrong answer. Nothing here knows about attention: callers pass named fields.

Three modes (``validate=`` of the public attention calls, normalised by :func:`check_validate_mode`):

- ``"cached"`` (the default; ``None`` means the same): the first call with a given signature on a
  given group exchanges a 16-byte digest of the fields (one all-gather of a fixed-size tensor, so
  the check itself can never mismatch in size); when the digests differ, or a rank's local check
  failed, a second exchange (``all_gather_object``) of the full fields names every differing
  field and each rank's value. A signature that every rank agreed on is remembered **per group**;
  later calls with it cost a dict lookup and no communication. ``values`` (checksums of small
  tensors that must be equal everywhere, which read tensor data and so synchronise a GPU) are
  computed and compared on that first call only.
- ``"always"`` (``True``): the exchange (values included) on every call.
- ``"off"`` (``False``): nothing.

Where the cache lives: :data:`AGREEMENT`, an :class:`AgreementRegistry` holding a
``weakref.WeakKeyDictionary`` keyed by the ``ProcessGroup`` object itself (a ``UspGroups`` uses
its ``sp`` group; ``None`` the default group). Each group has its own signatures, which disappear
with the group object; nothing is shared between groups or processes. An entry is written only
after an exchange in which every rank of the group agreed, and entries leave only in insertion
order (at most ``max_signatures`` per group) or through :func:`clear_agreement_cache`, so as long
as the ranks make the same calls their caches hold the same signatures.

The asymmetric case: if one rank calls with a signature the group already agreed on (it skips the
exchange) while another rank calls with a new one (it enters the exchange), the two ranks are in
different collectives. What follows depends on the backend: the new rank waits in the exchange
until the group's timeout and then raises a RuntimeError that says so (naming its own call), the
cached rank's next collective fails or times out the same way, and on gloo a size mismatch can
abort the process. It is bounded by the process group's timeout (seqpar's groups:
``seqpar.comm.groups.DEFAULT_TIMEOUT_S``). If both ranks call with *different* signatures that
were *both* agreed before, nothing is detected (use ``"always"`` while debugging). The mode
itself must be the same on every rank: it is part of the exchanged fields (so ``"always"`` on one
rank and ``"cached"`` on another is a clear error on the first call), but a rank with ``"off"``
never exchanges.
"""
from __future__ import annotations

import hashlib
import math
import threading
import weakref
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from seqpar.comm.collectives import _all_gather_dim0
from seqpar.comm.groups import UspGroups, group_rank_and_size, sp_group_of

VALIDATE_MODES = ("cached", "always", "off")


def check_validate_mode(validate: object) -> str:
    """The mode named by ``validate``: None or "cached" -> "cached", True or "always" -> "always",
    False or "off" -> "off". Raises a TypeError / ValueError for anything else (checked on this
    rank, before any communication)."""
    if validate is None:
        return "cached"
    if validate is True:
        return "always"
    if validate is False:
        return "off"
    if type(validate) is str:
        if validate in VALIDATE_MODES:
            return validate
        raise ValueError(f"validate must be one of {VALIDATE_MODES} (or True = 'always', False = 'off', "
                         f"None = 'cached'), got {validate!r}")
    raise TypeError(f"validate must be a bool, None or one of {VALIDATE_MODES}, got {type(validate).__name__} "
                    f"{validate!r}")


def _same(a: Any, b: Any) -> bool:
    """Equality, with a relative tolerance for floats (checksums), element-wise in tuples / lists."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_same_on_all_ranks(fields: Mapping[str, Any], group: Any, *, what: str,
                            local_error: BaseException | None = None) -> None:
    """Compare ``fields`` (picklable values: numbers, strings, tuples...) across ``group``.

    Collective (one ``all_gather_object``): every rank of ``group`` must call it. ``local_error``
    is this rank's own validation error, if any: it is re-raised here after the exchange, and the
    other ranks raise a ValueError naming this rank and its message, so that a rank with bad
    input cannot leave the others waiting in a collective. Raises a ValueError naming each field
    that differs and every rank's value. ``group`` may be a UspGroups (its ``sp`` group is used).
    """
    group = sp_group_of(group)
    rank, world_size = group_rank_and_size(group)
    if world_size == 1:
        if local_error is not None:
            raise local_error
        return
    mine = (None if local_error is None else f"{type(local_error).__name__}: {local_error}", dict(fields))
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine, group=group)
    if local_error is not None:
        raise local_error
    failed = [(r, err) for r, (err, _) in enumerate(everyone) if err is not None]
    if failed:
        details = "; ".join(f"rank {r}: {err}" for r, err in failed)
        raise ValueError(f"{what}: other ranks of the group rejected their inputs ({details})")
    diffs = []
    for name in dict.fromkeys(n for _, f in everyone for n in f):  # the same order on every rank
        values = [f.get(name) for _, f in everyone]
        if not all(_same(values[0], other) for other in values[1:]):
            diffs.append(f"{name}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values)))
    if diffs:
        raise ValueError(f"{what}: the ranks of the group (this is rank {rank} of {world_size}) disagree on "
                         + "; ".join(diffs))


# ---------------------------------------------------------------------------------------------
# The per-group cache of agreed signatures.


class _GroupAgreement:
    """What one process knows about one group: the signatures all its ranks agreed on (in
    insertion order) and counters of the exchanges made."""

    __slots__ = ("signatures", "exchanges", "detailed", "__weakref__")

    def __init__(self) -> None:
        self.signatures: dict = {}
        self.exchanges = 0  # digest exchanges (one collective each)
        self.detailed = 0   # full-field exchanges after differing digests or a local error


class AgreementRegistry:
    """Agreed call signatures per process group (weakly keyed by the group object)."""

    def __init__(self, max_signatures: int = 1024) -> None:
        self.max_signatures = max_signatures
        self._groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def state(self, pg: Any) -> _GroupAgreement:
        st = self._groups.get(pg)
        if st is None:
            with self._lock:
                st = self._groups.get(pg)
                if st is None:
                    st = self._groups[pg] = _GroupAgreement()
        return st

    def knows(self, pg: Any, key: Any) -> bool:
        """Whether every rank of ``pg`` agreed on the signature ``key`` before (no lock: a read)."""
        st = self._groups.get(pg)
        return st is not None and key in st.signatures

    def remember(self, pg: Any, key: Any) -> None:
        st = self.state(pg)
        with self._lock:
            st.signatures[key] = None
            while len(st.signatures) > self.max_signatures:  # oldest first: the same on every rank
                del st.signatures[next(iter(st.signatures))]

    def clear(self, pg: Any = None) -> None:
        """Forget the signatures (and reset the counters) of ``pg``, or of every group."""
        with self._lock:
            for st in (list(self._groups.values()) if pg is None else [self._groups.get(pg)]):
                if st is not None:
                    st.signatures.clear()
                    st.exchanges = st.detailed = 0


#: The process-wide registry (see the module docstring for why this is safe to share).
AGREEMENT = AgreementRegistry()


def _process_group(group: Any) -> Any:
    """The ProcessGroup object a group argument stands for (UspGroups -> sp, None -> default)."""
    if isinstance(group, UspGroups):
        group = group.sp
    return dist.group.WORLD if group is None else group


def clear_agreement_cache(group: Any = None) -> None:
    """Forget the agreed signatures of ``group`` (a ProcessGroup, UspGroups or None for the
    default group), or of every group with ``group="all"``, and reset its counters
    (:func:`agreement_stats`). Do it on every rank of the group at the same point (e.g. between
    tests), or the ranks' caches differ (see the module docstring)."""
    if isinstance(group, str) and group == "all":
        AGREEMENT.clear()
    elif dist.is_available() and dist.is_initialized():
        AGREEMENT.clear(_process_group(group))


def agreement_stats(group: Any = None) -> dict:
    """This process's counters for ``group``: agreed ``signatures`` held, digest ``exchanges`` and
    ``detailed`` (full-field) exchanges made so far."""
    st = AGREEMENT.state(_process_group(group))
    return dict(signatures=len(st.signatures), exchanges=st.exchanges, detailed=st.detailed)


def _digest(fields: Mapping[str, Any], error: str | None) -> list[int]:
    """Two int64 words of a 128-bit hash of the fields (stable across processes: repr, not hash())."""
    text = repr((sorted(fields.items()), error)).encode()
    raw = hashlib.blake2b(text, digest_size=16).digest()
    return [int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)]


def _collective_device(pg: Any) -> torch.device:
    """The device a small tensor collective on ``pg`` needs (CPU for gloo, the current GPU for nccl)."""
    get = getattr(dist.distributed_c10d, "_get_object_coll_device", None)
    if get is not None:
        try:
            return torch.device(get(pg))
        except Exception:
            pass
    backend = str(dist.get_backend(pg))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_digests(pg: Any, world_size: int, words: list[int]) -> list[list[int]]:
    """One all-gather of a fixed-size int64 tensor: every rank's digest words."""
    mine = torch.tensor(words, dtype=torch.int64, device=_collective_device(pg))
    out = torch.empty(world_size * mine.numel(), dtype=torch.int64, device=mine.device)
    _all_gather_dim0(out, mine, group=pg)
    return out.view(world_size, -1).tolist()


def check_agreement(fields: Mapping[str, Any], group: Any, *, what: str, mode: str = "cached",
                    values: Callable[[], Mapping[str, Any]] | None = None,
                    local_error: BaseException | None = None) -> None:
    """Check that every rank of ``group`` calls with the same ``fields`` (see the module docstring).

    ``fields``: hashable, picklable values (numbers, strings, None, tuples of them) that identify
    the call without reading tensor data -- the signature. ``values``: a callable returning more
    fields that do read data (checksums); called only when an exchange happens, and merged over
    ``fields`` for it. ``mode``: "cached", "always" or "off" (:func:`check_validate_mode`).
    ``local_error``: this rank's own validation error, or None; with one, the exchange still
    happens (so the other ranks raise "other ranks of the group rejected their inputs" instead of
    waiting) and this rank re-raises it. Collective on a cache miss: every rank of the group must
    call it with the same ``mode``. ``group``: a ProcessGroup, a UspGroups (its ``sp``) or None.
    """
    if mode == "off":
        if local_error is not None:
            raise local_error
        return
    if not (dist.is_available() and dist.is_initialized()):
        group_rank_and_size(sp_group_of(group))  # raises if a group was given without distributed
        if local_error is not None:
            raise local_error
        return
    pg = _process_group(group)
    key = None
    if mode == "cached" and local_error is None:
        key = (what, tuple(fields.items()))
        if AGREEMENT.knows(pg, key):
            return  # agreed before on this group: no communication
    try:
        rank, world_size = group_rank_and_size(pg)
    except Exception:
        if local_error is not None:
            raise local_error
        raise
    if world_size == 1 or dist.get_backend(pg) == "fake":  # nobody to disagree with
        if local_error is not None:
            raise local_error
        if key is not None:
            AGREEMENT.remember(pg, key)
        return
    full = dict(fields)
    full["validate"] = mode
    if values is not None and local_error is None:
        try:
            full.update(values())
        except Exception as e:  # keep the exchange: the other ranks must not be left waiting
            local_error = e
    error = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
    st = AGREEMENT.state(pg)
    try:
        everyone = _exchange_digests(pg, world_size, _digest(full, error))
    except Exception as comm_error:
        if local_error is not None:
            raise local_error from comm_error
        raise RuntimeError(
            f"{what}: the agreement check of this rank's call failed in its exchange ({comm_error}). Either "
            f"another rank of the group stopped, or it skipped the check -- because it had agreed on the "
            f"signature of its own call before (validate='cached': the ranks then disagree on a call the group "
            f"has seen) or runs with validate='off'. This rank (rank {rank} of {world_size}) called with "
            f"{dict(full)!r}"
        ) from comm_error
    st.exchanges += 1
    if all(words == everyone[0] for words in everyone):
        if local_error is not None:  # every rank failed alike
            raise local_error
        if key is not None:
            AGREEMENT.remember(pg, key)
        return
    st.detailed += 1
    check_same_on_all_ranks(full, pg, what=what, local_error=local_error)
    # equal up to the float tolerance of checksums
    if key is not None:
        AGREEMENT.remember(pg, key)
