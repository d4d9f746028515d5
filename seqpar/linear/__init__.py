"""Sequence-parallel linear attention: LASP-2 (one all-gather of states) and LASP (ring)."""
from seqpar.linear.api import STRATEGIES, linear_attention
from seqpar.linear.common import CommEvent, CommStats

__all__ = ["STRATEGIES", "linear_attention", "CommEvent", "CommStats"]
