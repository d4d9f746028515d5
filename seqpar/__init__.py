"""seqpar: sequence parallelism for softmax, linear and hybrid attention in PyTorch."""
from seqpar.attention import STRATEGIES, attention
from seqpar.config import ModelConfig, SequenceParallelConfig, TrainConfig
from seqpar.layout import LAYOUTS, BalancedLayout, balanced_layout, global_positions, local_positions, shard, unshard
from seqpar.linear import linear_attention
from seqpar.model import HybridLM
from seqpar.parallelize import parallelize_model, shard_batch

__version__ = "0.1.0"

__all__ = [
    # layouts
    "LAYOUTS", "BalancedLayout", "balanced_layout", "shard", "unshard", "local_positions", "global_positions",
    # attention across ranks
    "STRATEGIES", "attention", "linear_attention",
    # model and training
    "ModelConfig", "SequenceParallelConfig", "TrainConfig", "HybridLM", "parallelize_model", "shard_batch",
]
