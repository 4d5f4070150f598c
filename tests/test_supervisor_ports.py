"""The ports `cairn up` gives its children, and how it knows each one started.

Found running bench/scale.py: two services drew the same health port, the second died with
"address already in use", and the first answered the second's readiness probe, so the start
looked complete and the study waited for a tuning service that was gone.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.tools import supervisor


def test_a_port_is_never_handed_out_twice():
    handed_out: set[int] = set()
    ports = [supervisor.free_port(handed_out) for _ in range(400)]
    assert len(set(ports)) == len(ports)
    assert handed_out == set(ports)


@pytest.fixture
def readiness_of():
    """An HTTP server on a free port whose /readyz answers 200 as the service named."""
    servers: list[ThreadingHTTPServer] = []

    def serve(name: str) -> str:
        class Ready(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                body = json.dumps({"service": name, "ready": True, "detail": ""}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_readiness_is_answered_by_the_service_itself(readiness_of):
    """The port named for tuning is held by training: tuning is not ready, however long one waits."""
    alive = os.getpid()  # a process that runs: the check must not end on "exited"
    impostor = {"pids": {"tuning": alive}, "health": {"tuning": readiness_of("training")}}
    assert supervisor.wait_ready(impostor, timeout=1.0) == {"tuning": "not ready"}
    # a tenant's endpoint is listed among the health URLs as `<tenant>/serve`
    honest = {"pids": {"tuning": alive, "acme/tuning": alive, "acme/serve": alive},
              "health": {"tuning": readiness_of("tuning"), "acme/tuning": readiness_of("tuning"),
                         "acme/serve": readiness_of("serve")}}
    assert supervisor.wait_ready(honest, timeout=10.0) == {}
