"""A loopback HTTP server in front of a real `mlflow server`, for drills that sit between the client and it.

    proxy = LoopbackProxy(handle)   # handle(request, body) answers each request: forward(...) or refuse(...)
    proxy.uri                       # http://127.0.0.1:<port>
    proxy.close()

The tracking fault drill (tests/faults/test_tracking_faults.py: hold, 503, slow) and the planted-secret test's
authenticating gateway (tests/integration/test_tracking_secrets.py) differ only in what ``handle`` decides.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sft_stack.common.ports import free_port

Handle = Callable[[BaseHTTPRequestHandler, bytes], None]
"""What the proxy does with one request (its handler and its body, already read)."""


class LoopbackProxy:
    """A threaded HTTP server on a free 127.0.0.1 port that hands every request to ``handle``."""

    def __init__(self, handle: Handle) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                handle(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def forward(
    request: BaseHTTPRequestHandler,
    body: bytes,
    upstream_port: int,
    *,
    path: str | None = None,
    drop_headers: tuple[str, ...] = ("host",),
    timeout_s: float = 60,
) -> None:
    """Send ``request`` (to ``path``, default its own) to 127.0.0.1:``upstream_port`` without the ``drop_headers``
    (lower case), and relay the answer: status, headers and body, with a Content-Length of its own."""
    upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=timeout_s)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in drop_headers}
    upstream.request(request.command, request.path if path is None else path, body=body, headers=headers)
    response = upstream.getresponse()
    payload = response.read()
    request.send_response(response.status)
    for key, value in response.getheaders():
        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
            request.send_header(key, value)
    request.send_header("Content-Length", str(len(payload)))
    request.end_headers()
    request.wfile.write(payload)


def refuse(request: BaseHTTPRequestHandler, status: int) -> None:
    """Answer ``status`` with an empty body."""
    request.send_response(status)
    request.send_header("Content-Length", "0")
    request.end_headers()
