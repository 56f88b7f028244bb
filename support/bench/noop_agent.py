"""The benchmarks' agent: an SDK agent with one skill, ``NOOP``, that answers at once.

Run it as its own process, as any agent runs::

    python -m support.bench.noop_agent --port 8100 --instance-id noop-1

It registers with the registry at ``REGISTRY_URL``, serves the bus and
``/agent-request``, heartbeats, and drains on SIGTERM, like the reference agents.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from agents.sdk.agent import Agent, skill

__all__ = ["NoopAgent", "NoopInput"]


class NoopInput(BaseModel):
    """Any payload; it is echoed back."""

    model_config = ConfigDict(extra="allow")


class NoopAgent(Agent):
    name = "noop"
    version = "1.0.0"
    description = "Answers NOOP at once, echoing its payload: the agent the benchmarks call."

    @skill("NOOP", description="Does nothing; answers with the payload it was given.", tags=("bench",))
    async def noop(self, payload: NoopInput) -> dict[str, Any]:
        return payload.model_dump()


def main() -> None:
    from agents.sdk.app import create_agent_app, serve_agent
    from shared.lib.bootstrap import bootstrap

    parser = argparse.ArgumentParser(description="Serve the no-op benchmark agent.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--instance-id", default="noop-1")
    args = parser.parse_args()
    settings = bootstrap("noop", migrate=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_agent_app(
        NoopAgent(settings), instance_id=args.instance_id, endpoint=f"http://{settings.host}:{args.port}"
    )
    serve_agent(app, host=settings.host, port=args.port, service="noop", log_level=settings.log_level)


if __name__ == "__main__":
    main()
