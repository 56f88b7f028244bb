"""Envelopes: construction, canonical form, HMAC signing and verification, limits."""

from __future__ import annotations

import time

import orjson
import pytest

from shared.lib.agent_events import (
    ENVELOPE_OVERHEAD_BYTES,
    MAX_DEADLINE_AHEAD_S,
    AgentRequestEvent,
    AgentResponseEvent,
    canonical_bytes,
    check_payload_size,
    parse_envelope,
    request_from_dict,
    response_from_dict,
    signing_key_for,
)
from shared.lib.errors import InvalidInput, InvalidSignature, OrchestratorError, PayloadTooLarge, RequestRejected
from shared.lib.settings import Settings

KEY = b"unit-test-key-0123456789"


def _request(**kw: object) -> AgentRequestEvent:
    values: dict[str, object] = {
        "source_agent": "orchestrator",
        "target_agent": "code-review",
        "request_type": "REVIEW_CODE",
        "payload": {"b": 1, "a": [1, 2]},
    }
    values.update(kw)
    return AgentRequestEvent.create(**values)  # type: ignore[arg-type]


def test_create_fills_ids_and_deadline() -> None:
    """create() gives fresh ids, defaults correlation and idempotency to the request id, deadline from timeout_s."""
    before = time.time()
    request = _request(timeout_s=5)
    assert len(request.request_id) == 32
    assert request.correlation_id == request.idempotency_key == request.request_id
    assert before + 5 <= request.deadline <= time.time() + 5
    assert request.schema_version == 1
    assert _request().request_id != request.request_id


def test_wire_values_are_plain_strings() -> None:
    """Priority and status serialise as plain strings, never an enum repr."""
    data = orjson.loads(_request(priority="urgent").to_json())
    assert data["priority"] == "urgent"
    response = _request().respond("rejected", error={"code": "rejected", "message": "no"})
    assert orjson.loads(response.to_json())["status"] == "rejected"


@pytest.mark.parametrize(
    ("field", "value"),
    [("target_agent", "Code Review"), ("source_agent", "-x"), ("request_type", "1BAD"), ("priority", "asap")],
)
def test_invalid_fields_are_named(field: str, value: str) -> None:
    """A bad agent id, request type or priority raises InvalidInput naming the field."""
    with pytest.raises(InvalidInput) as err:
        _request(**{field: value})
    assert err.value.field == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deadline", 1e308),  # once a 500: the in-flight marker's ms overflowed int()
        ("deadline", 1e17),  # once a retryable 503: the marker's ms were out of Redis's range
        ("deadline", "inf"),
        ("deadline", "nan"),
        ("created_at", "inf"),
        ("created_at", "nan"),
        ("deadline", True),  # once read as 1.0 (1970): a 408 deadline_expired, not a type error
        ("created_at", False),
    ],
)
def test_received_times_must_be_finite_and_near(field: str, value: object) -> None:
    """A received deadline or created_at that is not finite, or a deadline over a day ahead, names its field."""
    data = _request().to_dict()
    data[field] = value
    with pytest.raises(InvalidInput) as err:
        request_from_dict(data, key=None)
    assert err.value.field == field
    assert err.value.status_code == 422


def test_a_deadline_up_to_a_day_ahead_is_taken_and_timeout_s_past_it_is_refused() -> None:
    """A deadline up to MAX_DEADLINE_AHEAD_S after created_at is valid; create(timeout_s=) past it names deadline."""
    data = _request().to_dict()
    data["deadline"] = data["created_at"] + MAX_DEADLINE_AHEAD_S
    assert request_from_dict(data, key=None).deadline == data["deadline"]
    with pytest.raises(InvalidInput) as err:
        _request(timeout_s=MAX_DEADLINE_AHEAD_S + 1)
    assert err.value.field == "deadline"
    assert "at most one day" in err.value.message


def test_canonical_form_ignores_key_order_and_signature() -> None:
    """The canonical bytes sort keys at every level and leave out the signature."""
    a = {"b": {"y": 1, "x": 2}, "a": 1, "signature": "s1"}
    b = {"a": 1, "b": {"x": 2, "y": 1}, "signature": "s2"}
    assert canonical_bytes(a) == canonical_bytes(b) == b'{"a":1,"b":{"x":2,"y":1}}'


def test_signature_round_trip_and_tamper_detection() -> None:
    """A signed envelope verifies after a JSON round trip; any changed field or wrong key fails."""
    signed = _request().signed(KEY)
    data = orjson.loads(signed.to_json())
    assert request_from_dict(data, key=KEY) == signed
    with pytest.raises(InvalidSignature):
        request_from_dict({**data, "payload": {"b": 2, "a": [1, 2]}}, key=KEY)
    with pytest.raises(InvalidSignature):
        request_from_dict(data, key=b"other-key")
    unsigned = orjson.loads(_request().to_json())
    with pytest.raises(InvalidSignature) as err:
        request_from_dict(unsigned, key=KEY)
    assert err.value.field == "signature"


def test_development_mode_skips_verification() -> None:
    """With key=None (development mode) an unsigned envelope is accepted."""
    data = orjson.loads(_request().to_json())
    assert request_from_dict(data, key=None).signature is None


def test_payload_limit() -> None:
    """Payloads over max_bytes are refused with PayloadTooLarge on the payload field."""
    assert check_payload_size({"a": "x"}, max_bytes=100) == b'{"a":"x"}'
    with pytest.raises(PayloadTooLarge) as err:
        check_payload_size({"a": "x" * 200}, max_bytes=100)
    assert err.value.field == "payload"
    with pytest.raises(InvalidInput):
        check_payload_size({"a": object()}, max_bytes=100)


def test_parse_envelope_refuses_oversized_and_malformed() -> None:
    """Raw envelopes over the limit, not JSON, or not an object are refused before parsing."""
    with pytest.raises(PayloadTooLarge):
        parse_envelope(b" " * (10 + ENVELOPE_OVERHEAD_BYTES + 1), max_bytes=10)
    with pytest.raises(InvalidInput):
        parse_envelope(b"{not json", max_bytes=10)
    with pytest.raises(InvalidInput):
        parse_envelope(b"[1]", max_bytes=10)


def test_response_mirrors_request_and_raises_for_status() -> None:
    """respond() swaps source/target, keeps ids and trace; raise_for_status rebuilds the error."""
    request = _request(metadata={"trace": {"langsmith-trace": "abc"}, "other": 1})
    ok = request.respond("success", {"approved": True}, served_by="i1")
    assert (ok.source_agent, ok.target_agent) == ("code-review", "orchestrator")
    assert ok.request_id == request.request_id
    assert ok.metadata == {"trace": {"langsmith-trace": "abc"}}
    assert ok.raise_for_status() == {"approved": True}
    failed = request.respond("rejected", error={"code": "rejected", "message": "unknown type", "field": "request_type"})
    with pytest.raises(RequestRejected) as err:
        failed.raise_for_status()
    assert err.value.field == "request_type"
    assert "served_by" not in err.value.details
    answered = request.respond("error", error={"code": "invalid_input", "message": "no such module"}, served_by="i2")
    with pytest.raises(OrchestratorError) as err2:
        answered.raise_for_status()
    assert (err2.value.code, err2.value.details["served_by"]) == ("invalid_input", "i2")


def test_signed_response_round_trip() -> None:
    """Responses are signed and verified like requests."""
    response = _request().respond("success", {"x": 1}).signed(KEY)
    parsed = response_from_dict(orjson.loads(response.to_json()), key=KEY)
    assert isinstance(parsed, AgentResponseEvent)
    assert parsed.payload == {"x": 1}


def test_per_agent_key_overrides_shared_key() -> None:
    """An agent with its own key is signed with it; every other agent with the shared key."""
    settings = Settings(dev_mode=True, signing_key="shared-key", agent_signing_keys={"cicd": "cicd-key"})
    assert signing_key_for(settings, "cicd") == b"cicd-key"
    assert signing_key_for(settings, "documentation") == b"shared-key"
