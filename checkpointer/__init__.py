"""checkpointer: Hugging Face safetensors checkpoints loaded and saved shard by shard with DCP."""

from checkpointer.api import DistributedHFCheckpointer
from checkpointer.dcp.hf_io import IOStats
from checkpointer.errors import (
    ChatTemplateError,
    CheckpointAccessError,
    CheckpointArgumentError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointTransportError,
    CheckpointUnsupportedError,
)
from checkpointer.format.model_config import ModelConfig

__all__ = [
    "ChatTemplateError",
    "CheckpointAccessError",
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointTransportError",
    "CheckpointUnsupportedError",
    "DistributedHFCheckpointer",
    "IOStats",
    "ModelConfig",
]
