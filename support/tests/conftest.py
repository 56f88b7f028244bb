"""Fixtures shared by every test: real PostgreSQL and Redis, isolated per test.

The servers are the ones named by ``DATABASE_URL`` / ``REDIS_URL`` when set, and
embedded ones started for the session otherwise. Each test gets its own
database (``test_<uuid>``, migrated, dropped afterwards) and its own Redis key
prefix (its keys deleted afterwards) — never a global flush.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agent_orchestrator.stack import SERVICE_NAMES
from shared.lib.connections import create_database, drop_database, with_database
from shared.lib.embedded import EmbeddedServers
from shared.lib.migrations import apply_migrations
from shared.lib.settings import Settings
from support.tests.procs import ServiceProcess, free_ports

TEST_SECRETS = {
    "AO_API_KEYS": "test-api-key",
    "AO_REGISTRATION_SECRET": "test-registration-secret-0123456789",
    "AO_SIGNING_KEY": "test-signing-key-0123456789abcdef",
}


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    """(admin PostgreSQL URL, Redis URL) of real servers for the whole session.

    Embedded servers keep their data outside pytest's temp tree: pytest resets that
    tree to mode 0700 whenever a session starts, which would lock out the
    unprivileged user the embedded PostgreSQL runs as.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="ao-test-servers-"))
    embedded = EmbeddedServers(data_dir)
    try:
        yield embedded.ensure(
            database_url=os.environ.get("DATABASE_URL") or None, redis_url=os.environ.get("REDIS_URL") or None
        )
    finally:
        embedded.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def database_url(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own, dropped afterwards."""
    admin_url = server_urls[0]
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = await create_database(admin_url, name)
    await apply_migrations(url)
    yield url
    await drop_database(with_database(admin_url, "postgres"), name)


@pytest.fixture
def redis_url(server_urls: tuple[str, str]) -> str:
    return server_urls[1]


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (a test's own), so a shared Redis keeps nothing of it."""
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.unlink(key)
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def ports() -> dict[str, int]:
    """A free loopback port for every service, so tests never collide with a running stack."""
    return free_ports(list(SERVICE_NAMES))


@pytest.fixture
def settings_factory(
    database_url: str, redis_url: str, redis_prefix: str, ports: dict[str, int], tmp_path: Path
) -> Callable[..., Settings]:
    """Build Settings for this test's database, prefix, ports and data dir."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "ports": ports,
            "data_dir": tmp_path / "data",
            "registry_url": f"http://127.0.0.1:{ports['agent-registry']}",
            "api_keys": [TEST_SECRETS["AO_API_KEYS"]],
            "registration_secret": TEST_SECRETS["AO_REGISTRATION_SECRET"],
            "signing_key": TEST_SECRETS["AO_SIGNING_KEY"],
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def service_env(
    database_url: str, redis_url: str, redis_prefix: str, ports: dict[str, int], tmp_path: Path
) -> dict[str, str]:
    """Environment for child service processes, matching ``settings_factory``."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_")}
    env.update(TEST_SECRETS)
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AO_REDIS_PREFIX": redis_prefix,
            "AO_PORTS": json.dumps(ports),
            "AO_DATA_DIR": str(tmp_path / "data"),
            "REGISTRY_URL": f"http://127.0.0.1:{ports['agent-registry']}",
            "AO_HEARTBEAT_INTERVAL_S": "1",
            "AO_LOG_LEVEL": "INFO",
        }
    )
    return env


@pytest.fixture
def spawn(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``agent-orchestrator ARGS...`` as a real process; everything is stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(
        *args: str,
        url: str | None = None,
        env: dict[str, str] | None = None,
        ready_path: str | None = "/ready",
        name: str | None = None,
    ) -> ServiceProcess:
        log = tmp_path / "logs" / f"{name or args[0]}-{len(started)}.log"
        proc = ServiceProcess(list(args), {**service_env, **(env or {})}, log, url)
        started.append(proc)
        return proc.start(ready_path=ready_path)

    yield start
    for proc in reversed(started):
        proc.stop(timeout_s=10)
