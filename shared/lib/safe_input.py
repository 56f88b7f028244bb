"""Input PostgreSQL can take: text without NUL or unpaired surrogates, integers within bigint,
JSON no deeper and with no integer larger than what is stored and carried can hold.

PostgreSQL refuses both in ``text`` and ``jsonb`` (asyncpg raises
``CharacterNotInRepertoireError``, ``UntranslatableCharacterError`` or
"surrogates not allowed"), and Python's own ``open()`` refuses NUL. JSON can
carry both (``"\\u0000"``, ``"\\ud800"``), so every service checks what it is
sent at its edge (HTTP bodies and query strings, agent request payloads) and
answers 422 naming the field, instead of a 500 from deep in the code. Likewise an
integer past ``bigint`` (an event id, a cursor) is asyncpg's ``DataError``: bound it
with :func:`check_bigint` where it comes in.

JSON nested past :data:`MAX_JSON_DEPTH`, or holding an integer outside
``[JSON_INT_MIN, JSON_INT_MAX]``, cannot be stored either: orjson, which writes every
``jsonb`` value and every message of the bus, refuses an integer past 64 bits and nesting
past 254 levels, and pydantic's serialiser (an agent signing an envelope) past about 250.
:func:`check_json_limits` refuses both with 422 naming the field; the depth leaves room for
the levels a value is wrapped in on its way (an envelope, an event, a workflow's state).

Cost, measured with ``timeit`` (best of 5 x 100,000 calls) on a 12-field payload with
nested lists and objects: :func:`find_unsafe_text` 0.7 µs when the payload is clean (one
``orjson.dumps``; walking it in Python took 11 µs, so it is walked only when unsafe text
may be in it); :func:`may_hold_unsafe_text` on a 1 KB body 1.3 µs, so an HTTP body is
parsed a second time only when it holds a suspicious escape or byte.
:func:`may_exceed_json_limits` (one ``bytes.translate``, one count, one search) costs what
:func:`may_hold_unsafe_text` does: 3.0 µs each on a 1 KB agent envelope, timed together on
one machine. A body is parsed and walked only when it has more than :data:`MAX_JSON_DEPTH`
brackets or 19 digits in a row.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from shared.lib.errors import InvalidInput

__all__ = [
    "BIGINT_MAX",
    "JSON_INT_MAX",
    "JSON_INT_MIN",
    "MAX_JSON_DEPTH",
    "UNSAFE_TEXT_MESSAGE",
    "check_bigint",
    "check_json_limits",
    "check_text",
    "clipped",
    "find_json_past_limits",
    "find_unsafe_text",
    "may_exceed_json_limits",
    "may_hold_unsafe_text",
]

#: The largest ``bigint`` (int64): ids of the events table, and any integer a query compares with one.
BIGINT_MAX = 2**63 - 1

#: How deeply a JSON body may nest its objects and arrays: ``{"a": [1]}`` is 2 deep. Well
#: under orjson's 254 (``jsonb``, the bus), pydantic's ~250 (an envelope signed) and the
#: ~200 of pydantic's JSON parser (a workflow's input), with room for what wraps the value.
MAX_JSON_DEPTH = 128

#: The integers orjson writes (int64 and uint64), so the ones ``jsonb`` and the bus carry.
JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1

#: Path segments among which the field is named when JSON nests too deeply, not 129 levels of it.
_DEPTH_PATH_SEGMENTS = 8
#: Path segments kept while looking for the place: more than a message shows (cut to 80 characters).
_KEPT_SEGMENTS = 40

#: How much of a caller's value (a header, a key, a path, an id) an error message repeats.
_ECHO_MAX_CHARS = 80

#: What the error says after the field's path.
UNSAFE_TEXT_MESSAGE = "text must not contain NUL (\\u0000) or unpaired surrogates (\\ud800-\\udfff)"

_UNSAFE_CHAR = re.compile("[\x00\ud800-\udfff]")
#: In raw JSON: an escaped NUL or surrogate, a surrogate encoded as UTF-8 (Python's json
#: decodes it with ``surrogatepass``), or a NUL byte (any UTF-16/32 body has them).
_UNSAFE_RAW = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]|\x00")
#: Stands, in the walk, for a key that is itself unsafe.
_UNSAFE_KEY = object()


def _unsafe(text: str) -> bool:
    if text.isascii():
        return "\x00" in text
    return _UNSAFE_CHAR.search(text) is not None


def _escaped(text: str) -> str:
    """``text`` with its unsafe characters written as ``\\uXXXX``, fit to show in a message."""
    return _UNSAFE_CHAR.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _children(value: Any) -> list[tuple[str | int, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list | tuple):
        return list(enumerate(value))
    return []


def _surely_safe(value: Any) -> bool:
    """orjson writes NUL as ``\\u0000`` and refuses surrogates: one C-speed pass over the
    value settles the common case (~0.3 µs for a 12-field payload, against ~11 µs to walk it)."""
    try:
        return b"\\u0000" not in orjson.dumps(value)
    except TypeError:  # a surrogate, or something orjson cannot write: walk it to know
        return False


def find_unsafe_text(value: Any, *, path: str = "") -> str | None:
    """The dotted path (``input.files.0.name``) of the first string, key or value, holding a
    NUL or an unpaired surrogate; ``path`` itself when ``value`` is such a string; None if
    there is none. Walks without recursion, in document order, so any nesting depth is fine."""
    if _surely_safe(value):
        return None
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _unsafe(item):
                return where
            continue
        if item is _UNSAFE_KEY:
            return where
        children = _children(item)
        for key, child in reversed(children):
            if isinstance(key, str) and _unsafe(key):  # reported when reached, in document order
                child, key = _UNSAFE_KEY, _escaped(key)
            stack.append((f"{where}.{key}" if where else str(key), child))
    return None


def check_text(value: Any, *, field: str = "") -> None:
    """Raise :class:`InvalidInput` naming the path of the first unsafe string in ``value``
    (prefixed with ``field``): ``input.name: text must not contain NUL ...``."""
    where = find_unsafe_text(value, path=field)
    if where is not None:
        where = clipped(where or "body")
        raise InvalidInput(f"{where}: {UNSAFE_TEXT_MESSAGE}; remove those characters and send it again", field=where)


def may_hold_unsafe_text(raw: bytes) -> bool:
    """Whether raw JSON bytes may decode to unsafe text: a cheap scan that is never wrong
    when it says no (``\\\\u0000``, an escaped backslash, is a false yes, settled by
    :func:`find_unsafe_text` on the parsed value)."""
    if b"\\u" not in raw and b"\x00" not in raw and b"\xed" not in raw:  # 3 C scans: ~10x the regex's speed
        return False
    return _UNSAFE_RAW.search(raw) is not None


def check_bigint(value: int, *, field: str, minimum: int = 0) -> int:
    """``value`` if it is in ``[minimum, BIGINT_MAX]``; else :class:`InvalidInput` naming ``field``."""
    if not minimum <= value <= BIGINT_MAX:
        raise InvalidInput(f"{field} must be an integer from {minimum} to {BIGINT_MAX}", field=field)
    return value


def clipped(text: str, *, max_chars: int = _ECHO_MAX_CHARS) -> str:
    """``text`` as an error message may repeat it: cut to ``max_chars`` when longer, saying how
    long it was (a caller's 8,000-character header was echoed whole)."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text)} characters)"


#: For the raw scan: digits become ``0``, an opening bracket ``[``, anything else a space.
_SHAPE = bytes(0x30 if b in b"0123456789" else 0x5B if b in b"[{" else 0x20 for b in range(256))
#: The fewest digits of an integer outside ``[JSON_INT_MIN, JSON_INT_MAX]``: 2**63 has 19.
_LONG_DIGITS = b"0" * len(str(2**63))


def may_exceed_json_limits(raw: bytes) -> bool:
    """Whether raw JSON may nest past :data:`MAX_JSON_DEPTH` or hold an integer past 64 bits: a
    scan that is never wrong when it says no (as many brackets as the limit, or 19 digits in a
    row, in a string or a float, are a false yes, settled by :func:`find_json_past_limits`)."""
    shape = raw.translate(_SHAPE)
    return shape.count(b"[") > MAX_JSON_DEPTH or _LONG_DIGITS in shape


def _int_outside(value: Any) -> bool:
    return type(value) is int and not JSON_INT_MIN <= value <= JSON_INT_MAX


#: What JSON parses to other than containers and integers, told apart at the cost of one lookup.
_SCALARS = frozenset({str, float, bool, type(None)})


def _within_limits(value: Any) -> bool:
    """The common case, settled level by level and building no path: 0.28 ms for a list of 250
    objects of 3 fields (1,250 values), a third of what parsing them took with ``json.loads``."""
    level, depth = [value], 0
    while True:
        below: list[Any] = []
        nested = False
        for item in level:
            kind = type(item)
            if kind in _SCALARS:
                continue
            if kind is int:
                if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                    return False
            elif isinstance(item, dict):
                nested = True
                below.extend(item.values())
            elif isinstance(item, list | tuple):
                nested = True
                below.extend(item)
        if not nested:
            return True
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return False
        level = below


def find_json_past_limits(value: Any, *, path: str = "") -> tuple[str, str] | None:
    """Where ``value`` first (in document order) nests past :data:`MAX_JSON_DEPTH` or holds an
    integer outside ``[JSON_INT_MIN, JSON_INT_MAX]``, and what is wrong there; None if nowhere.
    ``path`` prefixes the place. A place nested too deeply is named by its field, the last
    object key of its first levels (``metadata.schema`` for ``metadata.schema.0.0...``)."""
    if _within_limits(value):
        return None
    # (depth, the first _KEPT_SEGMENTS of its path, value): a deeper value shares its parent's
    # path (no copy per value: a 1 MB body of deep small items cost ~0.5 GB as full paths)
    stack: list[tuple[int, tuple[str | int, ...], Any]] = [(0, (), value)]
    while stack:
        depth, where, item = stack.pop()
        if _int_outside(item):
            why = f"integer outside the 64-bit range ({JSON_INT_MIN} to {JSON_INT_MAX})"
            return _dotted(path, where), f"{why}; send so large a number as a string"
        if not isinstance(item, dict | list | tuple):
            continue
        if depth >= MAX_JSON_DEPTH:
            why = f"JSON nested more than {MAX_JSON_DEPTH} levels deep; nest it less deeply"
            return _dotted(path, _field_of(where)), why
        children = item.items() if isinstance(item, dict) else enumerate(item)
        kept = depth < _KEPT_SEGMENTS
        stack.extend((depth + 1, (*where, key) if kept else where, child) for key, child in reversed(list(children)))
    return None


def _field_of(where: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The first levels of ``where`` up to its last object key: the field, not its indices."""
    named = list(where[:_DEPTH_PATH_SEGMENTS])
    while named and isinstance(named[-1], int):
        named.pop()
    return tuple(named)


def _dotted(path: str, where: tuple[str | int, ...]) -> str:
    return ".".join([path] * bool(path) + [str(p) for p in where])


def check_json_limits(value: Any, *, field: str = "") -> None:
    """Raise :class:`InvalidInput` naming where ``value`` (prefixed with ``field``) nests past
    :data:`MAX_JSON_DEPTH` or holds an integer past 64 bits (``metadata.n: integer outside ...``)."""
    found = find_json_past_limits(value, path=field)
    if found is not None:
        where = clipped(found[0] or "body")
        raise InvalidInput(f"{where}: {found[1]}", field=where)
