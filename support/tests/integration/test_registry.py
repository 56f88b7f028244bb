"""The registry's API and its client, against a real registry app, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from agent_registry.events import AgentEvents
from agent_registry.reaper import Reaper
from agent_registry.store import RegistryStore
from shared.lib.connections import connect_redis, create_pg_pool
from shared.lib.errors import Conflict, NotFound, Unauthorized
from shared.lib.event_bus import EventBus
from shared.lib.metrics import REGISTRY_STALE_AGENTS
from shared.lib.registry_client import RegistryClient
from shared.lib.registry_models import AgentStatus, Registration, Skill
from shared.lib.settings import Settings
from support.tests.registry_support import API_KEY, SECRET, RunningRegistry, registration, serve_registry


@pytest.fixture
async def registry(settings_factory: Callable[..., Settings]) -> AsyncIterator[RunningRegistry]:
    """A registry with the default (long) heartbeat TTL."""
    async with serve_registry(settings_factory) as running:
        yield running


def _client(registry: RegistryClient | RunningRegistry) -> RegistryClient:
    assert isinstance(registry, RunningRegistry)
    return RegistryClient(registry.url, registration_secret=SECRET, api_key=API_KEY, timeout_s=5, retry_for_s=5)


# -- lifecycle and storage -----------------------------------------------------------------


async def test_register_issues_token_and_stores_only_its_hash(registry: RunningRegistry, database_url: str) -> None:
    """Registration returns the instance and a token; the table keeps only the token's SHA-256."""
    agent_id, token = await registry.register("code-review", skills=["review_code"], tags=["python"])
    assert agent_id.startswith("code-review-")
    got = (await registry.get(agent_id)).json()
    assert got["status"] == "initializing"
    assert got["capabilities"][0]["id"] == "review_code"
    assert got["capabilities"][0]["tags"] == ["python"]
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT token_hash FROM agent_instances WHERE id = $1", agent_id)
    finally:
        await conn.close()
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert token not in stored


async def test_heartbeat_keeps_the_status_the_agent_set(registry: RunningRegistry) -> None:
    """A heartbeat updates load and liveness but never turns busy back into active."""
    agent_id, token = await registry.register("cicd")
    assert (await registry.set_status(agent_id, token, "active")).status_code == 200
    assert (await registry.set_status(agent_id, token, "busy")).status_code == 200
    before = (await registry.get(agent_id)).json()["last_heartbeat"]
    r = await registry.heartbeat(agent_id, token, in_flight=7)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "busy"
    got = (await registry.get(agent_id)).json()
    assert got["status"] == "busy"
    assert got["in_flight"] == 7
    assert got["last_heartbeat"] > before


@pytest.mark.parametrize("content", [None, b"{}"], ids=["no body", "empty object"])
async def test_heartbeat_body_is_optional(registry: RunningRegistry, content: bytes | None) -> None:
    """A heartbeat with no body, or an empty object, is one with the defaults (in_flight 0)."""
    agent_id, token = await registry.register("cicd")
    headers = {"X-Agent-Token": token, **({"Content-Type": "application/json"} if content else {})}
    r = await registry.http.post(f"{registry.url}/agents/{agent_id}/heartbeat", content=content, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"agent_id": agent_id, "status": "initializing", "in_flight": 0}


async def test_deregister_by_token_or_operator_key(registry: RunningRegistry) -> None:
    """An instance deletes itself with its token, an operator with an API key; both are then gone."""
    own_id, own_token = await registry.register("documentation")
    other_id, _ = await registry.register("documentation")
    r = await registry.http.delete(f"{registry.url}/agents/{own_id}", headers={"X-Agent-Token": own_token})
    assert r.status_code == 204
    r = await registry.http.delete(f"{registry.url}/agents/{other_id}", headers={"X-API-Key": API_KEY})
    assert r.status_code == 204
    assert (await registry.get(own_id)).status_code == 404
    assert (await registry.get(other_id)).status_code == 404


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["heartbeat", "status", "delete"])
async def test_bad_token_is_401_naming_the_header(registry: RunningRegistry, call: str) -> None:
    """Every call an instance makes about itself refuses a wrong token with 401 and changes nothing."""
    agent_id, _ = await registry.register("infrastructure")
    bad = {"X-Agent-Token": "not-the-token"}
    url = f"{registry.url}/agents/{agent_id}"
    if call == "heartbeat":
        r = await registry.http.post(f"{url}/heartbeat", json={"in_flight": 3}, headers=bad)
    elif call == "status":
        r = await registry.http.put(f"{url}/status", json={"status": "active"}, headers=bad)
    else:
        r = await registry.http.delete(url, headers=bad)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["field"] == "X-Agent-Token"
    got = (await registry.get(agent_id)).json()
    assert (got["status"], got["in_flight"]) == ("initializing", 0)


async def test_missing_credentials_are_401(registry: RunningRegistry) -> None:
    """No token, no registration secret, a wrong secret, or no API key on reads: 401 naming what is missing."""
    agent_id, _ = await registry.register("cicd")
    r = await registry.http.post(f"{registry.url}/agents/{agent_id}/heartbeat", json={"in_flight": 0})
    assert (r.status_code, r.json()["error"]["field"]) == (401, "X-Agent-Token")
    r = await registry.http.post(f"{registry.url}/agents/register", json=registration("cicd"))
    assert (r.status_code, r.json()["error"]["field"]) == (401, "X-Registration-Secret")
    r = await registry.http.post(
        f"{registry.url}/agents/register", json=registration("cicd"), headers={"X-Registration-Secret": "nope"}
    )
    assert (r.status_code, r.json()["error"]["field"]) == (401, "X-Registration-Secret")
    for path in ("/agents", f"/agents/{agent_id}", "/agents/watch"):
        r = await registry.http.get(registry.url + path)
        assert (r.status_code, r.json()["error"]["field"]) == (401, "X-API-Key"), path
    r = await registry.http.delete(f"{registry.url}/agents/{agent_id}")
    assert (r.status_code, r.json()["error"]["field"]) == (401, "X-API-Key")


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("POST", "/heartbeat"), ("PUT", "/status"), ("DELETE", "")]
)
async def test_bad_agent_id_is_422_naming_it(registry: RunningRegistry, method: str, suffix: str) -> None:
    """An id outside ^[a-z0-9][a-z0-9_-]{0,63}$ gets 422 naming agent_id, on every endpoint."""
    body = {"in_flight": 0} if suffix == "/heartbeat" else {"status": "active"}
    r = await registry.http.request(
        method,
        f"{registry.url}/agents/Bad.ID{suffix}",
        json=body if suffix else None,
        headers={"X-Agent-Token": "t", "X-API-Key": API_KEY},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "agent_id"


async def test_illegal_transition_is_409_naming_both_statuses(registry: RunningRegistry) -> None:
    """initializing -> busy is refused with 409 naming both statuses; the status stays."""
    agent_id, token = await registry.register("feature-dev")
    r = await registry.set_status(agent_id, token, "busy")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert "initializing" in error["message"]
    assert "busy" in error["message"]
    assert error["details"] == {"current": "initializing", "requested": "busy"}
    assert (await registry.set_status(agent_id, token, "error")).status_code == 200
    r = await registry.set_status(agent_id, token, "active")
    assert r.status_code == 409
    assert (await registry.get(agent_id)).json()["status"] == "error"


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("register", b"{not json", 400, "body"),
        ("register", b'{"name": "\xff"}', 400, "body"),  # not UTF-8: FastAPI's own 400 named nothing
        ("register", b"[" * 5000 + b"]" * 5000, 400, "body"),
        ("register", {**registration("x"), "name": "Not Valid"}, 422, "name"),
        ("register", {**registration("x"), "capabilities": [{"id": "a"}]}, 422, "capabilities.0.name"),
        ("register", {**registration("x"), "endpoint": "ftp://x"}, 422, "endpoint"),
        ("register", {**registration("x"), "status": "offline"}, 422, "status"),
        ("register", {**registration("x"), "surprise": 1}, 422, "surprise"),
        ("heartbeat", b"{", 400, "body"),
        ("heartbeat", {"in_flight": "many"}, 422, "in_flight"),
        ("heartbeat", {"in_flight": -1}, 422, "in_flight"),
        ("heartbeat", {"in_flight": 1, "load": 2}, 422, "load"),
        ("status", {"status": "sleeping"}, 422, "status"),
        ("status", {"status": "active", "reson": "typo"}, 422, "reson"),
        ("register", {**registration("x"), "metadata": {"a": "x\u0000y"}}, 422, "metadata.a"),
        ("register", {**registration("x"), "metadata": {"k\u0000": 1}}, 422, "metadata.k\\u0000"),
        ("register", {**registration("x"), "version": "1\u0000"}, 422, "version"),
        ("register", registration("x", skills=["ok", "A\u0000"]), 422, "capabilities.1.id"),
        ("register", json.dumps({**registration("x"), "metadata": {"a": ["\ud800"]}}).encode(), 422, "metadata.a.0"),
        ("register", b'{"name": "x", "metadata": {"s": "\xed\xa0\x80"}}', 422, "metadata.s"),
        ("status", {"status": "active", "reason": "a\u0000b"}, 422, "reason"),
    ],
)
async def test_malformed_bodies_name_the_field(
    registry: RunningRegistry, path: str, body: Any, status: int, field: str
) -> None:
    """Malformed JSON gets 400, a wrong field 422, each naming the field; nothing is written."""
    agent_id, token = await registry.register("cicd")
    url = {
        "register": f"{registry.url}/agents/register",
        "heartbeat": f"{registry.url}/agents/{agent_id}/heartbeat",
        "status": f"{registry.url}/agents/{agent_id}/status",
    }[path]
    headers = {"X-Registration-Secret": SECRET, "X-Agent-Token": token, "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else None
    method = "PUT" if path == "status" else "POST"
    r = await registry.http.request(method, url, content=content, json=None if content else body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert len(await registry.discover()) == 1
    assert (await registry.get(agent_id)).json()["status"] == "initializing"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", ["register", "heartbeat", "status"])
async def test_a_body_not_sent_as_json_is_415_naming_the_content_type(
    registry: RunningRegistry, path: str, content_type: str | None
) -> None:
    """A JSON body sent with no content type, or another one, gets 415 naming content-type and
    saying what to send (not "body: Input should be a valid dictionary"); nothing is written."""
    agent_id, token = await registry.register("cicd")
    url, body, method = {
        "register": (f"{registry.url}/agents/register", registration("x"), "POST"),
        "heartbeat": (f"{registry.url}/agents/{agent_id}/heartbeat", {"in_flight": 2}, "POST"),
        "status": (f"{registry.url}/agents/{agent_id}/status", {"status": "active"}, "PUT"),
    }[path]
    headers = {"X-Registration-Secret": SECRET, "X-Agent-Token": token}
    # httpx sends no Content-Type for raw content unless one is given
    headers |= {"Content-Type": content_type} if content_type else {}
    r = await registry.http.request(method, url, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("unsupported_media_type", "content-type")
    assert "Content-Type: application/json" in error["message"]
    assert len(await registry.discover()) == 1
    assert (await registry.get(agent_id)).json()["in_flight"] == 0


@pytest.mark.parametrize("query", ["capability=%00", "tag=a%00", "name=x&capability=A%00B"])
async def test_nul_in_a_query_is_422_naming_the_parameter(registry: RunningRegistry, query: str) -> None:
    """A query parameter holding NUL gets 422 naming it (PostgreSQL cannot compare such text)."""
    r = await registry.http.get(f"{registry.url}/agents?{query}", headers={"X-API-Key": API_KEY})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == query.rpartition("&")[2].partition("=")[0]
    assert "NUL" in error["message"]


@pytest.mark.parametrize(("query", "field"), [("name=a&name=b", "name"), ("limit=1&capability=x&limit=2", "limit")])
async def test_a_repeated_single_valued_query_parameter_is_422_naming_it(
    registry: RunningRegistry, query: str, field: str
) -> None:
    """A filter given twice is refused naming it (the last one was used); status may repeat."""
    r = await registry.http.get(f"{registry.url}/agents?{query}", headers={"X-API-Key": API_KEY})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    await registry.register("cicd")
    r = await registry.http.get(
        f"{registry.url}/agents?status=busy&status=initializing", headers={"X-API-Key": API_KEY}
    )
    assert [a["name"] for a in r.json()] == ["cicd"]


async def test_oversized_body_is_413(registry: RunningRegistry) -> None:
    """A registration over the payload limit is refused with 413 before it is parsed."""
    big = registration("cicd", metadata={"blob": "x" * (registry.settings.max_payload_bytes + 1)})
    r = await registry.http.post(f"{registry.url}/agents/register", json=big, headers={"X-Registration-Secret": SECRET})
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "body"


# -- discovery -------------------------------------------------------------------------------


async def _fleet(registry: RunningRegistry) -> dict[str, str]:
    """Five documentation instances in various states and loads, plus one other agent."""
    ids: dict[str, str] = {}
    plan = [
        ("idle", "active", 0),
        ("loaded", "active", 5),
        ("busy", "busy", 1),
        ("starting", "initializing", 0),
        ("broken", "error", 0),
    ]
    for label, status, load in plan:
        agent_id, token = await registry.register("documentation", skills=["generate_docs"], tags=["docs", label])
        if status in ("active", "busy"):
            assert (await registry.set_status(agent_id, token, "active")).status_code == 200
        if status != "active" and status != "initializing":
            assert (await registry.set_status(agent_id, token, status)).status_code == 200
        assert (await registry.heartbeat(agent_id, token, in_flight=load)).status_code == 200
        ids[label] = agent_id
    ids["other"], _ = await registry.register("code-review", skills=["review_code"], tags=["python"])
    return ids


async def test_discovery_filters_and_orders_healthiest_first(registry: RunningRegistry) -> None:
    """Filters by capability, tag, status and name; active before busy, then least loaded."""
    ids = await _fleet(registry)
    found = [a["id"] for a in await registry.discover(capability="generate_docs")]
    assert found == [ids["idle"], ids["loaded"], ids["busy"], ids["starting"], ids["broken"]]
    assert [a["id"] for a in await registry.discover(tag="busy")] == [ids["busy"]]
    assert [a["id"] for a in await registry.discover(tag="python")] == [ids["other"]]
    active = await registry.discover(capability="generate_docs", status="active")
    assert [a["id"] for a in active] == [ids["idle"], ids["loaded"]]
    healthy = await registry.discover(capability="generate_docs", status=["busy", "active"])
    assert [a["id"] for a in healthy] == [ids["idle"], ids["loaded"], ids["busy"]]
    assert {a["id"] for a in await registry.discover(name="code-review")} == {ids["other"]}
    assert await registry.discover(capability="no_such_skill") == []
    assert len(await registry.discover(limit=2)) == 2
    r = await registry.http.get(f"{registry.url}/agents", params={"status": "asleep"}, headers={"X-API-Key": API_KEY})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "status.0")


@pytest.mark.parametrize(
    ("where", "index"),
    [
        ("""capabilities @> '[{"id": "generate_docs"}]'""", "agent_instances_capabilities_gin"),
        ("""capabilities @> '[{"tags": ["docs"]}]'""", "agent_instances_capabilities_gin"),
        ("status = 'active'", "agent_instances_status"),
        ("status = ANY('{active,busy}'::text[])", "agent_instances_status"),
        ("name = 'documentation'", "agent_instances_name_status"),
    ],
)
async def test_discovery_filters_use_indexes(database_url: str, where: str, index: str) -> None:
    """Each discovery filter can be answered from an index rather than a table scan."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN SELECT id FROM agent_instances WHERE {where}"))
    finally:
        await conn.close()
    assert index in plan, plan


# -- staleness -------------------------------------------------------------------------------


async def test_stale_instance_goes_offline_then_returns_with_its_status(
    settings_factory: Callable[..., Settings],
) -> None:
    """Past the TTL a silent busy instance is offline; its next heartbeat restores busy."""
    async with serve_registry(settings_factory, agent_stale_after_s=0.4, agent_remove_after_s=60) as registry:
        agent_id, token = await registry.register("cicd")
        await registry.set_status(agent_id, token, "active")
        await registry.set_status(agent_id, token, "busy")
        before = REGISTRY_STALE_AGENTS.labels(name="cicd")._value.get()
        await asyncio.sleep(1.2)
        got = (await registry.get(agent_id)).json()
        assert got["status"] == "offline"
        assert REGISTRY_STALE_AGENTS.labels(name="cicd")._value.get() == before + 1
        metrics = (await registry.http.get(f"{registry.url}/metrics")).text
        assert 'registry_agents{name="cicd",status="offline"} 1.0' in metrics
        r = await registry.heartbeat(agent_id, token, in_flight=2)
        assert r.json()["status"] == "busy"
        assert (await registry.get(agent_id)).json()["status"] == "busy"
        metrics = (await registry.http.get(f"{registry.url}/metrics")).text
        assert "registry_heartbeats_total" in metrics
        assert "registry_heartbeat_lag_seconds_bucket" in metrics


async def test_declared_offline_is_not_revived_and_expired_is_removed(
    settings_factory: Callable[..., Settings],
) -> None:
    """An instance that declared itself offline stays so on heartbeat; a silent one is removed after the grace."""
    async with serve_registry(settings_factory, agent_stale_after_s=0.3, agent_remove_after_s=1.0) as registry:
        declared_id, declared_token = await registry.register("cicd")
        silent_id, _ = await registry.register("cicd")
        assert (await registry.set_status(declared_id, declared_token, "offline")).status_code == 200
        for _ in range(12):
            r = await registry.heartbeat(declared_id, declared_token)
            assert r.json()["status"] == "offline"
            await asyncio.sleep(0.15)
        assert (await registry.get(silent_id)).status_code == 404
        assert (await registry.get(declared_id)).json()["status"] == "offline"


async def test_the_removal_grace_counts_from_going_offline(registry: RunningRegistry, database_url: str) -> None:
    """An instance silent for longer than the grace but offline for less is kept: the grace is
    the time offline (it was counted from the last heartbeat, so it came the stale TTL early)."""
    recent, long_ago = (await registry.register("cicd"))[0], (await registry.register("cicd"))[0]
    pool = await create_pg_pool(database_url, min_size=1, max_size=1)
    try:
        await pool.execute(
            "UPDATE agent_instances SET status = 'offline', last_heartbeat = now() - interval '400 seconds', "
            "status_changed_at = now() - CASE WHEN id = $1 THEN interval '100 seconds' ELSE interval '350 seconds' "
            "END WHERE id = ANY($2::text[])",
            recent,
            [recent, long_ago],
        )
        removed = await RegistryStore(pool).remove_expired(remove_after_s=300)
    finally:
        await pool.close()
    assert [r.agent_id for r in removed] == [long_ago]
    assert (await registry.get(recent)).json()["status"] == "offline"


async def test_concurrent_sweeps_mark_each_instance_once(
    registry: RunningRegistry, settings_factory: Callable[..., Settings], database_url: str, redis_url: str
) -> None:
    """Two replicas sweeping at the same moment mark each stale instance offline exactly once."""
    for _ in range(20):
        await registry.register("sweep-target")
    settings = settings_factory()
    pools = [await create_pg_pool(database_url, min_size=1, max_size=2) for _ in range(2)]
    client = await connect_redis(redis_url)
    bus = EventBus(client, settings, pool=pools[0])
    try:
        await asyncio.sleep(0.3)
        reapers = [Reaper(RegistryStore(p), AgentEvents(bus), stale_after_s=0.2, remove_after_s=600) for p in pools]
        before = REGISTRY_STALE_AGENTS.labels(name="sweep-target")._value.get()
        await asyncio.gather(*(r.sweep() for r in reapers))
        assert REGISTRY_STALE_AGENTS.labels(name="sweep-target")._value.get() == before + 20
        offline = await bus.events_since(0, event_type="agent.status_changed")
        assert len(offline) == 20
        assert {e.payload["status"] for e in offline} == {"offline"}
    finally:
        await bus.close()
        await client.aclose()
        for p in pools:
            await p.close()
    assert {a["status"] for a in await registry.discover(name="sweep-target")} == {"offline"}


async def test_transitions_are_emitted_on_the_bus(
    registry: RunningRegistry, settings_factory: Callable[..., Settings], database_url: str, redis_url: str
) -> None:
    """Registration, status change and removal each land in the events log, in order."""
    agent_id, token = await registry.register("cicd")
    await registry.heartbeat(agent_id, token)
    await registry.set_status(agent_id, token, "active")
    await registry.http.delete(f"{registry.url}/agents/{agent_id}", headers={"X-Agent-Token": token})
    pool = await create_pg_pool(database_url, min_size=1, max_size=1)
    client = await connect_redis(redis_url)
    bus = EventBus(client, settings_factory(), pool=pool)
    try:
        events = await bus.events_since(0, aggregate_type="agent", aggregate_id=agent_id)
    finally:
        await bus.close()
        await client.aclose()
        await pool.close()
    assert [e.event_type for e in events] == ["agent.registered", "agent.status_changed", "agent.removed"]
    assert (events[1].payload["previous_status"], events[1].payload["status"]) == ("initializing", "active")
    assert events[2].payload["reason"] == "deregistered"


# -- watch -------------------------------------------------------------------------------------


async def _read_events(lines: AsyncIterator[str], count: int) -> list[tuple[str, dict[str, Any]]]:
    """The next ``count`` server-sent events as (event name, data)."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    async for line in lines:
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((kind, json.loads(line.split(":", 1)[1])))
            if len(events) == count:
                return events
    return events


async def test_watch_streams_changes_made_on_another_replica(
    registry: RunningRegistry, settings_factory: Callable[..., Settings]
) -> None:
    """A watcher on one replica sees registrations, status changes and removals made through another."""
    async with (
        serve_registry(settings_factory) as other,
        registry.http.stream("GET", f"{registry.url}/agents/watch", headers={"X-API-Key": API_KEY}) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith(": watching")
        agent_id, token = await other.register("code-review")
        await other.heartbeat(agent_id, token)  # changes nothing: not streamed
        await other.set_status(agent_id, token, "active")
        await other.http.delete(f"{other.url}/agents/{agent_id}", headers={"X-Agent-Token": token})
        async with asyncio.timeout(10):
            events = await _read_events(lines, 3)
    assert [k for k, _ in events] == ["registered", "status", "removed"]
    assert all(e["agent_id"] == agent_id for _, e in events)
    assert (events[1][1]["previous_status"], events[1][1]["status"]) == ("initializing", "active")


async def test_watch_streams_end_when_the_listen_connection_is_lost(
    registry: RunningRegistry, database_url: str
) -> None:
    """When the registry's LISTEN connection is lost (PostgreSQL restarted, the backend killed),
    the changes notified until it is back are missed: open streams end, so their clients list and
    watch again (they went on, silently missing changes); once it is back a new watch streams."""
    headers = {"X-API-Key": API_KEY}
    async with registry.http.stream("GET", f"{registry.url}/agents/watch", headers=headers) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith(": watching")
        conn = await asyncpg.connect(database_url)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND (query ILIKE 'LISTEN%' OR query = 'SELECT 1')"
            )
        finally:
            await conn.close()
        assert killed >= 1
        async with asyncio.timeout(15):
            rest = [line async for line in lines]
    assert not [line for line in rest if line.startswith("data:")], rest

    async def watch_again() -> list[tuple[str, dict[str, Any]]]:
        while True:
            async with registry.http.stream("GET", f"{registry.url}/agents/watch", headers=headers) as again:
                if again.status_code == 503:
                    assert "retry" in (await again.aread()).decode()
                    await asyncio.sleep(0.2)
                    continue
                assert again.status_code == 200
                lines = again.aiter_lines()
                assert (await anext(lines)).startswith(": watching")
                await registry.register("code-review")
                return await _read_events(lines, 1)

    async with asyncio.timeout(20):
        events = await watch_again()
    assert [k for k, _ in events] == ["registered"]


# -- client ------------------------------------------------------------------------------------


def _registration(name: str = "code-review") -> Registration:
    skill = Skill(id="review_code", name="Review code", tags=["python"], input_schema={"type": "object"})
    return Registration(name=name, version="2.0.0", endpoint="http://127.0.0.1:8003", capabilities=[skill])


async def test_client_lifecycle(registry: RunningRegistry) -> None:
    """The client registers, heartbeats its load in the background, changes status, discovers and deregisters."""
    load = {"n": 3}
    async with _client(registry) as client:
        registered = await client.register(_registration())
        agent_id = registered.agent.id
        await client.set_status(AgentStatus.ACTIVE)
        beats: list[float] = []
        client.start_heartbeat(interval_s=0.1, load=lambda: load["n"], on_heartbeat=beats.append)
        async with asyncio.timeout(5):
            while len(beats) < 3:
                await asyncio.sleep(0.05)
        found = await client.discover(capability="review_code", status=[AgentStatus.ACTIVE, AgentStatus.BUSY])
        assert [a.id for a in found] == [agent_id]
        assert found[0].in_flight == 3
        assert found[0].capabilities[0].input_schema == {"type": "object"}
        await client.set_status(AgentStatus.BUSY)
        await asyncio.sleep(0.3)
        assert (await client.get(agent_id)).status is AgentStatus.BUSY  # heartbeats kept busy
        with pytest.raises(Conflict):
            await client.set_status(AgentStatus.INITIALIZING)
        await client.deregister()
        with pytest.raises(NotFound):
            await client.get(agent_id)


async def test_client_registers_again_under_the_same_id_when_forgotten(
    registry: RunningRegistry, database_url: str
) -> None:
    """When the registry loses the instance, the heartbeat re-registers it with the same id and status."""
    async with _client(registry) as client:
        agent_id = (await client.register(_registration())).agent.id
        await client.set_status(AgentStatus.ACTIVE)
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("DELETE FROM agent_instances")
        finally:
            await conn.close()
        client.start_heartbeat(interval_s=0.1)
        async with asyncio.timeout(5):
            while client.registrations < 2:
                await asyncio.sleep(0.05)
        got = await client.get(agent_id)
        assert got.status is AgentStatus.ACTIVE
        await client.deregister()


async def test_client_surfaces_bad_credentials(registry: RunningRegistry) -> None:
    """A wrong registration secret or API key surfaces as Unauthorized, not a retry loop."""
    async with RegistryClient(registry.url, registration_secret="wrong", api_key="wrong", retry_for_s=5) as client:
        with pytest.raises(Unauthorized):
            await client.register(_registration())
        with pytest.raises(Unauthorized):
            await client.discover()
