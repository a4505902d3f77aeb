"""Remote I/O: our downloads and uploads against plain huggingface_hub and s3fs, on loopback servers.

Same files, same run, fresh caches for every download:
- Hub download: ``phases.open_folder`` of a ``HubLocation`` (pinned sha, only the needed files, digests checked)
  against plain ``snapshot_download``;
- Hub upload: our one-commit publish against plain ``create_commit`` of the same files;
- S3 download / upload: ``phases.open_folder`` of an ``FsspecLocation`` / ``replace_with`` against plain ``fs.get`` / ``fs.put``;
- streaming: the bytes each of 2 ranks reads when loading with ``streaming=True``, against its share.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from bench.models import model_bytes


def _timed(operation: Callable[[], object]) -> float:
    started = time.perf_counter()
    operation()
    return time.perf_counter() - started


def _fresh(*folders: Path) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _hub_rows(base: Path, reps: int) -> list[tuple[str, float, float]]:
    """(operation, plain seconds, ours seconds) against a local Hub."""
    from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

    from checkpointer.phases import open_folder
    from checkpointer.storage.hub_location import HubLocation
    from checkpointer.storage.urls import parse_location

    api, files = HfApi(), sorted(p for p in base.iterdir() if p.is_file())
    hf_cache, our_cache = Path(os.environ["HF_HOME"]) / "hub", Path(os.environ["CHECKPOINTER_CACHE"])
    plain_up, ours_up, plain_down, ours_down = [], [], [], []
    for _ in range(reps):
        plain_repo, ours_repo = f"bench/plain-{uuid.uuid4().hex[:6]}", f"bench/ours-{uuid.uuid4().hex[:6]}"
        api.create_repo(plain_repo)
        operations = [CommitOperationAdd(p.name, str(p)) for p in files]
        plain_up.append(_timed(lambda: api.create_commit(plain_repo, operations=operations, commit_message="plain")))
        ours_up.append(_timed(lambda: HubLocation(parse_location(f"hf://{ours_repo}")).replace_with(base)))
        _fresh(hf_cache, our_cache)
        plain_down.append(_timed(lambda: snapshot_download(plain_repo)))
        _fresh(hf_cache, our_cache)
        ours_down.append(_timed(lambda: open_folder(HubLocation(parse_location(f"hf://{plain_repo}")))))
        for repo in (plain_repo, ours_repo):
            api.delete_repo(repo)
    return [("Hub upload", statistics.median(plain_up), statistics.median(ours_up)), ("Hub download", statistics.median(plain_down), statistics.median(ours_down))]


def _s3_rows(base: Path, reps: int) -> list[tuple[str, float, float]]:
    """(operation, plain seconds, ours seconds) against moto's S3 server."""
    from checkpointer.phases import open_folder
    from checkpointer.storage.fsspec_location import FsspecLocation
    from checkpointer.testing.pytest_plugin import S3Server

    server = S3Server()
    os.environ.update(server.credentials)
    fs, our_cache = server.filesystem(), Path(os.environ["CHECKPOINTER_CACHE"])
    plain_up, ours_up, plain_down, ours_down = [], [], [], []
    try:
        for rep in range(reps):
            bucket = f"bench-{rep}-{uuid.uuid4().hex[:6]}"
            fs.mkdir(bucket)
            plain_up.append(_timed(lambda: fs.put(str(base), f"{bucket}/plain", recursive=True)))
            ours = FsspecLocation(f"s3://{bucket}/ours", server.storage_options)
            ours_up.append(_timed(lambda: ours.replace_with(base)))
            target = our_cache / "plain-get"
            _fresh(target, our_cache)
            plain_down.append(_timed(lambda: fs.get(f"{bucket}/plain/", str(target) + "/", recursive=True)))
            _fresh(our_cache)
            ours_down.append(_timed(lambda: open_folder(FsspecLocation(f"s3://{bucket}/plain", server.storage_options))))
            fs.rm(bucket, recursive=True)
    finally:
        server.stop()
    return [("S3 upload", statistics.median(plain_up), statistics.median(ours_up)), ("S3 download", statistics.median(plain_down), statistics.median(ours_down))]


def stream_load(rank: int, world: int, url: str, config_dir: str, model_type: str) -> int:
    """Rank function: a streaming sharded load from ``url``; returns the bytes this rank read."""
    from checkpointer import DistributedHFCheckpointer, ModelConfig
    from checkpointer.train.fsdp import build_sharded_model

    config = ModelConfig.from_json(Path(config_dir, "config.json").read_text())
    model = build_sharded_model(model_type, config, dtype=torch.bfloat16)
    checkpointer = DistributedHFCheckpointer(url, f"/tmp/unused-{rank}", model_type, streaming=True)
    checkpointer.load_model(model)
    return checkpointer.last_load.bytes


def _streaming_rows(base: Path, world: int) -> list[str]:
    from huggingface_hub import HfApi

    from checkpointer.testing.multiprocess import run_on_ranks

    repo = f"bench/stream-{uuid.uuid4().hex[:6]}"
    HfApi().create_repo(repo)
    HfApi().upload_folder(folder_path=str(base), repo_id=repo)
    per_rank = run_on_ranks(stream_load, world, f"hf://{repo}", str(base), "LLAMA3", timeout=1800)
    HfApi().delete_repo(repo)
    share = model_bytes(base) / world
    return [f"| streaming, rank {r} of {world} | {n / 1e6:.0f} MB read | {share / 1e6:.0f} MB share | {n / share:.3f} |" for r, n in enumerate(per_rank)]


def run_remote(base: Path, work: Path, reps: int = 3, world: int = 2) -> list[str]:
    """Measure everything; the report section as Markdown lines (with PASS/MISS verdicts)."""
    from checkpointer.testing.hub_client import configure_hub_client
    from checkpointer.testing.hub_server import LocalHub

    size_gb = sum(p.stat().st_size for p in base.iterdir() if p.is_file()) / 1e9
    os.environ["CHECKPOINTER_CACHE"] = str(work / "remote-cache")
    with LocalHub() as hub:
        configure_hub_client(hub.endpoint, hub.token, work / "remote-hf-home")
        rows = _hub_rows(base, reps) + _s3_rows(base, reps)
        streaming = _streaming_rows(base, world)
    lines = [
        "## Remote I/O (loopback servers: a local Hub and moto's S3)",
        "",
        f"{size_gb:.2f} GB of files, medians of {reps} repetitions, fresh caches for every download. Throughput ratio = plain time / ours (target: at least 0.9).",
        "",
        "| operation | plain s | ours s | plain GB/s | ours GB/s | ours/plain throughput | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, plain, ours in rows:
        ratio = plain / ours
        lines.append(f"| {name} | {plain:.2f} | {ours:.2f} | {size_gb / plain:.2f} | {size_gb / ours:.2f} | {ratio:.2f} | {'PASS' if ratio >= 0.9 else 'MISS'} |")
    lines += ["", "| streaming load | bytes read | share | read/share (target: at most 1.1) |", "|---|---|---|---|", *streaming, ""]
    return lines
