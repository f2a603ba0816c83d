"""A served app over loopback: uvicorn in a thread of this process (no other process),
on a free port, stopped on exit."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from loralens.serving.server import Service, bind_socket, create_app

MAX_BODY = 4096
# the API key of the keyed-server tests (never to be shown or logged)
KEY = "sk-loralens-7f3a9c1e-test-key"


@contextmanager
def serving(service: Service, max_body: int = MAX_BODY, app_factory=None):
    """Serve ``app_factory(service, max_body)`` (default ``create_app``); yield its URL."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = (app_factory or create_app)(service, max_body)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not server.started:
        assert th.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(30)
