"""seqpar: sequence parallelism for softmax, linear and hybrid attention in PyTorch."""
from seqpar.layout import LAYOUTS, global_positions, local_positions, shard, unshard
from seqpar.attention import STRATEGIES, attention
from seqpar.linear import linear_attention
from seqpar.config import ModelConfig, SequenceParallelConfig, TrainConfig
from seqpar.model import HybridLM
from seqpar.parallelize import parallelize_model, shard_batch

__version__ = "0.1.0"

__all__ = ["linear_attention", "STRATEGIES", "attention", "LAYOUTS", "global_positions", "local_positions", "shard", "unshard"]
__all__ += ["ModelConfig", "SequenceParallelConfig", "TrainConfig", "HybridLM", "parallelize_model", "shard_batch"]
