"""Kept for existing imports: ``checkpointer.fsdp`` is :mod:`checkpointer.train.fsdp`."""

from checkpointer.train.fsdp import build_sharded_model, default_mesh, initialize_lora, parallel_mesh, shard_model

__all__ = ["build_sharded_model", "default_mesh", "initialize_lora", "parallel_mesh", "shard_model"]
