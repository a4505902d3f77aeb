"""The JSON files of a checkpoint (index, config, manifest, adapter config): one reader, one writer.

The reader names the file when the text is not JSON, so every caller's error does; the
writer gives every file the same form (indented, keys sorted, a final newline), so equal
contents are equal bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from checkpointer.errors import CheckpointFormatError


def parse_json(text: bytes | str, where: str, what: str = "", advice: str = "") -> Any:
    """``text`` (UTF-8) parsed as JSON; else a CheckpointFormatError naming ``where``.

    The message is ``"<where>: not valid JSON (<why>)"``, or ``"<where>: <what> is not valid
    JSON (<why>): <advice>"`` when those are given.

    Example::

        config = parse_json(folder.read(CONFIG_FILE, 0, size), folder.describe(CONFIG_FILE))
    """
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        subject = f"{what} is not" if what else "not"
        raise CheckpointFormatError(f"{where}: {subject} valid JSON ({e})" + (f": {advice}" if advice else ""), file=where) from None


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` as checkpointer writes every JSON file: indented, keys sorted, a final newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
