"""The stack supervisor waits for each service to answer ``/ready`` as itself."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_orchestrator.stack import Stack, StackProcess
from shared.lib.errors import StartupError
from shared.lib.settings import Settings


@pytest.fixture
def impostor() -> Iterator[str]:
    """An HTTP server whose /ready answers 200 as code-review: what the orchestrator's URL reaches
    when code-review was given the same port and bound it first."""

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "ready", "service": "code-review"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_service_answering_for_another_is_not_taken_as_ready(impostor: str, tmp_path: Path) -> None:
    """The orchestrator's process is alive, but its URL answers as code-review: the start fails
    naming both, instead of passing with another service behind the orchestrator's URL."""
    stack = Stack(Settings(data_dir=tmp_path, dev_mode=True))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    sp = StackProcess("orchestrator-1", ["serve"], impostor, tmp_path / "o.log", "orchestrator", alive)
    try:
        with pytest.raises(StartupError, match=f"{impostor} answers as code-review, not orchestrator"):
            stack._wait_ready(sp)
    finally:
        alive.kill()
        alive.wait()
