"""Stopping a whole stack: every instance it registered deregisters before the registry stops."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from shared.lib.connections import with_database
from support.tests.e2e.conftest import registered_instances, start_stack, stop_stack

pytestmark = pytest.mark.slow


def test_stop_leaves_no_instance_registered(server_urls: tuple[str, str], tmp_path: Path) -> None:
    """After ``Stack.stop`` no instance the stack registered is left in the registry (agents and
    the orchestrator drain and deregister while the registry still answers; it stops last); the
    orchestrator registers under host and port, with no pid that would change at each restart."""
    stack, db_name = start_stack(server_urls, tmp_path)
    db_url = with_database(server_urls[0], db_name)
    try:
        registered = asyncio.run(registered_instances(db_url))
        port = stack.settings.port_for("orchestrator")
        host = socket.gethostname()[:20].lower().replace(".", "-")
        assert f"orchestrator-{host}-{port}" in registered, registered
        assert {"feature-dev-1", "documentation-2", "cicd-1"} <= set(registered), registered
    finally:
        stack.stop()
        left = asyncio.run(registered_instances(db_url))
        stop_stack(stack, server_urls, db_name)
    assert left == {}, f"still registered after the stack stopped: {left}"
