"""Simulated nodes on one machine: ``torchrun --nnodes N`` over loopback, one mount namespace per node.

Each node's torchrun runs inside ``unshare -m`` after ``mount --bind <node folder> <common
path>``, so the same path (cache, ``output_dir``, ``checkpoint_dir``) is private to each node,
as on a cluster without a shared file system. Needs root (or CAP_SYS_ADMIN); see
:func:`can_simulate_nodes`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from checkpointer.testing.multiprocess import free_port


def can_simulate_nodes() -> bool:
    """Whether this process may create mount namespaces (root with ``unshare``)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("mount") is not None


@dataclass
class NodeRun:
    """One node's torchrun: its exit status and output."""

    node: int
    returncode: int
    output: str


@dataclass
class SimulatedCluster:
    """``nodes`` folders under ``root``, each mounted at ``common`` inside its node."""

    root: Path
    nodes: int = 2
    nproc_per_node: int = 2

    def __post_init__(self) -> None:
        self.common = self.root / "common"
        self.common.mkdir(parents=True, exist_ok=True)
        for k in range(self.nodes):
            self.node_dir(k).mkdir(parents=True, exist_ok=True)

    def node_dir(self, node: int) -> Path:
        """What node ``node`` sees at :attr:`common`."""
        return self.root / f"node{node}"

    def start(self, script: Path, args: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
        """Start every node's torchrun running ``script args`` (each in its own session, for killing)."""
        port = free_port()
        environment = {**os.environ, **(env or {})}
        procs = []
        for k in range(self.nodes):
            torchrun = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes), "--nproc_per_node", str(self.nproc_per_node),
                "--node_rank", str(k), "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *args,
            ]  # fmt: skip
            inner = f"mount --bind {shlex.quote(str(self.node_dir(k)))} {shlex.quote(str(self.common))} && exec {shlex.join(torchrun)}"
            procs.append(
                subprocess.Popen(
                    ["unshare", "-m", "bash", "-c", inner], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, start_new_session=True,
                )
            )  # fmt: skip
        return procs

    def run(self, script: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 240.0) -> list[NodeRun]:
        """Run ``script`` on every node and wait; a node still running after ``timeout`` is killed."""
        return wait_all(self.start(script, args, env), timeout)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own, so a process group is not enough)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.extend(kids := children.get(todo.pop(), []))
        todo.extend(kids)
    return found


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and every rank on it."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[NodeRun]:
    deadline = time.monotonic() + timeout
    runs = []
    for k, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_node(proc)
            output, _ = proc.communicate()
            output += f"\n[node {k} killed after {timeout:.0f} s]"
        runs.append(NodeRun(k, proc.returncode, output))
    return runs
