"""What the dashboard and alert tests share: the generator, the rules, and PromQL parsing.

The parsing is deliberately small: it finds metric names and grouping labels in the
queries this project writes, not in arbitrary PromQL.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from prometheus_client import REGISTRY

import shared.lib.metrics  # noqa: F401 - registers every metric of the project in REGISTRY

__all__ = [
    "ALLOWED_LABELS",
    "FORBIDDEN_LABELS",
    "alert_rules",
    "defined_metric_names",
    "generator",
    "grouping_labels",
    "matcher_labels",
    "metric_names",
]

ROOT = Path(__file__).resolve().parents[2]

#: Labels with bounded values (names, types, statuses, reasons), plus Prometheus's own.
ALLOWED_LABELS = {
    "status",
    "name",
    "type",
    "node",
    "source_agent",
    "target_agent",
    "request_type",
    "agent",
    "reason",
    "code",  # an error code of shared/lib/errors.py: a closed set
    "event_type",
    "resource_type",
    "dependency",
}
#: Ids that would make a series per request, workflow or holder.
FORBIDDEN_LABELS = {
    "request_id",
    "workflow_id",
    "owner",
    "owner_id",
    "correlation_id",
    "idempotency_key",
    "thread_id",
    "agent_id",
    "instance_id",
    "id",
}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def generator() -> ModuleType:
    """deploy/grafana/generate.py, imported from its path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ao_dashboards", ROOT / "deploy" / "grafana" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects."""
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(_GROUPING, " ", e)
    e = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", e)
    tokens = re.findall(r"(?<![\w:])[A-Za-z_:][\w:]*\b(?!\s*\()", e)  # not followed by "(": no functions
    return {t for t in tokens if t.lower() not in _KEYWORDS}


def grouping_labels(expr: str) -> set[str]:
    """Labels an expression groups or matches on (by, without, on, ignoring, group_*)."""
    return {label.strip() for group in re.findall(_GROUPING, expr) for label in group.split(",") if label.strip()}


def matcher_labels(expr: str) -> set[str]:
    """Labels an expression filters on inside ``{...}``."""
    return {m for block in re.findall(r"\{([^}]*)\}", expr) for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", block)}


def defined_metric_names() -> set[str]:
    """Every sample name the services can export: shared.lib.metrics plus the default collectors."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
    }
    names = {"up"}  # Prometheus's own, per target
    for family in REGISTRY.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names
