"""checkpointer: Hugging Face safetensors checkpoints loaded and saved shard by shard with DCP."""

from checkpointer.api import DistributedHFCheckpointer
from checkpointer.dcp.hf_io import IOStats
from checkpointer.errors import CheckpointError, CheckpointFormatError, CheckpointMismatchError
from checkpointer.format.model_config import ModelConfig

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "DistributedHFCheckpointer",
    "IOStats",
    "ModelConfig",
]
