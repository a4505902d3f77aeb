"""Which safetensors files make up a Hugging Face checkpoint, and what they hold.

The index (``model.safetensors.index.json``) is the truth when present: only the files
it names are read, each must exist, and each must hold exactly the keys the index
assigns to it. Without an index the checkpoint is ``model.safetensors``, or the files
the caller names. A stray ``.safetensors`` beside them is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from checkpointer.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from checkpointer.format.folder import Folder, check_relative_name
from checkpointer.format.json_files import parse_json
from checkpointer.format.safetensors import Header, TensorEntry, header_length, parse_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_REFETCH_FILES = "the index and the weight files do not belong together: copy or download them again"
# Pickled PyTorch weights, which are never read (unpickling can run code).
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONFIG_FILE = "config.json"
# Files that travel with the weights when present in the base checkpoint.
SUPPORT_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files of a checkpoint and every tensor in them."""

    folder: Folder
    files: tuple[str, ...]
    tensors: dict[str, TensorEntry]
    weight_map: dict[str, str] | None
    index_metadata: dict[str, Any]
    headers: dict[str, Header]

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def read_header(folder: Folder, name: str) -> Header:
    """Read and validate the safetensors header of one file."""
    size = folder.size(name)
    prefix = folder.read(name, 0, min(8, size))
    where = folder.describe(name)
    length = header_length(prefix, where, size)
    return parse_header(folder.read(name, 8, length), name, size, where)


def _weight_map_from_text(text: bytes, where: str) -> dict[str, str]:
    return _parse_index(text, where)[0]


def _parse_index(text: bytes, where: str) -> tuple[dict[str, str], dict[str, Any]]:
    raw = parse_json(text, where)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(
            f"{where}: no 'weight_map' object mapping tensor names to file names; "
            "copy or download the index again, or delete it and name the weight files with checkpoint_files",
            file=where,
        )
    if not weight_map:
        raise CheckpointFormatError(f"{where}: 'weight_map' is empty, so the checkpoint has no weights; copy or download the index again", file=where)
    for name in set(weight_map.values()):
        check_relative_name(name, where)
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    return dict(weight_map), metadata


def read_index(folder: Folder) -> tuple[dict[str, str], dict[str, Any]]:
    """The weight map and metadata of ``model.safetensors.index.json``."""
    where = folder.describe(INDEX_FILE)
    size = folder.size(INDEX_FILE)
    if size > 256 * 2**20:
        raise CheckpointFormatError(f"{where}: {size} bytes is too large for an index file", file=where)
    return _parse_index(folder.read(INDEX_FILE, 0, size), where)


def check_weight_file_names(names: Sequence[str], where: str) -> list[str]:
    """Named weight files must be safetensors inside the folder (a pickled ``.bin``/``.pt`` is refused by name)."""
    for name in names:
        check_relative_name(name, where)
        if not name.endswith(".safetensors"):
            raise CheckpointFormatError(
                f"{where}/{name}: checkpoint_files names a file that is not .safetensors: weights are read from "
                "safetensors only (unpickling can run code); convert it once, e.g. with transformers: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
            )
    return list(names)


def _choose_files(folder: Folder, checkpoint_files: Sequence[str] | None) -> tuple[list[str], dict | None, dict]:
    if checkpoint_files:
        return check_weight_file_names(checkpoint_files, folder.describe()), None, {}
    if folder.exists(INDEX_FILE):
        weight_map, metadata = read_index(folder)
        return sorted(set(weight_map.values())), weight_map, metadata
    if folder.exists(SINGLE_FILE):
        return [SINGLE_FILE], None, {}
    raise _no_weights(folder.describe(), [name for name in PICKLE_WEIGHTS if folder.exists(name)])


def _no_weights(where: str, pickles: list[str]) -> CheckpointFormatError:
    """No safetensors weights: say so, and what to do (convert pickled weights, or name the files)."""
    if pickles:
        return CheckpointFormatError(
            f"{where}: no {INDEX_FILE} or {SINGLE_FILE}, only {' and '.join(pickles)}: weights are read only from "
            "safetensors (unpickling can run code); convert them once, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)",
            url=where,
        )
    return CheckpointFormatError(f"{where}: no {INDEX_FILE} or {SINGLE_FILE}; name the weight files with checkpoint_files", url=where)


def scan_checkpoint_files(folder: Folder, checkpoint_files: Sequence[str] | None = None) -> tuple[CheckpointFiles, list[str]]:
    """Like :func:`read_checkpoint_files`, but every problem is listed instead of the first raised.

    Returns the files whose headers could be read (and their tensors) and one message per
    problem: a missing file, a bad or truncated header, a tensor in two files, an index that
    does not match the files. A missing or unreadable index still raises.
    """
    files, problems = _scan(folder, checkpoint_files)
    return files, [problem.message for problem in problems]


def _scan(folder: Folder, checkpoint_files: Sequence[str] | None) -> tuple[CheckpointFiles, list[CheckpointError]]:
    """The readable files and every problem, as the error each would raise."""
    files, weight_map, metadata = _choose_files(folder, checkpoint_files)
    problems: list[CheckpointError] = []
    headers: dict[str, Header] = {}
    for name in files:
        if weight_map is not None and not folder.exists(name):
            problems.append(
                CheckpointNotFoundError(
                    f"{folder.describe(name)}: missing: {INDEX_FILE} names this shard but it does not exist; "
                    "copy or download the whole checkpoint again",
                    file=folder.describe(name),
                )
            )
            continue
        try:
            headers[name] = read_header(folder, name)
        except (CheckpointFormatError, CheckpointNotFoundError) as e:
            problems.append(e)
    tensors = _tensors_of(folder, headers, problems)
    if weight_map is not None:
        problems += weight_map_problems(folder, {k: f for k, f in weight_map.items() if f in headers}, tensors)
    return CheckpointFiles(folder, tuple(headers), tensors, weight_map, metadata, headers), problems


def read_checkpoint_files(folder: Folder, checkpoint_files: Sequence[str] | None = None) -> CheckpointFiles:
    """Discover and validate the weight files of the checkpoint in ``folder``."""
    files, problems = _scan(folder, checkpoint_files)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise problems[0].with_message(problems[0].message + more)
    return files


def _tensors_of(folder: Folder, headers: dict[str, Header], problems: list[CheckpointError]) -> dict[str, TensorEntry]:
    tensors: dict[str, TensorEntry] = {}
    for header in headers.values():
        for key, entry in header.tensors.items():
            if key in tensors:
                problems.append(
                    CheckpointFormatError(
                        f"{folder.describe()}: tensor {key!r} is in both {tensors[key].file} and {entry.file}: "
                        f"which copy to load is ambiguous; {_REFETCH_FILES}",
                        url=folder.describe(),
                        file=entry.file,
                        key=key,
                    )
                )
                continue
            tensors[key] = entry
    return tensors


def weight_map_problems(folder: Folder, weight_map: dict[str, str], tensors: dict[str, TensorEntry]) -> list[CheckpointError]:
    """Where the index and the files disagree: keys missing from their file, in another file, or not indexed."""
    where = folder.describe(INDEX_FILE)
    problems: list[CheckpointError] = []
    for key, name in weight_map.items():
        if key not in tensors:
            problems.append(
                CheckpointFormatError(f"{where}: tensor {key!r} is assigned to {name} but that file lacks it; {_REFETCH_FILES}", file=where, key=key)
            )
        elif tensors[key].file != name:
            problems.append(
                CheckpointFormatError(
                    f"{where}: tensor {key!r} is assigned to {name} but found in {tensors[key].file}; {_REFETCH_FILES}", file=where, key=key
                )
            )
    for key in sorted(set(tensors) - set(weight_map)):
        problems.append(
            CheckpointFormatError(f"{where}: tensor {key!r} in {tensors[key].file} is not in the index; {_REFETCH_FILES}", file=where, key=key)
        )
    return problems


def files_to_fetch(available: set[str], read_index: Callable[[], bytes], where: str, checkpoint_files: Sequence[str] | None = None) -> list[str]:
    """The files a remote checkpoint needs: index, the weights it names, config, tokenizer files.

    ``available`` lists the remote folder's file names; ``read_index`` fetches the index text.
    """
    support = [name for name in (CONFIG_FILE, *SUPPORT_FILES) if name in available]
    if checkpoint_files:
        weights = check_weight_file_names(checkpoint_files, where)
    elif INDEX_FILE in available:
        weights = [INDEX_FILE, *sorted(set(_weight_map_from_text(read_index(), f"{where}/{INDEX_FILE}").values()))]
    elif SINGLE_FILE in available:
        weights = [SINGLE_FILE]
    else:
        raise _no_weights(where, [name for name in PICKLE_WEIGHTS if name in available])
    missing = [name for name in weights if name not in available]
    if missing:
        raise CheckpointNotFoundError(f"{where}/{missing[0]}: missing: the checkpoint names this file but it does not exist", url=where, file=f"{where}/{missing[0]}")
    return weights + support
