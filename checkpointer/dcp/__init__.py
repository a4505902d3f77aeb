"""torch.distributed.checkpoint plug-ins: planners, storage reader and writer, the two DCP calls, training state."""
