import pathlib

import pytest

from variants import write_variant


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Every variant, written once per session: name -> folder (read-only by convention)."""
    from variants import VARIANTS

    root = tmp_path_factory.mktemp("tiny")
    return {name: write_variant(name, root) for name in VARIANTS}
