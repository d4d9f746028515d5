"""Validated configurations of the hybrid model, of sequence parallelism and of training.

Every dataclass checks itself in ``__post_init__`` and raises a ValueError that names the
problem and the numbers. Cross-config rules (a layout that the model's layer kinds cannot use,
heads that Ulysses cannot split, a sequence that the layout cannot cut) live in
:func:`check_compatible`, which :class:`TrainConfig` and :func:`seqpar.parallelize.parallelize_model`
both call.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from seqpar.kernels.softmax import BACKENDS
from seqpar.layout import LAYOUTS, check_global_length, check_layout, chunks_per_rank, layout_name
from seqpar.masks import check_softcap, check_window

LAYER_KINDS = {"S": "softmax", "L": "linear", "D": "delta"}
#: Layer kinds whose token mixing is a linear-attention recurrence (a state passed across ranks).
RECURRENT_KINDS = ("linear", "delta")
FEATURE_MAPS = ("identity", "elu1", "relu", "silu")
DECAYS = ("fixed", "gate", "gla", "none")
SOFTMAX_STRATEGIES = ("ring", "allgather", "ulysses", "usp")
LINEAR_STRATEGIES = ("lasp2", "lasp1")
DTYPES = ("float32", "float64", "bfloat16")
NONFINITE_ACTIONS = ("stop", "skip")


@dataclass
class ModelConfig:
    """A Linear-Llama3-style hybrid decoder.

    ``pattern`` is a string over ``S`` (softmax attention), ``L`` (linear attention) and ``D``
    (gated delta rule, a Gated DeltaNet layer as in Qwen3-Next), repeated (and truncated) to
    ``n_layers``. ``linear_decay`` (``L`` layers) is ``fixed`` (a per-head constant log decay,
    RetNet's ladder log(1 - 2^(-5-h))), ``gate`` (a data-dependent per-head gate, log-sigmoid of a
    low-rank projection divided by ``gate_normalizer``), ``gla`` (the same per key channel: gates
    [B, T, H, head_dim], as GLA) or ``none``.

    ``D`` layers have ``delta_heads`` heads (None: ``n_heads``) with query / key dimension
    ``delta_head_dim`` (None: ``head_dim``) and value dimension ``delta_value_dim`` (None:
    ``delta_head_dim``); :attr:`delta_dims` resolves the three. Giving one of them without a ``D``
    layer in the pattern is an error (it would be silently unused).

    Softmax layers: ``window`` (None: full causal attention) is a causal sliding window, query i
    sees keys i - window < j <= i (the transformers ``sliding_window`` convention), in global
    positions (document positions with packed documents); ``softcap`` (None: off) caps the
    attention logits as Gemma 2, s -> softcap * tanh(s / softcap). Both need a softmax layer in
    ``pattern``.
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int | None = None  # default: SwiGLU's 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 32
    pattern: str = "LS"
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_embeddings: bool = True
    # softmax-attention layers
    window: int | None = None
    softcap: float | None = None
    # linear-attention layers
    linear_decay: str = "fixed"
    feature_map: str = "identity"
    linear_output_norm: bool = True
    linear_rope: bool = False
    gate_rank: int = 16
    gate_normalizer: float = 16.0
    # gated delta-rule layers (pattern letter D); None: n_heads / head_dim / delta_head_dim
    delta_heads: int | None = None
    delta_head_dim: int | None = None
    delta_value_dim: int | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "gate_rank", "ffn_multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads} (GQA)")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} (dim {self.dim} / n_heads {self.n_heads}) must be even for RoPE")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern must be a non-empty string over 'S' (softmax), 'L' (linear) and 'D' "
                             f"(gated delta rule), got {self.pattern!r}")
        bad = sorted(set(self.pattern) - set(LAYER_KINDS))
        if bad:
            raise ValueError(f"pattern {self.pattern!r} has unknown layer kinds {bad}; use 'S' (softmax), "
                             f"'L' (linear) and 'D' (gated delta rule)")
        if self.linear_decay not in DECAYS:
            raise ValueError(f"unknown linear_decay {self.linear_decay!r}; expected one of {DECAYS}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {self.feature_map!r}; expected one of {FEATURE_MAPS}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be >= 1, got {self.ffn_dim}")
        if self.gate_normalizer <= 0:
            raise ValueError(f"gate_normalizer must be > 0, got {self.gate_normalizer}")
        self.window = check_window(self.window)  # "window must be an int >= 1 or None, got ..."
        self.softcap = check_softcap(self.softcap)
        for name in ("window", "softcap"):
            if getattr(self, name) is not None and not self.has_softmax:
                raise ValueError(f"{name}={getattr(self, name)} applies to softmax-attention layers, but pattern "
                                 f"{self.pattern!r} has none over {self.n_layers} layers")
        for name in ("delta_heads", "delta_head_dim", "delta_value_dim"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 1 or None, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
            if not self.has_delta:
                raise ValueError(f"{name}={value} applies to gated delta-rule layers ('D'), but pattern "
                                 f"{self.pattern!r} has none over {self.n_layers} layers")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def layer_kinds(self) -> list[str]:
        """``"softmax"``, ``"linear"`` or ``"delta"`` for each of the ``n_layers`` layers."""
        reps = (self.n_layers + len(self.pattern) - 1) // len(self.pattern)
        return [LAYER_KINDS[c] for c in (self.pattern * reps)[: self.n_layers]]

    @property
    def has_linear(self) -> bool:
        """Whether some layer is a linear-attention recurrence (``L`` or ``D``): such a layer
        passes a state across the ranks, so each rank must hold consecutive tokens."""
        return any(kind in RECURRENT_KINDS for kind in self.layer_kinds)

    @property
    def has_delta(self) -> bool:
        return "delta" in self.layer_kinds

    @property
    def delta_dims(self) -> tuple[int, int, int]:
        """(heads, query / key dimension, value dimension) of the gated delta-rule layers."""
        heads = self.n_heads if self.delta_heads is None else self.delta_heads
        key_dim = self.head_dim if self.delta_head_dim is None else self.delta_head_dim
        value_dim = key_dim if self.delta_value_dim is None else self.delta_value_dim
        return heads, key_dim, value_dim

    @property
    def has_softmax(self) -> bool:
        return "softmax" in self.layer_kinds


@dataclass
class SequenceParallelConfig:
    """How attention layers run across the sequence-parallel group.

    One token ``layout`` for the whole model; a strategy per kind of layer. ``ulysses_size`` is
    the Ulysses axis of the 2-D ``usp`` strategy (the ring axis is ``sp_size / ulysses_size``).
    """

    sp_size: int = 1
    layout: str | Any = "contiguous"  # a name, or a layout object (seqpar.layout.BalancedLayout)
    softmax_strategy: str = "ring"
    linear_strategy: str = "lasp2"
    ulysses_size: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("sp_size", "ulysses_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if self.sp_size < 1:
            raise ValueError(f"sp_size must be >= 1, got {self.sp_size}")
        check_layout(self.layout)  # a name of LAYOUTS, or a layout object
        if self.softmax_strategy not in SOFTMAX_STRATEGIES:
            raise ValueError(f"unknown softmax_strategy {self.softmax_strategy!r}; expected one of {SOFTMAX_STRATEGIES}")
        if self.linear_strategy not in LINEAR_STRATEGIES:
            raise ValueError(f"unknown linear_strategy {self.linear_strategy!r}; expected one of {LINEAR_STRATEGIES}")
        if self.ulysses_size < 1 or self.sp_size % self.ulysses_size != 0:
            raise ValueError(f"ulysses_size {self.ulysses_size} does not divide sp_size {self.sp_size}")
        if self.softmax_strategy != "usp" and self.ulysses_size != 1:
            raise ValueError(f"ulysses_size {self.ulysses_size} is only used by softmax_strategy='usp', "
                             f"got softmax_strategy={self.softmax_strategy!r}")

    @property
    def ring_size(self) -> int:
        return self.sp_size // self.ulysses_size

    @property
    def length_divisor(self) -> int:
        """What a global sequence length must be a multiple of: sp_size, times the chunks each rank
        holds (2 for zigzag) when the sequence is split at all."""
        return self.sp_size * (chunks_per_rank(self.layout) if self.sp_size > 1 else 1)


def check_compatible(model: ModelConfig, sp: SequenceParallelConfig, seq_len: int | None = None) -> None:
    """Raise a ValueError when ``sp`` cannot run ``model`` (and, if given, ``seq_len`` tokens)."""
    if layout_name(sp.layout) == "striped" and model.has_linear:
        raise ValueError("layout 'striped' cannot be used with linear-attention layers (pattern "
                         f"{model.pattern!r}): a linear-attention rank must hold consecutive tokens; "
                         "use 'contiguous' or 'zigzag'")
    if model.has_softmax and sp.sp_size > 1:
        # Ulysses splits the query heads over its group (KV heads that do not split are repeated
        # by the strategy, see seqpar.softmax).
        if sp.softmax_strategy == "ulysses" and model.n_heads % sp.sp_size != 0:
            raise ValueError(f"softmax_strategy 'ulysses' needs n_heads ({model.n_heads}) divisible by "
                             f"sp_size ({sp.sp_size})")
        if sp.softmax_strategy == "usp" and model.n_heads % sp.ulysses_size != 0:
            raise ValueError(f"softmax_strategy 'usp' needs n_heads ({model.n_heads}) divisible by "
                             f"ulysses_size ({sp.ulysses_size})")
    if seq_len is not None and not isinstance(sp.layout, str):
        check_global_length(sp.layout, seq_len, sp.sp_size)  # a layout object is built for one length
    elif seq_len is not None:
        divisor = sp.length_divisor
        if seq_len % divisor != 0:
            raise ValueError(f"seq_len {seq_len} is not divisible by {divisor} "
                             f"(sp_size={sp.sp_size}, layout={sp.layout!r})")


@dataclass
class TrainConfig:
    """A training run: model, sequence parallelism, data, optimiser, logging and checkpoints.

    ``batch_size`` is the GLOBAL number of sequences per step (split over the data-parallel
    replicas), so a run can resume with another data- or sequence-parallel size and see the
    same batches.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    sp: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    # data
    data: str = "stdlib"  # "stdlib" (byte-level Python source), "synthetic" (long-range copy task) or a token-file path
    packing: bool = False  # token files: fill rows with whole documents, attention and RoPE restart at each
    data_dtype: str | None = None  # token files without metadata: uint16 or uint32
    eos_id: int | None = None  # token files without metadata: the end-of-document token id
    seq_len: int = 128
    batch_size: int = 4
    max_corpus_bytes: int = 4_000_000
    val_fraction: float = 0.05
    # optimisation
    steps: int = 30
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # parameter dtype; on CUDA the forward runs under bf16 autocast (see amp)
    amp: bool = True
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (inductor with a C++ compiler, else aot_eager)
    # logging / evaluation / checkpoints
    run_dir: str = "runs/default"
    log_interval: int = 1
    profile_every: int = 0  # run every N-th step under torch.profiler (0: never)
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_batches: int = 2
    checkpoint_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" (latest in run_dir), a checkpoint path, or None
    progress: bool = True
    plot: bool = True
    device: str = "auto"
    # faults
    on_nonfinite: str = "stop"  # a NaN / inf loss or gradient norm: "stop" (exit non-zero) or "skip" the update
    max_skipped_steps: int = 10  # on_nonfinite="skip": stop after this many non-finite steps in a row
    timeout_s: float = 600.0  # of every process group the trainer creates: a stopped rank becomes an error

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.sp, dict):
            self.sp = SequenceParallelConfig(**self.sp)
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be 'stdlib', 'synthetic' or the path of a token file or directory, got {self.data!r}")
        if self.data in ("stdlib", "synthetic") and (self.packing or self.data_dtype is not None or self.eos_id is not None):
            raise ValueError(f"packing, data_dtype and eos_id apply to token files, not to data={self.data!r}")
        if self.data_dtype not in (None, "uint16", "uint32"):
            raise ValueError(f"data_dtype must be uint16 or uint32, got {self.data_dtype!r}")
        for name in ("seq_len", "batch_size", "steps", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints", "profile_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"unknown on_nonfinite {self.on_nonfinite!r}; expected one of {NONFINITE_ACTIONS}")
        if self.max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.data == "stdlib" and self.model.vocab_size < 256:
            raise ValueError(f"byte-level data needs vocab_size >= 256, got {self.model.vocab_size}")
        check_compatible(self.model, self.sp, self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# One line of help per field (the command line of ``python -m seqpar.train`` shows these), and
# the allowed values of the fields that take a name.

FIELD_HELP: dict[str, str] = {
    # ModelConfig
    "vocab_size": "vocabulary size (byte-level data needs >= 256)",
    "dim": "model width",
    "n_layers": "number of decoder layers",
    "n_heads": "query heads per attention layer",
    "n_kv_heads": "key/value heads (GQA: must divide n_heads)",
    "ffn_dim": "SwiGLU hidden size (none: 8/3 dim rounded up to ffn_multiple_of)",
    "ffn_multiple_of": "round the default SwiGLU hidden size up to a multiple of this",
    "pattern": "layer kinds, repeated over the layers: S = softmax attention, L = linear attention, D = gated delta "
               "rule (Gated DeltaNet) (e.g. LLLS, DDDS)",
    "norm_eps": "RMSNorm epsilon",
    "rope_theta": "RoPE base",
    "tie_embeddings": "share the input embedding with the output head",
    "window": "sliding window of the softmax-attention layers: query i sees the keys j with i-window < j <= i "
              "(none: full causal attention)",
    "softcap": "attention logit softcap of the softmax-attention layers (Gemma 2): s -> softcap * tanh(s / softcap) "
               "(none: off)",
    "linear_decay": "decay of the linear-attention (L) layers: fixed (per-head RetNet ladder), gate (data-dependent, "
                    "per head), gla (data-dependent, per head and key channel, as GLA) or none",
    "feature_map": "feature map applied to q and k in linear-attention layers",
    "linear_output_norm": "RMSNorm on each head's linear-attention output",
    "linear_rope": "apply RoPE to q and k in linear-attention layers too",
    "gate_rank": "rank of the low-rank gate projection (linear_decay=gate or gla)",
    "gate_normalizer": "divide the log-sigmoid gate by this (linear_decay=gate or gla)",
    "delta_heads": "heads of the gated delta-rule (D) layers (none: n_heads)",
    "delta_head_dim": "query / key dimension per head of the D layers (none: head_dim)",
    "delta_value_dim": "value dimension per head of the D layers (none: delta_head_dim)",
    "init_std": "standard deviation of the initial weights",
    # SequenceParallelConfig
    "sp_size": "sequence-parallel ranks per sequence (must divide the number of processes)",
    "layout": "which tokens each rank holds: contiguous, zigzag (balanced causal work) or striped (softmax only)",
    "softmax_strategy": "how softmax layers attend across ranks",
    "linear_strategy": "how linear-attention layers pass states across ranks",
    "ulysses_size": "Ulysses axis of softmax_strategy=usp (the ring axis is sp / ulysses_size)",
    "backend": "block kernels: auto (Triton on CUDA, torch SDPA on CPU), torch, sdpa or triton",
    # TrainConfig
    "data": "training data: stdlib (bytes of Python's standard library), synthetic (long-range copy task), or "
            "the path of a token file / directory (python -m seqpar.data prepare writes one)",
    "packing": "token files: fill each row with whole documents; attention, RoPE positions and the linear "
               "layers' states restart at every document, and no label crosses one",
    "data_dtype": "token files without a .json sidecar: uint16 or uint32",
    "eos_id": "token files without a .json sidecar: the end-of-document token id",
    "seq_len": "tokens per sequence (global, before it is split over the sp ranks)",
    "batch_size": "sequences per step, global (split over the data-parallel replicas)",
    "max_corpus_bytes": "read at most this many bytes of the stdlib corpus",
    "val_fraction": "fraction of the corpus held out for evaluation",
    "steps": "optimizer steps in all (a resumed run continues up to this step)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "final learning rate of the cosine schedule, as a fraction of lr",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "seed": "seed of the initial parameters and of the data order",
    "dtype": "parameter dtype (on CUDA the forward runs under bf16 autocast when float32 and --amp)",
    "amp": "bf16 autocast on CUDA",
    "activation_checkpointing": "recompute each layer in backward to save activation memory",
    "compile": "torch.compile each decoder layer (inductor when a C++ compiler is found, else aot_eager); the "
               "block kernels are torch custom ops, the collectives between them graph breaks",
    "run_dir": "directory for config.json, train.log, train.jsonl, loss.png and checkpoints/",
    "log_interval": "write a train record (step time and where it went) every this many steps",
    "profile_every": "run every N-th step under torch.profiler: a profile record of its collectives and a trace in "
                     "run_dir/profiles/ (0: never)",
    "eval_interval": "evaluate on held-out data every this many steps (0: only at the end)",
    "eval_batches": "held-out batches per evaluation",
    "checkpoint_interval": "save a checkpoint every this many steps (0: only at the end)",
    "keep_checkpoints": "keep this many newest checkpoints (0: save none)",
    "resume": "continue a run: auto (the newest checkpoint in run_dir) or a checkpoint path",
    "progress": "show a progress bar (a plain line every few steps when the output is not a terminal)",
    "plot": "write loss.png at the end",
    "device": "auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or cuda[:N]",
    "on_nonfinite": "a NaN / inf loss or gradient norm: stop (exit with status 3, checkpoints kept) or skip the update",
    "max_skipped_steps": "with --on-nonfinite skip: stop after this many non-finite steps in a row",
    "timeout_s": "seconds a collective may wait on any process group the trainer creates (a stopped rank becomes an error)",
}

FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "linear_decay": DECAYS,
    "feature_map": FEATURE_MAPS,
    "layout": LAYOUTS,
    "softmax_strategy": SOFTMAX_STRATEGIES,
    "linear_strategy": LINEAR_STRATEGIES,
    "dtype": DTYPES,
    "backend": BACKENDS,
    "on_nonfinite": NONFINITE_ACTIONS,
}


# ---------------------------------------------------------------------------------------------
# Presets. ``tiny`` runs a step in well under a second on one CPU core.

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS"),
    "small": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, pattern="LLLS"),
    "medium": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, pattern="LLLS"),
    # Llama-3.2-1B shapes (dim 2048, 16 layers, 32/8 heads, SwiGLU 8192), byte vocabulary:
    # about 0.97B parameters.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, pattern="LLLS"),
    # Llama-3-8B shapes (dim 4096, 32 layers, 32/8 heads, SwiGLU 14336), byte vocabulary:
    # about 7.0B parameters.
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, pattern="LLLS"),
    # Qwen3-Next-style: three gated delta-rule (Gated DeltaNet) layers per softmax layer.
    "qwen3next-tiny": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, pattern="DDDS"),
    "qwen3next-small": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, pattern="DDDS"),
}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, batch_size=4, steps=40, lr=3e-3, warmup_steps=4),
    "small": dict(seq_len=1024, batch_size=8, steps=500, lr=1e-3, warmup_steps=50),
    "medium": dict(seq_len=4096, batch_size=8, steps=2000, lr=6e-4, warmup_steps=100),
    "1b": dict(seq_len=32768, batch_size=8, steps=5000, lr=3e-4, warmup_steps=200, activation_checkpointing=True),
    "8b": dict(seq_len=131072, batch_size=8, steps=5000, lr=2e-4, warmup_steps=200, activation_checkpointing=True),
    "qwen3next-tiny": dict(seq_len=128, batch_size=4, steps=40, lr=3e-3, warmup_steps=4),
    "qwen3next-small": dict(seq_len=1024, batch_size=8, steps=500, lr=1e-3, warmup_steps=50),
}


# ---------------------------------------------------------------------------------------------
# What may change when a run resumes from a checkpoint.

#: Fields that give the parameters their shapes (or add parameters): never changed on resume.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "ffn_multiple_of", "pattern",
                "tie_embeddings", "linear_decay", "linear_output_norm", "gate_rank", "delta_heads", "delta_head_dim",
                "delta_value_dim")
#: Fields that change what the model computes or which tokens it sees: a resume with other
#: values is refused unless each one is named in ``allow_changes`` (e.g. a longer seq_len with a
#: larger rope_theta for long-context continued training).
SEMANTIC_FIELDS = ("norm_eps", "rope_theta", "window", "softcap", "feature_map", "linear_rope", "gate_normalizer",
                   "data", "packing", "data_dtype", "eos_id", "seq_len", "batch_size", "max_corpus_bytes",
                   "val_fraction", "seed")
#: Fields with no effect once the parameters exist, or that only say where the run lives.
IGNORED_ON_RESUME = ("init_std", "run_dir", "resume")


def _flat_config(d: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in d.items() if k not in ("model", "sp")}
    flat.update(d.get("model") or {})
    flat.update({f"sp.{k}": v for k, v in (d.get("sp") or {}).items()})
    return flat


def check_allow_changes(allow_changes: tuple[str, ...]) -> None:
    """Raise a ValueError for a name that is not one of :data:`SEMANTIC_FIELDS` (a shape field
    can never change; the others apply on resume without being allowed)."""
    for name in allow_changes:
        if name in SHAPE_FIELDS:
            raise ValueError(f"allow_changes: {name!r} changes the shapes of the parameters and cannot change on "
                             f"resume")
        if name not in SEMANTIC_FIELDS:
            raise ValueError(f"allow_changes: {name!r} is not a field that needs allowing; choose from "
                             f"{', '.join(SEMANTIC_FIELDS)} (the other fields apply on resume without it)")


def resume_changes(saved: dict[str, Any], new: TrainConfig,
                   allow_changes: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Compare the config a checkpoint was saved with (``TrainConfig.to_dict()``) with ``new``.

    Returns (refused, applied): one ``"field: old -> new"`` line per difference. Refused are
    changes of :data:`SHAPE_FIELDS` (always) and of :data:`SEMANTIC_FIELDS` not named in
    ``allow_changes``; applied are the others (optimisation, logging, checkpoints, parallelism,
    and the allowed ones). Fields missing from ``saved`` (an older seqpar) are not compared.
    Raises ValueError for a name in ``allow_changes`` that is not a field or cannot be allowed.
    """
    check_allow_changes(allow_changes)
    old, cur = _flat_config(saved), _flat_config(new.to_dict())
    refused, applied = [], []
    for name, value in cur.items():
        if name in IGNORED_ON_RESUME or name not in old or old[name] == value:
            continue
        line = f"{name}: {old[name]!r} -> {value!r}"
        if name in SHAPE_FIELDS or (name in SEMANTIC_FIELDS and name not in allow_changes):
            refused.append(line)
        else:
            applied.append(line)
    return refused, applied


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a preset name; ``model`` and ``sp`` overrides may be dicts."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(TRAIN_PRESETS)}")
    model = dict(MODEL_PRESETS[name])
    model.update(overrides.pop("model", {}) or {})
    sp = overrides.pop("sp", {}) or {}
    kwargs = dict(TRAIN_PRESETS[name])
    kwargs.update(overrides)
    return TrainConfig(model=ModelConfig(**model), sp=SequenceParallelConfig(**sp) if isinstance(sp, dict) else sp, **kwargs)
