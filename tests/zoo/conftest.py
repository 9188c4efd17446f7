"""Fixtures for the zoo tests: an isolated MMF cache and a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    cache = tmp_path / "mmf_cache"
    monkeypatch.setenv("MMF_CACHE_DIR", str(cache))
    for var in (
        "MMF_DATA_DIR",
        "MMF_OFFLINE",
        "MMF_MODEL_ZOO",
        "MMF_DATASET_ZOO",
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return cache


class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.requests: Counter = Counter()
        counter = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                counter[self.path] += 1
                super().do_GET()

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = _Server(root)
    try:
        yield server
    finally:
        server.close()
