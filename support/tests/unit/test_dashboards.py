"""Dashboards and alert rules query only metrics the code defines, over bounded labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

import shared.lib.metrics as metrics
from support.tests.dashboards_support import (
    ALLOWED_LABELS,
    FORBIDDEN_LABELS,
    ROOT,
    alert_rules,
    defined_metric_names,
    generator,
    grouping_labels,
    matcher_labels,
    metric_names,
)

GEN = generator()
PANEL_QUERIES = [(d.title, p.title, q.expr) for d in GEN.DASHBOARDS for p in d.panels for q in p.queries]
ALERTS = [(r["alert"], r["expr"]) for r in alert_rules()]
#: Prometheus adds these to every series; le is a histogram's bucket bound.
SCRAPE_LABELS = {"job", "le"}


def test_committed_dashboards_match_the_generator(tmp_path: Path) -> None:
    """deploy/grafana/dashboards/*.json is exactly what generate.py writes (regenerate after editing)."""
    assert GEN.write_all(check=True) == []
    written = {p.name for p in GEN.write_all(tmp_path)}
    assert written == {p.name for p in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")}


def test_dashboards_cover_the_four_views() -> None:
    """Overview, Agents, Workflows and Locks exist, each with unique panel titles and the provisioned datasource."""
    assert [d.title.split(" / ")[1] for d in GEN.DASHBOARDS] == ["Overview", "Agents", "Workflows", "Locks"]
    for d in GEN.DASHBOARDS:
        model = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / f"{d.uid}.json").read_text())
        titles = [p["title"] for p in model["panels"]]
        assert len(titles) == len(set(titles)), d.title
        assert {t["datasource"]["uid"] for p in model["panels"] for t in p["targets"]} == {GEN.DATASOURCE_UID}


@pytest.mark.parametrize(("where", "expr"), [(f"{d}: {p}", e) for d, p, e in PANEL_QUERIES] + ALERTS)
def test_every_queried_metric_is_defined(where: str, expr: str) -> None:
    """Each metric a panel or alert queries is defined in shared/lib/metrics.py or the default collectors."""
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - defined_metric_names()
    assert not unknown, f"{where} queries metrics nothing defines: {sorted(unknown)}"


def test_metric_name_parsing_catches_a_misspelt_metric() -> None:
    """The check is not a rubber stamp: a misspelt name in a query is reported."""
    expr = 'sum by (type) (rate(workflows_finishd_total{status="failed"}[5m])) / on(type) sum(workflows_active)'
    assert metric_names(expr) - defined_metric_names() == {"workflows_finishd_total"}


@pytest.mark.parametrize(("where", "expr"), [(f"{d}: {p}", e) for d, p, e in PANEL_QUERIES])
def test_no_panel_groups_by_an_id_or_an_instance(where: str, expr: str) -> None:
    """Panels group only by bounded labels: never a request, workflow or owner id, nor instance."""
    labels = grouping_labels(expr) | matcher_labels(expr)
    assert not labels & FORBIDDEN_LABELS, where
    assert labels <= ALLOWED_LABELS | SCRAPE_LABELS, f"{where}: {sorted(labels - ALLOWED_LABELS - SCRAPE_LABELS)}"


@pytest.mark.parametrize(("alert", "expr"), ALERTS)
def test_alerts_use_bounded_labels(alert: str, expr: str) -> None:
    """Alert expressions group and filter only by bounded labels."""
    labels = grouping_labels(expr) | matcher_labels(expr)
    assert labels <= ALLOWED_LABELS | SCRAPE_LABELS, f"{alert}: {sorted(labels - ALLOWED_LABELS - SCRAPE_LABELS)}"


def test_metric_labels_have_bounded_cardinality() -> None:
    """Every metric in shared/lib/metrics.py has only bounded labels: no id ever becomes a label."""
    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(defined) >= 25
    for metric in defined:
        labels = set(metric._labelnames)
        assert not labels & FORBIDDEN_LABELS, metric._name
        assert labels <= ALLOWED_LABELS, f"{metric._name}: {sorted(labels - ALLOWED_LABELS)}"


def test_quiet_empty_panels_give_a_reason() -> None:
    """A panel allowed to be empty in a quiet run says why; the list lives in the generator only."""
    quiet = {p.title: p.quiet_empty for d in GEN.DASHBOARDS for p in d.panels if p.quiet_empty}
    assert quiet
    for title, reason in quiet.items():
        assert len(reason.split()) >= 5, title
