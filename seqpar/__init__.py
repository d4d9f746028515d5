"""seqpar: sequence parallelism for softmax, linear and hybrid attention in PyTorch."""
from seqpar.layout import LAYOUTS, global_positions, local_positions, shard, unshard
from seqpar.attention import STRATEGIES, attention
from seqpar.linear import linear_attention

__version__ = "0.1.0"

__all__ = ["linear_attention", "STRATEGIES", "attention", "LAYOUTS", "global_positions", "local_positions", "shard", "unshard"]
