"""The deploy files are valid and speak the settings class's language.

Docker is not run here: the Compose file is checked with the compose-spec parser
(strict: an unknown key fails), the Kubernetes manifests against the Kubernetes
schemas (kubernetes-validate, strict), the Prometheus files with promtool. The
environment variables every file sets must each be a real setting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from compose_spec import PyCompose

from agent_orchestrator.cli import app
from agent_orchestrator.config_reference import env_names, render
from shared.lib.settings import SERVICE_PORTS, load_settings

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s" / "base"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"

#: What an image of ours is run with: DESIGN's services plus the one-shot migration.
APP_COMMANDS = {"serve", "registry", "agent", "migrate"}
#: Variables read by a library on its own (langsmith), not by Settings.
LIBRARY_VARS = re.compile(r"^LANGSMITH_[A-Z_]+$")
#: Variables third-party images read (PostgreSQL, Redis CLI, Grafana).
THIRD_PARTY_VARS = {
    "postgres": re.compile(r"^POSTGRES_(USER|DB|PASSWORD)$"),
    "redis": re.compile(r"^REDISCLI_AUTH$"),
    "grafana": re.compile(r"^GF_[A-Z_]+$"),
}
#: A service cannot run in a container without these (AO_HOST: listen beyond loopback).
REQUIRED_VARS = {"DATABASE_URL", "REDIS_URL", "REGISTRY_URL", "AO_API_KEYS", "AO_REGISTRATION_SECRET", "AO_SIGNING_KEY"}
SECRET_VARS = {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "AO_API_KEYS", "AO_REGISTRATION_SECRET", "AO_SIGNING_KEY"}

_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))"
)


class MissingVariable(ValueError):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg") or ""
        present = name in env and (env[name] != "" or not op.startswith(":"))
        if present:
            return env[name]
        if op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op.endswith("-") else ""

    return _VAR.sub(sub, value)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, env) for v in node]
    return node


def compose_raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines())
    return {k.strip(): v.strip() for k, *rest in pairs if k.strip() and not k.startswith("#") for v in rest}


def filled_env() -> dict[str, str]:
    """deploy/.env.example with a test value for every secret it leaves empty."""
    return {k: v or f"test-{k.lower().replace('_', '-')}" for k, v in env_example().items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(_walk(compose_raw(), filled_env()))


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith("agent-orchestrator:")}


def _variables_of(node: Any) -> set[str]:
    """Variables interpolated anywhere in a parsed Compose document (comments do not count)."""
    if isinstance(node, dict):
        return set().union(*map(_variables_of, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(_variables_of, node)) if node else set()
    if not isinstance(node, str):
        return set()
    return {m.group("braced") or m.group("bare") for m in _VAR.finditer(node) if m.group(0) != "$$"}


# -- Compose ---------------------------------------------------------------------------------------
def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    """The interpolated Compose file parses under the strict compose-spec parser."""
    parsed = PyCompose.from_json(json.dumps(compose))
    assert set(parsed.service_names()) >= {"postgres", "redis", "agent-registry", "prometheus", "grafana"}


def test_compose_spec_parser_refuses_a_misspelt_key(compose: dict[str, Any]) -> None:
    """The validator is not a rubber stamp: a misspelt service key is refused."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["cicd"]["enviroment"] = broken["services"]["cicd"].pop("environment")
    with pytest.raises(ValueError, match="enviroment"):
        PyCompose.from_json(json.dumps(broken))


def test_compose_refuses_to_start_without_each_secret() -> None:
    """Every secret is `${VAR:?}`: leaving any one empty stops Compose before it starts anything."""
    for name in SECRET_VARS | {"GRAFANA_ADMIN_PASSWORD"}:
        env = {**filled_env(), name: ""}
        with pytest.raises(MissingVariable, match=name):
            _walk(compose_raw(), env)


def test_env_example_lists_exactly_the_variables_compose_reads() -> None:
    """deploy/.env.example names every variable the Compose file interpolates, and no other."""
    assert _variables_of(compose_raw()) == set(env_example())


def test_compose_holds_no_literal_secret() -> None:
    """Secrets and credentials in URLs reach containers only through `${VAR}`, never as literals."""
    for name, service in compose_raw()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"(PASSWORD|SECRET|SIGNING_KEY|API_KEYS?|_AUTH)$", key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", str(value)), f"{name}.{key} is a literal"
            if "@" in str(value):
                assert re.search(r":\$\{[A-Z_]+:\?[^}]*\}@", str(value)), f"{name}.{key} has a literal password"


def test_compose_runs_every_service_with_ready_healthchecks(compose: dict[str, Any]) -> None:
    """Registry, two orchestrators, six agents (documentation x2), healthchecks on /ready at DESIGN's ports."""
    services = app_services(compose)
    commands = {n: s["command"] for n, s in services.items()}
    assert sorted(n for n, c in commands.items() if c == ["serve"]) == ["orchestrator-1", "orchestrator-2"]
    agents = {c[1]: n for n, c in commands.items() if c[0] == "agent"}
    assert set(agents) == set(SERVICE_PORTS) - {"orchestrator", "agent-registry"}
    assert services["documentation"]["deploy"]["replicas"] == 2
    port_of = {"agent-registry": 8009, "orchestrator-1": 8001, "orchestrator-2": 8001} | {
        n: SERVICE_PORTS[a] for a, n in agents.items()
    }
    for name, port in port_of.items():
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/ready" in test, name
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["orchestrator-1"]["ports"] == ["127.0.0.1:8001:8001"]
    assert services["agent-registry"]["ports"] == ["127.0.0.1:8009:8009"]


def test_compose_datastores_persist_and_report_health(compose: dict[str, Any]) -> None:
    """PostgreSQL 16 and Redis 7 keep their data in volumes, Redis with an append-only file."""
    pg, redis = compose["services"]["postgres"], compose["services"]["redis"]
    assert pg["image"].startswith("postgres:16")
    assert redis["image"].startswith("redis:7")
    assert "pg-data:/var/lib/postgresql/data" in pg["volumes"]
    assert "redis-data:/data" in redis["volumes"]
    assert "--appendonly yes" in " ".join(redis["command"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_environment_matches_the_settings_class(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variable an app container gets is a setting (or LANGSMITH_*), the required ones are set, and they load."""
    known = set(env_names())
    for name, service in app_services(compose).items():
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = {k for k in env if k not in known and not LIBRARY_VARS.match(k)}
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"
        assert set(env) >= REQUIRED_VARS, f"{name} lacks {sorted(REQUIRED_VARS - set(env))}"
        for key in [k for k in os.environ if k in known]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.host == "0.0.0.0"


def test_third_party_containers_get_only_their_own_variables(compose: dict[str, Any]) -> None:
    """PostgreSQL, Redis and Grafana get only variables their images read."""
    for name, pattern in THIRD_PARTY_VARS.items():
        for key in compose["services"][name]["environment"]:
            assert pattern.match(key), f"{name}: {key}"


def test_image_commands_exist_in_the_cli(compose: dict[str, Any]) -> None:
    """Each command the deploy files run is a command of `agent-orchestrator`."""
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert commands >= APP_COMMANDS
    used = {s["command"][0] for s in app_services(compose).values()}
    used |= {c["args"][0] for d in k8s_docs() for c in _containers(d)}
    assert used == APP_COMMANDS


def test_dockerfile_is_multi_stage_non_root_and_locked() -> None:
    """One slim multi-stage image built with uv from uv.lock, running as a non-root user."""
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.MULTILINE)
    assert [s[1] for s in stages] == ["build", "runtime"]
    assert "slim" in re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)  # type: ignore[union-attr]
    assert "uv sync --frozen --no-dev" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user
    assert not user[-1].startswith(("0", "root"))
    assert re.search(r'^ENTRYPOINT \[.*"agent-orchestrator"\]', text, re.MULTILINE)
    for copied in re.findall(r"^COPY (?!--)(\S+) ", text, re.MULTILINE):
        assert (ROOT / copied).exists(), copied


# -- Kubernetes -------------------------------------------------------------------------------------
def k8s_docs() -> list[dict[str, Any]]:
    """The kustomize build (kubectl when present, else the listed resources as they are)."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for r in kustomization["resources"] for d in yaml.safe_load_all((K8S / r).read_text()) if d]


def secret_template() -> dict[str, Any]:
    """deploy/k8s/base/secret.yaml: the Secret's keys, for the one created out of band."""
    template: dict[str, Any] = yaml.safe_load((K8S / "secret.yaml").read_text())
    return template


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if doc["kind"] in {"Deployment", "Job"}:
        yield from doc["spec"]["template"]["spec"]["containers"]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return k8s_docs()


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_k8s_manifests_validate_against_the_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    """Every manifest is valid (strict: no unknown field) for Kubernetes 1.29 and the newest schemas shipped."""
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_validation_refuses_a_misspelt_field(manifests: list[dict[str, Any]]) -> None:
    """The schema check is strict: a misspelt probe field fails it."""
    deployment = json.loads(json.dumps(next(d for d in manifests if d["kind"] == "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.29.0", strict=True)


def _by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests if d["kind"] == kind}


def test_k8s_deployments_probe_limit_and_expose_design_ports(manifests: list[dict[str, Any]]) -> None:
    """Each Deployment: readiness on /ready, liveness on /health, requests and limits, DESIGN's port, a Service."""
    deployments = _by_kind(manifests, "Deployment")
    assert set(deployments) == set(SERVICE_PORTS)
    services = _by_kind(manifests, "Service")
    for name, d in deployments.items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
        assert c["ports"][0]["containerPort"] == SERVICE_PORTS[name]
        assert services[name]["spec"]["ports"][0]["port"] == SERVICE_PORTS[name]
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployments["orchestrator"]["spec"]["replicas"] == 2
    assert deployments["documentation"]["spec"]["replicas"] == 2


def test_k8s_budgets_autoscalers_config_and_migration(manifests: list[dict[str, Any]]) -> None:
    """A PodDisruptionBudget per Deployment, a CPU HPA per agent, ConfigMap, migrate Job; the Secret is an
    empty template beside the base, not in it (applying the base replaced the real one with empty values)."""
    deployments = set(_by_kind(manifests, "Deployment"))
    pdbs = _by_kind(manifests, "PodDisruptionBudget")
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for p in pdbs.values()} == deployments
    hpas = _by_kind(manifests, "HorizontalPodAutoscaler")
    assert set(hpas) == deployments - {"orchestrator", "agent-registry"}
    for hpa in hpas.values():
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert not _by_kind(manifests, "Secret"), "applying the base must not overwrite the real Secret"
    assert set(secret_template()["stringData"].values()) == {""}, "the Secret is a template: no values"
    (job,) = _by_kind(manifests, "Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert _by_kind(manifests, "ConfigMap")


def test_k8s_environment_matches_the_settings_class(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ConfigMap, Secret and container variables are each a setting (or LANGSMITH_*); required ones are provided."""
    known = set(env_names())
    (config,) = _by_kind(manifests, "ConfigMap").values()
    provided = set(config["data"]) | set(secret_template()["stringData"])
    for doc in manifests:
        for c in _containers(doc):
            names = provided | {e["name"] for e in c.get("env", [])}
            unknown = {n for n in names if n not in known and not LIBRARY_VARS.match(n)}
            assert not unknown, f"{doc['metadata']['name']} sets variables no setting reads: {sorted(unknown)}"
            assert names >= REQUIRED_VARS
    for key in [k for k in os.environ if k in known]:
        monkeypatch.delenv(key)
    for key, value in config["data"].items():
        monkeypatch.setenv(key, value)
    assert load_settings(dev_mode=True).data_dir == Path("/data")


# -- Prometheus -------------------------------------------------------------------------------------
def test_prometheus_scrapes_every_service_at_its_design_port() -> None:
    """One job per service, named as the service, at DESIGN's port; the rule file is loaded."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j["dns_sd_configs"][0]["port"] for j in config["scrape_configs"] if "dns_sd_configs" in j}
    assert jobs == SERVICE_PORTS
    orchestrator = next(j for j in config["scrape_configs"] if j["job_name"] == "orchestrator")
    assert orchestrator["dns_sd_configs"][0]["names"] == ["orchestrator-1", "orchestrator-2"]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; `make test` installs it as root)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=DEPLOY / "prometheus", check=False)


@pytest.mark.parametrize(
    "args",
    [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_config_and_rules(args: tuple[str, ...]) -> None:
    """promtool checks the scrape config and the rules, and the rule unit tests prove each alert fires."""
    result = _promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_a_runbook() -> None:
    """Each alert fires in alerts_test.yml and has a runbook heading in docs/OPERATIONS.md."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == alerts
    headings = set(re.findall(r"^#### (\w+)$", OPERATIONS.read_text(), re.MULTILINE))
    assert alerts <= headings, f"no runbook for {sorted(alerts - headings)}"
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["annotations"]["runbook"] == f"docs/OPERATIONS.md#{r['alert'].lower()}"


# -- the configuration reference ------------------------------------------------------------------------
def test_operations_doc_carries_the_generated_configuration_reference() -> None:
    """docs/OPERATIONS.md holds the reference exactly as `config-reference` renders it, so every setting is there."""
    text = OPERATIONS.read_text()
    assert render() in text, "regenerate it: uv run agent-orchestrator config-reference --write docs/OPERATIONS.md"
    for env in env_names():
        assert f"`{env}`" in text
