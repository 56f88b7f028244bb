"""Which servers and secrets the commands run beside a stack use when the environment gives
none: the operator commands (``locks``, ``dlq``) and services started by hand reach the
embedded servers a running stack keeps under the data dir, or none (one line, exit 2), and
take the secrets of its ``stack.env``."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.lib.embedded import EmbeddedServers
from shared.lib.migrations import apply_migrations
from shared.lib.running_stack import remove_stack_env, write_stack_env
from support.tests.conftest import TEST_SECRETS
from support.tests.integration.conftest import run_cli
from support.tests.procs import ServiceProcess, free_port

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


@pytest.fixture
def stack_env_file(running_stack_servers: Path) -> Iterator[dict[str, str]]:
    """The running stack's ``stack.env`` under its data dir, as `up` writes it; removed afterwards."""
    written = {k: f"{v}-of-the-stack" for k, v in TEST_SECRETS.items()}
    write_stack_env(running_stack_servers, written, pid=os.getpid())
    yield written
    remove_stack_env(running_stack_servers)


async def test_a_service_started_by_hand_joins_the_running_stack(
    running_stack_servers: Path, stack_env_file: dict[str, str], tmp_path: Path
) -> None:
    """`registry` started by hand with no URL and no secret in its environment reaches the stack's
    embedded servers and takes the stack's secrets: it answers /ready and accepts the stack's
    API key, not another."""
    port = free_port()
    env = {k: v for k, v in _env(running_stack_servers).items() if k not in TEST_SECRETS}
    proc = ServiceProcess(["registry", "--port", str(port)], env, tmp_path / "registry.log", f"http://127.0.0.1:{port}")
    proc.start()
    try:
        async with httpx.AsyncClient(base_url=proc.url or "", timeout=5) as http:
            ours = await http.get("/agents", headers={"X-API-Key": stack_env_file["AO_API_KEYS"]})
            theirs = await http.get("/agents", headers={"X-API-Key": TEST_SECRETS["AO_API_KEYS"]})
        assert (ours.status_code, theirs.status_code) == (200, 401), (ours.text, theirs.text)
    finally:
        proc.stop()


async def test_an_operator_command_takes_the_stack_secrets_the_environment_leaves_unset(
    running_stack_servers: Path, stack_env_file: dict[str, str]
) -> None:
    """`dlq requeue` signs, so it needs AO_SIGNING_KEY: with none in the environment it takes the
    running stack's (and goes on to look the id up), and with none anywhere it says to set it."""
    env = {k: v for k, v in _env(running_stack_servers).items() if k not in TEST_SECRETS}
    code, out = await run_cli(env, "dlq", "requeue", "documentation/1-0")
    assert (code, out.strip()) == (2, "error: no dead letter 'documentation/1-0'; list them with `dlq list`")
    remove_stack_env(running_stack_servers)
    code, out = await run_cli(env, "dlq", "requeue", "documentation/1-0")
    assert code == 2, out
    assert "AO_SIGNING_KEY is unset" in out, out
