"""A real redis-server for the jobs and cache tests (Debian's `redis-server`, installed by the Makefile's
test set-up): one per test, on a free port, without persistence."""

import socket
import subprocess
import time

import pytest

from .conftest import free_port, stop_process


class RedisServer:
    """A real `redis-server` (Debian's, installed by the Makefile's test set-up) on a free port, no persistence.
    `stop()` and `start()` again on the same port simulate an outage."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        stop_process(self.process, grace=5)


@pytest.fixture
def redis_server():
    """A fresh redis-server per test (so no test sees another's jobs)."""
    server = RedisServer()
    yield server
    server.stop()
