"""Explicit, opt-in glue between seqpar and training frameworks.

Each submodule imports its framework lazily (only when you import the submodule), so ``import
seqpar`` never imports Megatron-core, DeepSpeed or transformers:

- :mod:`seqpar.integrations.megatron`: core-attention modules for Megatron-core ``ModuleSpec``\\ s
  that run on Megatron's context-parallel group, and hybrid (linear + softmax) layer specs.
- :mod:`seqpar.integrations.deepspeed`: a drop-in for ``deepspeed.sequence.layer.DistributedAttention``
  on DeepSpeed's sequence-parallel group.
- :mod:`seqpar.integrations.hf`: ``apply_sequence_parallel(model, group, ...)`` for transformers
  Llama-family models, through transformers' attention-function registry.

Nothing here patches a framework globally: every integration is a call you make on your own
model, with the framework's own process groups.
"""
