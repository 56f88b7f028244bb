"""Paths inside a repository: the one check every agent applies before it reads or
writes a file of a repository it was handed.

A path is inside when it still is once resolved, symbolic links followed: a
``README.md`` that links to ``/etc/passwd``, or ``calc/link.py`` that links to a
file of another project, is outside, and an agent must neither read it (and
answer with its text) nor write through it.
"""

from __future__ import annotations

from pathlib import Path

from shared.lib.errors import InvalidInput

__all__ = ["inside", "is_inside"]


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (absolute, or relative to ``root``) resolves to a place inside ``root``."""
    return (root / path).resolve().is_relative_to(root.resolve())


def inside(root: Path, path: str | Path, *, field: str, advice: str = "name a file inside it") -> Path:
    """``path`` resolved inside ``root``; one that escapes the repository (``..``, an absolute
    path, a symbolic link leaving it) is refused as an :class:`InvalidInput` naming ``field``."""
    if not is_inside(root, Path(path)):
        raise InvalidInput(f"{field}: {path} is outside the repository; {advice}", field=field)
    return (root / path).resolve()
