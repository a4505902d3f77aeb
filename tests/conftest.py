import pytest

from variants import VARIANTS, write_variant

pytest_plugins = ["checkpointer.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Every variant, written once per session: name -> folder (read-only by convention)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_variant(name, root) for name in VARIANTS}
