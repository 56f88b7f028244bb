"""A bare registry client as its own process, for chaos tests that kill it with SIGKILL.

``python -m support.tests.chaos.registry_client_proc REGISTRY_URL NAME`` registers
an instance, reports ``active``, prints its id on one line and heartbeats every
0.2 s until killed. The registration secret comes from AO_REGISTRATION_SECRET.
"""

from __future__ import annotations

import asyncio
import os
import sys

from shared.lib.registry_client import RegistryClient
from shared.lib.registry_models import AgentStatus, Registration, Skill

__all__ = ["main"]


async def main(url: str, name: str) -> None:
    client = RegistryClient(url, registration_secret=os.environ["AO_REGISTRATION_SECRET"], retry_for_s=10)
    skill = Skill(id="chaos", name="Chaos target")
    registered = await client.register(
        Registration(name=name, version="0.0.1", endpoint="http://127.0.0.1:1", capabilities=[skill])
    )
    await client.set_status(AgentStatus.ACTIVE)
    client.start_heartbeat(interval_s=0.2)
    print(registered.agent.id, flush=True)
    await asyncio.Event().wait()  # heartbeat until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
