"""Bounded metric labels: values taken from input add a fixed number of series at most."""

from __future__ import annotations

import pytest

from shared.lib import metrics
from shared.lib.resource_lock import resource_type


@pytest.fixture(autouse=True)
def fresh_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's own bounds: the process-wide ones keep what other tests' labels need."""
    monkeypatch.setattr(metrics, "AGENT_NAME_LABELS", metrics.LabelBound())
    monkeypatch.setattr(metrics, "RESOURCE_TYPE_LABELS", metrics.LabelBound())


def test_a_label_bound_passes_known_and_first_values_then_other() -> None:
    """Known values always pass; of the others the first `limit` distinct ones pass, later new ones are `other`."""
    bound = metrics.LabelBound(limit=3)
    bound.know("orchestrator")
    assert [bound(f"src-{i}") for i in range(5)] == ["src-0", "src-1", "src-2", "other", "other"]
    assert bound("src-1") == "src-1"  # a value seen once keeps its label: counters stay consistent
    assert bound("orchestrator") == "orchestrator"


def test_request_types_an_agent_does_not_declare_are_unsupported() -> None:
    """Once an agent declared its request types, any other type is labelled `unsupported`."""
    metrics.declare_request_types("unit-labels", ["REVIEW_CODE", "EXPLAIN_CODE"])
    assert metrics.request_type_label("unit-labels", "REVIEW_CODE") == "REVIEW_CODE"
    assert metrics.request_type_label("unit-labels", "RANDOM_1f3a") == metrics.UNSUPPORTED_LABEL
    assert metrics.AGENT_NAME_LABELS("unit-labels") == "unit-labels"  # its own name is known


def test_resource_types_are_bounded() -> None:
    """Lock resource types past the bound map to `other`, however many distinct prefixes come."""
    labels = {resource_type(f"t{i}x:thing") for i in range(metrics.MAX_LABEL_VALUES + 10)}
    assert len(labels - {metrics.OVERFLOW_LABEL}) <= metrics.MAX_LABEL_VALUES
    assert metrics.OVERFLOW_LABEL in labels
