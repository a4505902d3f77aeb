"""Writing safetensors files byte by byte, for tests that need headers the library would never write."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def write_raw(path: Path, header: dict[str, Any], data: bytes = b"", length: int | None = None) -> None:
    """Write ``header`` (as JSON) and ``data`` as a safetensors file; ``length`` overrides the header length field."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
