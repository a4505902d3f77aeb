"""Errors: one base class, the builtin each one is, fields, and the same error on every rank.

The in-process tests call the public API the way torchtune's code would (``except
ValueError``, ``except FileNotFoundError``); one spawn of 2 gloo processes checks that an
error raised on one rank reaches the other with its class and fields.
"""

from __future__ import annotations

import json
import pickle
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
from torch.distributed.checkpoint.api import CheckpointException

import checkpointer
from checkpointer import DistributedHFCheckpointer, ModelConfig
from checkpointer.errors import (
    ERRORS,
    CheckpointAccessError,
    CheckpointArgumentError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from checkpointer.format.folder import LocalFolder
from checkpointer.runtime.distributed import by_rank_zero, dcp_errors, on_all_ranks, on_rank_zero, portable
from checkpointer.testing.multiprocess import run_on_ranks

FIELDS = {"url": "hf://tester/repo", "file": "hf://tester/repo/model-00002-of-00002.safetensors", "key": "lm_head.weight"}


def test_every_error_class_is_a_checkpoint_error_importable_from_the_package():
    for cls in ERRORS:
        assert issubclass(cls, CheckpointError) and getattr(checkpointer, cls.__name__) is cls
    builtins = {cls: [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)] for cls in ERRORS}
    assert all(builtins[cls] for cls in ERRORS if cls is not CheckpointError), builtins


def test_torchtune_style_except_value_error_catches_a_bad_url(tmp_path: Path):
    try:
        DistributedHFCheckpointer("s3:/bucket/model", str(tmp_path), "LLAMA3")
    except ValueError as e:  # what torchtune's checkpointers raise for bad arguments
        assert isinstance(e, CheckpointArgumentError) and (e.url, e.key) == ("s3:/bucket/model", "checkpoint_dir")
    else:
        pytest.fail("a malformed URL was accepted")


def test_bad_config_json_is_a_value_error_naming_the_file_and_field(tiny_llama3: Path):
    raw = json.loads((tiny_llama3 / "config.json").read_text())
    del raw["hidden_size"]
    with pytest.raises(ValueError, match="required field 'hidden_size' is missing") as info:
        ModelConfig.from_json(json.dumps(raw), "/models/x/config.json")
    assert isinstance(info.value, CheckpointFormatError) and (info.value.file, info.value.key) == ("/models/x/config.json", "hidden_size")


def test_a_missing_file_is_a_file_not_found_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="file not found") as info:
        LocalFolder(tmp_path).size("model.safetensors")
    assert isinstance(info.value, CheckpointNotFoundError) and info.value.file == str(tmp_path / "model.safetensors")


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_survives_pickling_with_its_class_message_and_fields(cls: type[CheckpointError]):
    error = cls("something broke", **FIELDS)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and str(again) == "something broke" and _fields(again) == FIELDS


def test_an_error_that_cannot_travel_as_itself_travels_as_the_base_class_with_its_fields():
    class Local(CheckpointFormatError):  # a class pickle cannot find by name
        pass

    sent = portable(Local("bad header", **FIELDS))
    assert type(sent) is CheckpointError and str(sent) == "bad header" and _fields(sent) == FIELDS


def test_on_one_process_a_foreign_exception_becomes_a_checkpoint_error_with_its_cause():
    with pytest.raises(CheckpointError, match="'boom'") as info:
        on_all_ranks(_raise(KeyError("boom")))
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(CheckpointNotFoundError) as info:  # our own errors pass unchanged
        on_rank_zero(_raise(CheckpointNotFoundError("gone", **FIELDS)))
    assert _fields(info.value) == FIELDS


def test_dcp_failures_become_the_failing_ranks_error_with_its_fields():
    failure = CheckpointNotFoundError("x: file not found", **FIELDS)
    with pytest.raises(CheckpointNotFoundError, match="^x: file not found$") as info:
        with dcp_errors():
            raise CheckpointException("read", {0: (failure, traceback.StackSummary())})
    assert _fields(info.value) == FIELDS


# ---- across ranks: one spawn of 2 processes -----------------------------------------------------


def _raise(error: Exception) -> Callable[[], None]:
    def step() -> None:
        raise error

    return step


def _fields(error: BaseException) -> dict[str, Any]:
    return {name: getattr(error, name, None) for name in FIELDS}


def _caught(call: Callable[[], Any]) -> dict[str, Any]:
    """What a caller sees of the error ``call`` raises."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test compares what arrives
        return {
            "class": type(e).__name__,
            "message": str(e),
            "fields": _fields(e),
            "builtins": [c.__name__ for c in (ValueError, FileNotFoundError, PermissionError) if isinstance(e, c)],
        }
    return {"class": "no error"}


def errors_on_every_rank(rank: int, world: int, config_json: str) -> dict[str, dict[str, Any]]:
    from checkpointer.train.fsdp import build_sharded_model, default_mesh

    mesh = default_mesh()
    config = ModelConfig.from_json(config_json)

    def on_rank(failing: int, error: Exception) -> Callable[[], None]:
        return _raise(error) if rank == failing else lambda: None

    def unknown_model_type() -> None:
        try:
            build_sharded_model("GPT2", config, mesh)
        except ValueError as e:  # torchtune's except clause: must catch it, on every rank
            raise CheckpointError(f"caught as ValueError: {type(e).__name__}: {e}") from e

    return {
        "not_found_on_rank_1": _caught(lambda: on_all_ranks(on_rank(1, CheckpointNotFoundError("x: file not found", **FIELDS)))),
        "access_on_rank_0": _caught(lambda: on_rank_zero(_raise(CheckpointAccessError("not authorized (401)", **FIELDS)))),
        "access_by_rank_0": _caught(lambda: by_rank_zero(_raise(CheckpointAccessError("not authorized (401)", **FIELDS)))),
        "ran_by_rank_0": {"result": by_rank_zero(lambda: f"ran on rank {rank}")},
        "key_error_on_rank_0": _caught(lambda: on_all_ranks(on_rank(0, KeyError("boom")))),
        "unknown_model_type": _caught(unknown_model_type),
    }


@pytest.fixture(scope="module")
def across_ranks(tiny_llama3: Path) -> list[dict[str, dict[str, Any]]]:
    return run_on_ranks(errors_on_every_rank, 2, (tiny_llama3 / "config.json").read_text(), timeout=120, pg_timeout=30)


@pytest.mark.parametrize(
    "case,cls,message,fields,builtins",
    [
        ("not_found_on_rank_1", "CheckpointNotFoundError", "[rank 1] x: file not found", FIELDS, ["FileNotFoundError"]),
        ("access_on_rank_0", "CheckpointAccessError", "[rank 0] not authorized (401)", FIELDS, ["PermissionError"]),
        ("access_by_rank_0", "CheckpointAccessError", "[rank 0] not authorized (401)", FIELDS, ["PermissionError"]),
        ("key_error_on_rank_0", "CheckpointError", "[rank 0] 'boom'", dict.fromkeys(FIELDS), []),
    ],
)
def test_an_error_on_one_rank_reaches_every_rank_with_its_class_and_fields(across_ranks, case, cls, message, fields, builtins):
    for rank, seen in enumerate(across_ranks):
        assert seen[case] == {"class": cls, "message": message, "fields": fields, "builtins": builtins}, rank


def test_a_step_by_rank_zero_runs_there_alone_and_only_rank_zero_gets_its_result(across_ranks):
    assert [seen["ran_by_rank_0"]["result"] for seen in across_ranks] == ["ran on rank 0", None]


def test_an_unknown_model_type_is_a_value_error_on_every_rank(across_ranks):
    for seen in across_ranks:
        assert seen["unknown_model_type"]["class"] == "CheckpointError"
        assert seen["unknown_model_type"]["message"].startswith("caught as ValueError: CheckpointArgumentError: unknown model type 'GPT2'")
