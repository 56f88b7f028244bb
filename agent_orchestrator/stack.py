"""The whole platform as OS processes: servers, registry, agents, orchestrators.

``agent-orchestrator up`` and ``demo`` use :class:`Stack`. It starts embedded
PostgreSQL and Redis unless URLs are configured, then each service as its own
``python -m agent_orchestrator ...`` process with its log under
``<data_dir>/logs``, waits until each answers ``/ready``, and stops everything
it started on exit: agents and orchestrators first, the registry once they have
deregistered, the servers last. While it runs, the secrets its services share (given, or
generated where unset) and where its servers and services are reached are in
``<data_dir>/stack.env``, 0600, for the commands and programs run beside it
(``shared.lib.running_stack``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.lib.bootstrap import preflight
from shared.lib.embedded import EmbeddedServers, free_port
from shared.lib.errors import StartupError
from shared.lib.http_service import check_port_free
from shared.lib.running_stack import remove_stack_env, write_stack_env
from shared.lib.settings import SECRETS, Settings, env_var

__all__ = ["AGENT_NAMES", "SERVICE_NAMES", "Stack", "StackProcess", "ready_service", "spawn_cli"]

_log = logging.getLogger(__name__)

AGENT_NAMES = ("feature-dev", "code-review", "infrastructure", "cicd", "documentation")
#: Every service with a port of its own in the settings (``AO_PORTS``).
SERVICE_NAMES = ("agent-registry", *AGENT_NAMES, "orchestrator")
_READY_TIMEOUT_S = 60.0
#: Past its drain grace (``agent_drain_grace_s``), how long an instance may take to deregister and exit.
_STOP_MARGIN_S = 10.0
#: How long the registry, stopped last, may take to exit.
_REGISTRY_STOP_S = 10.0
#: A supervised service that exits by itself starts again after 1 s, then 2, 4 ... up to this.
_RESTART_MAX_DELAY_S = 30.0
#: A restart that stays up this long starts the back-off again from 1 s.
_RESTART_RESET_S = 60.0


def spawn_cli(args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``agent-orchestrator ARGS...`` as its own process (own session), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent_orchestrator", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def ready_service(ready: httpx.Response) -> str | None:
    """The service a ``/ready`` answer names (None: not one of ours)."""
    try:
        body = ready.json()
    except ValueError:
        return None
    return body.get("service") if isinstance(body, dict) else None


def _stack_secrets(env: dict[str, str]) -> dict[str, str]:
    """The secrets of the stack's environment (generated or given), as ``stack.env`` keeps them."""
    return {name: env[name] for name in (env_var(field) for field in SECRETS) if name in env}


@dataclass
class StackProcess:
    name: str
    args: list[str]
    url: str
    log: Path
    service: str
    """What its ``/ready`` says it is (the registry, an agent's name, the orchestrator)."""
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    """When it was started last (monotonic)."""
    restarts: int = 0
    """Restarts in a row, each within :data:`_RESTART_RESET_S` of the one before: the back-off's exponent."""
    restart_at: float | None = None
    """When it starts again, once :meth:`Stack.supervise` saw it exit (monotonic)."""

    def spawn(self, env: dict[str, str]) -> None:
        self.proc = spawn_cli(self.args, env=env, log=self.log)
        self.started_at = time.monotonic()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    """Servers and services for one machine; ``extra_instances`` adds instances per agent."""

    settings: Settings
    dev_mode: bool = False
    extra_instances: dict[str, int] = field(default_factory=dict)
    orchestrator_replicas: int = 1
    env_overrides: dict[str, str] = field(default_factory=dict)
    processes: list[StackProcess] = field(default_factory=list)
    api_key: str = ""
    secrets_file: Path | None = None
    """Where the stack keeps the secrets it runs with, while it runs (``<data_dir>/stack.env``)."""
    _servers: EmbeddedServers | None = None
    _env: dict[str, str] = field(default_factory=dict)
    _spare_ports: set[int] = field(default_factory=set)

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._check_ports()
            self._start_servers()
            asyncio.run(preflight(self.settings))
            self._spawn_and_wait(
                [self._service("agent-registry", ["registry"], self.settings.port_for("agent-registry"))]
            )
            agents = [self._service(n, ["agent", n], self.settings.port_for(n), instance=f"{n}-1") for n in AGENT_NAMES]
            for name, extra in self.extra_instances.items():
                agents += [
                    self._service(name, ["agent", name], self._spare_port(), instance=f"{name}-{i + 2}")
                    for i in range(extra)
                ]
            orchestrators = [
                self._service(
                    "orchestrator", ["serve"], self.settings.port_for("orchestrator"), instance="orchestrator-1"
                )
            ]
            orchestrators += [
                self._service("orchestrator", ["serve"], self._spare_port(), instance=f"orchestrator-{i + 2}")
                for i in range(self.orchestrator_replicas - 1)
            ]
            self._spawn_and_wait(agents + orchestrators)
        except BaseException:
            self.stop()
            raise

    def _spare_port(self) -> int:
        """A free port for an extra instance: none of the services' own ports (not all bound yet)
        and none given before (a port just freed can be picked again)."""
        taken = {self.settings.port_for(name) for name in SERVICE_NAMES} | self._spare_ports
        while (port := free_port(self.settings.host)) in taken:
            continue
        self._spare_ports.add(port)
        return port

    def _check_ports(self) -> None:
        """Refuse to start when a service's port is taken, before anything was spawned."""
        for service in SERVICE_NAMES:
            check_port_free(self.settings.host, self.settings.port_for(service), service)

    def _start_servers(self) -> None:
        self._servers = EmbeddedServers(self.settings.data_dir)
        db_url, redis_url = self._servers.ensure(
            database_url=self.settings.database_url, redis_url=self.settings.redis_url
        )
        self.settings = self.settings.model_copy(update={"database_url": db_url, "redis_url": redis_url})
        secrets_env = self._secrets()
        reach = {
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "AO_REDIS_PREFIX": self.settings.redis_prefix,
            "REGISTRY_URL": self.settings.url_for("agent-registry"),
            "ORCHESTRATOR_URL": self.settings.url_for("orchestrator"),
        }
        self.secrets_file = write_stack_env(
            self.settings.data_dir, {**_stack_secrets(secrets_env), **reach}, pid=os.getpid()
        )
        self._env = {
            **os.environ,
            **secrets_env,
            **self.env_overrides,
            **reach,
            "AO_PORTS": json.dumps(self.settings.ports),
            "AO_DATA_DIR": str(self.settings.data_dir.resolve()),
            "AO_HOST": self.settings.host,
        }

    def _secrets(self) -> dict[str, str]:
        """Random secrets for any that are unset, so the stack never runs on defaults."""
        s = self.settings
        out = {"AO_DEV_MODE": "true" if self.dev_mode else "false"}
        keys = s.api_keys or [secrets.token_urlsafe(24)]
        out["AO_API_KEYS"] = ",".join(keys)
        out["AO_REGISTRATION_SECRET"] = s.registration_secret or secrets.token_urlsafe(32)
        out["AO_SIGNING_KEY"] = s.signing_key or secrets.token_urlsafe(32)
        self.api_key = keys[0]
        return out

    def _service(self, name: str, args: list[str], port: int, *, instance: str | None = None) -> StackProcess:
        log_dir = self.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        label = instance or name
        full = [*args, "--port", str(port)]
        if instance and args[0] == "agent":
            full += ["--instance-id", label]
        return StackProcess(
            name=label, args=full, url=f"http://{self.settings.host}:{port}", log=log_dir / f"{label}.log", service=name
        )

    def _spawn_and_wait(self, group: list[StackProcess]) -> None:
        for sp in group:
            sp.spawn(self._env)
            self.processes.append(sp)
        for sp in group:
            self._wait_ready(sp)

    def _wait_ready(self, sp: StackProcess) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        assert sp.proc is not None
        while time.monotonic() < deadline:
            if sp.proc.poll() is not None:
                raise StartupError(
                    f"{sp.name} exited with code {sp.proc.returncode} during start-up: "
                    f"{sp.tail(3).strip()} (log: {sp.log})"
                )
            try:
                r = httpx.get(f"{sp.url}/ready", timeout=1.0)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                if (answered := ready_service(r)) == sp.service:
                    return
                raise StartupError(f"{sp.url} answers as {answered}, not {sp.service}: another process has its port")
            time.sleep(0.1)
        raise StartupError(f"{sp.name} was not ready within {_READY_TIMEOUT_S:.0f}s (log: {sp.log})")

    # -- operate ---------------------------------------------------------------------------------
    def find(self, name: str) -> list[StackProcess]:
        return [p for p in self.processes if p.name == name or p.name.startswith(f"{name}-")]

    def kill9(self, sp: StackProcess) -> None:
        if sp.proc is not None and sp.proc.poll() is None:
            os.kill(sp.proc.pid, signal.SIGKILL)
            sp.proc.wait(timeout=10)

    def restart(self, sp: StackProcess) -> None:
        """Start ``sp`` again with its own arguments (after :meth:`kill9`, say); wait until it is ready."""
        sp.spawn(self._env)
        self._wait_ready(sp)

    def supervise(self) -> list[str]:
        """Start again each service that exited by itself (``up`` calls this every second), after
        a back-off: 1 s, doubling up to :data:`_RESTART_MAX_DELAY_S`, from 1 s again once a
        restart stayed up :data:`_RESTART_RESET_S`; and, at once, an embedded server that exited
        (the services reconnect by themselves). Returns what it did, a line each."""
        now = time.monotonic()
        said = self._servers.revive() if self._servers is not None else []
        for sp in self.processes:
            if sp.proc is None or (code := sp.proc.poll()) is None:
                continue
            if sp.restart_at is None:
                sp.restarts = 0 if now - sp.started_at >= _RESTART_RESET_S else sp.restarts
                delay = min(_RESTART_MAX_DELAY_S, 2.0**sp.restarts)
                sp.restart_at = now + delay
                said.append(f"{sp.name} exited with code {code}; starting it again in {delay:.0f}s (log: {sp.log})")
            elif now >= sp.restart_at:
                sp.spawn(self._env)
                sp.restarts += 1
                sp.restart_at = None
                said.append(f"{sp.name} started again (restart {sp.restarts} in a row; log: {sp.log})")
        return said

    @property
    def orchestrator_url(self) -> str:
        return self.settings.url_for("orchestrator")

    @property
    def env(self) -> dict[str, str]:
        return dict(self._env)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the agents and orchestrators, then the registry, then the servers.

        The registry goes last so that every instance can still deregister while it drains
        (stopped together, a slower agent found it gone and stayed ``active`` in its table).
        """
        services = [p for p in reversed(self.processes) if p.service != "agent-registry"]
        registry = [p for p in self.processes if p.service == "agent-registry"]
        self._terminate(services, grace_s=self.settings.agent_drain_grace_s + _STOP_MARGIN_S)
        self._terminate(registry, grace_s=_REGISTRY_STOP_S)
        self.processes.clear()
        if self.secrets_file is not None:
            remove_stack_env(self.settings.data_dir)
            self.secrets_file = None
        if self._servers is not None:
            self._servers.stop()
            self._servers = None

    @staticmethod
    def _terminate(group: list[StackProcess], *, grace_s: float) -> None:
        """SIGTERM every live process of ``group``, wait up to ``grace_s`` for all, SIGKILL stragglers."""
        alive = [p for p in group if p.proc is not None and p.proc.poll() is None]
        for sp in alive:
            assert sp.proc is not None
            sp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for sp in alive:
            assert sp.proc is not None
            try:
                sp.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log.warning("%s ignored SIGTERM for %.0fs; killing it", sp.name, grace_s)
                sp.proc.kill()
                sp.proc.wait(timeout=10)
