"""``checkpointer verify``: is a checkpoint whole? Index, headers, manifest, sizes; with ``--full`` every byte."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from checkpointer.cli.common import Checkpoint, Outcome, Timer
from checkpointer.cli.dcp_export import PICKLED_METADATA, has_dcp
from checkpointer.dcp.training_state import METADATA_FILE, TRAINING_STATE_DIR, parse_metadata_json
from checkpointer.errors import CheckpointError, CheckpointNotFoundError
from checkpointer.format.digests import mismatch, units_to_verify
from checkpointer.format.hf_files import CONFIG_FILE, CheckpointFiles, scan_checkpoint_files
from checkpointer.format.manifest import MANIFEST_FILE, Contents, recorded_files
from checkpointer.format.peft import ADAPTER_CONFIG_FILE, ADAPTER_FILE, lora_scale
from checkpointer.format.tensor_io import read_tensor
from checkpointer.runtime.progress import byte_bar, human_size

log = logging.getLogger(__name__)


@dataclass
class WeightSet:
    """Safetensors files of a checkpoint (its weights, or an adapter in ``prefix``) whose headers were read."""

    prefix: str
    checkpoint: Checkpoint
    files: CheckpointFiles


@dataclass
class Findings:
    """What verify found: problems (the checkpoint is not whole), notes (what was not checked), bytes read."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0


def verify(location: str, full: bool, storage_options: dict[str, Any] | None = None) -> Outcome:
    """Print every problem of the checkpoint at ``location``; exit code 1 if there is any."""
    timer = Timer()
    checkpoint = Checkpoint.open(location, "LOCATION", storage_options)
    findings = check(checkpoint, full)
    for problem in findings.problems:
        print(f"PROBLEM: {problem}")
    for note in findings.notes:
        log.info(note)
    where, size = checkpoint.describe(), sum(checkpoint.files.values())
    how = f"every byte read, {timer.rate(findings.bytes_read)}" if full else f"headers, index and sizes checked in {timer.seconds:.1f} s"
    if findings.problems:
        return Outcome(1, f"{where} is NOT whole: {len(findings.problems)} problem(s), listed above ({how})")
    return Outcome(0, f"{where} is whole: {len(checkpoint.files)} files, {human_size(size)} ({how})")


def check(checkpoint: Checkpoint, full: bool = False) -> Findings:
    """Everything verify checks, without printing."""
    findings = Findings()
    manifest = _manifest(checkpoint, findings)
    weight_sets = _weight_sets(checkpoint, findings)
    for prefix in (f"{TRAINING_STATE_DIR}/", ""):
        _check_dcp(checkpoint, prefix, findings)
    if manifest is not None:
        _check_contents(checkpoint, manifest, findings)
        _check_sizes(checkpoint, manifest, findings, full)
    if not weight_sets and manifest is None and not has_dcp(checkpoint):
        findings.problems.append(f"{checkpoint.describe()}: no weights, adapter, manifest or DCP metadata here: check the path")
    if full:
        _read_everything(checkpoint, weight_sets, manifest or {}, findings)
    return findings


def _manifest(checkpoint: Checkpoint, findings: Findings) -> dict[str, Any] | None:
    try:
        manifest = checkpoint.manifest()
    except CheckpointError as e:
        findings.problems.append(str(e))
        return None
    if manifest is None:
        findings.notes.append(f"no {MANIFEST_FILE}: not a checkpointer checkpoint (or not published whole); sizes not checked against one")
    return manifest


def _weight_sets(checkpoint: Checkpoint, findings: Findings) -> list[WeightSet]:
    """Scan the weights and every adapter: missing files, headers (strict), index against files."""
    sets = []
    if checkpoint.has_weights:
        sets.append(_scan(checkpoint, "", None, findings))
        if CONFIG_FILE not in checkpoint.files:
            findings.problems.append(f"{checkpoint.describe(CONFIG_FILE)}: missing: transformers cannot load the weights without it")
    for folder in checkpoint.adapter_dirs():
        adapter = checkpoint.sub(folder)
        sets.append(_scan(adapter, folder, [ADAPTER_FILE], findings))
        _check_adapter_config(adapter, findings)
    return [s for s in sets if s is not None]


def _scan(checkpoint: Checkpoint, prefix: str, names: list[str] | None, findings: Findings) -> WeightSet | None:
    try:
        files, problems = scan_checkpoint_files(checkpoint.folder, names)
    except CheckpointError as e:  # an unreadable index
        findings.problems.append(str(e))
        return None
    findings.problems += problems
    return WeightSet(f"{prefix}/" if prefix else "", checkpoint, files)


def _check_adapter_config(adapter: Checkpoint, findings: Findings) -> None:
    try:
        config = adapter.read_json(ADAPTER_CONFIG_FILE)
        if config is None:
            raise CheckpointNotFoundError(f"{adapter.describe(ADAPTER_CONFIG_FILE)}: missing: PEFT cannot load the adapter without it", file=adapter.describe(ADAPTER_CONFIG_FILE))
        lora_scale(config, adapter.describe(ADAPTER_CONFIG_FILE))
    except CheckpointError as e:
        findings.problems.append(str(e))


def _check_dcp(checkpoint: Checkpoint, prefix: str, findings: Findings) -> None:
    """A DCP folder: every data file its JSON metadata names exists and is long enough."""
    path = f"{prefix}{METADATA_FILE}"
    if f"{prefix}{PICKLED_METADATA}" in checkpoint.files and path not in checkpoint.files:
        findings.notes.append(f"{checkpoint.describe(prefix + PICKLED_METADATA)}: a pickle, not read (unpickling runs code); its data files are not checked")
    if path not in checkpoint.files:
        return
    try:
        metadata = parse_metadata_json(checkpoint.read_bytes(path), checkpoint.describe(path))
    except CheckpointError as e:
        findings.problems.append(str(e))
        return
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = checkpoint.files.get(prefix + name)
        if size is None:
            findings.problems.append(f"{checkpoint.describe(prefix + name)}: missing: {path} names it")
        elif size < end:
            findings.problems.append(f"{checkpoint.describe(prefix + name)}: truncated: {path} needs {end} bytes, the file has {size}")


def _check_contents(checkpoint: Checkpoint, manifest: dict[str, Any], findings: Findings) -> None:
    """What the manifest says the checkpoint holds is there."""
    contents = Contents.of(manifest, checkpoint.describe(MANIFEST_FILE))
    needed = [CONFIG_FILE] if contents.weights else []
    if contents.adapter is not None:
        needed += [f"{contents.adapter}/{name}".lstrip("/") for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE)]
    if contents.training_state:
        needed.append(f"{TRAINING_STATE_DIR}/{METADATA_FILE}")
    for path in needed:
        if path not in checkpoint.files:
            findings.problems.append(f"{checkpoint.describe(path)}: missing: {MANIFEST_FILE} says the checkpoint holds it")
    if contents.weights and not checkpoint.has_weights:
        findings.problems.append(f"{checkpoint.describe()}: {MANIFEST_FILE} says it holds weights, but there is no index or model.safetensors")


def _check_sizes(checkpoint: Checkpoint, manifest: dict[str, Any], findings: Findings, full: bool) -> None:
    records = recorded_files(manifest)
    for path, record in records.items():
        size = checkpoint.files.get(path)
        if size is None:
            findings.problems.append(f"{checkpoint.describe(path)}: missing: {MANIFEST_FILE} lists it")
        elif record.size is not None and size != record.size:
            findings.problems.append(f"{checkpoint.describe(path)}: {size} bytes, but {MANIFEST_FILE} records {record.size}")
    digests = sum(1 for r in records.values() if r.has_digests)
    if digests and not full:
        findings.notes.append(f"{MANIFEST_FILE} records digests of {digests} file(s): checked with --full")


def _read_everything(checkpoint: Checkpoint, weight_sets: list[WeightSet], manifest: dict[str, Any], findings: Findings) -> None:
    """--full: files with recorded digests are hashed; every other weight file is read tensor by tensor."""
    recorded = recorded_files(manifest)
    digests = {p: manifest["files"][p] for p, r in recorded.items() if r.has_digests and p in checkpoint.files}
    to_read = [(s, name) for s in weight_sets for name in s.files.files if s.prefix + name not in digests]
    total = sum(checkpoint.files[p] for p in digests) + sum(s.files.headers[n].file_size for s, n in to_read)
    with byte_bar(total, f"verify {checkpoint.describe()}") as bar:
        for path, digest in digests.items():
            _check_digest(checkpoint, path, digest, findings, bar)
        for weight_set, name in to_read:
            _read_tensors(weight_set, name, findings, bar)


def _check_digest(checkpoint: Checkpoint, path: str, record: dict[str, Any], findings: Findings, bar: tqdm) -> None:
    """The file's xxh3 ranges (or older sha256) against the manifest; the first range that differs is a problem."""
    folder, name = checkpoint.reader(path)
    try:
        for unit in units_to_verify(folder, name, record, checkpoint.files[path]):
            actual = unit.hash(folder)
            findings.bytes_read += unit.runs.nbytes
            bar.update(unit.runs.nbytes)
            if actual != unit.expected:
                findings.problems.append(mismatch(folder, unit, actual))
                return
    except CheckpointError as e:
        findings.problems.append(str(e))


def _read_tensors(weight_set: WeightSet, name: str, findings: Findings, bar: tqdm) -> None:
    entries = sorted((e for e in weight_set.files.tensors.values() if e.file == name), key=lambda e: e.start)
    for entry in entries:
        try:
            read_tensor(weight_set.files.folder, entry)
        except CheckpointError as e:
            findings.problems.append(f"{e} (reading tensor {entry.name!r})")
            return
        findings.bytes_read += entry.nbytes
        bar.update(entry.nbytes)
