"""seqpar.kernels: per-device math (no ranks). Each family has a plain PyTorch reference, a
Triton implementation, and one dispatcher that picks by device (``backend='auto'``)."""
from seqpar.kernels.softmax import (
    BACKENDS,
    attention_block_accumulate_,
    attention_block_backward,
    attention_block_forward,
    merge_partials_,
    resolve_backend,
)
from seqpar.kernels.softmax_reference import attention_reference, compute_dtype
from seqpar.kernels.linear import (
    chunk_linear_attention,
    chunk_linear_attention_backward,
    chunk_linear_attention_forward,
)

__all__ = [
    "chunk_linear_attention",
    "chunk_linear_attention_backward",
    "chunk_linear_attention_forward",
    "BACKENDS",
    "attention_block_accumulate_",
    "attention_block_backward",
    "attention_block_forward",
    "merge_partials_",
    "resolve_backend",
    "attention_reference",
    "compute_dtype",
]
