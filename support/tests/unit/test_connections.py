"""The Redis client's hiredis command packing: the same bytes redis-py's own packer writes."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from shared.lib.connections import _fast_connection

COMMANDS: list[tuple[Any, ...]] = [
    ("SET", "key", "välue", "EX", 30),
    (b"EVALSHA", b"abc", 2, "k1", b"k2", 0.25, 1e20, -7),
    ("CONFIG GET", "maxmemory"),  # a two-word command name is split, as redis-py does
    ("XADD", "s", "MAXLEN", "~", 100_000, "*", "e", b"\x00\xff" * 70_000),  # past the chunking cutoff
]


@pytest.mark.parametrize("cls", [Connection, UnixDomainSocketConnection])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_packed_bytes_match_redis_py(cls: type[Any], command: tuple[Any, ...]) -> None:
    ours, theirs = _fast_connection(cls)(), cls()
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))


def test_one_class_per_connection_kind() -> None:
    assert _fast_connection(Connection) is _fast_connection(Connection)
    assert issubclass(_fast_connection(UnixDomainSocketConnection), UnixDomainSocketConnection)


def test_unpackable_argument_is_a_data_error() -> None:
    with pytest.raises(DataError):
        _fast_connection(Connection)().pack_command("SET", "key", object())
