"""The registry's wire models and its status transition rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.lib.registry_models import AgentStatus, Registration, Skill, transition_allowed

S = AgentStatus


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (S.INITIALIZING, S.ACTIVE, True),
        (S.ACTIVE, S.BUSY, True),
        (S.BUSY, S.ACTIVE, True),
        (S.ACTIVE, S.ACTIVE, True),
        (S.INITIALIZING, S.BUSY, False),
        (S.BUSY, S.INITIALIZING, False),
        (S.ERROR, S.ACTIVE, False),
        (S.OFFLINE, S.ACTIVE, False),
        *[(status, S.ERROR, True) for status in S],
        *[(status, S.OFFLINE, True) for status in S],
    ],
)
def test_transitions_follow_the_design(current: AgentStatus, new: AgentStatus, allowed: bool) -> None:
    """initializing -> active, active <-> busy, any -> error/offline; nothing else."""
    assert transition_allowed(current, new) is allowed


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Code Review"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"agent_id": "-leading-dash"}, "agent_id"),
        ({"endpoint": "not a url"}, "endpoint"),
        ({"version": ""}, "version"),
        ({"capabilities": [{"id": "", "name": "n"}]}, "capabilities"),
        ({"unknown": True}, "unknown"),
    ],
)
def test_registration_refuses_bad_fields(change: dict[str, object], field: str) -> None:
    """A registration with a bad field fails validation naming that field."""
    body: dict[str, object] = {"name": "code-review", "version": "1.0", "endpoint": "http://127.0.0.1:8003"}
    body.update(change)
    with pytest.raises(ValidationError) as info:
        Registration.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == field


def test_skill_has_the_a2a_shape() -> None:
    """A skill carries id, name, description, tags and input/output schemas, and nothing else."""
    skill = Skill(id="review_code", name="Review code", tags=["python"], input_schema={"type": "object"})
    assert set(skill.model_dump()) == {"id", "name", "description", "tags", "input_schema", "output_schema"}
    with pytest.raises(ValidationError):
        Skill.model_validate({"id": "x", "name": "x", "examples": []})
