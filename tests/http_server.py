"""An ASGI app served by uvicorn on a free 127.0.0.1 port for the length of a block (real HTTP for
the jobs API's and the dashboard's tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from clusterft.ports import free_port


@contextmanager
def running_server(app: Any, log_level: str = "warning") -> Iterator[str]:
    """`app` served by uvicorn on a free 127.0.0.1 port for the block; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
