"""torchtune's recipe state: its keys, and the training state read back whole, without a template.

torchtune's recipes resume from what ``load_checkpoint()`` returns: the weights plus
``optimizer``, ``seed``, ``epochs_run``, ``total_epochs``, ``max_steps_per_epoch`` (and
``dataloader``), with full (unsharded) tensors. Our training state is DCP's sharded format;
:func:`read_whole_training_state` rebuilds it from its metadata alone (every rank reads it
all, no collective), and :func:`name_optimizer_params` turns an optimizer state keyed by
parameter index into the FQN-keyed form ``torchtune.training.load_from_full_optimizer_state_dict``
(``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict``) takes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpointer.dcp.hf_io import quiet_dcp
from checkpointer.dcp.training_state import JsonMetadataReader, WeightsOnlyLoadPlanner
from checkpointer.errors import CheckpointArgumentError

# torchtune.training's optimizer key (a string constant, so that no torchtune import is needed)
OPT_KEY = "optimizer"


def read_whole_training_state(reader: JsonMetadataReader) -> dict[str, Any]:
    """The saved training state as nested dicts and lists of full tensors (this process alone).

    DCP's metadata keeps each entry's path (string keys for dicts, integer positions for
    lists); optimizer states get their integer parameter ids back (DCP stores them as strings).
    """
    metadata = reader.read_metadata()
    flat: dict[str, Any] = {
        fqn: torch.empty(entry.size, dtype=entry.properties.dtype) if isinstance(entry, TensorStorageMetadata) else None
        for fqn, entry in metadata.state_dict_metadata.items()
    }
    planner = WeightsOnlyLoadPlanner(flatten_state_dict=False)
    with quiet_dcp():
        dcp.load(flat, storage_reader=reader, planner=planner, no_dist=True)
    nested: dict[str, Any] = {}
    for fqn, value in planner.state_dict.items():  # the planner's copy holds the non-tensor values
        set_element(nested, tuple(metadata.planner_data.get(fqn, (fqn,))), value)
    return _with_param_ids(nested)


def _with_param_ids(value: Any) -> Any:
    """Every optimizer state dict inside ``value`` with integer keys where its param_groups use integer ids."""
    if isinstance(value, list):
        return [_with_param_ids(v) for v in value]
    if not isinstance(value, dict):
        return value
    value = {k: _with_param_ids(v) for k, v in value.items()}
    groups = value.get("param_groups")
    if isinstance(value.get("state"), dict) and isinstance(groups, list):
        ids = {pid for group in groups for pid in group.get("params", [])}
        if ids and all(isinstance(pid, int) for pid in ids):
            value["state"] = {int(k) if str(k).isdigit() else k: v for k, v in value["state"].items()}
    return value


def name_optimizer_params(optimizer_state: dict[str, Any], model_state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters by index) keyed by the model's parameter names instead.

    The ids follow the optimizer's parameters in order, which torchtune's recipes build from
    ``model.parameters()``: the model state dict's keys in order. Every state tensor's shape
    is checked against the tensor it is named for. An already named state is returned as is.
    """
    groups = optimizer_state.get("param_groups")
    if not isinstance(groups, list) or not isinstance(optimizer_state.get("state"), dict):
        return optimizer_state
    ids = [pid for group in groups for pid in group.get("params", [])]
    if not ids or not all(isinstance(pid, int) for pid in ids):
        return optimizer_state
    names = list(model_state)
    if len(ids) != len(names):
        raise CheckpointArgumentError(
            f"save_checkpoint: state_dict['optimizer'] holds {len(ids)} parameters by index but state_dict['model'] "
            f"holds {len(names)} tensors: cannot tell which is which; pass get_optimizer_state_dict(model, optimizer)",
            key=OPT_KEY,
        )
    name_of = dict(zip(ids, names))
    state = {name_of[pid]: moments for pid, moments in optimizer_state["state"].items()}
    for name, moments in state.items():
        for kind, moment in moments.items():
            if isinstance(moment, torch.Tensor) and moment.dim() > 0 and moment.shape != model_state[name].shape:
                raise CheckpointArgumentError(
                    f"save_checkpoint: optimizer {kind} of parameter #{ids[names.index(name)]} has shape "
                    f"{tuple(moment.shape)} but {name} is {tuple(model_state[name].shape)}: the optimizer's parameters "
                    "are not the model's in order; pass get_optimizer_state_dict(model, optimizer)",
                    key=OPT_KEY,
                )
    named_groups = [{**group, "params": [name_of[pid] for pid in group["params"]]} for group in groups]
    return {"state": state, "param_groups": named_groups}
