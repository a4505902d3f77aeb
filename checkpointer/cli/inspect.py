"""``checkpointer inspect``: what a checkpoint holds, from its headers, index and manifest only."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpointer.cli.common import Checkpoint, Outcome, Timer, model_types
from checkpointer.cli.dcp_export import PICKLED_METADATA
from checkpointer.dcp.training_state import METADATA_FILE, TRAINING_STATE_DIR, parse_metadata_json
from checkpointer.format.dtypes import SAFETENSORS_NAMES
from checkpointer.format.file_layout import natural_key
from checkpointer.format.hf_files import CheckpointFiles, read_checkpoint_files
from checkpointer.format.peft import ADAPTER_CONFIG_FILE, ADAPTER_FILE
from checkpointer.runtime.progress import human_size

_CONFIG_FIELDS = ("model_type", "architectures", "dtype", "torch_dtype", "tie_word_embeddings", "num_hidden_layers", "hidden_size", "vocab_size")


def inspect(location: str, as_json: bool, storage_options: dict[str, Any] | None = None) -> Outcome:
    """Print what is at ``location``: files, tensors, split, model type, index, manifest, adapter, training state."""
    timer = Timer()
    checkpoint = Checkpoint.open(location, "LOCATION", storage_options)
    report = describe(checkpoint)
    print(json.dumps(report, indent=2) if as_json else render(report))
    sets = [report["weights"] or {"tensors": []}, *report["adapters"].values()]
    return Outcome(0, f"inspected {checkpoint.describe()}: {len(report['files'])} files, {human_size(sum(report['files'].values()))}, "
                      f"{sum(len(s['tensors']) for s in sets)} tensors, in {timer.seconds:.1f} s")


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """Everything inspect reports, as plain JSON values."""
    config = checkpoint.config()
    weights = checkpoint.weights() if checkpoint.has_weights else None
    adapters = {d or ".": _adapter(checkpoint.sub(d)) for d in checkpoint.adapter_dirs()}
    keys = weights.tensors if weights else []
    return {
        "location": checkpoint.describe(),
        "files": checkpoint.files,
        "config": {k: config[k] for k in _CONFIG_FIELDS if k in config} if config else None,
        "weights": _weights(weights) if weights else None,
        "model_types": model_types(keys, config),
        "manifest": checkpoint.manifest(),
        "adapters": adapters,
        "training_state": _dcp(checkpoint, f"{TRAINING_STATE_DIR}/"),
        "dcp": _dcp(checkpoint, ""),
    }


def _tensor_rows(files: CheckpointFiles) -> list[dict[str, Any]]:
    return [
        {"name": e.name, "dtype": SAFETENSORS_NAMES[e.dtype], "shape": list(e.shape), "file": e.file, "bytes": e.nbytes}
        for e in sorted(files.tensors.values(), key=lambda e: natural_key(e.name))
    ]


def _weights(files: CheckpointFiles) -> dict[str, Any]:
    per_file = {name: {"bytes": h.file_size, "tensors": len(h.tensors)} for name, h in files.headers.items()}
    dtypes = Counter(SAFETENSORS_NAMES[e.dtype] for e in files.tensors.values())
    return {
        "tensor_bytes": files.total_bytes,
        "dtypes": dict(dtypes),
        "split": {"files": len(per_file), "largest_file_bytes": max(f["bytes"] for f in per_file.values()), "per_file": per_file},
        "index_metadata": files.index_metadata if files.weight_map is not None else None,
        "header_metadata": {name: h.metadata for name, h in files.headers.items() if h.metadata},
        "tensors": _tensor_rows(files),
    }


def _adapter(folder: Checkpoint) -> dict[str, Any]:
    files = read_checkpoint_files(folder.folder, [ADAPTER_FILE])
    config = folder.read_json(ADAPTER_CONFIG_FILE) or {}
    fields = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
    return {"config": {k: config[k] for k in fields if k in config}, "tensor_bytes": files.total_bytes, "tensors": _tensor_rows(files)}


def _dcp(checkpoint: Checkpoint, prefix: str) -> dict[str, Any] | None:
    """A DCP checkpoint under ``prefix``: ours (JSON metadata) is summarised; a pickled one is only named."""
    if f"{prefix}{METADATA_FILE}" in checkpoint.files:
        path = f"{prefix}{METADATA_FILE}"
        metadata = parse_metadata_json(checkpoint.read_bytes(path), checkpoint.describe(path))
        entries = metadata.state_dict_metadata
        tensors = [m for m in entries.values() if isinstance(m, TensorStorageMetadata)]
        return {
            "metadata": "json",
            "entries": len(entries),
            "tensor_bytes": sum(m.size.numel() * m.properties.dtype.itemsize for m in tensors),
            "top_level_keys": sorted({k.split(".", 1)[0] for k in entries}),
            "data_files": len({info.relative_path for info in (metadata.storage_data or {}).values()}),
        }
    if f"{prefix}{PICKLED_METADATA}" in checkpoint.files:
        return {"metadata": "pickle (not read: unpickling runs code; `checkpointer export --trust-pickle` reads it)"}
    return None


# ---- text ----------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"checkpoint: {report['location']}"]
    lines += _files_lines(report["files"])
    lines += _config_lines(report["config"], report["model_types"], bool(report["weights"]))
    if report["weights"]:
        lines += _weights_lines(report["weights"])
    for folder, adapter in report["adapters"].items():
        lines += _adapter_lines(folder, adapter)
    lines += _manifest_lines(report["manifest"])
    for title, dcp in (("training state (training_state/)", report["training_state"]), ("DCP checkpoint", report["dcp"])):
        if dcp:
            lines.append(f"{title}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dcp.items()))
    return "\n".join(lines)


def _files_lines(files: dict[str, int]) -> list[str]:
    lines = [f"files: {len(files)}, {human_size(sum(files.values()))}"]
    return lines + [f"  {name:<48} {human_size(size):>10}" for name, size in files.items()]


def _config_lines(config: dict | None, model_types: list[str], has_weights: bool) -> list[str]:
    looks = ", ".join(model_types) if model_types else "none of the registered model types"
    lines = [f"model type: looks like {looks}" if has_weights else "model type: no weights here (an adapter's is its base model's)"]
    if config:
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    return lines


def _weights_lines(weights: dict[str, Any]) -> list[str]:
    split = weights["split"]
    dtypes = ", ".join(f"{n} {d}" for d, n in weights["dtypes"].items())
    lines = [
        f"weights: {len(weights['tensors'])} tensors ({dtypes}), {human_size(weights['tensor_bytes'])}, "
        f"in {split['files']} file(s), the largest {human_size(split['largest_file_bytes'])}"
    ]
    lines += [f"  {name:<48} {human_size(f['bytes']):>10} {f['tensors']:>6} tensors" for name, f in split["per_file"].items()]
    if weights["index_metadata"] is not None:
        lines.append(f"index metadata: {json.dumps(weights['index_metadata'], sort_keys=True)}")
    return lines + ["tensors:"] + _tensor_lines(weights["tensors"])


def _tensor_lines(rows: list[dict[str, Any]]) -> list[str]:
    width = max((len(r["name"]) for r in rows), default=0)
    return [f"  {r['name']:<{width}}  {r['dtype']:<5} {str(r['shape']):<16} {r['file']}" for r in rows]


def _adapter_lines(folder: str, adapter: dict[str, Any]) -> list[str]:
    config = ", ".join(f"{k}={v}" for k, v in adapter["config"].items())
    where = "top level" if folder == "." else f"{folder}/"
    lines = [f"adapter ({where}): {len(adapter['tensors'])} tensors, {human_size(adapter['tensor_bytes'])}; {config}"]
    return lines + _tensor_lines(adapter["tensors"])


def _manifest_lines(manifest: dict[str, Any] | None) -> list[str]:
    if manifest is None:
        return ["manifest: none (not written by checkpointer, or not published completely)"]
    contents = manifest.get("contents") or {}
    held = [k.replace("_", " ") for k, v in contents.items() if v not in (None, False)]
    return [
        f"manifest (checkpointer.json): {manifest.get('name')}, created {manifest.get('created')}, "
        f"world size {manifest.get('world_size')}, holds {', '.join(held) or 'nothing'}, {len(manifest.get('files') or {})} files listed"
    ]
