"""Run the app with uvicorn in a background thread on a free 127.0.0.1 port (tests, load runs)."""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    """``with BackgroundServer(app) as server: ... server.url ...``: started on enter, stopped on exit."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 30.0):
        import uvicorn

        with socket.socket() as probe:
            probe.bind((host, 0))
            self.port = probe.getsockname()[1]
        self.host, self.start_timeout_s = host, start_timeout_s
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", backlog=1024)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="tokenprune-serve")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
