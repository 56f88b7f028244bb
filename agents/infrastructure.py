"""The infrastructure agent: DEPLOY_SERVICE and ROLLBACK of environment
directories, HEALTH_CHECK of a deployment, and REMEDIATE for the issues a
health check reports.

Environments live under ``data_dir/environments/<name>`` unless an absolute
path is given. Deploys and rollbacks of one environment run one at a time under
its lock file (``agents.work.release``), waiting for it no longer than the
request's deadline; a repeated deploy of the current revision changes nothing.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.sdk.agent import Agent, skill
from agents.work.health import (
    Environment,
    Issue,
    Probe,
    Target,
    probe_environment,
    probe_http,
    probe_pending,
    probe_tcp,
)
from agents.work.pipeline import file_sha256
from agents.work.release import ENV_LOCK_WAIT_S, deploy_release, environment_dir, rollback
from agents.work.remediation import (
    dead_consumers,
    deregister_instance,
    expired_locks,
    reclaim_pending,
    release_lock,
    stale_instances,
)
from shared.lib.errors import InvalidInput, NotFound
from shared.lib.resource_lock import ResourceLockManager
from shared.lib.settings import AGENT_ID_PATTERN

__all__ = ["DeployServiceInput", "HealthCheckInput", "InfrastructureAgent", "RemediateInput", "RollbackInput"]

_ARTIFACT_REV = re.compile(r"-([0-9a-f]{7,64})\.tar\.gz$")


class DeployServiceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(min_length=1, description="path of a .tar.gz from DEPLOY_ARTIFACT")
    environment: str = Field(min_length=1, description="a name under data_dir/environments, or an absolute path")
    revision: str | None = Field(default=None, description="default: from the artifact's manifest")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="checked when given")
    keep_releases: int | None = Field(default=None, ge=1, le=100)


class RollbackInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: str = Field(min_length=1)
    to: str | None = Field(default=None, description="a kept release; default: the one before current")


class HealthCheckInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(default_factory=list, max_length=256)
    environment: Environment | None = None
    agents: list[Annotated[str, Field(pattern=AGENT_ID_PATTERN)]] = Field(
        default_factory=list, max_length=256, description="agents whose pending requests to count"
    )
    max_pending: int = Field(default=100, ge=0)
    registry: bool = Field(default=False, description="look for stale instances in the registry")
    locks: bool = Field(default=False, description="look for expired or abandoned lock leases")
    timeout_s: float = Field(default=5.0, gt=0, le=120)


class RemediateInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["rollback", "deregister_instance", "reclaim_pending", "release_lock"]
    environment: str | None = Field(default=None, description="rollback")
    to: str | None = Field(default=None, description="rollback: a kept release")
    agent_id: str | None = Field(default=None, pattern=AGENT_ID_PATTERN, description="deregister_instance")
    agent: str | None = Field(default=None, pattern=AGENT_ID_PATTERN, description="reclaim_pending")
    consumer: str | None = Field(default=None, min_length=1, max_length=128, description="reclaim_pending")
    resource_id: str | None = Field(default=None, min_length=1, max_length=512, description="release_lock")
    reason: str = Field(default="remediation by the infrastructure agent", min_length=1, max_length=500)

    @model_validator(mode="after")
    def _needs(self) -> RemediateInput:
        needed = _NEEDS[self.action]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.action} needs {', '.join(missing)}")
        return self


_NEEDS: dict[str, tuple[str, ...]] = {
    "rollback": ("environment",),
    "deregister_instance": ("agent_id",),
    "reclaim_pending": ("agent", "consumer"),
    "release_lock": ("resource_id",),
}


def _manifest(artifact: Path) -> dict[str, Any]:
    path = artifact.with_name(artifact.name + ".json")
    if not path.is_file():
        return {}
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        message = f"artifact: its manifest {path.name} is not JSON ({e}); pass the revision"
        raise InvalidInput(message, field="artifact") from e
    return manifest if isinstance(manifest, dict) else {}


def _revision_of(artifact: Path, given: str | None) -> str:
    if not artifact.is_file():
        raise NotFound(f"artifact: {artifact} does not exist; package the revision first", field="artifact")
    if given:
        return given
    manifest = _manifest(artifact)
    if isinstance(manifest.get("revision"), str):
        return str(manifest["revision"])
    if (match := _ARTIFACT_REV.search(artifact.name)) is not None:
        return match.group(1)
    raise InvalidInput("revision: the artifact has no manifest; pass the revision", field="revision")


class InfrastructureAgent(Agent):
    name = "infrastructure"
    version = "1.0.0"
    description = "Deploys artifacts into environment directories, rolls back, checks health and remediates."

    def _env(self, environment: str) -> Path:
        return environment_dir(environment, root=self.settings.data_dir / "environments")

    def _lock_wait_s(self) -> float:
        """How long to wait for the environment's lock: no longer than the caller waits."""
        return self.time_left_s(default_s=ENV_LOCK_WAIT_S)

    @skill(
        "DEPLOY_SERVICE",
        description="Unpack an artifact into <env>/releases/<rev> and switch <env>/current atomically; keeps the "
        "last N releases. Idempotent per environment and revision.",
        tags=("deploy", "release", "environment"),
    )
    async def deploy_service(self, payload: DeployServiceInput) -> dict[str, Any]:
        artifact = Path(payload.artifact)
        env = self._env(payload.environment)
        revision = await asyncio.to_thread(_revision_of, artifact, payload.revision)
        if payload.sha256 is not None:
            await _check_sha256(artifact, payload.sha256)
        keep = payload.keep_releases or self.settings.keep_releases
        result = await deploy_release(artifact, env, revision, keep_releases=keep, wait_s=self._lock_wait_s())
        return result.as_dict()

    @skill(
        "ROLLBACK",
        description="Switch <env>/current back to the release deployed before it, or to a named kept release.",
        tags=("deploy", "rollback", "environment"),
    )
    async def rollback(self, payload: RollbackInput) -> dict[str, Any]:
        return (await rollback(self._env(payload.environment), to=payload.to, wait_s=self._lock_wait_s())).as_dict()

    @skill(
        "HEALTH_CHECK",
        description="Probe HTTP and TCP targets, the release an environment serves, and the requests pending "
        "for agents on the bus; returns every probe and the issues found.",
        tags=("health", "monitoring", "probe"),
    )
    async def health_check(self, payload: HealthCheckInput) -> dict[str, Any]:
        probes, issues = await self._probe_targets(payload)
        if payload.environment is not None:
            probe, issue = await asyncio.to_thread(probe_environment, self._env(payload.environment))
            probes.append(probe)
            issues += [issue] if issue else []
        if payload.agents:
            pending_probes, pending_issues = await self._pending(payload)
            probes += pending_probes
            issues += pending_issues
        if payload.registry:
            issues += await stale_instances(self.require("registry"), stale_after_s=self.settings.agent_stale_after_s)
        if payload.locks:
            issues += await expired_locks(self._locks())
        return {
            "healthy": not any(i.severity == "critical" for i in issues),
            "probes": [p.as_dict() for p in probes],
            "issues": [i.as_dict() for i in issues],
        }

    async def _pending(self, payload: HealthCheckInput) -> tuple[list[Probe], list[Issue]]:
        redis, prefix = self.require("redis"), self.settings.redis_prefix
        probes, issues = await probe_pending(redis, prefix, payload.agents, max_pending=payload.max_pending)
        for agent in payload.agents:
            for consumer, held in (await dead_consumers(redis, prefix, agent)).items():
                fix = {"action": "reclaim_pending", "agent": agent, "consumer": consumer}
                message = f"{held} requests to {agent} are held by {consumer}, which is no longer live"
                issues.append(Issue("dead_consumer", f"{agent}/{consumer}", "warning", message, fix))
        return probes, issues

    def _locks(self) -> ResourceLockManager:
        return ResourceLockManager(self.require("pool"), self.settings)

    async def _probe_targets(self, payload: HealthCheckInput) -> tuple[list[Probe], list[Issue]]:
        checks = [
            probe_http(t.url or "", timeout_s=payload.timeout_s, expect_status=t.expect_status)
            if t.kind == "http"
            else probe_tcp(t.host or "", t.port or 0, timeout_s=payload.timeout_s)
            for t in payload.targets
        ]
        results = await asyncio.gather(*checks)
        return [p for p, _ in results], [i for _, i in results if i is not None]

    @skill(
        "REMEDIATE",
        description="Apply the fix a health check proposed: rollback an environment, deregister a dead "
        "instance, reclaim the requests a dead consumer holds, or release an expired lock.",
        tags=("remediation", "self-healing"),
    )
    async def remediate(self, payload: RemediateInput) -> dict[str, Any]:
        result = await getattr(self, f"_remediate_{payload.action}")(payload)
        return {"action": payload.action, **result}

    async def _remediate_rollback(self, payload: RemediateInput) -> dict[str, Any]:
        result = await rollback(self._env(payload.environment or ""), to=payload.to, wait_s=self._lock_wait_s())
        return {"applied": result.changed, "result": result.as_dict()}

    async def _remediate_deregister_instance(self, payload: RemediateInput) -> dict[str, Any]:
        api_key = self.settings.api_keys[0] if self.settings.api_keys else None
        removed = await deregister_instance(self.settings.registry_url, payload.agent_id or "", api_key=api_key,
                                            timeout_s=10.0)  # fmt: skip
        return {"applied": removed, "agent_id": payload.agent_id}

    async def _remediate_reclaim_pending(self, payload: RemediateInput) -> dict[str, Any]:
        marked = await reclaim_pending(
            self.require("redis"), self.settings.redis_prefix, payload.agent or "", payload.consumer or "",
            visibility_timeout_s=self.settings.visibility_timeout_s,
        )  # fmt: skip
        return {"applied": marked > 0, "reclaimable": marked}

    async def _remediate_release_lock(self, payload: RemediateInput) -> dict[str, Any]:
        result = await release_lock(self._locks(), payload.resource_id or "", reason=payload.reason)
        return {"applied": result["released"], **result}


def _sha256_of(artifact: Path) -> str:
    if not artifact.is_file():
        raise InvalidInput(f"artifact: {artifact} does not exist", field="artifact")
    return file_sha256(artifact)


async def _check_sha256(artifact: Path, expected: str) -> None:
    actual = await asyncio.to_thread(_sha256_of, artifact)
    if actual != expected:
        raise InvalidInput(f"sha256: the artifact's checksum is {actual}, not {expected}", field="sha256")
