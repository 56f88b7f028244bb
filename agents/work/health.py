"""Health probes of a deployment: HTTP and TCP targets, the release an
environment serves, and the request backlog pending on the bus.

Each probe returns :class:`Issue` values; an issue may carry the remediation
the infrastructure agent can apply to it (``deregister_instance``,
``reclaim_pending``, ``release_lock``, ``rollback``).

What may be probed is checked where a request names it (:class:`Target`,
:data:`Environment`), so a malformed host or URL is the caller's 422 naming it, not a
probe that fails in the socket layer: a 64-letter DNS label, an empty one (``a..b``)
or a bidi control is an ``idna`` UnicodeError there, ``http://[::1`` httpx's
InvalidURL, neither of which a probe reports as unreachable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import redis.asyncio as aioredis
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from redis.exceptions import ResponseError

from agents.work.release import check_environment, current_release
from shared.lib.redis_keys import BANDS, as_text, request_stream
from shared.lib.safe_input import clipped

__all__ = [
    "Environment",
    "Issue",
    "Probe",
    "Target",
    "probe_environment",
    "probe_http",
    "probe_pending",
    "probe_tcp",
]

#: A DNS label as resolvers take it: 1 to 63 letters, digits, '-' or '_' (IDNA encodes other letters).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
#: The longest DNS name, without its final dot.
_HOST_NAME_MAX = 253


def _host_name_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty or too long label, a character IDNA refuses (a bidi control)
        return False
    return len(name.rstrip(".")) <= _HOST_NAME_MAX and _HOST_NAME.match(name) is not None


#: What a host must be, said when it is not.
_HOST_RULE = "an IP address or a host name (dot-separated labels of 1 to 63 letters, digits, '-' or '_')"


def _check_host(host: str) -> str:
    if not _host_name_ok(host):
        raise ValueError(f"{clipped(host)!r} is not {_HOST_RULE}")
    return host


def _check_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ValueError(f"{clipped(url)!r} is not a URL: {clipped(str(e))}") from e
    if not parsed.host:
        raise ValueError(f"{clipped(url)!r} has no host; give http://HOST[:PORT]/PATH")
    if not _host_name_ok(parsed.host):
        raise ValueError(f"{clipped(url)!r} has host {clipped(parsed.host)!r}, which is not {_HOST_RULE}")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ValueError(f"{clipped(url)!r} has port {parsed.port}; give one from 1 to 65535")
    return url


#: An environment to probe: a name under the environments directory or an absolute path,
#: as :func:`agents.work.release.environment_dir` takes it.
Environment = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(check_environment)]


class Target(BaseModel):
    """An HTTP or TCP probe of HEALTH_CHECK (and of the workflows that ask for one)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["http", "tcp"]
    url: Annotated[str, Field(pattern=r"^https?://\S+$", max_length=4096), AfterValidator(_check_url)] | None = None
    host: Annotated[str, Field(min_length=1, max_length=_HOST_NAME_MAX + 1), AfterValidator(_check_host)] | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    expect_status: int = Field(default=200, ge=100, le=599)

    @model_validator(mode="after")
    def _address(self) -> Target:
        if self.kind == "http" and not self.url:
            raise ValueError("an http target needs a url")
        if self.kind == "tcp" and (not self.host or self.port is None):
            raise ValueError("a tcp target needs a host and a port")
        return self


@dataclass(frozen=True)
class Issue:
    """Something unhealthy, where, how bad, and what would fix it."""

    kind: str
    target: str
    severity: str  # "critical" fails the check; "warning" does not
    message: str
    remediation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """The outcome of one probe, healthy or not, with how long it took."""

    kind: str
    target: str
    healthy: bool
    latency_ms: float
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def probe_http(url: str, *, timeout_s: float, expect_status: int = 200) -> tuple[Probe, Issue | None]:
    """GET ``url``; anything but ``expect_status`` within ``timeout_s`` is a critical issue."""
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url)
    except httpx.HTTPError as e:
        probe = Probe("http", url, False, _ms(started), {"error": f"{type(e).__name__}: {e}"})
        return probe, Issue("http_unreachable", url, "critical", f"{url} did not answer: {type(e).__name__}")
    probe = Probe("http", url, response.status_code == expect_status, _ms(started), {"status": response.status_code})
    if probe.healthy:
        return probe, None
    message = f"{url} answered {response.status_code}, expected {expect_status}"
    return probe, Issue("http_status", url, "critical", message)


async def probe_tcp(host: str, port: int, *, timeout_s: float) -> tuple[Probe, Issue | None]:
    """Open (and close) a TCP connection to ``host:port`` within ``timeout_s``."""
    target = f"{host}:{port}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), timeout=timeout_s)
    except (OSError, TimeoutError) as e:
        probe = Probe("tcp", target, False, _ms(started), {"error": f"{type(e).__name__}: {e}"})
        return probe, Issue("tcp_unreachable", target, "critical", f"nothing accepts connections on {target}")
    return Probe("tcp", target, True, _ms(started)), None


def probe_environment(env: Path) -> tuple[Probe, Issue | None]:
    """Whether ``env/current`` points at an existing release (a dangling switch is critical)."""
    revision = current_release(env)
    target = str(env)
    if revision is None:
        issue = Issue("not_deployed", target, "warning", f"{env.name} has never been deployed")
        return Probe("release", target, False, 0.0), issue
    healthy = (env / "current").resolve().is_dir()
    probe = Probe("release", target, healthy, 0.0, {"revision": revision})
    if healthy:
        return probe, None
    fix = {"action": "rollback", "environment": target}
    return probe, Issue("dangling_release", target, "critical", f"current points at missing release {revision}", fix)


async def probe_pending(
    redis: aioredis.Redis, prefix: str, agents: list[str], *, max_pending: int
) -> tuple[list[Probe], list[Issue]]:
    """Requests read but not yet acknowledged per agent (XPENDING over its request streams)."""
    probes, issues = [], []
    for agent in agents:
        started = time.monotonic()
        pending, consumers = await _pending_of(redis, prefix, agent)
        detail = {"pending": pending, "consumers": consumers}
        probes.append(Probe("redis_pending", agent, pending <= max_pending, _ms(started), detail))
        if pending > max_pending:  # no fix of its own: a dead consumer's share is a dead_consumer issue
            message = f"{pending} requests pending for {agent} (threshold {max_pending})"
            issues.append(Issue("pending_backlog", agent, "warning", message))
    return probes, issues


async def _pending_of(redis: aioredis.Redis, prefix: str, agent: str) -> tuple[int, dict[str, int]]:
    total, consumers = 0, dict[str, int]()
    for band in BANDS:
        try:
            summary = await redis.xpending(request_stream(prefix, agent, band), agent)
        except ResponseError:  # no stream or no group yet: nothing pending
            continue
        total += int(summary.get("pending") or 0)
        for entry in summary.get("consumers") or []:
            name = as_text(entry["name"])
            consumers[name] = consumers.get(name, 0) + int(entry["pending"])
    return total, consumers


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
