"""The agent base class: a name, a version, skills, and one async handler per
request type.

Writing an agent::

    class Greeter(Agent):
        name = "greeter"
        version = "1.0.0"
        description = "Says hello."

        @skill("GREET", description="Greets someone by name.", tags=("demo",))
        async def greet(self, payload: GreetInput) -> GreetOutput:
            return GreetOutput(text=f"hello {payload.who}")

The payload model is read from the handler's annotation. :meth:`Agent.handle`
is the bus handler: it rejects an unknown request type naming the supported
ones, validates the payload (an error names the field), runs the handler and
returns its result as a JSON-ready dict. The same path serves HTTP.

The request's deadline is the time after which it must not run, so
:meth:`Agent.handle` cancels a handler still running at the deadline (its child
processes are killed, as on a cancel: see ``agents.work.process``) and answers a
``timeout`` error naming ``deadline``, on the bus and over HTTP alike (a pipeline
of ``sleep 20`` sent with three seconds to go answered success after twenty).
Work a handler hands to a thread cannot be stopped and finishes on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from agents.sdk.brain import Brain
from shared.lib.agent_events import AgentRequestEvent
from shared.lib.errors import InvalidInput, OrchestratorError, RequestRejected, ServiceUnavailable, Timeout
from shared.lib.registry_models import Skill
from shared.lib.settings import Settings
from shared.lib.tracing import agent_span

__all__ = ["Agent", "AgentServices", "SkillSpec", "skill"]

_log = logging.getLogger(__name__)

Handler = Callable[[Any, Any], Awaitable[Any]]
F = TypeVar("F", bound=Handler)


@dataclass(frozen=True)
class SkillSpec:
    """One request type an agent serves, described in the A2A skill shape."""

    request_type: str
    name: str
    description: str
    tags: tuple[str, ...]
    input_model: type[BaseModel]
    output_model: type[BaseModel] | None
    method: str

    def as_skill(self) -> Skill:
        """The registry's (and the card's) description of this skill, schemas included."""
        output = self.output_model.model_json_schema() if self.output_model is not None else None
        return Skill(
            id=self.request_type,
            name=self.name,
            description=self.description,
            tags=list(self.tags),
            input_schema=self.input_model.model_json_schema(),
            output_schema=output,
        )


@dataclass
class AgentServices:
    """What a running agent may use beyond its own code; set by the app's lifespan.

    Each is None when the agent runs outside a service (a test calling :meth:`Agent.handle`).
    """

    registry: Any = None
    redis: Any = None
    pool: Any = None
    bus: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def skill(
    request_type: str,
    *,
    name: str | None = None,
    description: str,
    tags: tuple[str, ...] = (),
    output: type[BaseModel] | None = None,
) -> Callable[[F], F]:
    """Mark an ``async def handler(self, payload: Model)`` as serving ``request_type``."""

    def mark(fn: F) -> F:
        fn.__agent_skill__ = {  # type: ignore[attr-defined]
            "request_type": request_type,
            "name": name or request_type.replace("_", " ").title(),
            "description": description,
            "tags": tags,
            "output": output,
        }
        return fn

    return mark


#: The deadline (Unix time) of the request the current task handles; see :meth:`Agent.time_left_s`.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("agent_request_deadline", default=None)


def _payload_model(fn: Callable[..., Any]) -> type[BaseModel]:
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    model = hints.get(params[0]) if params else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{fn.__qualname__}: annotate the payload parameter with a pydantic model")
    return model


def _field_of(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "payload"
    return loc, str(err.get("msg", "invalid value")).removeprefix("Value error, ")


class Agent:
    """Base of every agent: declare ``name``, ``version``, ``description`` and ``@skill`` handlers."""

    name: ClassVar[str]
    version: ClassVar[str] = "1.0.0"
    description: ClassVar[str] = ""
    skills: ClassVar[dict[str, SkillSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, SkillSpec] = {}
        for attr, fn in inspect.getmembers(cls, inspect.iscoroutinefunction):
            meta = getattr(fn, "__agent_skill__", None)
            if meta is None:
                continue
            found[meta["request_type"]] = SkillSpec(
                meta["request_type"], meta["name"], meta["description"], tuple(meta["tags"]),
                _payload_model(fn), meta["output"], attr,
            )  # fmt: skip
        cls.skills = found

    def __init__(self, settings: Settings, *, brain: Brain | None = None) -> None:
        self.settings = settings
        self.brain = brain
        self.services = AgentServices()

    @property
    def request_types(self) -> list[str]:
        return sorted(self.skills)

    def capabilities(self) -> list[Skill]:
        return [self.skills[t].as_skill() for t in self.request_types]

    def parse(self, request_type: str, payload: dict[str, Any]) -> tuple[SkillSpec, BaseModel]:
        """The skill and validated payload of a request; rejects unknown types, names a bad field."""
        spec = self.skills.get(request_type)
        if spec is None:
            supported = ", ".join(self.request_types)
            raise RequestRejected(
                f"{self.name} does not handle {request_type!r}; supported request types: {supported}",
                field="request_type",
                details={"supported": self.request_types},
            )
        try:
            return spec, spec.input_model.model_validate(payload)
        except ValidationError as e:
            loc, msg = _field_of(e)
            raise InvalidInput(f"{request_type} payload field {loc}: {msg}", field=loc) from e

    async def run(self, request_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Validate ``payload`` and run the handler of ``request_type``; the result as a JSON-ready dict."""
        spec, model = self.parse(request_type, payload)
        result = await getattr(self, spec.method)(model)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        if not isinstance(result, dict):
            raise TypeError(f"{spec.method} returned {type(result).__name__}; return a dict or a pydantic model")
        return result

    def time_left_s(self, *, default_s: float) -> float:
        """Seconds until the deadline of the request being handled (``default_s`` outside one):
        a skill bounds its own retries by it, so it never works on after its caller gave up."""
        deadline = _DEADLINE.get()
        return default_s if deadline is None else max(0.0, deadline - time.time())

    async def handle(self, request: AgentRequestEvent) -> dict[str, Any]:
        """The bus handler: an error the project raises becomes an error response; nothing else escapes."""
        token = _DEADLINE.set(request.deadline)
        try:
            async with agent_span(
                f"{self.name}.{request.request_type}",
                headers=request.trace,
                inputs=request.payload,
                metadata={"agent": self.name, "request_id": request.request_id},
            ):
                return await self._run_by_deadline(request)
        except OrchestratorError:
            raise
        except Exception as e:  # the handler is a boundary: a failure is an error response, never a crash
            _log.exception("%s failed on %s", self.name, request.request_type)
            raise OrchestratorError(f"{self.name} could not complete {request.request_type}: {e}") from e
        finally:
            _DEADLINE.reset(token)

    async def _run_by_deadline(self, request: AgentRequestEvent) -> dict[str, Any]:
        """:meth:`run`, cancelled at the request's deadline and answered with :class:`Timeout`."""
        scope = asyncio.timeout(request.deadline - time.time())
        try:
            async with scope:
                return await self.run(request.request_type, request.payload)
        except TimeoutError as e:
            if not scope.expired():  # the handler's own TimeoutError, not the deadline's
                raise
            at = datetime.fromtimestamp(request.deadline, UTC).isoformat(timespec="milliseconds")
            raise Timeout(
                f"{self.name} stopped {request.request_type} at its deadline {at} ({request.deadline}); "
                "send it again with a later deadline and a new idempotency key",
                field="deadline",
            ) from e

    def require(self, service: str) -> Any:
        """A service of :class:`AgentServices`, or a clear error when the agent runs without it."""
        value = getattr(self.services, service, None)
        if value is None:
            raise ServiceUnavailable(f"{self.name} runs without a {service} connection; start it as a service")
        return value

    async def think(self, instructions: str, prompt: str) -> str | None:
        """The brain's answer, or None when no LLM is configured (or it failed)."""
        if self.brain is None:
            return None
        return await self.brain.complete(instructions, prompt, timeout_s=self.settings.agent_llm_timeout_s)
