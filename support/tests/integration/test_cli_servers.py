"""Which servers the operator commands (``locks``, ``dlq``) reach when no URL is set: the
embedded ones a running stack keeps under the data dir, or none (one line, exit 2)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.lib.embedded import EmbeddedServers
from shared.lib.migrations import apply_migrations
from support.tests.conftest import TEST_SECRETS
from support.tests.integration.conftest import run_cli

pytestmark = pytest.mark.slow

OPERATOR_COMMANDS = [
    ("locks", "list"),
    ("locks", "release", "env:x", "--reason", "stuck"),
    ("dlq", "list"),
]


def _env(data_dir: Path) -> dict[str, str]:
    """The environment of an operator with no server URLs, in a data dir of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_") and k not in ("DATABASE_URL", "REDIS_URL")}
    return {**env, **TEST_SECRETS, "AO_DATA_DIR": str(data_dir)}


@pytest.mark.parametrize("args", OPERATOR_COMMANDS, ids=" ".join)
async def test_no_servers_fail_with_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    """With no URL and no stack running, an operator command exits 2 with one line saying what to
    set, and starts no server of its own (the data dir stays empty)."""
    data_dir = tmp_path / "data"
    code, out = await run_cli(_env(data_dir), *args)
    assert code == 2, out
    assert len(out.strip().splitlines()) == 1, out
    assert out.startswith("error: no "), out
    assert "_URL, or start the stack (`agent-orchestrator up`)" in out, out
    assert not data_dir.exists() or not any(data_dir.iterdir()), list(data_dir.iterdir())


@pytest.fixture(scope="module")
def running_stack_servers() -> Iterator[Path]:
    """Embedded servers running under a data dir, migrated, as `agent-orchestrator up` leaves them
    (outside pytest's temp tree, which is 0700 to the embedded PostgreSQL's own user)."""
    data_dir = Path(tempfile.mkdtemp(prefix="ao-test-cli-servers-"))
    servers = EmbeddedServers(data_dir)
    try:
        db_url, _ = servers.ensure(database_url=None, redis_url=None)
        asyncio.run(apply_migrations(db_url))
        yield data_dir
    finally:
        servers.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("locks", "list"), "no resource is locked"),
        (("dlq", "list"), "no dead letters"),
    ],
)
async def test_running_embedded_servers_are_used(
    running_stack_servers: Path, args: tuple[str, ...], expected: str
) -> None:
    """With no URL, an operator command connects to the embedded servers running under the data dir."""
    code, out = await run_cli(_env(running_stack_servers), *args)
    assert (code, out.strip()) == (0, expected)
