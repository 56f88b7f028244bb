"""Replacing a file atomically: write a temporary file beside it, then ``os.replace``.

The temporary name is unique to the call, not only to the process: one agent
serves many requests at once, and two of them may write the same target (two
workflows packaging one revision). With a per-process name the second writer's
file was renamed away or deleted under the first.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["temp_beside", "write_atomically"]


def temp_beside(target: Path) -> Path:
    """A fresh temporary path in ``target``'s directory (hidden, ending ``.tmp``)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def write_atomically(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data``: readers see the old file or the new one, never a part."""
    tmp = temp_beside(target)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
