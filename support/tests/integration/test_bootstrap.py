"""Start-up: migrations, embedded servers, settings and the errors a bad start gets."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from shared.lib.connections import connect_postgres
from shared.lib.embedded import EmbeddedRedis, EmbeddedServers
from shared.lib.errors import StartupError
from shared.lib.migrations import MIGRATIONS, apply_migrations
from shared.lib.running_stack import remove_stack_env, write_stack_env
from shared.lib.settings import load_settings
from support.tests.procs import free_port


async def test_migrations_twice_are_a_no_op(database_url: str) -> None:
    """A migrated database reports nothing to apply, and every migration is recorded once."""
    again = await apply_migrations(database_url)
    assert again.applied == []
    conn = await connect_postgres(database_url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await conn.close()
    assert versions == list(range(1, len(MIGRATIONS) + 1))


async def test_concurrent_migrations_apply_each_file_once(server_urls: tuple[str, str]) -> None:
    """Four processes' worth of concurrent migrators serialise on the advisory lock."""
    from shared.lib.connections import create_database, drop_database, with_database

    name = f"test_mig_{os.getpid()}_{free_port()}"
    url = await create_database(server_urls[0], name)
    try:
        results = await asyncio.gather(*(apply_migrations(url) for _ in range(4)))
        assert sorted(len(r.applied) for r in results) == [0, 0, 0, len(MIGRATIONS)]
    finally:
        await drop_database(with_database(server_urls[0], "postgres"), name)


def test_embedded_redis_is_reused_and_only_its_starter_stops_it(tmp_path: Path) -> None:
    """A second start finds the running server and leaves it running when it stops."""
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    second = EmbeddedRedis(tmp_path)
    try:
        assert second.start() == url
        assert first.started
        assert not second.started
        second.stop()
        assert second._alive(url)
    finally:
        first.stop()
    assert not first._alive(url)
    assert (tmp_path / "redis" / "appendonlydir").exists() or (tmp_path / "redis" / "appendonly.aof").exists()


def test_embedded_servers_that_exit_are_started_again_on_the_same_urls_and_data() -> None:
    """kill -9 of the embedded PostgreSQL and Redis: ``revive`` (what ``up`` runs every second)
    starts each again, on the URL its clients hold, with what it stored; until then it says
    nothing for a server that runs. (In a directory outside pytest's temp tree, which is 0700 to
    the embedded PostgreSQL's own user.)"""
    data_dir = Path(tempfile.mkdtemp(prefix="ao-test-revive-"))
    servers = EmbeddedServers(data_dir)
    try:
        db_url, redis_url = servers.ensure(database_url=None, redis_url=None)
        assert servers.revive() == []
        r = redis.Redis.from_url(redis_url)
        r.config_set("appendfsync", "always")  # in the append-only file before the kill
        r.set("kept", "yes")
        r.close()
        assert servers.postgres is not None
        os.kill(servers.postgres._running_info().pid, signal.SIGKILL)
        os.kill(int((data_dir / "redis" / "redis.pid").read_text()), signal.SIGKILL)
        said: list[str] = []
        deadline = time.monotonic() + 60
        while sum("started it again" in line for line in said) < 2:
            assert time.monotonic() < deadline, said
            time.sleep(0.5)
            said += servers.revive()
        assert any(line.startswith("embedded PostgreSQL exited; started it again") for line in said), said
        assert any(line.startswith("embedded Redis exited; started it again") for line in said), said
        assert redis.Redis.from_url(redis_url).get("kept") == b"yes"
        assert asyncio.run(_select_one(db_url)) == 1
    finally:
        servers.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _select_one(url: str) -> int:
    conn = await connect_postgres(url)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


def test_unsafe_default_secrets_are_refused_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dev mode a missing or default secret stops start-up with a message naming it."""
    for var in ("AO_DEV_MODE", "AO_SIGNING_KEY", "AO_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AO_REGISTRATION_SECRET", "changeme")
    with pytest.raises(StartupError, match="AO_REGISTRATION_SECRET"):
        load_settings()
    assert load_settings(dev_mode=True).dev_mode


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("AO_LOG_LEVEL", "LOUD", "AO_LOG_LEVEL: 'LOUD' is not a log level; use one of DEBUG, INFO, WARNING, ERROR"),
        ("AO_PORTS", "x", "AO_PORTS must be JSON"),
        ("AO_LOCK_TTL_S", "soon", "AO_LOCK_TTL_S: Input should be a valid number"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_its_variable(
    variable: str, value: str, expected: str, service_env: dict[str, str], ports: dict[str, int]
) -> None:
    """A value a setting cannot take (a log level logging does not know, JSON that is not) stops
    start-up with one line naming the variable and what it takes, exit 2, no traceback."""
    done = _start(["registry", "--port", str(ports["agent-registry"])], {**service_env, variable: value})
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: invalid configuration: {expected}"), done.stderr


def test_an_error_quoting_square_brackets_prints_them(service_env: dict[str, str]) -> None:
    """A CLI error is printed as it is: the id pattern an --instance-id must match keeps its
    character classes (rich took them for markup and printed ``^{0,63}$``)."""
    done = _start(["agent", "cicd", "--instance-id", "Bad Id", "--port", "1"], service_env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: --instance-id 'Bad Id' must match ^[a-z0-9][a-z0-9_-]{0,63}$"


def test_the_log_level_is_taken_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """AO_LOG_LEVEL=warning is WARNING, as logging and uvicorn both take it."""
    monkeypatch.setenv("AO_LOG_LEVEL", " warning")
    assert load_settings(dev_mode=True).log_level == "WARNING"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "http://127.0.0.1:8009"),
        ({"AO_PORTS": '{"agent-registry": 28009}'}, "http://127.0.0.1:28009"),
        ({"AO_PORTS": '{"agent-registry": 28009}', "AO_HOST": "10.0.0.7"}, "http://10.0.0.7:28009"),
        ({"AO_PORTS": '{"agent-registry": 28009}', "REGISTRY_URL": ""}, "http://127.0.0.1:28009"),
        ({"AO_PORTS": '{"agent-registry": 28009}', "REGISTRY_URL": "http://registry:8009"}, "http://registry:8009"),
    ],
    ids=["defaults", "ports", "host-and-ports", "blank", "given"],
)
def test_an_unset_registry_url_follows_host_and_ports(
    env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With REGISTRY_URL unset (or blank), services reach the registry where AO_HOST and AO_PORTS
    put it, as url_for does; a REGISTRY_URL that is given wins."""
    for var in ("REGISTRY_URL", "AO_REGISTRY_URL", "AO_PORTS", "AO_HOST"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = load_settings(dev_mode=True)
    assert settings.registry_url == expected
    if "REGISTRY_URL" not in env or not env["REGISTRY_URL"]:
        assert settings.registry_url == settings.url_for("agent-registry")


def test_a_running_stacks_secrets_fill_only_what_the_environment_leaves_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a stack's stack.env under the data dir (0600), settings take its secrets where neither
    the environment nor the caller gives one; what they give wins. Without the file, nothing."""
    for var in ("AO_DEV_MODE", "AO_API_KEYS", "AO_REGISTRATION_SECRET", "AO_SIGNING_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AO_DATA_DIR", str(tmp_path))
    stack = {"AO_API_KEYS": "k1,k2", "AO_REGISTRATION_SECRET": "it's the stack's", "AO_SIGNING_KEY": "stack-key"}
    path = write_stack_env(tmp_path, stack, pid=os.getpid())
    assert path == (tmp_path / "stack.env").resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = load_settings()
    assert (settings.api_keys, settings.registration_secret, settings.signing_key) == (
        ["k1", "k2"],
        "it's the stack's",
        "stack-key",
    )
    monkeypatch.setenv("AO_SIGNING_KEY", "from-the-environment")
    assert load_settings().signing_key == "from-the-environment"
    assert load_settings(signing_key="from-the-caller").signing_key == "from-the-caller"
    remove_stack_env(tmp_path)
    with pytest.raises(StartupError, match="AO_REGISTRATION_SECRET"):
        load_settings()


def _start(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("case", ["bad-database-url", "unreachable-redis", "port-taken"])
def test_bad_start_up_input_gets_one_line_and_non_zero_exit(
    case: str, service_env: dict[str, str], ports: dict[str, int]
) -> None:
    """A wrong DATABASE_URL, an unreachable Redis or a taken port: one clear line, exit 2, no traceback."""
    env = dict(service_env)
    if case == "bad-database-url":
        env["DATABASE_URL"] = env["DATABASE_URL"].replace("/test_", "/missing_")
    elif case == "unreachable-redis":
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    import socket

    with socket.socket() as taken:
        if case == "port-taken":
            taken.bind(("127.0.0.1", ports["agent-registry"]))
            taken.listen()
        done = _start(["registry"], env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    expected = {"bad-database-url": "PostgreSQL", "unreachable-redis": "Redis", "port-taken": "already in use"}[case]
    assert expected in errors[0]


def test_a_registry_out_of_reach_fails_the_start_of_the_orchestrator_and_an_agent_in_one_line(
    service_env: dict[str, str],
) -> None:
    """Started with no registry to register with (it never came up), the orchestrator and an agent
    each give up once registration's retries run out: one line naming the registry, exit 2."""
    commands = [["serve"], ["agent", "code-review"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "agent_orchestrator", *args],
            env=service_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    for args, proc in zip(commands, procs, strict=True):
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 2, (args, stderr)
        assert "Traceback" not in stderr, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, stderr
        assert f"could not register: the registry at {service_env['REGISTRY_URL']} is out of reach" in errors[0], errors
