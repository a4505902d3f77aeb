"""Two simulated nodes beside one: load and save time, and bytes over the network per rank.

``python -m bench.nodes --size 20m`` (as root: nodes are mount namespaces, see
checkpointer.testing.nodes). The same 4 ranks run once as 1 node x 4 (one file system: no
byte travels) and once as 2 nodes x 2 with node-local disks: the base is a local folder only
rank 0's node has (sent once to node 1's cache), the output a node-local ``output_dir``
(node 1's boxes sent to rank 0's node). Each rank reports its load and save seconds and the
bytes it sent and received (on load: the node copy a node's first rank received); the table
prints the slowest rank's time and each rank's bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def worker(base: str, out: str, report: str) -> None:
    """Every rank: build, load (timed), save (timed), report."""
    import datetime

    import torch.distributed as dist

    from bench.models import MODEL_TYPE
    from checkpointer import DistributedHFCheckpointer
    from checkpointer.format.folder import local_files
    from checkpointer.format.model_config import ModelConfig
    from checkpointer.runtime.cache import cache_root
    from checkpointer.runtime.distributed import barrier, local_rank
    from checkpointer.train.fsdp import build_sharded_model, default_mesh

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    checkpointer = DistributedHFCheckpointer(base, out, MODEL_TYPE)
    barrier()
    started = time.perf_counter()  # opening the base (and sending it to other nodes) is part of the load
    model = build_sharded_model(MODEL_TYPE, ModelConfig.from_dict(checkpointer.open().config_dict), default_mesh())
    checkpointer.load_model(model)
    barrier()
    loaded = time.perf_counter() - started
    copies = cache_root() / "node-copies"
    load_received = sum(local_files(copies).values()) if copies.is_dir() and local_rank() == 0 else 0
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    barrier()
    saved = time.perf_counter() - started - loaded
    network = checkpointer.last_network
    measured = {"load_s": loaded, "save_s": saved, "sent": network.sent, "received": network.received, "load_received": load_received}
    Path(report, f"rank-{dist.get_rank()}.json").write_text(json.dumps(measured))
    dist.destroy_process_group()


def measure(base: Path, nodes: int, nproc: int, root: Path) -> list[dict]:
    from checkpointer.testing.nodes import SimulatedCluster

    cluster = SimulatedCluster(root, nodes=nodes, nproc_per_node=nproc)
    shutil.copytree(base, cluster.node_dir(0) / "base")
    report = root / "report"
    report.mkdir()
    env = {"CHECKPOINTER_CACHE": str(cluster.common / "cache"), "PYTHONPATH": ":".join(sys.path)}
    runs = cluster.run(Path(__file__), ["--worker", str(cluster.common / "base"), str(cluster.common / "out"), str(report)], env, timeout=1800)
    failed = [r for r in runs if r.returncode]
    if failed:
        raise SystemExit(f"node {failed[0].node} failed:\n{failed[0].output[-4000:]}")
    return [json.loads((report / f"rank-{r}.json").read_text()) for r in range(nodes * nproc)]


def table(rows: dict[str, list[dict]], model_bytes: int) -> list[str]:
    lines = [
        f"model: {model_bytes / 1e6:.0f} MB", "",
        "| layout | load s | load: MB received per rank | save s | save: MB sent per rank | save: MB received per rank |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    per_rank = lambda ranks, key: " / ".join(f"{r[key] / 1e6:.1f}" for r in ranks)  # noqa: E731
    for name, ranks in rows.items():
        lines.append(
            f"| {name} | {max(r['load_s'] for r in ranks):.2f} | {per_rank(ranks, 'load_received')} | "
            f"{max(r['save_s'] for r in ranks):.2f} | {per_rank(ranks, 'sent')} | {per_rank(ranks, 'received')} |"
        )
    one, two = rows.values()
    lines += ["", f"2 nodes / 1 node: load {max(r['load_s'] for r in two) / max(r['load_s'] for r in one):.2f}x, "
              f"save {max(r['save_s'] for r in two) / max(r['save_s'] for r in one):.2f}x"]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20m")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    from bench.models import SIZES, ensure_base_model, model_bytes

    base = ensure_base_model(SIZES[args.size], args.work)
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        rows = {
            "1 node x 4": measure(base, 1, 4, Path(scratch, "one")),
            "2 nodes x 2, node-local disks": measure(base, 2, 2, Path(scratch, "two")),
        }
    print("\n".join(table(rows, model_bytes(base))))


if __name__ == "__main__":
    main()
