"""``agent-orchestrator up`` as a real process: what it prints, what ``run --follow`` prints
against it, the secrets it generates and keeps for the commands run beside it, that it starts
again an agent killed under it and its embedded Redis, and that stopping it leaves no
instance registered and no secrets file."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from agent_orchestrator.demo import make_sample_repo
from agent_orchestrator.stack import SERVICE_NAMES
from shared.lib.connections import create_database, drop_database, with_database
from shared.lib.running_stack import read_stack_env
from support.tests.conftest import delete_prefix
from support.tests.e2e.conftest import registered_instances
from support.tests.procs import ServiceProcess, free_port, free_ports

pytestmark = pytest.mark.slow

#: Narrower than one line of ``up``'s listing, so anything that wraps does.
_COLUMNS = "60"
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def up_env(server_urls: tuple[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of an `up` with its own database, Redis prefix, ports and data dir, and no
    secrets: `up` generates them, as on a fresh checkout."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    db_url = asyncio.run(create_database(server_urls[0], name))
    prefix = f"t{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AO_")}
    env.update(
        DATABASE_URL=db_url,
        REDIS_URL=server_urls[1],
        AO_REDIS_PREFIX=prefix,
        AO_PORTS=json.dumps(free_ports(list(SERVICE_NAMES))),
        AO_DATA_DIR=str(tmp_path / "data"),
        AO_HEARTBEAT_INTERVAL_S="1",
        COLUMNS=_COLUMNS,
    )
    yield env
    asyncio.run(drop_database(with_database(server_urls[0], "postgres"), name))
    delete_prefix(server_urls[1], prefix)


def _wait_up(proc: subprocess.Popen[str], log: Path, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Ctrl-C stops everything" in text:
            return text
        assert proc.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(f"up not ready after {timeout_s}s:\n{log.read_text()}")


def test_up_prints_whole_paths_follows_and_stops_clean(up_env: dict[str, str], tmp_path: Path) -> None:
    """`up` prints each log path whole on its service's line in a narrow terminal, and where it
    keeps the secrets it generated (stack.env, 0600); `run --follow`, with no secret in its
    environment, takes the API key from there, prints the workflow id whole and starts its final
    table on a line of its own; an agent started by hand registers with the stack's secret; after
    `up` stops (SIGTERM), no instance it registered is left in the registry, nor the secrets file."""
    log = tmp_path / "up.log"
    up_env = {k: v for k, v in up_env.items() if k != "REDIS_URL"}  # its own embedded Redis, to kill
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_orchestrator", "up"],
            env=up_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    try:
        shown = _wait_up(proc, log)
        logs_dir = Path(up_env["AO_DATA_DIR"]).resolve() / "logs"
        for name in ("agent-registry", "feature-dev-1", "documentation-2", "orchestrator-1"):
            assert re.search(rf"^  {name} +http://\S+  \(log: {logs_dir}/{name}\.log\)$", shown, re.M), shown
        secrets = Path(up_env["AO_DATA_DIR"]).resolve() / "stack.env"
        assert re.search(rf"^  secrets: {re.escape(str(secrets))}   \(mode 0600", shown, re.M), shown
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
        written = read_stack_env(secrets.parent)
        assert set(written) == {"AO_API_KEYS", "AO_REGISTRATION_SECRET", "AO_SIGNING_KEY", *_REACH}
        assert f"API key: {written['AO_API_KEYS']} " in shown
        _agent_by_hand_registers(up_env, tmp_path)
        _the_worked_example_runs_with_stack_env_alone(written, tmp_path)
        _a_killed_agent_starts_again(up_env, log)
        _a_killed_redis_starts_again(up_env, log)
        repo, _, _ = make_sample_repo(tmp_path / "repo")
        follow = subprocess.run(
            [sys.executable, "-m", "agent_orchestrator", "run", "parallel_docs", "--follow", "--input",
             json.dumps({"repo_path": str(repo), "modules": ["calc"]})],
            env=up_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert follow.returncode == 0, follow.stdout + follow.stderr
        lines = follow.stdout.splitlines()
        titles = [ln for ln in lines if ln.strip().startswith("workflow ")]
        assert titles, follow.stdout
        assert all(_ID.search(t) for t in titles), follow.stdout
        assert all(ln.endswith(("┘", "┐", "┤", "│", "─")) or "┘" not in ln for ln in lines), follow.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert asyncio.run(registered_instances(up_env["DATABASE_URL"])) == {}, log.read_text()[-3000:]
    assert not secrets.exists()


#: What stack.env says, beside the secrets, of where the stack is reached.
_REACH = ("DATABASE_URL", "REDIS_URL", "AO_REDIS_PREFIX", "REGISTRY_URL", "ORCHESTRATOR_URL")


def _the_worked_example_runs_with_stack_env_alone(written: dict[str, str], tmp_path: Path) -> None:
    """docs/EVENT_PROTOCOL.md's worked example, run from the repository's root in an environment
    of stack.env alone (as `set -a; . .data/stack.env` gives a shell), reaches the stack's
    code-review agent: stack.env held only the secrets, and the example failed with
    "cannot connect to Redis at None"."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "EVENT_PROTOCOL.md").read_text()
    example = re.search(r"## A worked example\n.*?```python\n(.*?)```", doc, re.S)
    assert example is not None
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AO_DATA_DIR": str(tmp_path / "elsewhere"), **written}
    ran = subprocess.run(
        [sys.executable, "-c", example.group(1)],
        cwd=Path(__file__).resolve().parents[3], env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("code-review-1 {'module': 'shared.lib.errors', 'path': 'shared/lib/errors.py'"), (
        ran.stdout
    )


def _pid_serving(port: int) -> int:
    """The pid of the stack's process started with ``--port PORT``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"agent_orchestrator" in args and f"--port\0{port}\0".encode() in b"\0".join(args) + b"\0":
            return int(cmdline.parent.name)
    raise AssertionError(f"no process serves port {port}")


def _a_killed_agent_starts_again(up_env: dict[str, str], log: Path) -> None:
    """kill -9 of code-review-1: `up` says so, starts it again after 1 s with the same instance id,
    and the new process answers /ready and is `active` in the registry again."""
    port = json.loads(up_env["AO_PORTS"])["code-review"]
    victim = _pid_serving(port)
    registered = asyncio.run(_registration(up_env["DATABASE_URL"], "code-review-1"))[1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "code-review-1 started again" not in (text := log.read_text()):
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.2)
    assert re.search(r"^code-review-1 exited with code -9; starting it again in 1s \(log: \S+\)$", text, re.M), text
    assert _pid_serving(port) != victim
    while not _ready(f"http://127.0.0.1:{port}/ready"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    while True:  # registered again, by the new process, and active
        status, at = asyncio.run(_registration(up_env["DATABASE_URL"], "code-review-1"))
        if status == "active" and at > registered:
            break
        assert time.monotonic() < deadline, (status, at, log.read_text()[-3000:])
        time.sleep(0.2)


def _a_killed_redis_starts_again(up_env: dict[str, str], log: Path) -> None:
    """kill -9 of the embedded Redis `up` started: `up` says so and starts it again on the same
    URL and data (its append-only file), and the orchestrator is ready again by itself (the
    `run --follow` after this goes through it)."""
    redis_dir = Path(up_env["AO_DATA_DIR"]).resolve() / "redis"
    victim = int((redis_dir / "redis.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "embedded Redis exited; started it again" not in (text := log.read_text()):
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.2)
    assert int((redis_dir / "redis.pid").read_text()) != victim
    orchestrator = f"http://127.0.0.1:{json.loads(up_env['AO_PORTS'])['orchestrator']}/ready"
    while not _ready(orchestrator):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


async def _registration(database_url: str, instance: str) -> tuple[str, datetime]:
    """An instance's status and when it (last) registered."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT status, registered_at FROM agent_instances WHERE id = $1", instance)
    finally:
        await conn.close()
    assert row is not None, instance
    return row["status"], row["registered_at"]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _agent_by_hand_registers(up_env: dict[str, str], tmp_path: Path) -> None:
    """An agent started by hand beside the stack, with no secret in its environment, registers
    with the stack's registration secret (and so becomes active in its registry)."""
    port = free_port()
    agent = ServiceProcess(
        ["agent", "documentation", "--port", str(port), "--instance-id", "documentation-by-hand"],
        up_env,
        tmp_path / "by-hand.log",
        f"http://127.0.0.1:{port}",
    )
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while asyncio.run(registered_instances(up_env["DATABASE_URL"])).get("documentation-by-hand") != "active":
            assert time.monotonic() < deadline, agent.output()[-3000:]
            time.sleep(0.2)
    finally:
        assert agent.stop() in (0, -signal.SIGTERM), agent.output()[-3000:]
