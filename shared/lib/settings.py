"""The one settings class every service and command builds at start-up.

Values come from environment variables. The three connection URLs keep their
conventional names (``DATABASE_URL``, ``REDIS_URL``, ``REGISTRY_URL``); every
other variable carries the ``AO_`` prefix. Nothing here runs at import time:
call :func:`load_settings` from a lifespan or a CLI command.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from shared.lib.errors import StartupError
from shared.lib.running_stack import read_stack_env

__all__ = ["AGENT_ID_PATTERN", "LOG_LEVELS", "SECRETS", "SERVICE_PORTS", "Settings", "env_var", "load_settings"]

#: Agent ids and agent names share one pattern (DESIGN, Guarantees).
AGENT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

#: Default port per service (DESIGN, Services and ports).
SERVICE_PORTS: dict[str, int] = {
    "orchestrator": 8001,
    "feature-dev": 8002,
    "code-review": 8003,
    "infrastructure": 8004,
    "cicd": 8005,
    "documentation": 8006,
    "agent-registry": 8009,
}

#: The levels AO_LOG_LEVEL takes (in any case): the ones ``logging`` and uvicorn both know.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_UNSAFE_SECRETS = {"", "changeme", "change-me", "secret", "password", "dev"}
#: Every secret a service needs outside dev mode; see :func:`load_settings` ``require``.
SECRETS = ("registration_secret", "signing_key", "api_keys")
#: The secrets the settings being built must have (pydantic's documented way to hand an
#: ``__init__`` validation context: a context variable set around the call).
_required: ContextVar[tuple[str, ...]] = ContextVar("required_secrets", default=SECRETS)


class _RunningStackSecrets(PydanticBaseSettingsSource):
    """The secrets of the stack running under the data dir (its ``stack.env``, written by
    ``agent-orchestrator up``), for those the environment and the caller leave unset: a command
    run beside the stack (``dlq requeue``, ``agent NAME``) signs and registers as its services do."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        # the data dir as the sources above this one (arguments, environment) set it
        data_dir = Path(self.current_state.get("data_dir") or Settings.model_fields["data_dir"].default)
        written = read_stack_env(data_dir)
        return {name: written[env_var(name)] for name in SECRETS if env_var(name) in written}


def _url_field(name: str, default: str | None = None) -> Any:
    return Field(default=default, validation_alias=AliasChoices(name, f"AO_{name}"))


class Settings(BaseSettings):
    """Configuration shared by the orchestrator, the registry and every agent."""

    model_config = SettingsConfigDict(env_prefix="AO_", extra="ignore", populate_by_name=True)

    # -- connections ---------------------------------------------------------------
    database_url: str | None = _url_field("DATABASE_URL")
    """PostgreSQL URL; unset: ``up``, ``demo`` and ``migrate`` start the embedded server under
    data_dir, and the operator commands (``locks``, ``dlq``, ``events``) and services started by
    hand use it while it runs."""
    redis_url: str | None = _url_field("REDIS_URL")
    """Redis URL; unset: ``up`` and ``demo`` start the embedded redis-server under data_dir,
    and the operator commands and services started by hand use it while it runs."""
    registry_url: str = _url_field("REGISTRY_URL", "")  # "": derived in _derive_service_urls
    """Where agents and the orchestrator reach the registry service; unset: AO_HOST and the
    registry's port in AO_PORTS (``http://127.0.0.1:8009``)."""
    orchestrator_url: str = _url_field("ORCHESTRATOR_URL", "")  # "": derived in _derive_service_urls
    """Where the CLI's workflow commands (``run``, ``status``, ``list``, ``approve``, ``reject``,
    ``cancel``) reach the orchestrator API; unset: AO_HOST and the orchestrator's port in
    AO_PORTS (``http://127.0.0.1:8001``)."""
    pg_prepare_threshold: int | None = 5
    """psycopg prepare threshold for the checkpointer; set empty/None behind pgbouncer."""
    checkpoint_synchronous_commit: bool = True
    """Wait for the WAL flush on each checkpoint commit. Off, a checkpoint still survives an
    orchestrator crash and stays in WAL order, but a PostgreSQL crash may lose the last
    ~0.6 s of them (those steps re-run on resume); it saves a flush per superstep."""
    checkpoint_write_behind_ms: float = Field(default=100.0, ge=0, le=10_000)
    """In a workflow at durability ``async``, how long a step's checkpoint may wait to go in a
    statement the run writes anyway (its node's event, the outcome) before it is written on its
    own (0: each at once); a node's event waits half as long. A crash may lose the steps of that
    window; they run again with the same call keys. Every checkpoint is stored no later than the
    run's outcome."""

    # -- process ---------------------------------------------------------------------
    data_dir: Path = Path(".data")
    """Embedded servers' data, the artifact store and logs live under here."""
    host: str = "127.0.0.1"
    """Interface every service binds to."""
    ports: dict[str, int] = Field(default_factory=lambda: dict(SERVICE_PORTS))
    """Port per service name, as JSON (``AO_PORTS='{"orchestrator": 9001}'``); merged over the defaults.
    An unset REGISTRY_URL follows the ``agent-registry`` port."""
    dev_mode: bool = False
    """Open APIs with no keys or signatures. Announced loudly at start-up."""
    log_level: str = "INFO"
    """Log level of every service: DEBUG, INFO, WARNING or ERROR (any case)."""

    # -- security --------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated API keys accepted by the orchestrator and registry APIs."""
    api_key: str = ""
    """The key CLI commands present to the orchestrator API; default: the first of AO_API_KEYS."""
    registration_secret: str = ""
    """Secret an agent presents to register; the registry then issues it a token. Unset beside a
    running stack: the stack's (``<data_dir>/stack.env``), as for AO_SIGNING_KEY and AO_API_KEYS."""
    signing_key: str = ""
    """Shared HMAC-SHA256 key for envelopes on the bus."""
    max_payload_bytes: int = 1024 * 1024
    """Largest HTTP body or envelope payload accepted, in bytes."""

    # -- messaging -------------------------------------------------------------------
    redis_prefix: str = "ao"
    """Prefix of every Redis key, so deployments and tests can share one server."""
    visibility_timeout_s: float = 30.0
    """A pending request not renewed for this long is reclaimed by another instance."""
    consumer_dead_after_s: float = 10.0
    """An agent instance whose bus consumer showed no life for this long (or the visibility timeout,
    if shorter) is dead: requests go to it no more, and a live instance takes over the ones it held."""
    max_deliveries: int = 5
    """Deliveries after which a request goes to the dead-letter stream."""
    response_ttl_s: int = 24 * 3600
    """How long a response is kept for idempotent replays (under its idempotency key; its request id
    keeps pointing at that key as long)."""
    request_timeout_s: float = 30.0
    """Default timeout of an agent call made by the orchestrator."""
    stream_maxlen: int = 100_000
    """Approximate MAXLEN of every request stream (backpressure)."""
    replay_window_s: float = 300.0
    """Signed envelopes older than this are refused as possible replays."""
    agent_concurrency: int = 16
    """Requests one agent instance handles at once, off the bus and over HTTP together (past it, HTTP gets 503 busy)."""
    agent_signing_keys: dict[str, str] = Field(default_factory=dict)
    """Per-agent HMAC keys as JSON (``AO_AGENT_SIGNING_KEYS='{"cicd": "..."}'``); others use signing_key."""

    # -- registry --------------------------------------------------------------------
    heartbeat_interval_s: float = 5.0
    """How often an agent heartbeats (jittered by 10 %)."""
    agent_stale_after_s: float = 20.0
    """Missed-heartbeat TTL after which an instance is marked offline."""
    agent_remove_after_s: float = 300.0
    """Grace period after which an offline instance is removed."""

    # -- agents ----------------------------------------------------------------------
    agent_llm: str = ""
    """Chat model of the agents' optional LLM brain, as ``module:attribute``; empty means none."""
    agent_llm_timeout_s: float = 60.0
    """Longest wait for one LLM completion; past it the agent answers without the LLM."""
    agent_drain_grace_s: float = 20.0
    """On SIGTERM, how long an agent lets in-flight requests finish before it deregisters."""
    agent_status_debounce_s: float = 0.5
    """How long in-flight work must stay (or stay gone) before an agent reports busy (or active)."""
    review_max_file_bytes: int = 1024 * 1024
    """Files a change adds or grows past this size are an error-level review finding."""
    pipeline_timeout_s: float = 600.0
    """Longest run of a repository's test command before the pipeline is failed as timed out."""
    keep_releases: int = 5
    """Releases kept per deploy environment; older ones are removed after a deploy."""

    # -- workflows -------------------------------------------------------------------
    approval_timeout_s: float = 3600.0
    """A pending human approval older than this expires as rejected."""
    run_lease_ttl_s: float = 15.0
    """A workflow run whose runner stopped renewing for this long is taken over."""
    max_run_losses: int = Field(default=3, ge=1)
    """A run whose replica died while running it this many times (a node that exits the process,
    say) fails instead of being taken over again, so it cannot take down replica after replica.
    A lost database connection counts no loss."""
    stuck_after_s: float = 600.0
    """A running workflow with no progress for this long is reported stuck."""
    checkpoint_retention_s: float = 7 * 24 * 3600.0
    """Finished workflows keep intermediate checkpoints for this long."""
    housekeeping_interval_s: float = 60.0
    """How often a replica prunes the checkpoints of finished workflows past retention."""
    max_concurrent_workflows: int = 64
    """Workflows one orchestrator replica runs at once."""

    # -- resource locks --------------------------------------------------------------
    lock_ttl_s: float = 60.0
    """Default lease TTL: a lease not renewed for this long expires and the next acquirer gets it."""
    lock_max_connections: int = 64
    """Dedicated PostgreSQL sessions one process uses for leases (one per held lease, plus attempts)."""
    lock_idle_connections: int = 4
    """Dedicated lock sessions kept open between leases, so a grant costs no connect."""
    lock_poll_max_s: float = 0.5
    """Longest sleep of a waiting acquirer between tries when no release notification comes."""
    lock_sweep_interval_s: float = 1.0
    """How often a process expires its own overdue leases and, after that grace, anyone's."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then a running stack's secrets (lowest)."""
        return init_settings, env_settings, dotenv_settings, file_secret_settings, _RunningStackSecrets(settings_cls)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: Any) -> Any:
        """Checked here, so a bad level is one line at load, not a traceback from ``logging``."""
        if not isinstance(value, str):
            return value
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
        return value.strip().upper()

    @field_validator("ports", mode="after")
    @classmethod
    def _merge_ports(cls, value: dict[str, int]) -> dict[str, int]:
        return {**SERVICE_PORTS, **value}

    @field_validator("database_url", "redis_url", "pg_prepare_threshold", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _derive_service_urls(self) -> Settings:
        """The registry and the orchestrator where AO_HOST and AO_PORTS put them, when
        REGISTRY_URL / ORCHESTRATOR_URL are not given."""
        if not self.registry_url.strip():
            self.registry_url = self.url_for("agent-registry")
        if not self.orchestrator_url.strip():
            self.orchestrator_url = self.url_for("orchestrator")
        self.orchestrator_url = self.orchestrator_url.rstrip("/")
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_secrets(self) -> Settings:
        if self.dev_mode:
            return self
        required = _required.get()
        for name in ("registration_secret", "signing_key"):
            if name in required and getattr(self, name).strip().lower() in _UNSAFE_SECRETS:
                raise ValueError(
                    f"AO_{name.upper()} is unset or a default value; set a random secret "
                    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) "
                    "or run with AO_DEV_MODE=true"
                )
        if "api_keys" in required and not self.api_keys:
            raise ValueError("AO_API_KEYS is empty; set at least one key or run with AO_DEV_MODE=true")
        return self

    def port_for(self, service: str) -> int:
        """The configured port of ``service``; agents without a default get none."""
        try:
            return self.ports[service]
        except KeyError as e:
            raise StartupError(f"no port configured for service {service!r}; set AO_PORTS") from e

    def url_for(self, service: str) -> str:
        return f"http://{self.host}:{self.port_for(service)}"


def env_var(field: str) -> str:
    """The environment variable of a settings field: ``AO_<FIELD>``, or the conventional name
    of a connection URL (``DATABASE_URL``)."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in Settings.model_fields:
        loc[0] = env_var(loc[0])  # what the operator set: AO_LOG_LEVEL, not log_level
    msg = re.sub(r"^Value error, ", "", str(err.get("msg", "")))
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def _unparsable(exc: SettingsError) -> str:
    """pydantic-settings' error for a value it could not decode (``AO_PORTS=x``: not JSON)."""
    field = re.search(r'field "(\w+)"', str(exc))
    name = env_var(field[1]) if field and field[1] in Settings.model_fields else "a setting"
    return f"{name} must be JSON: {exc.__cause__ or exc}"


def load_settings(*, require: tuple[str, ...] = SECRETS, **overrides: Any) -> Settings:
    """Build settings from the environment, turning a validation error into a StartupError.

    Outside dev mode, the secrets named in ``require`` (of :data:`SECRETS`) must be set and not
    defaults; a command that uses only some of them (``dlq requeue`` signs, and needs only
    ``signing_key``) names just those."""
    token = _required.set(require)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise StartupError(f"invalid configuration: {_first_error(e)}") from e
    except SettingsError as e:
        raise StartupError(f"invalid configuration: {_unparsable(e)}") from e
    finally:
        _required.reset(token)
