"""Real OS processes for tests: spawn a service, wait until it answers, stop or kill it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent_orchestrator.stack import spawn_cli
from shared.lib.embedded import free_port

__all__ = ["ServiceProcess", "free_port", "free_ports", "wait_http"]


def free_ports(names: list[str]) -> dict[str, int]:
    """A free loopback port for each name, all different: each socket stays bound until every port
    is chosen (ports picked one at a time can come back twice, and two services then collide)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in names]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {name: int(s.getsockname()[1]) for name, s in zip(names, socks, strict=True)}


def wait_http(
    url: str, *, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{url} not ready after {timeout_s}s (last: {last}):\n{tail}")


@dataclass
class ServiceProcess:
    """One ``agent-orchestrator`` subcommand running as its own process."""

    args: list[str]
    env: dict[str, str]
    log: Path
    url: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, ready_path: str | None = "/ready", timeout_s: float = 30.0) -> ServiceProcess:
        self.proc = spawn_cli(self.args, env=self.env, log=self.log)
        if self.url and ready_path:
            wait_http(self.url + ready_path, timeout_s=timeout_s, proc=self.proc, log=self.log)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, *, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
