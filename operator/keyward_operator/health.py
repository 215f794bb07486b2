"""``GET /healthz`` for the operator's pod probes.

The answer is 200 while the leader-election loop is alive: a follower retries the Lease every few seconds and
the leader renews it every few seconds, so a loop that stopped making progress (an API call that hangs, a
stuck thread) shows as a stale heartbeat and the probe fails. A leader that cannot renew exits by itself,
so the probe is not needed for that. Followers answer 200 too: they are healthy, only waiting.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Callable

_log = logging.getLogger("keyward.operator.health")

#: Checks the process: (healthy, one-line reason).
Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """A tiny HTTP server on its own thread; only ``GET /healthz`` is served."""

    def __init__(self, port: int, check: Check, *, host: str = "") -> None:
        self.check = check

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/healthz":
                    self._answer(404, "not found: only /healthz is served\n")
                    return
                healthy, reason = outer.check()
                self._answer(200 if healthy else 503, f"{reason}\n")

            def _answer(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a probe every few seconds is not worth a log line

        # "" binds every interface: the kubelet probes the pod's IP.
        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def start(self) -> None:
        self._thread.start()
        _log.info("health.serving", extra={"fields": {"port": self.port, "path": "/healthz"}})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
