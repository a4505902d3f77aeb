"""A corpus of bad inputs: each is refused with one clear error, the same on every rank, without a hang.

``CORPUS`` is one table. Each entry breaks a fresh copy of a tiny valid checkpoint (or
names a bad location), says which exact error class must be raised, and gives a regex
that must match the message; ``<name>`` in the regex stands for a file or key the
builder reports (escaped), so every message is checked to name what is broken (and the
error's ``file`` field names the file too). All cases run in ONE spawn of 2 processes,
each rank looping over the whole table (a module fixture); each case is its own test.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from places import unique_repo, upload_to_hub, use_private_cache
from safetensors.torch import load_file, save_file
from safetensors_files import write_raw

from checkpointer import DistributedHFCheckpointer
from checkpointer.errors import (
    CheckpointAccessError,
    CheckpointArgumentError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from checkpointer.format.hf_files import CONFIG_FILE, INDEX_FILE
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import get_key_map
from checkpointer.storage.output_lock import LOCK_FILE
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.testing.pytest_plugin import hub_environment

MODEL_TYPE = "LLAMA3"  # the type of the tiny_llama3 checkpoint every case starts from
BAD_TOKEN = "hf_bad_token_never_printed_0123456789"
CASE_LIMIT_S = 30.0  # the process group timeout: a rank left waiting in a collective fails its case
RSS_LIMIT_MB = 200  # no case may grow a rank's peak memory by more (a hostile size must not be allocated)


# ---- what a builder hands to the ranks ---------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    """A broken input: where to load from, and the names its error message must contain."""

    source: str
    names: dict[str, str] = field(default_factory=dict)
    output: str | None = None  # default: a fresh local folder
    model_type: str = MODEL_TYPE
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    method: str = "load_model"  # or "load_checkpoint", or "save_checkpoint" (which must write nothing)
    state: dict[str, Any] = field(default_factory=dict)  # state-dict entries replaced before saving


@dataclass(frozen=True)
class Workspace:
    """What builders may use besides their copy."""

    outside: Path  # a folder outside every case's folder
    hub_repo: str  # the valid checkpoint, uploaded to the local Hub


Builder = Callable[[Path, Workspace], Broken]


@dataclass(frozen=True)
class Bad:
    """One corpus entry: how to break a copy of ``start``, and the error it must raise.

    ``start`` is "base" (tiny_llama3, written by write_tiny_model: 12 shards and an index) or
    "saved" (the same saved by checkpointer, with checkpointer.json holding sizes and digests).
    """

    name: str
    build: Builder
    error: type[CheckpointError]
    message: str
    start: str = "base"


# ---- safetensors surgery ------------------------------------------------------------------------


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (as a dict) and its data section."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _tensors_by_offset(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INDEX_FILE).read_text())


def _shards(folder: Path) -> list[str]:
    return sorted(set(_index(folder)["weight_map"].values()))


def _shard_with_most_tensors(folder: Path) -> str:
    weight_map = _index(folder)["weight_map"]
    return max(_shards(folder), key=lambda f: (sum(v == f for v in weight_map.values()), f))


def _edit_header(folder: Path, edit: Callable[[dict[str, Any], list[str]], str], data_extra: bytes = b"") -> dict[str, str]:
    """Let ``edit(header, keys_by_offset)`` change the header of the busiest shard; it returns the key it broke."""
    shard = _shard_with_most_tensors(folder)
    header, data = _split(folder / shard)
    key = edit(header, _tensors_by_offset(header))
    write_raw(folder / shard, header, data + data_extra)
    return {"file": str(folder / shard), "shard": shard, "key": key}


def _set_index(folder: Path, index: dict[str, Any]) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index))


def _tune_key(folder: Path, hf_key: str) -> str:
    config = ModelConfig.from_json((folder / CONFIG_FILE).read_text())
    return get_key_map(MODEL_TYPE, config).tune_keys(hf_key)[0]


# ---- builders: each breaks the copy it is given -------------------------------------------------


def truncated_shard(folder: Path, ws: Workspace) -> Broken:
    shard = _shard_with_most_tensors(folder)
    header, _ = _split(folder / shard)
    (folder / shard).write_bytes((folder / shard).read_bytes()[:-16])
    return Broken(str(folder), {"file": str(folder / shard), "key": _tensors_by_offset(header)[-1]})


def header_length_past_end(folder: Path, ws: Workspace) -> Broken:
    path = folder / _shards(folder)[0]
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    return Broken(str(folder), {"file": str(path)})


def header_not_json(folder: Path, ws: Workspace) -> Broken:
    path = folder / _shards(folder)[0]
    blob = bytearray(path.read_bytes())
    blob[8:12] = b"{{{{"
    path.write_bytes(bytes(blob))
    return Broken(str(folder), {"file": str(path)})


def overlapping_offsets(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        second = keys[1]
        header[second]["data_offsets"] = [o - 4 for o in header[second]["data_offsets"]]
        return second

    return Broken(str(folder), _edit_header(folder, edit))


def offsets_out_of_range(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        last = keys[-1]
        header[last]["data_offsets"] = [o + 2**40 for o in header[last]["data_offsets"]]
        return last

    return Broken(str(folder), _edit_header(folder, edit))


def unknown_dtype(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        header[keys[0]]["dtype"] = "Q4"
        return keys[0]

    return Broken(str(folder), _edit_header(folder, edit))


def dtype_not_a_string(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        header[keys[0]]["dtype"] = ["F32"]
        return keys[0]

    return Broken(str(folder), _edit_header(folder, edit))


def byte_length_mismatch(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        header[keys[0]]["shape"][0] += 1
        return keys[0]

    return Broken(str(folder), _edit_header(folder, edit))


def gap_between_tensors(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        header[keys[-1]]["data_offsets"] = [o + 4 for o in header[keys[-1]]["data_offsets"]]
        return keys[-1]

    return Broken(str(folder), _edit_header(folder, edit, data_extra=b"\0" * 4))


def metadata_not_strings(folder: Path, ws: Workspace) -> Broken:
    def edit(header: dict[str, Any], keys: list[str]) -> str:
        header["__metadata__"] = {"format": "pt", "step": 7}
        return "step"

    return Broken(str(folder), _edit_header(folder, edit))


def empty_file(folder: Path, ws: Workspace) -> Broken:
    path = folder / _shards(folder)[-1]
    path.write_bytes(b"")
    return Broken(str(folder), {"file": str(path)})


def huge_header_length(folder: Path, ws: Workspace) -> Broken:
    """A 1 GiB header in a (sparse) file that long: only the size limit stops a 1 GiB allocation."""
    path = folder / _shards(folder)[0]
    path.write_bytes(struct.pack("<Q", 2**30) + path.read_bytes()[8:])
    os.truncate(path, 8 + 2**30 + 1)
    return Broken(str(folder), {"file": str(path)})


def index_not_json(folder: Path, ws: Workspace) -> Broken:
    (folder / INDEX_FILE).write_text('{"weight_map": {')
    return Broken(str(folder), {"index": str(folder / INDEX_FILE)})


def index_without_weight_map(folder: Path, ws: Workspace) -> Broken:
    _set_index(folder, {"metadata": _index(folder)["metadata"]})
    return Broken(str(folder), {"index": str(folder / INDEX_FILE)})


def index_names_no_tensors(folder: Path, ws: Workspace) -> Broken:
    """An empty weight map: load_checkpoint has no model to miss the keys, so only the index check can tell."""
    _set_index(folder, {"metadata": {}, "weight_map": {}})
    return Broken(str(folder), {"index": str(folder / INDEX_FILE)}, method="load_checkpoint")


def _index_naming(name: Callable[[Workspace], str]) -> Builder:
    """The index assigns one tensor to ``name(ws)`` instead of its shard."""

    def build(folder: Path, ws: Workspace) -> Broken:
        index = _index(folder)
        key = min(index["weight_map"])
        index["weight_map"][key] = name(ws)
        _set_index(folder, index)
        return Broken(str(folder), {"index": str(folder / INDEX_FILE), "name": name(ws)})

    return build


def shard_symlink_outside(folder: Path, ws: Workspace) -> Broken:
    shard = _shards(folder)[1]
    outside = ws.outside / shard
    shutil.copy(folder / shard, outside)  # a valid file: only where it lives is wrong
    (folder / shard).unlink()
    (folder / shard).symlink_to(outside)
    return Broken(str(folder), {"file": str(folder / shard), "outside": str(outside)})


def shard_symlink_loop(folder: Path, ws: Workspace) -> Broken:
    shard = _shards(folder)[1]
    (folder / shard).unlink()
    (folder / shard).symlink_to(shard)
    return Broken(str(folder), {"file": str(folder / shard)})


def missing_shard(folder: Path, ws: Workspace) -> Broken:
    shard = _shards(folder)[1]
    (folder / shard).unlink()
    return Broken(str(folder), {"file": str(folder / shard)})


def key_in_two_shards(folder: Path, ws: Workspace) -> Broken:
    first, second = _shards(folder)[:2]
    key = next(iter(load_file(folder / first)))
    tensors = load_file(folder / second) | {key: load_file(folder / first)[key]}
    save_file(tensors, folder / second, metadata={"format": "pt"})
    return Broken(str(folder), {"key": key, "first": first, "second": second})


def _drop_tensor(folder: Path, shard: str) -> str:
    """Rewrite ``shard`` (validly) without its first tensor; returns that tensor's key."""
    tensors = load_file(folder / shard)
    key = min(tensors)
    del tensors[key]
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return key


def index_key_missing_from_file(folder: Path, ws: Workspace) -> Broken:
    shard = _shard_with_most_tensors(folder)
    key = _drop_tensor(folder, shard)
    return Broken(str(folder), {"index": str(folder / INDEX_FILE), "key": key, "shard": shard})


def unexpected_key(folder: Path, ws: Workspace) -> Broken:
    shard, key = _shards(folder)[0], "model.layers.0.self_attn.extra_proj.weight"
    save_file(load_file(folder / shard) | {key: torch.zeros(4, 4)}, folder / shard, metadata={"format": "pt"})
    index = _index(folder)
    index["weight_map"][key] = shard
    _set_index(folder, index)
    return Broken(str(folder), {"key": key, "shard": shard})


def missing_key(folder: Path, ws: Workspace) -> Broken:
    shard = _shard_with_most_tensors(folder)
    key = _drop_tensor(folder, shard)
    index = _index(folder)
    del index["weight_map"][key]
    _set_index(folder, index)
    return Broken(str(folder), {"key": key, "tune_key": _tune_key(folder, key)})


def shape_mismatch(folder: Path, ws: Workspace) -> Broken:
    """A 2-D tensor's shape transposed in its header: the same bytes, the wrong shape."""
    weight_map = _index(folder)["weight_map"]
    key = next(k for k in sorted(weight_map) if k.endswith("mlp.down_proj.weight"))
    path = folder / weight_map[key]
    header, data = _split(path)
    rows, cols = header[key]["shape"]
    header[key]["shape"] = [cols, rows]
    write_raw(path, header, data)
    names = {"key": key, "tune_key": _tune_key(folder, key), "shard": weight_map[key]}
    return Broken(str(folder), names | {"model_shape": f"({rows}, {cols})", "file_shape": f"({cols}, {rows})"})


def wrong_model_type(folder: Path, ws: Workspace) -> Broken:
    hf_type = json.loads((folder / CONFIG_FILE).read_text())["model_type"]
    return Broken(str(folder), {"config": str(folder / CONFIG_FILE), "hf_type": hf_type, "right": MODEL_TYPE}, model_type="QWEN2")


def missing_config(folder: Path, ws: Workspace) -> Broken:
    (folder / CONFIG_FILE).unlink()
    return Broken(str(folder), {"config": str(folder / CONFIG_FILE)})


def config_not_json(folder: Path, ws: Workspace) -> Broken:
    (folder / CONFIG_FILE).write_text("{'hidden_size': 64}")
    return Broken(str(folder), {"config": str(folder / CONFIG_FILE)})


def config_missing_field(folder: Path, ws: Workspace) -> Broken:
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["hidden_size"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return Broken(str(folder), {"config": str(folder / CONFIG_FILE)})


def _config_with(**fields: Any) -> Builder:
    """config.json with ``fields`` set (the model itself is built from the valid config)."""

    def build(folder: Path, ws: Workspace) -> Broken:
        config = json.loads((folder / CONFIG_FILE).read_text())
        (folder / CONFIG_FILE).write_text(json.dumps(config | fields))
        return Broken(str(folder), {"config": str(folder / CONFIG_FILE)})

    return build


def only_pytorch_model_bin(folder: Path, ws: Workspace) -> Broken:
    tensors = {k: v for shard in _shards(folder) for k, v in load_file(folder / shard).items()}
    torch.save(tensors, folder / "pytorch_model.bin")
    for path in [*folder.glob("*.safetensors"), folder / INDEX_FILE]:
        path.unlink()
    return Broken(str(folder), {"folder": str(folder)})


def truncated_after_manifest(folder: Path, ws: Workspace) -> Broken:
    shard = _shards(folder)[0]
    (folder / shard).write_bytes((folder / shard).read_bytes()[:-4])
    return Broken(str(folder), {"file": str(folder / shard)})


def replaced_after_manifest(folder: Path, ws: Workspace) -> Broken:
    """A shard rewritten as a valid file of other size (fp16): only the manifest can tell."""
    shard = _shards(folder)[0]
    save_file({k: v.half() for k, v in load_file(folder / shard).items()}, folder / shard, metadata={"format": "pt"})
    return Broken(str(folder), {"file": str(folder / shard)})


def bit_flip(folder: Path, ws: Workspace) -> Broken:
    path = folder / _shards(folder)[0]
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x10  # inside the last tensor: the header stays valid, the size unchanged
    path.write_bytes(bytes(blob))
    return Broken(str(folder), {"file": str(path)}, kwargs={"verify_checksums": True})


def digests_with_endless_runs(folder: Path, ws: Workspace) -> Broken:
    """A manifest whose one strided range claims 2**40 runs of one byte: refused before anything is allocated or read."""
    manifest, shard = json.loads((folder / MANIFEST_FILE).read_text()), _shards(folder)[0]
    header = manifest["files"][shard]["xxh3_128"][0]
    manifest["files"][shard]["xxh3_128"] = [header, [header[1], 1, 1, 2**40, "0" * 32]]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return Broken(str(folder), {"file": str(folder / shard)}, kwargs={"verify_checksums": True})


def manifest_not_json(folder: Path, ws: Workspace) -> Broken:
    (folder / MANIFEST_FILE).write_text("{")
    return Broken(str(folder), {"manifest": str(folder / MANIFEST_FILE)})


def save_wrong_model_type(folder: Path, ws: Workspace) -> Broken:
    """Saving a Llama model as QWEN2 would write q/k without the RoPE permutation, silently."""
    return replace(wrong_model_type(folder, ws), output=str(folder.parent / f"{folder.name}-out"), method="save_checkpoint")


def _on_hub(build: Builder, **kwargs: Any) -> Builder:
    """``build``'s broken folder, uploaded to the local Hub and loaded from there with ``kwargs`` (names become URLs)."""

    def build_on_hub(folder: Path, ws: Workspace) -> Broken:
        broken = build(folder, ws)
        repo = f"{ws.hub_repo}-{folder.name}"
        upload_to_hub(folder, repo)
        url = f"hf://{repo}"
        names = {k: v.replace(str(folder), url) for k, v in broken.names.items()}
        return replace(broken, source=url, names=names, kwargs=broken.kwargs | kwargs)

    return build_on_hub


def _save_with(entries: dict[str, Any]) -> Builder:
    """Save the (valid) model with ``entries`` replacing or adding state-dict values."""

    def build(folder: Path, ws: Workspace) -> Broken:
        output = str(folder.parent / f"{folder.name}-out")
        return Broken(str(folder), {"key": next(iter(entries))}, output=output, method="save_checkpoint", state=entries)

    return build


def _location(checkpoint_dir: str = "{folder}", output_dir: str | None = None) -> Builder:
    """Bad ``checkpoint_dir``/``output_dir`` values (``{folder}``: the copy, ``{repo}``: the Hub repo)."""

    def build(folder: Path, ws: Workspace) -> Broken:
        source = checkpoint_dir.format(folder=folder, repo=ws.hub_repo)
        output = output_dir.format(folder=folder, repo=ws.hub_repo) if output_dir else None
        return Broken(source, {"source": source, "output": output or "", "repo": ws.hub_repo}, output=output)

    return build


def bad_token(folder: Path, ws: Workspace) -> Broken:
    return Broken(f"hf://{ws.hub_repo}", {"repo": ws.hub_repo}, env={"HF_TOKEN": BAD_TOKEN})


F, M, A, N = CheckpointFormatError, CheckpointMismatchError, CheckpointArgumentError, CheckpointNotFoundError
CORPUS: list[Bad] = [
    # safetensors files
    Bad("truncated_shard", truncated_shard, F, r"<file>: tensor '<key>' .*truncated"),
    Bad("hub_streamed_truncated_shard", _on_hub(truncated_shard, streaming=True), F, r"<file>: tensor '<key>' .*truncated"),
    Bad("header_length_past_end", header_length_past_end, F, r"<file>: header length \d+ runs past the end of the file"),
    Bad("header_not_json", header_not_json, F, r"<file>: header is not valid JSON"),
    Bad("overlapping_offsets", overlapping_offsets, F, r"<file>: tensor '<key>' at data offset \d+ overlaps the previous tensor"),
    Bad("offsets_out_of_range", offsets_out_of_range, F, r"<file>: tensor '<key>' .*past the end of the file"),
    Bad("unknown_dtype", unknown_dtype, F, r"<file>: tensor '<key>': unknown dtype 'Q4'"),
    Bad("dtype_not_a_string", dtype_not_a_string, F, r"<file>: tensor '<key>': unknown dtype \['F32'\]"),
    Bad("byte_length_mismatch", byte_length_mismatch, F, r"<file>: tensor '<key>': holds \d+ bytes but shape \[.*\] x F32 needs \d+"),
    Bad("gap_between_tensors", gap_between_tensors, F, r"<file>: tensor '<key>' at data offset \d+ leaves a gap before it"),
    Bad("metadata_not_strings", metadata_not_strings, F, r"<file>: __metadata__\['<key>'\] is an int, not a string"),
    Bad("empty_file", empty_file, F, r"<file>: .*empty"),
    Bad("huge_header_length", huge_header_length, F, r"<file>: header length \d+ exceeds the \d+-byte limit"),
    # the index and the files it names
    Bad("index_not_json", index_not_json, F, r"<index>: not valid JSON"),
    Bad("index_without_weight_map", index_without_weight_map, F, r"<index>: no 'weight_map'.*copy or download the index again"),
    Bad("index_names_no_tensors", index_names_no_tensors, F, r"<index>: 'weight_map' is empty"),
    Bad("index_names_parent", _index_naming(lambda ws: "../x.safetensors"), F, r"<index>: file name '<name>' leaves the folder; a checkpoint may only name files inside it"),
    Bad("index_names_absolute", _index_naming(lambda ws: str(ws.outside / "x.safetensors")), F, r"<index>: file name '<name>' is not a relative path.*only name files inside it"),
    Bad("shard_symlink_outside", shard_symlink_outside, F, r"<file>: a symlink leading outside .*<outside>.*copy the file in"),
    Bad("shard_symlink_loop", shard_symlink_loop, F, r"<file>: cannot be resolved \(.*loop.*\); replace it with the file"),
    Bad("missing_shard", missing_shard, N, r"<file>: missing: model.safetensors.index.json names this shard"),
    Bad("key_in_two_shards", key_in_two_shards, F, r"tensor '<key>' is in both <first> and <second>: .*copy or download them again"),
    Bad("index_key_missing_from_file", index_key_missing_from_file, F, r"<index>: tensor '<key>' is assigned to <shard> but that file lacks it; .*copy or download them again"),
    # the checkpoint against the model
    Bad("unexpected_key", unexpected_key, M, r"unexpected key: <key> in <shard>"),
    Bad("missing_key", missing_key, M, r"missing key: <tune_key> \(stored as <key>\)"),
    Bad("shape_mismatch", shape_mismatch, M, r"shape mismatch: <tune_key> has shape <model_shape> in the model but <key> in <shard> has <file_shape>"),
    Bad("wrong_model_type", wrong_model_type, M, r"<config> has model_type '<hf_type>', which is not a QWEN2 model: pass model_type=.*<right>"),
    # config.json
    Bad("missing_config", missing_config, N, r"<config>: missing"),
    Bad("config_not_json", config_not_json, F, r"<config>: not valid JSON"),
    Bad("config_missing_field", config_missing_field, F, r"<config>: required field 'hidden_size' is missing"),
    Bad("config_zero_heads", _config_with(num_attention_heads=0), F, r"<config>: num_attention_heads is 0; it must be a positive integer"),
    Bad("config_fractional_size", _config_with(hidden_size=64.5), F, r"<config>: hidden_size is 64.5; it must be a positive integer"),
    Bad("only_pytorch_model_bin", only_pytorch_model_bin, F, r"<folder>: .*pytorch_model\.bin.* only from safetensors"),
    Bad("hub_only_pytorch_model_bin", _on_hub(only_pytorch_model_bin), F, r"<folder>: .*pytorch_model\.bin.* only from safetensors"),
    # checkpoints written by checkpointer (with a manifest)
    Bad("truncated_after_manifest", truncated_after_manifest, F, r"<file>: .*truncated", start="saved"),
    Bad("replaced_after_manifest", replaced_after_manifest, F, r"<file>: \d+ bytes, but checkpointer\.json recorded \d+", start="saved"),
    Bad("bit_flip_with_verify_checksums", bit_flip, F, r"<file>: xxh3_128 .* differs .* the file is corrupt", start="saved"),
    Bad("digests_with_endless_runs", digests_with_endless_runs, F, r"<file>: a digest of 1099511627776 runs of 1 bytes.* is not a strided range of at most \d+ runs", start="saved"),
    Bad("manifest_not_json", manifest_not_json, F, r"<manifest>: not valid JSON", start="saved"),
    # saving: refused before anything is written
    Bad("save_non_tensor_value", _save_with({"norm.scale": [1.0, 2.0]}), A, r"\['<key>'\] is a list, not a tensor"),
    Bad("save_unknown_key", _save_with({"extra.weight": torch.zeros(2)}), M, r"no Hugging Face name is known for torchtune key '<key>'"),
    Bad("save_wrong_model_type", save_wrong_model_type, M, r"config\.json has model_type '<hf_type>', which is not a QWEN2 model"),
    # locations
    Bad("url_missing_slash", _location("s3:/x"), A, r"checkpoint_dir='<source>': did you mean s3://"),
    Bad("url_unknown_scheme", _location(output_dir="nosuchproto://bucket/runs"), A, r"output_dir='<output>': fsspec knows no protocol 'nosuchproto'"),
    Bad("url_hub_without_namespace", _location("hf://repo"), A, r"checkpoint_dir='<source>': expected hf://"),
    Bad("hub_missing_repo", _location("hf://tester/no-such-repo"), N, r"<source>: repository tester/no-such-repo not found"),
    Bad("hub_missing_revision", _location("hf://{repo}@no-such-revision"), N, r"revision 'no-such-revision' not found in <repo>: name an existing branch, tag or commit"),
    Bad("hub_bad_token", bad_token, CheckpointAccessError, r"not authorized \(401\): set HF_TOKEN"),
]


# ---- the runner: every rank loops over every case -----------------------------------------------


def _case(bad: Bad, broken: Broken, config_dir: Path, default_output: Path) -> dict[str, Any]:
    """What a rank needs to attempt ``bad`` (plain values: it travels to spawned processes)."""
    return {
        "name": bad.name,
        "source": broken.source,
        "output": broken.output or str(default_output),
        "model_type": broken.model_type,
        "config": str(config_dir / CONFIG_FILE),
        "kwargs": broken.kwargs,
        "env": broken.env,
        "method": broken.method,
        "state": broken.state,
    }


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _attempt(case: dict[str, Any], mesh: Any) -> None:
    from checkpointer.train.fsdp import build_sharded_model

    config = ModelConfig.from_json(Path(case["config"]).read_text())
    model = build_sharded_model(case["model_type"], config, mesh)
    checkpointer = DistributedHFCheckpointer(case["source"], case["output"], case["model_type"], **case["kwargs"])
    calls = {
        "load_model": lambda: checkpointer.load_model(model),
        "load_checkpoint": checkpointer.load_checkpoint,
        "save_checkpoint": lambda: checkpointer.save_checkpoint({"model": model.state_dict() | case["state"]}, epoch=0),
    }
    calls[case["method"]]()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attempt_every_case(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """On each rank: attempt every case; the error class, message, seconds and peak-memory growth of each."""
    from checkpointer.train.fsdp import default_mesh

    mesh = default_mesh()
    outcomes = {}
    for case in cases:
        started, rss = time.perf_counter(), _peak_rss_mb()
        try:
            with _environment(case["env"]):
                _attempt(case, mesh)
            error, message, fields = "no error", "", {}
        except Exception as e:  # noqa: BLE001 - a raw exception is a finding, reported like the others
            error, message, fields = type(e).__name__, str(e), {name: getattr(e, name, None) for name in ("url", "file", "key")}
        outcomes[case["name"]] = {
            "error": error,
            "message": message,
            "fields": fields,
            "seconds": time.perf_counter() - started,
            "rss_growth_mb": _peak_rss_mb() - rss,
        }
    return outcomes


def _expected(bad: Bad, names: dict[str, str]) -> str:
    return re.sub(r"<(\w+)>", lambda m: re.escape(names[m[1]]), bad.message)


def _checkpoint_like(output: Path) -> list[str]:
    """What a save left in ``output`` (its lock file aside)."""
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.name != LOCK_FILE) if output.exists() else []


def _problems(bad: Bad, broken: Broken, outcomes: list[dict[str, Any]], secrets: list[str]) -> list[str]:
    """Everything wrong with how the ranks handled ``bad`` (empty when all is well)."""
    first = outcomes[0]
    problems = []
    if any((o["error"], o["message"], o["fields"]) != (first["error"], first["message"], first["fields"]) for o in outcomes):
        problems.append(f"ranks disagree: {[(o['error'], o['message'], o['fields']) for o in outcomes]}")
    if first["error"] != bad.error.__name__:
        problems.append(f"expected {bad.error.__name__}, got {first['error']}: {first['message']}")
    elif not re.search(_expected(bad, broken.names), first["message"], re.DOTALL):
        problems.append(f"message {first['message']!r} does not match {_expected(bad, broken.names)!r}")
    if "file" in broken.names and first["fields"].get("file") != broken.names["file"]:
        problems.append(f"the error's file field is {first['fields'].get('file')!r}, not {broken.names['file']!r}")
    problems += [f"peak memory grew {o['rss_growth_mb']:.0f} MB" for o in outcomes if o["rss_growth_mb"] > RSS_LIMIT_MB]
    problems += [f"a token appears in {first['message']!r}" for s in secrets if s in first["message"]]
    if broken.method == "save_checkpoint" and _checkpoint_like(Path(broken.output)):
        problems.append(f"a refused save wrote {_checkpoint_like(Path(broken.output))}")
    return problems


def test_corpus_is_large_and_names_are_unique() -> None:
    names = [bad.name for bad in CORPUS]
    assert len(names) >= 25 and len(set(names)) == len(names)


@pytest.fixture(scope="module")
def corpus_problems(tiny_llama3: Path, saved_llama3: Path, local_hub: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every case built, then attempted in ONE spawn of 2 ranks: each case's problems, by name."""
    tmp_path = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as monkeypatch, hub_environment(monkeypatch, local_hub, tmp_path / "hf_home") as hub:
        use_private_cache(monkeypatch, tmp_path / "cache")
        repo = unique_repo("bad-inputs")
        upload_to_hub(tiny_llama3, repo)
        (tmp_path / "outside").mkdir()
        ws = Workspace(tmp_path / "outside", repo)
        starts = {"base": tiny_llama3, "saved": saved_llama3}
        built: list[tuple[Bad, Broken]] = []
        for bad in CORPUS:
            folder = tmp_path / "cases" / bad.name
            shutil.copytree(starts[bad.start], folder)
            built.append((bad, bad.build(folder, ws)))
        cases = [_case(bad, broken, tiny_llama3, tmp_path / "out" / bad.name) for bad, broken in built]

        started = time.perf_counter()
        results = run_on_ranks(attempt_every_case, 2, cases, timeout=240, pg_timeout=CASE_LIMIT_S)
        total = time.perf_counter() - started

        secrets = [hub.token, BAD_TOKEN]
        report = {bad.name: _problems(bad, broken, [r[bad.name] for r in results], secrets) for bad, broken in built}
    timings = ", ".join(f"{name} {max(r[name]['seconds'] for r in results):.2f}s" for name in report)
    print(f"\n{len(cases)} cases on 2 ranks in {total:.1f} s: {timings}")
    return report


@pytest.mark.parametrize("bad", CORPUS, ids=lambda bad: bad.name)
def test_bad_input_is_refused_clearly_on_every_rank(bad: Bad, corpus_problems: dict[str, list[str]]) -> None:
    assert not corpus_problems[bad.name], "; ".join(corpus_problems[bad.name])
