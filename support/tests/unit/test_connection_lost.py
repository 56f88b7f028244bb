"""``connection_lost``: a lost or refused connection to PostgreSQL or Redis, anywhere in an
error's chain, is the servers' trouble (the runner resumes the workflow), not the request's."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest
import redis.exceptions

from shared.lib.connections import connection_lost


def _raised_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as e:
            raise RuntimeError("call 1 (cicd RUN_PIPELINE) failed") from e
    except RuntimeError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (redis.exceptions.ConnectionError("Connection closed by server."), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (_raised_from(BrokenPipeError(32, "Broken pipe")), True),
        (FileNotFoundError(2, "No such file or directory", "docs/calc.md"), False),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False),
        (_raised_from(ValueError("bad input")), False),
    ],
)
def test_connection_lost_tells_the_servers_trouble_from_the_requests(exc: BaseException, lost: bool) -> None:
    """A workflow that failed because a connection was lost is resumed, not failed (the runner)."""
    assert connection_lost(exc) is lost
