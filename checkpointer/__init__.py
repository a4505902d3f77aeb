"""checkpointer: Hugging Face safetensors checkpoints loaded and saved shard by shard with DCP."""

from checkpointer.checkpointer import DistributedHFCheckpointer
from checkpointer.hf_io import IOStats
from checkpointer.errors import CheckpointError, CheckpointFormatError, CheckpointMismatchError
from checkpointer.model_config import ModelConfig

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "DistributedHFCheckpointer",
    "IOStats",
    "ModelConfig",
]
