"""The package's dependencies point one way: format <- mapping <- dcp <- storage <- facade <- train, cli."""

from __future__ import annotations

import ast
from pathlib import Path

import checkpointer

ROOT = Path(checkpointer.__file__).parent

# A module may import from its own layer and the layers below it; runtime and errors from anywhere.
LAYERS = ["format", "mapping", "dcp", "storage", "facade", "train", "cli", "testing"]
FACADE = {"api", "phases", "resume", "load", "save", "async_save", "base_checkpoint", "__init__", "__main__", "fsdp", "hf_tokenizer"}
ANYWHERE = {"runtime", "errors"}
UPWARD_EXCEPTIONS = {
    ("fsdp", "train"),  # documented alias: checkpointer.fsdp.build_sharded_model
    ("hf_tokenizer", "train"),  # documented alias: checkpointer.hf_tokenizer.hf_chat_tokenizer
    ("__main__", "cli"),  # python -m checkpointer runs the command line
    ("train.demo", "testing"),  # the demo runs the local Hub server and the SmolLM2 conversion
}
NOT_BETWEEN = {("cli.dcp_export", "cli.export")}  # export dispatches to dcp_export, never the reverse


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return "facade" if top in FACADE else top


def _imports(path: Path) -> list[str]:
    """The checkpointer modules ``path`` imports anywhere (TYPE_CHECKING blocks and functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n.removeprefix("checkpointer.") for n in names if n.startswith("checkpointer.")]
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for imported in _imports(path):
            source, target = _layer(module), _layer(imported)
            if target in ANYWHERE:
                continue
            if source in ANYWHERE:
                problems.append(f"{module} imports {imported}: runtime and errors depend on no layer")
            elif LAYERS.index(target) > LAYERS.index(source) and (module, target) not in UPWARD_EXCEPTIONS:
                problems.append(f"{module} ({source}) imports {imported} ({target}), a layer above it")
            elif (module, imported) in NOT_BETWEEN:
                problems.append(f"{module} imports {imported}, which imports it")
    return problems


def test_imports_point_down_the_layers():
    assert _violations() == []


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports (any package), anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_format_and_storage_know_no_process_groups():
    """Bytes and files only: the phases decide which rank runs a storage step."""
    import inspect

    from checkpointer.storage.fsspec_location import FsspecLocation
    from checkpointer.storage.hub_location import HubLocation
    from checkpointer.storage.local import LocalLocation

    distributed = ("torch.distributed", "checkpointer.runtime.distributed", "checkpointer.dcp")
    for package in ("format", "storage"):
        for path in sorted((ROOT / package).glob("*.py")):
            used = sorted(m for m in _all_imports(path) if m.startswith(distributed))
            assert not used, f"{package}/{path.name} imports {used}"
    for cls in (LocalLocation, FsspecLocation, HubLocation):
        for name, method in inspect.getmembers(cls, inspect.isfunction):
            assert not {"group", "process_group"} & set(inspect.signature(method).parameters), f"{cls.__name__}.{name} takes a process group"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "checkpointer"
    (fake / "format").mkdir(parents=True)
    (fake / "format" / "bad.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from checkpointer.mapping.key_maps import KeyMap\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    assert _violations() == ["format.bad (format) imports mapping.key_maps (mapping), a layer above it"]
