"""Agents as real processes next to a real registry, over real PostgreSQL and Redis.

Lifecycle: register -> heartbeat -> busy under load -> active again -> SIGTERM
with work in flight -> the work finishes -> deregistered. Plus the HTTP side:
the A2A card, authentication, and errors naming the field or the supported types.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from a2a.types import AgentCard
from google.protobuf.json_format import ParseDict

from agents.infrastructure import InfrastructureAgent
from shared.lib import metrics
from shared.lib.agent_events import AgentRequestEvent, AgentResponseEvent, sign
from shared.lib.connections import connect_redis
from shared.lib.errors import NotFound
from shared.lib.event_bus import EventBus
from shared.lib.registry_client import RegistryClient
from shared.lib.registry_models import AgentInstance, Registration
from shared.lib.settings import Settings
from support.tests.conftest import TEST_SECRETS
from support.tests.integration.conftest import run_cli
from support.tests.procs import ServiceProcess

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}
AGENT_ENV = {"AO_AGENT_STATUS_DEBOUNCE_S": "0.1", "AO_AGENT_DRAIN_GRACE_S": "15"}
ROOT = Path(__file__).resolve().parents[3]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A one-commit git repository and its revision."""
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    (path / "calc.py").write_text('"""Arithmetic."""\n\n\ndef add(a, b):\n    return a + b\n')
    _git(path, "add", "-A")
    _git(path, "-c", "user.email=d@example.com", "-c", "user.name=D", "commit", "-q", "-m", "one")
    return path, _git(path, "rev-parse", "HEAD")


@pytest.fixture
def stack(spawn: Callable[..., ServiceProcess], ports: dict[str, int]) -> Callable[[str], ServiceProcess]:
    """Start the registry, then return a starter for agent processes registered with it."""
    spawn("registry", url=f"http://127.0.0.1:{ports['agent-registry']}", name="registry")

    def start_agent(name: str) -> ServiceProcess:
        port = str(ports[name])
        url = f"http://127.0.0.1:{port}"
        return spawn("agent", name, "--port", port, "--instance-id", f"{name}-1", url=url, env=AGENT_ENV, name=name)

    return start_agent


@pytest.fixture
async def bus(settings_factory: Callable[..., Settings], redis_url: str) -> AsyncIterator[EventBus]:
    settings = settings_factory()
    redis = await connect_redis(redis_url)
    event_bus = EventBus(redis, settings, instance_id="tester-1")
    yield event_bus
    await event_bus.close()
    await redis.aclose()


@pytest.fixture
async def registry(ports: dict[str, int]) -> AsyncIterator[RegistryClient]:
    client = RegistryClient(
        f"http://127.0.0.1:{ports['agent-registry']}",
        registration_secret=TEST_SECRETS["AO_REGISTRATION_SECRET"],
        api_key=TEST_SECRETS["AO_API_KEYS"],
    )
    yield client
    await client.aclose()


async def _call(bus: EventBus, agent: str, request_type: str, payload: dict[str, Any]) -> AgentResponseEvent:
    request = AgentRequestEvent.create(
        source_agent="tester", target_agent=agent, request_type=request_type, payload=payload, timeout_s=30
    )
    return await bus.request_agent(request, timeout_s=30)


async def _wait_status(registry: RegistryClient, agent_id: str, status: str, *, timeout_s: float) -> AgentInstance:
    deadline = time.monotonic() + timeout_s
    seen = ""
    while time.monotonic() < deadline:
        instance = await registry.get(agent_id)
        seen = instance.status.value
        if seen == status:
            return instance
        await asyncio.sleep(0.05)
    raise AssertionError(f"{agent_id} stayed {seen}, never {status}")


def _slow_pipeline(repo: tuple[Path, str], seconds: float) -> dict[str, Any]:
    return {"repo_path": str(repo[0]), "revision": repo[1], "command": f"sleep {seconds}"}


async def test_agent_lifecycle(
    stack: Callable[[str], ServiceProcess], bus: EventBus, registry: RegistryClient, repo: tuple[Path, str]
) -> None:
    """An agent registers, heartbeats, is busy under load then active; on SIGTERM it finishes its work, deregisters."""
    proc = stack("cicd")
    first = await _wait_status(registry, "cicd-1", "active", timeout_s=10)
    assert {s.id for s in first.capabilities} == {"RUN_PIPELINE", "VALIDATE_BUILD", "DEPLOY_ARTIFACT"}
    await asyncio.sleep(1.5)  # AO_HEARTBEAT_INTERVAL_S=1 in the child
    assert (await registry.get("cicd-1")).last_heartbeat > first.last_heartbeat

    work = asyncio.create_task(_call(bus, "cicd", "RUN_PIPELINE", _slow_pipeline(repo, 1.5)))
    await _wait_status(registry, "cicd-1", "busy", timeout_s=5)
    assert (await work).status == "success"
    await _wait_status(registry, "cicd-1", "active", timeout_s=5)

    in_flight = asyncio.create_task(_call(bus, "cicd", "RUN_PIPELINE", _slow_pipeline(repo, 2)))
    await _wait_status(registry, "cicd-1", "busy", timeout_s=5)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    response = await in_flight
    assert response.status == "success", response.error
    assert response.payload["exit_code"] == 0
    assert await asyncio.to_thread(proc.proc.wait, 20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    with pytest.raises(NotFound):
        await registry.get("cicd-1")
    assert "drained and deregistered" in proc.output()


async def test_agent_http_and_bus_errors(
    stack: Callable[[str], ServiceProcess], bus: EventBus, repo: tuple[Path, str], ports: dict[str, int]
) -> None:
    """The card parses with a2a-sdk; a bad payload names the field, an unknown type is rejected (HTTP and bus);
    an envelope not sent as JSON gets 415 naming content-type."""
    stack("code-review")
    base = f"http://127.0.0.1:{ports['code-review']}"
    key = {"X-API-Key": TEST_SECRETS["AO_API_KEYS"]}
    explain = {"repo_path": str(repo[0]), "path": "calc.py"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        card = ParseDict((await http.get("/.well-known/agent-card.json")).json(), AgentCard())
        assert card.supported_interfaces[0].url == f"{base}/agent-request"
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200
        # at zero from the start, so the first dead letter is an increase DeadLettersGrowing sees
        for reason in metrics.AGENT_DEAD_LETTER_REASONS:
            assert f'agent_requests_dead_lettered_total{{reason="{reason}"}} 0.0' in scraped.text, reason
        assert 'agent_requests_redelivered_total{agent="code-review"} 0.0' in scraped.text

        def envelope(request_type: str, payload: dict[str, Any]) -> dict[str, Any]:
            request = AgentRequestEvent.create(
                source_agent="tester", target_agent="code-review", request_type=request_type, payload=payload
            )
            return request.to_dict()

        unauthenticated = await http.post("/agent-request", json=envelope("EXPLAIN_CODE", explain))
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"]["field"] == "signature"
        for header, value in (("X-API-Key", "not-a-key"), ("Authorization", "Bearer not-a-key")):
            wrong_key = await http.post(
                "/agent-request", json=envelope("EXPLAIN_CODE", explain), headers={header: value}
            )
            assert (wrong_key.status_code, wrong_key.json()["error"]["field"]) == (401, header)  # it named signature

        ok = await http.post("/agent-request", json=envelope("EXPLAIN_CODE", explain), headers=key)
        assert ok.status_code == 200
        assert ok.json()["payload"]["functions"][0]["name"] == "add"

        bad = await http.post(
            "/agent-request", json=envelope("REVIEW_CODE", {"repo_path": "/x", "base": "a"}), headers=key
        )
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "head"

        unknown = await http.post("/agent-request", json=envelope("DANCE", {}), headers=key)
        assert unknown.status_code == 422
        assert unknown.json()["status"] == "rejected"
        assert "EXPLAIN_CODE, REVIEW_CODE" in unknown.json()["error"]["message"]

        forged = {**envelope("EXPLAIN_CODE", explain), "signature": "0" * 64}
        assert (await http.post("/agent-request", json=forged)).status_code == 401

        malformed = await http.post("/agent-request", content=b"{not json", headers={**key, **JSON})
        assert malformed.status_code in (400, 422)

        # the envelope is JSON sent as such: no content type, or another, is a 415 saying so
        as_sent = orjson.dumps(envelope("EXPLAIN_CODE", explain))
        for content_type in ({}, {"Content-Type": "text/plain"}):
            refused = await http.post("/agent-request", content=as_sent, headers={**key, **content_type})
            assert refused.status_code == 415, refused.text
            assert refused.json()["error"]["field"] == "content-type"
            assert "Content-Type: application/json" in refused.json()["error"]["message"]

    over_bus = await _call(bus, "code-review", "REVIEW_CODE", {"repo_path": str(repo[0]), "base": repo[1], "head": 7})
    assert over_bus.status == "error"
    assert over_bus.error is not None
    assert over_bus.error["field"] == "head"
    rejected = await _call(bus, "code-review", "DANCE", {})
    assert rejected.status == "rejected"
    assert rejected.error is not None
    assert rejected.error["details"]["supported"] == ["EXPLAIN_CODE", "REVIEW_CODE"]


async def test_agent_http_refuses_far_deadlines_and_replays_and_bounds_its_labels(
    stack: Callable[[str], ServiceProcess], repo: tuple[Path, str], ports: dict[str, int]
) -> None:
    """Over HTTP: a far deadline is 422 naming it, a replay 401 bad_signature; random types and sources stay bounded."""
    stack("code-review")
    key = {"X-API-Key": TEST_SECRETS["AO_API_KEYS"]}
    explain = {"repo_path": str(repo[0]), "path": "calc.py"}

    def envelope(**fields: Any) -> dict[str, Any]:
        values = {"source_agent": "tester", "target_agent": "code-review", "request_type": "EXPLAIN_CODE"}
        request = AgentRequestEvent.create(**{**values, "payload": explain})  # type: ignore[arg-type]
        return {**request.to_dict(), **fields}

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['code-review']}", timeout=10) as http:
        for deadline in (1e308, 1e17):  # once a 500 (int overflow) and a retryable 503 (out of Redis's range)
            far = await http.post("/agent-request", json=envelope(deadline=deadline), headers=key)
            assert far.status_code == 422, far.text
            assert far.json()["error"]["field"] == "deadline"
        replayed = envelope(created_at=time.time() - 3600)
        replayed["signature"] = sign(replayed, TEST_SECRETS["AO_SIGNING_KEY"].encode())
        refused = await http.post("/agent-request", json=replayed)
        assert refused.status_code == 401, refused.text
        assert (refused.json()["error"]["code"], refused.json()["error"]["field"]) == ("bad_signature", "created_at")
        for _ in range(metrics.MAX_LABEL_VALUES + 4):
            noise = envelope(request_type=f"RANDOM_{uuid.uuid4().hex[:8]}", source_agent=f"src-{uuid.uuid4().hex[:8]}")
            assert (await http.post("/agent-request", json=noise, headers=key)).status_code == 422
        text = (await http.get("/metrics")).text
    series = re.findall(r"^agent_requests_total\{([^}]*)\}", text, re.M)
    assert not [s for s in series if "RANDOM_" in s]
    assert len({s for s in series if 'source_agent="src-' in s}) <= metrics.MAX_LABEL_VALUES
    assert any('source_agent="other"' in s and 'request_type="unsupported"' in s for s in series)


def _hand_written(explain: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An envelope as a user writes it from docs/EVENT_PROTOCOL.md: the required fields, whole-number times."""
    rid, now = uuid.uuid4().hex, int(time.time())
    required = {"request_id": rid, "correlation_id": rid, "idempotency_key": rid, "source_agent": "tester"}
    values = {**required, "target_agent": "code-review", "request_type": "EXPLAIN_CODE", "deadline": now + 30}
    return {key: value for key, value in {**values, "payload": explain, **fields}.items() if value is not ...}


async def _run_doc_curl_example(port: int) -> dict[str, Any]:
    """The curl example of docs/EVENT_PROTOCOL.md, run by bash from the repository root, against ``port``."""
    text = (ROOT / "docs" / "EVENT_PROTOCOL.md").read_text()
    [script] = [b for b in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S) if "/agent-request" in b]
    env = {**os.environ, "AO_API_KEY": TEST_SECRETS["AO_API_KEYS"]}
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script.replace("127.0.0.1:8003/", f"127.0.0.1:{port}/"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out)
    return answer


async def test_agent_http_takes_hand_written_unsigned_envelopes_and_still_verifies_signed_ones(
    stack: Callable[[str], ServiceProcess], bus: EventBus, repo: tuple[Path, str], ports: dict[str, int]
) -> None:
    """Keyed unsigned hand-written envelopes are answered (malformed: 422), bad signatures 401; none is stored."""
    stack("code-review")
    key = {"X-API-Key": TEST_SECRETS["AO_API_KEYS"]}
    explain = {"repo_path": str(repo[0]), "path": "calc.py"}
    now = int(time.time())
    answered = [
        _hand_written(explain),  # no reply_to, metadata, created_at, priority, schema_version or signature
        _hand_written(explain, created_at=now, deadline=now + 30, priority="high", metadata={}),  # no reply_to
        _hand_written(explain, schema_version=1, created_at=now, deadline=now + 30, reply_to=None),  # no metadata
        _hand_written(explain, created_at=time.time(), metadata={"trace": {}}, reply_to=None, signature=None),
    ]
    malformed = {
        "deadline": _hand_written(explain, deadline="soon"),
        "request_id": _hand_written(explain, request_id=...),
        "replyTo": _hand_written(explain, replyTo="me"),
        "created_at": _hand_written(explain, created_at=now - 3600),  # no signature of the caller's to replay
    }
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['code-review']}", timeout=10) as http:
        for envelope in answered:
            ok = await http.post("/agent-request", json=envelope, headers=key)
            assert ok.status_code == 200, (envelope, ok.text)
            assert ok.json()["payload"]["functions"][0]["name"] == "add"
        from_docs = await _run_doc_curl_example(ports["code-review"])
        assert from_docs["status"] == "success", from_docs
        for field, envelope in malformed.items():
            refused = await http.post("/agent-request", json=envelope, headers=key)
            assert refused.status_code == 422, (field, refused.text)
            assert (refused.json()["error"]["code"], refused.json()["error"]["field"]) == ("invalid_input", field)
        as_bool = await http.post("/agent-request", json=_hand_written(explain, deadline=True), headers=key)
        assert (as_bool.status_code, as_bool.json()["error"]["field"]) == (422, "deadline")  # a 408 as 1970
        assert await bus.dead_letters("code-review") == []

        signed = AgentRequestEvent.model_validate(_hand_written(explain)).signed(
            TEST_SECRETS["AO_SIGNING_KEY"].encode()
        )
        assert (await http.post("/agent-request", json=signed.to_dict())).status_code == 200
        forged = {**_hand_written(explain), "signature": "0" * 64}
        for headers in ({}, key):  # a caller who signs is verified, API key or not: never re-signed
            refused = await http.post("/agent-request", json=forged, headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "bad_signature"
    assert await bus.dead_letters("code-review") == []  # answered, not stored


async def test_an_agent_token_speaks_only_for_its_own_agent(
    stack: Callable[[str], ServiceProcess], registry: RegistryClient, repo: tuple[Path, str], ports: dict[str, int]
) -> None:
    """With the token of an instance of `caller`, an envelope saying source_agent "orchestrator" is a 403
    naming source_agent and is not run or counted (it was a 200 counted as from the orchestrator);
    saying "caller" it runs."""
    stack("code-review")
    registered = await registry.register(
        Registration(name="caller", version="1", endpoint="http://127.0.0.1:1", agent_id="caller-1")
    )
    token = {"X-Agent-Id": "caller-1", "X-Agent-Token": registered.token}
    explain = {"repo_path": str(repo[0]), "path": "calc.py"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['code-review']}", timeout=10) as http:
        posing = await http.post("/agent-request", json=_hand_written(explain, source_agent="orchestrator"),
                                 headers=token)  # fmt: skip
        assert posing.status_code == 403, posing.text
        assert (posing.json()["error"]["code"], posing.json()["error"]["field"]) == ("forbidden", "source_agent")
        assert "'caller'" in posing.json()["error"]["message"]
        itself = await http.post("/agent-request", json=_hand_written(explain, source_agent="caller"), headers=token)
        assert itself.status_code == 200, itself.text
        wrong = {**token, "X-Agent-Token": "x" * 40}
        refused = await http.post("/agent-request", json=_hand_written(explain, source_agent="caller"), headers=wrong)
        assert (refused.status_code, refused.json()["error"]["field"]) == (401, "X-Agent-Token")
        text = (await http.get("/metrics")).text
    series = re.findall(r"^agent_requests_total\{([^}]*)\}", text, re.M)
    assert not [s for s in series if 'source_agent="orchestrator"' in s]


_SERVE_AGENT_SCRIPT = """
import sys
from agents.catalogue import agent_class
from agents.sdk.app import create_agent_app, serve_agent
from shared.lib.bootstrap import bootstrap

settings = bootstrap("cicd")
app = create_agent_app(agent_class("cicd")(settings), instance_id="cicd-9", endpoint="http://127.0.0.1:1")
serve_agent(app, host="127.0.0.1", port=int(sys.argv[1]), service="cicd")
"""


def _one_error_line(out: str) -> str:
    """The one ``error:`` line of a failed start, after checking it printed no traceback."""
    assert "Traceback" not in out, out
    assert "deregistered" not in out, out
    [line] = [line for line in out.splitlines() if "error" in line.lower()]
    assert line.startswith("error: "), out
    return line


async def test_a_failed_start_is_one_line_through_the_cli_and_serve_agent(
    spawn: Callable[..., ServiceProcess], ports: dict[str, int], service_env: dict[str, str]
) -> None:
    """A wrong registration secret, through `agent-orchestrator agent` or a script calling serve_agent,
    and a port in use through serve_agent, exit 2 with one error line and no traceback, and say
    nothing of deregistering (58 lines of traceback and exit 3, with "drained and deregistered")."""
    spawn("registry", url=f"http://127.0.0.1:{ports['agent-registry']}", name="registry")
    wrong = {**service_env, "AO_REGISTRATION_SECRET": "not-the-registry-secret-" + "x" * 24}
    code, out = await run_cli(wrong, "agent", "code-review", "--port", str(ports["code-review"]),
                              "--instance-id", "code-review-9")  # fmt: skip
    assert code == 2, out
    assert "could not register" in _one_error_line(out)
    assert "AO_REGISTRATION_SECRET" in _one_error_line(out)

    async def serve_agent_script(env: dict[str, str], port: int) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SERVE_AGENT_SCRIPT, str(port), env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    code, out = await serve_agent_script(wrong, ports["cicd"])
    assert code == 2, out
    assert "could not register" in _one_error_line(out)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, out = await serve_agent_script(service_env, taken.getsockname()[1])
    assert code == 2, out
    assert "already in use" in _one_error_line(out)
    assert len(out.strip().splitlines()) == 1, out


_FAILING_BUS_SCRIPT = (
    """
import asyncio
from shared.lib import _bus_serve

async def broken(self):
    await asyncio.sleep(1.0)
    raise RuntimeError("a bug in the maintenance")

_bus_serve.Server._maintain_loop = broken
"""
    + _SERVE_AGENT_SCRIPT
)


async def test_an_instance_whose_bus_serving_ended_exits_1_for_its_supervisor(
    spawn: Callable[..., ServiceProcess], ports: dict[str, int], service_env: dict[str, str], registry: RegistryClient
) -> None:
    """An agent process whose bus serving ends on its own (a bug in a loop) drains, deregisters and
    exits with status 1 after one error line saying why, for its supervisor to start it again: it
    stayed up for good, not ready, answering HTTP, until someone restarted it by hand."""
    spawn("registry", url=f"http://127.0.0.1:{ports['agent-registry']}", name="registry")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FAILING_BUS_SCRIPT, str(ports["cicd"]), env=service_env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    [line] = [line for line in text.splitlines() if line.startswith("error: ")]
    assert "cicd stopped serving its requests on the bus" in line, text
    assert "a bug in the maintenance" in line, text
    with pytest.raises(NotFound):
        await registry.get("cicd-9")


async def test_stale_instance_is_found_and_deregistered(
    spawn: Callable[..., ServiceProcess],
    ports: dict[str, int],
    registry: RegistryClient,
    settings_factory: Callable[..., Settings],
) -> None:
    """An instance that stopped heartbeating is a health issue; the remediation removes it from the registry."""
    env = {"AO_AGENT_STALE_AFTER_S": "0.5"}
    spawn("registry", url=f"http://127.0.0.1:{ports['agent-registry']}", env=env, name="registry")
    endpoint = "http://127.0.0.1:1"
    await registry.register(Registration(name="ghost", version="1", endpoint=endpoint, agent_id="ghost-1"))
    infra = InfrastructureAgent(settings_factory(agent_stale_after_s=0.5))
    infra.services.registry = registry
    await asyncio.sleep(1.0)
    report = await infra.run("HEALTH_CHECK", {"registry": True})
    [issue] = [i for i in report["issues"] if i["kind"] == "stale_instance"]
    assert issue["remediation"] == {"action": "deregister_instance", "agent_id": "ghost-1"}
    done = await infra.run("REMEDIATE", issue["remediation"])
    assert done["applied"] is True
    with pytest.raises(NotFound):
        await registry.get("ghost-1")
