"""Exact softmax attention across ranks: one driver (``driver``), K/V sources (``sources``: ring
exchange or all-gather), one autograd Function (``function``) and per-strategy plans (``plan``).
The public entry point is :func:`seqpar.attention`."""
from seqpar.softmax.function import ParallelPlan, SoftmaxContextParallel
from seqpar.softmax.plan import STRATEGIES, build_plan, check_inputs

__all__ = ["ParallelPlan", "SoftmaxContextParallel", "STRATEGIES", "build_plan", "check_inputs"]
