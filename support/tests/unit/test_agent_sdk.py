"""The agent SDK without services: skills, payload validation, rejection, cards, the LLM brain."""

from __future__ import annotations

from pathlib import Path

import pytest
from a2a.types import AgentCard
from google.protobuf.json_format import ParseDict, ParseError
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from pydantic import BaseModel

from agents.catalogue import AGENTS, agent_class
from agents.sdk import Agent, ChatModelBrain, load_brain, skill
from agents.sdk.card import SCHEMAS_EXTENSION_URI, agent_card
from agents.sdk.routes import status_for_error_code
from shared.lib.agent_events import AgentRequestEvent
from shared.lib.errors import InvalidInput, OrchestratorError, RequestRejected, StartupError
from shared.lib.settings import Settings

EXPECTED_TYPES = {
    "orchestrator": ["AGGREGATE_RESULTS", "DECOMPOSE_TASK", "ROUTE_REQUEST"],
    "code-review": ["EXPLAIN_CODE", "REVIEW_CODE"],
    "cicd": ["DEPLOY_ARTIFACT", "RUN_PIPELINE", "VALIDATE_BUILD"],
    "infrastructure": ["DEPLOY_SERVICE", "HEALTH_CHECK", "REMEDIATE", "ROLLBACK"],
    "documentation": ["GENERATE_DOCS", "UPDATE_README"],
    "feature-dev": ["GENERATE_CODE", "REFACTOR_CODE"],
}


class GreetInput(BaseModel):
    who: str
    times: int = 1


class Greeter(Agent):
    name = "greeter"
    description = "Says hello."

    @skill("GREET", description="Greets someone.", tags=("demo",))
    async def greet(self, payload: GreetInput) -> dict[str, str]:
        return {"text": " ".join([f"hello {payload.who}"] * payload.times)}

    @skill("CRASH", description="Fails with an unexpected error.")
    async def crash(self, payload: GreetInput) -> dict[str, str]:
        raise ZeroDivisionError(payload.who)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(dev_mode=True, data_dir=tmp_path)


def _request(request_type: str, payload: dict[str, object]) -> AgentRequestEvent:
    return AgentRequestEvent.create(
        source_agent="tester", target_agent="greeter", request_type=request_type, payload=payload
    )


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_agent_card_parses_strictly_with_a2a_sdk(name: str, settings: Settings) -> None:
    """Every reference agent's card parses with a2a-sdk's AgentCard, which refuses unknown fields."""
    agent = agent_class(name)(settings)
    card = ParseDict(agent_card(agent, url="http://127.0.0.1:8003"), AgentCard())
    assert card.name == name
    assert sorted(s.id for s in card.skills) == EXPECTED_TYPES[name]
    assert card.supported_interfaces[0].url == "http://127.0.0.1:8003/agent-request"
    schemas = card.capabilities.extensions[0]
    assert schemas.uri == SCHEMAS_EXTENSION_URI
    assert set(schemas.params.keys()) == set(EXPECTED_TYPES[name])


def test_a2a_parse_refuses_an_unknown_card_field(settings: Settings) -> None:
    """The strict parse the card is held to does refuse a field AgentCard does not define."""
    card = agent_card(Greeter(settings), url="http://127.0.0.1:1")
    with pytest.raises(ParseError):
        ParseDict({**card, "inputSchema": {}}, AgentCard())


def test_skills_carry_their_json_schemas(settings: Settings) -> None:
    """A skill is declared by its handler's payload annotation; the registry gets its input schema."""
    greeter = Greeter(settings)
    assert greeter.request_types == ["CRASH", "GREET"]
    greet = next(s for s in greeter.capabilities() if s.id == "GREET")
    assert greet.tags == ["demo"]
    assert greet.input_schema is not None
    assert greet.input_schema["required"] == ["who"]


async def test_a_bad_payload_is_an_error_naming_the_field(settings: Settings) -> None:
    """A payload of the wrong type or missing a field is refused with the field's name."""
    greeter = Greeter(settings)
    with pytest.raises(InvalidInput) as wrong_type:
        await greeter.handle(_request("GREET", {"who": "ann", "times": "often"}))
    assert wrong_type.value.field == "times"
    with pytest.raises(InvalidInput) as missing:
        await greeter.handle(_request("GREET", {}))
    assert missing.value.field == "who"
    assert await greeter.handle(_request("GREET", {"who": "ann", "times": 2})) == {"text": "hello ann hello ann"}


async def test_an_unknown_request_type_is_rejected_naming_the_supported_ones(settings: Settings) -> None:
    """An unknown request type raises RequestRejected (a ``rejected`` response) listing the supported types."""
    with pytest.raises(RequestRejected) as rejected:
        await Greeter(settings).handle(_request("DANCE", {}))
    assert "CRASH, GREET" in rejected.value.message
    assert rejected.value.details["supported"] == ["CRASH", "GREET"]


async def test_an_unexpected_handler_failure_becomes_an_error_response(settings: Settings) -> None:
    """A handler bug surfaces as an OrchestratorError (an error response), never an escaping exception."""
    with pytest.raises(OrchestratorError) as failed:
        await Greeter(settings).handle(_request("CRASH", {"who": "x"}))
    assert "ZeroDivisionError" not in failed.value.message
    assert "could not complete CRASH" in failed.value.message


async def test_every_reference_handler_validates_its_payload(settings: Settings) -> None:
    """Each request type of each agent refuses a payload with an unknown field, naming it."""
    for name, types in EXPECTED_TYPES.items():
        agent = agent_class(name)(settings)
        for request_type in types:
            with pytest.raises(InvalidInput) as refused:
                await agent.run(request_type, {"bogus_field": 1})
            assert refused.value.field is not None, (name, request_type)


def test_error_codes_map_to_http_statuses() -> None:
    """Error responses over HTTP keep the status of their error class."""
    assert status_for_error_code("invalid_input") == 422
    assert status_for_error_code("rejected") == 422
    assert status_for_error_code("bad_signature") == 401
    assert status_for_error_code("something-else") == 500
    # the answers the bus itself stores or sends: a repeat of a cancelled key over HTTP is no 500
    assert status_for_error_code("cancelled") == 409
    assert status_for_error_code("dead_lettered") == 409


async def test_brain_answers_and_is_loaded_from_a_setting() -> None:
    """A langchain-core chat model is a brain; an empty setting means none, a bad one fails start-up."""
    brain = ChatModelBrain(GenericFakeChatModel(messages=iter([AIMessage("fine")])))
    assert await brain.complete("be brief", "hello") == "fine"
    assert load_brain("") is None
    with pytest.raises(StartupError):
        load_brain("no_such_module_here:model")
