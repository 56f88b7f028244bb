"""The proof of the dashboards: a real Prometheus scraping a real stack that ran real workflows.

Every dashboard panel's PromQL and every alert expression is evaluated through
Prometheus's HTTP API. A panel returns data unless the generator marks it
expected-empty in a quiet run, with the reason. A metric a dashboard or alert
uses that no service exports fails. The rules are loaded into Prometheus and must
evaluate cleanly, and killing an agent instance makes ServiceDown's expression fire.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent_orchestrator.demo import make_sample_repo
from agent_orchestrator.stack import Stack
from shared.lib.settings import SERVICE_PORTS
from support.tests.dashboards_support import FORBIDDEN_LABELS, ROOT, alert_rules, generator, metric_names
from support.tests.e2e.conftest import start_stack, stop_stack
from support.tests.procs import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus is not installed (Debian package `prometheus`; `make test` installs it as root)",
    ),
]

GEN = generator()
#: What Grafana's $__rate_interval becomes here: at least 4 scrapes of 1 s, as Grafana computes it.
RATE_WINDOW = "15s"
#: Alerts that must stay silent while every service is up and connected.
SILENT_WHEN_HEALTHY = {"ServiceDown", "ServiceAbsent", "PostgresUnreachable", "RedisUnreachable"}
#: Any label with more values than this in a short run is unbounded (ids leaking into labels).
MAX_LABEL_VALUES = 64
_TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    http: httpx.Client

    def api(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"{self.url}/api/v1/{path}", params=params)
        body = r.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float) -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=start, end=time.time(), step="1s")["result"])


def _job_of(process_name: str) -> str:
    base = re.sub(r"-\d+$", "", process_name)
    return base if base in SERVICE_PORTS else process_name


def write_config(stack: Stack, path: Path) -> Path:
    """A scrape config with the job names of deploy/prometheus/prometheus.yml, on loopback."""
    targets: dict[str, list[str]] = {}
    for p in stack.processes:
        targets.setdefault(_job_of(p.name), []).append(p.url.removeprefix("http://"))
    assert set(targets) == set(SERVICE_PORTS), targets
    config = {
        "global": {"scrape_interval": "2s", "scrape_timeout": "1900ms", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": sorted(urls)}]} for job, urls in sorted(targets.items())
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(config: Path, data: Path) -> Prometheus:
    port = free_port()
    with (data.parent / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, httpx.Client(timeout=10))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (data.parent / "prometheus.log").read_text()[-2000:]
        try:
            if prom.http.get(f"{prom.url}/-/ready").status_code == 200:
                return prom
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("prometheus was not ready within 30 s")


def wait_for_first_scrapes(prom: Prometheus, *, targets: int, timeout_s: float = 30) -> None:
    """Every target scraped at least twice, so what the workflows change shows up as a change."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = prom.api("query", query="count(count_over_time(up[1m]) >= 2)")["result"]
        if result and int(float(result[0]["value"][1])) >= targets:
            return
        time.sleep(0.5)
    raise AssertionError(f"prometheus did not scrape all {targets} targets twice within {timeout_s:.0f}s")


def drive_workflows(stack: Stack, repo_root: Path) -> dict[str, str]:
    """Two pr_deployments on one repository (lock contention, approvals), parallel_docs, self_healing."""
    repo, base, head = make_sample_repo(repo_root)
    pr = {"repo_path": str(repo), "base": base, "head": head, "environment": "staging"}
    launches = [
        ("pr_deployment", pr),
        ("pr_deployment", {**pr, "environment": "qa"}),
        ("parallel_docs", {"repo_path": str(repo), "modules": ["calc", "calc.ops"]}),
        ("self_healing", {"registry": True, "agents": ["documentation"], "max_iterations": 2}),
    ]
    with httpx.Client(base_url=stack.orchestrator_url, headers={"X-API-Key": stack.api_key}, timeout=30) as api:
        ids = []
        for wtype, data in launches:
            r = api.post("/workflows", json={"workflow_type": wtype, "input": data})
            assert r.status_code == 202, r.text
            ids.append(r.json()["workflow_id"])
        return _follow_and_approve(api, ids)


def _follow_and_approve(api: httpx.Client, ids: list[str], *, timeout_s: float = 75) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        for wf_id in ids:
            wf = api.get(f"/workflows/{wf_id}").json()
            status[wf_id] = wf["status"]
            if wf["status"] == "interrupted":
                time.sleep(0.5)  # a measurable approval wait
                api.post(f"/workflows/{wf_id}/resume", json={"decision": {"decision": "approve", "by": "ops"}})
        if all(s in _TERMINAL for s in status.values()):
            return status
        time.sleep(0.3)
    raise AssertionError(f"workflows did not finish: {status}")


@dataclass
class LiveRun:
    stack: Stack
    prom: Prometheus
    started_at: float
    outcomes: dict[str, str]


@pytest.fixture(scope="module")
def live(server_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """A stack that ran four workflows, and a Prometheus that scraped it all along."""
    tmp = tmp_path_factory.mktemp("live")
    stack, db_name = start_stack(server_urls, tmp)
    prom = None
    try:
        prom = start_prometheus(write_config(stack, tmp / "prometheus.yml"), tmp / "tsdb")
        wait_for_first_scrapes(prom, targets=len(stack.processes))
        started = time.time()
        outcomes = drive_workflows(stack, tmp)
        time.sleep(4)  # a few more scrapes and rule evaluations after the last step
        yield LiveRun(stack, prom, started, outcomes)
    finally:
        if prom is not None:
            prom.proc.terminate()
            prom.proc.wait(timeout=15)
            prom.http.close()
        stop_stack(stack, server_urls, db_name)


def _has_data(series: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(v)) for s in series for _, v in s["values"])


def test_the_workflows_succeeded(live: LiveRun) -> None:
    """The run the dashboards are judged on is a healthy one: every workflow succeeded."""
    assert set(live.outcomes.values()) == {"succeeded"}, live.outcomes


def test_every_panel_returns_data_or_is_marked_quiet_empty(live: LiveRun) -> None:
    """Each panel's queries return data over the run, unless the generator marks the panel quiet-empty."""
    empty, surprising = [], []
    for d in GEN.DASHBOARDS:
        for panel in d.panels:
            data = [
                _has_data(live.prom.query_range(q.expr.replace(GEN.RATE_WINDOW, RATE_WINDOW), live.started_at))
                for q in panel.queries
            ]
            if not all(data) and not panel.quiet_empty:
                empty.append(f"{d.title}: {panel.title} ({data})")
            if all(data) and panel.quiet_empty:
                surprising.append(panel.title)
    assert not empty, f"panels with no data in the run: {empty}"
    print(f"quiet-empty panels that had data this run: {surprising}")


def test_every_metric_a_dashboard_or_alert_uses_is_exported(live: LiveRun) -> None:
    """Each metric name the dashboards and alerts use is exported by some scraped service."""
    exprs = [q.expr for d in GEN.DASHBOARDS for p in d.panels for q in p.queries] + [r["expr"] for r in alert_rules()]
    used = set().union(*(metric_names(e) for e in exprs))
    metadata = set(live.prom.api("metadata"))
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in used}
    missing = {n for n in families if n not in metadata and n != "up"}
    assert not missing, f"used by dashboards or alerts but exported by no service: {sorted(missing)}"
    assert live.prom.query("up"), "Prometheus scraped nothing"


def test_every_alert_expression_evaluates_and_rules_are_healthy(live: LiveRun) -> None:
    """Prometheus evaluates every rule without error, and the availability alerts stay silent when healthy."""
    rules = [r for g in live.prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
    for rule in alert_rules():
        result = live.prom.query(rule["expr"])
        if rule["alert"] in SILENT_WHEN_HEALTHY:
            assert result == [], f"{rule['alert']} fires on a healthy stack: {result}"


def test_dependency_gauge_reports_every_service_connected(live: LiveRun) -> None:
    """service_dependency_up is 1 for PostgreSQL and Redis on every scraped service."""
    result = live.prom.query("service_dependency_up")
    jobs = {s["metric"]["job"] for s in result}
    assert jobs == set(SERVICE_PORTS)
    assert {s["metric"]["dependency"] for s in result} == {"postgres", "redis"}
    assert {s["value"][1] for s in result} == {"1"}


def test_label_cardinality_stays_bounded(live: LiveRun) -> None:
    """No id label exists in what the services export, and every label has a bounded number of values."""
    labels = set(live.prom.api("labels"))
    assert not labels & FORBIDDEN_LABELS, sorted(labels & FORBIDDEN_LABELS)
    for label in labels - {"__name__"}:
        values = live.prom.api(f"label/{label}/values")
        assert len(values) <= MAX_LABEL_VALUES, f"{label} has {len(values)} values"


def test_service_down_fires_when_an_agent_instance_dies(live: LiveRun) -> None:
    """kill -9 of one documentation instance makes ServiceDown's expression name exactly that target."""
    victim = next(p for p in live.stack.processes if p.name == "documentation-2")
    live.stack.kill9(victim)
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == "ServiceDown")
    deadline = time.monotonic() + 10
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not result:
        time.sleep(0.5)
        result = live.prom.query(expr)
    assert [(s["metric"]["job"], s["metric"]["instance"]) for s in result] == [
        ("documentation", victim.url.removeprefix("http://"))
    ]
