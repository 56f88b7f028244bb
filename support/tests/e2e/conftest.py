"""One real stack per test module: servers, registry, six agents, orchestrator(s).

Starting ~9 processes takes seconds, so tests in a module share a stack with its
own database, Redis prefix, ports and data directory, torn down at the end.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from agent_orchestrator.demo import make_sample_repo
from agent_orchestrator.stack import SERVICE_NAMES, Stack
from shared.lib.connections import create_database, drop_database, with_database
from shared.lib.migrations import apply_migrations
from shared.lib.settings import Settings
from support.tests.conftest import TEST_SECRETS, delete_prefix
from support.tests.procs import free_ports

STACK_ENV = {
    "AO_HEARTBEAT_INTERVAL_S": "1",
    "AO_AGENT_STALE_AFTER_S": "3",
    "AO_RUN_LEASE_TTL_S": "3",
    "AO_LOG_LEVEL": "INFO",
}


def start_stack(
    server_urls: tuple[str, str], tmp: Path, *, replicas: int = 1, docs: int = 2, env: dict[str, str] | None = None
) -> tuple[Stack, str]:
    """A started stack on a fresh database; returns it and the database name (to drop)."""
    admin, redis_url = server_urls
    name = f"test_{uuid.uuid4().hex[:12]}"
    db_url = asyncio.run(create_database(admin, name))
    asyncio.run(apply_migrations(db_url))
    ports = free_ports(list(SERVICE_NAMES))
    settings = Settings(
        database_url=db_url,
        redis_url=redis_url,
        redis_prefix=f"t{uuid.uuid4().hex[:10]}",
        ports=ports,
        data_dir=tmp / "data",
        api_keys=[TEST_SECRETS["AO_API_KEYS"]],
        registration_secret=TEST_SECRETS["AO_REGISTRATION_SECRET"],
        signing_key=TEST_SECRETS["AO_SIGNING_KEY"],
    )
    os.environ.pop("AO_DEV_MODE", None)
    stack = Stack(
        settings,
        extra_instances={"documentation": docs - 1},
        orchestrator_replicas=replicas,
        env_overrides={**STACK_ENV, **(env or {})},
    )
    stack.start()
    return stack, name


def stop_stack(stack: Stack, server_urls: tuple[str, str], db_name: str) -> None:
    """Stop a stack of :func:`start_stack`; drop its database and delete its Redis keys."""
    stack.stop()
    asyncio.run(drop_database(with_database(server_urls[0], "postgres"), db_name))
    delete_prefix(server_urls[1], stack.settings.redis_prefix)


async def registered_instances(database_url: str) -> dict[str, str]:
    """The registry's instances (id to status) in ``database_url``."""
    conn = await asyncpg.connect(database_url)
    try:
        return {r["id"]: r["status"] for r in await conn.fetch("SELECT id, status FROM agent_instances")}
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def stack(server_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real stack shared by the tests of one module."""
    s, name = start_stack(server_urls, tmp_path_factory.mktemp("stack"))
    yield s
    stop_stack(s, server_urls, name)


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client for the orchestrator API, with the API key."""
    with httpx.Client(base_url=stack.orchestrator_url, headers={"X-API-Key": stack.api_key}, timeout=30) as c:
        yield c


@pytest.fixture
def sample_repo(tmp_path: Path) -> tuple[Path, str, str]:
    """A git repository with a base commit and a head commit that adds a tested feature."""
    return make_sample_repo(tmp_path)
