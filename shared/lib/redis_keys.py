"""Every Redis key pattern and TTL, in one place.

Every key starts with the deployment's prefix (``Settings.redis_prefix``), so
deployments and tests can share one server. Keys that belong to one agent carry
its name as a hash tag (``{name}``), so all of an agent's keys land in the same
Redis Cluster slot and multi-key operations on them stay legal.
"""

from __future__ import annotations

from typing import Any

__all__: list[str] = []

# -- messaging (shared.lib.event_bus) -----------------------------------------------
__all__ += [
    "BANDS",
    "IN_FLIGHT_MARKER_MARGIN_MS",
    "agents_set",
    "as_text",
    "band_of",
    "cancel_channel",
    "consumers_key",
    "dead_letter_stream",
    "events_channel",
    "reply_channel",
    "request_id_key",
    "request_stream",
    "response_key",
]


def as_text(value: Any) -> str:
    """A name as Redis replies with it (bytes on a client that does not decode), as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


#: Priority bands, served in this order: one stream per band, so a backlog of
#: normal work never delays an urgent call (urgent+high share the first band).
BANDS: tuple[str, ...] = ("high", "normal")
_BAND_OF = {"urgent": "high", "high": "high", "normal": "normal", "low": "normal"}

#: An in-flight marker outlives its request's deadline by this much, so a repeat
#: sent right at the deadline still finds it; after that nothing can run the request.
IN_FLIGHT_MARKER_MARGIN_MS = 1000


def band_of(priority: str) -> str:
    """The band (stream) a priority is queued in."""
    return _BAND_OF[priority]


def request_stream(prefix: str, agent: str, band: str) -> str:
    """Stream of requests to ``agent`` in ``band``; its consumer group is named after the agent.

    Acknowledged entries are deleted in the same transaction as the ack, so the
    stream's length is the agent's queue depth (unread plus pending).
    """
    return f"{prefix}:{{{agent}}}:requests:{band}"


def consumers_key(prefix: str, agent: str) -> str:
    """Sorted set: consumer name -> Unix ms until which it counts as live.

    Renewed by each serving instance every third of the visibility timeout and
    expiring with it: a request to an agent with no live member fails at once.
    """
    return f"{prefix}:{{{agent}}}:consumers"


def response_key(prefix: str, agent: str, idempotency_key: str) -> str:
    """The stored response of a request (TTL ``Settings.response_ttl_s``), or ``P`` while
    it is in flight (TTL: the request's deadline plus IN_FLIGHT_MARKER_MARGIN_MS)."""
    return f"{prefix}:{{{agent}}}:response:{idempotency_key}"


def request_id_key(prefix: str, agent: str, request_id: str) -> str:
    """The idempotency key a request id was first admitted under (TTL ``Settings.response_ttl_s``):
    the same request id sent again under another key gets that request's response."""
    return f"{prefix}:{{{agent}}}:request:{request_id}"


def dead_letter_stream(prefix: str, agent: str) -> str:
    """Requests to ``agent`` that were refused or redelivered too often, each with its reason.

    Capped at ``Settings.stream_maxlen`` (approximate); no TTL, operators requeue or let it trim.
    """
    return f"{prefix}:{{{agent}}}:dead"


def agents_set(prefix: str) -> str:
    """Set of agent names that have ever served, so the CLI can list every dead-letter stream."""
    return f"{prefix}:agents"


def reply_channel(prefix: str, instance_id: str) -> str:
    """Pub/sub channel of one requester instance: responses are pushed here.

    Pub/sub drops what nobody hears; the stored response is the durable copy,
    read back after a reconnect or before giving up on a timeout.
    """
    return f"{prefix}:reply:{instance_id}"


def cancel_channel(prefix: str, agent: str) -> str:
    """Pub/sub channel of cancel notices for requests to ``agent``: every instance serving it
    listens (on its reply connection), and the one running the request cancels its handler.

    An instance remembers each notice until the request's deadline plus
    IN_FLIGHT_MARKER_MARGIN_MS (in memory, no key), so a request still queued when its notice
    came is answered ``cancelled`` without running when that instance reads it. Pub/sub drops
    what nobody hears: a notice sent while an instance was disconnected is lost to it.
    """
    return f"{prefix}:{{{agent}}}:cancel"


def events_channel(prefix: str, event_type: str) -> str:
    """Pub/sub channel of broadcast events of one type (subscribers use glob patterns)."""
    return f"{prefix}:events:{event_type}"
