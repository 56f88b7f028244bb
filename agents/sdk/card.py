"""The A2A v1.0 AgentCard an agent serves at ``/.well-known/agent-card.json``.

The card uses only fields of a2a-sdk's ``a2a.types.AgentCard`` (protobuf JSON
names: ``supportedInterfaces``, ``defaultInputModes``...), so it parses
strictly with ``google.protobuf.json_format.ParseDict``. An A2A skill has no
schema fields; each skill's input and output JSON schemas travel in a card
extension (``capabilities.extensions``) whose params map skill id to schemas.
"""

from __future__ import annotations

from typing import Any

from agents.sdk.agent import Agent

__all__ = ["SCHEMAS_EXTENSION_URI", "agent_card"]

#: Identifies the extension carrying each skill's request and response JSON schemas.
SCHEMAS_EXTENSION_URI = "https://agent-orchestrator.dev/extensions/skill-schemas/v1"
_JSON = "application/json"


def _skill(agent: Agent, request_type: str) -> dict[str, Any]:
    spec = agent.skills[request_type]
    return {
        "id": spec.request_type,
        "name": spec.name,
        "description": spec.description,
        "tags": list(spec.tags) or [agent.name],
        "inputModes": [_JSON],
        "outputModes": [_JSON],
    }


def _schemas(agent: Agent) -> dict[str, Any]:
    return {
        skill.id: {"input": skill.input_schema or {}, "output": skill.output_schema or {}}
        for skill in agent.capabilities()
    }


def _interface(url: str) -> dict[str, Any]:
    return {"url": f"{url.rstrip('/')}/agent-request", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}


def agent_card(agent: Agent, *, url: str) -> dict[str, Any]:
    """The card of ``agent`` served at ``url`` (its base URL; requests go to ``url + /agent-request``)."""
    return {
        "name": agent.name,
        "description": agent.description or agent.name,
        "version": agent.version,
        "supportedInterfaces": [_interface(url)],
        "provider": {"organization": "agent-orchestrator", "url": url},
        "capabilities": {
            "streaming": False,
            "pushNotifications": False,
            "extensions": [
                {
                    "uri": SCHEMAS_EXTENSION_URI,
                    "description": "JSON schemas of each skill's request payload and response payload",
                    "required": False,
                    "params": _schemas(agent),
                }
            ],
        },
        "securitySchemes": {
            "apiKey": {"apiKeySecurityScheme": {"location": "header", "name": "X-API-Key"}},
            "agentToken": {"apiKeySecurityScheme": {"location": "header", "name": "X-Agent-Token"}},
        },
        "securityRequirements": [{"schemes": {"apiKey": {"list": []}}}, {"schemes": {"agentToken": {"list": []}}}],
        "defaultInputModes": [_JSON],
        "defaultOutputModes": [_JSON],
        "skills": [_skill(agent, t) for t in agent.request_types],
    }
