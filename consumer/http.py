"""Operations HTTP server: `/metrics`, `/healthz` and `/readyz` on one port.

- `/metrics` serves the registry in the Prometheus text format (or OpenMetrics when the
  scraper requests it in `Accept`).
- `/healthz` (liveness) returns 200 while the event loop has called `HealthState.beat()`
  within `stall_after_s` seconds, else 503, so a hung loop gets the pod restarted.
- `/readyz` (readiness) returns 200 while the consumer is connected to the broker and
  accepts sessions, else 503. It turns 503 during a drain, before shutdown.

Both health endpoints return a small JSON object. The server runs in a background thread
with the stdlib `http.server`, so it responds even when the event loop is stuck.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from consumer.errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
# A client that sends nothing for this long is disconnected, so it cannot hold a thread.
REQUEST_TIMEOUT_S = 10.0

log = structlog.get_logger(__name__)


class HealthState:
    """Liveness and readiness of the consumer, written by the app, read by the server.

    `alive()` is True while `beat()` was called within `stall_after_s` seconds; the
    constructor counts as the first beat. `ready()` is True while both
    `set_connected(True)` and `set_accepting(True)` hold. Safe to use from several
    threads.
    """

    def __init__(
        self, stall_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be > 0, got {stall_after_s}")
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat = clock()
        self._connected = False
        self._accepting = False

    def beat(self) -> None:
        """Record that the event loop is responsive now."""
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def set_connected(self, connected: bool) -> None:
        """Record whether the broker connection is up."""
        with self._lock:
            self._connected = connected

    def set_accepting(self, accepting: bool) -> None:
        """Record whether the consumer accepts new sessions (False while draining)."""
        with self._lock:
            self._accepting = accepting

    def seconds_since_beat(self) -> float:
        """Return the seconds elapsed since the last `beat()`."""
        with self._lock:
            last = self._last_beat
        return self._clock() - last

    def alive(self) -> bool:
        """Return True when the last beat is at most `stall_after_s` seconds old."""
        return self.seconds_since_beat() <= self.stall_after_s

    def ready(self) -> bool:
        """Return True when the consumer is connected and accepting sessions."""
        with self._lock:
            return self._connected and self._accepting

    def liveness_body(self) -> dict[str, Any]:
        """Return the JSON body of `/healthz`."""
        return {
            "status": "ok" if self.alive() else "stalled",
            "seconds_since_beat": round(self.seconds_since_beat(), 3),
            "stall_after_s": self.stall_after_s,
        }

    def readiness_body(self) -> dict[str, Any]:
        """Return the JSON body of `/readyz`."""
        with self._lock:
            connected = self._connected
            accepting = self._accepting
        return {
            "status": "ready" if connected and accepting else "not_ready",
            "connected": connected,
            "accepting": accepting,
        }


async def run_heartbeat(health: HealthState, interval_s: float = 1.0) -> None:
    """Call `health.beat()` every `interval_s` seconds until cancelled.

    Run it as a task on the consumer's event loop: when the loop is blocked, the beats
    stop and `/healthz` turns 503 after `stall_after_s`.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    while True:
        health.beat()
        await asyncio.sleep(interval_s)


def _make_handler(
    registry: CollectorRegistry, health: HealthState
) -> type[BaseHTTPRequestHandler]:
    class OpsRequestHandler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send_metrics()
            elif path == "/healthz":
                self._send_json(health.alive(), health.liveness_body())
            elif path == "/readyz":
                self._send_json(health.ready(), health.readiness_body())
            else:
                # The path is echoed shortened, so a long URL cannot inflate the reply.
                shown_path = path[:100]
                message = f"not found: {shown_path}; use /metrics, /healthz or /readyz"
                body = {"error": message}
                self._send(HTTPStatus.NOT_FOUND, "application/json", _dump(body))

        def _send_metrics(self) -> None:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, content_type, encoder(registry))

        def _send_json(self, healthy: bool, body: dict[str, Any]) -> None:
            status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, "application/json", _dump(body))

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes and scrapes arrive every few seconds, so requests are not logged.
            pass

    return OpsRequestHandler


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class OpsServer:
    """HTTP server for `/metrics`, `/healthz` and `/readyz` in a background thread.

    Binds `host:port` when `start()` is called; port 0 lets the OS pick a free port,
    readable from `.port` after `start()`. Listens on 127.0.0.1 unless `host` is set
    to another address (a Kubernetes pod needs 0.0.0.0 so the kubelet can probe it).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthState,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
    ) -> None:
        self.registry = registry
        self.health = health
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Return the bound port, or the requested one before `start()`."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Return the base URL, such as `http://127.0.0.1:9464`."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind the port and serve requests in a daemon thread.

        Raises `ConfigurationError` naming the address when the port cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError(f"OpsServer is already running on {self.url}")
        handler = _make_handler(self.registry, self.health)
        try:
            self._server = _Server((self.host, self._requested_port), handler)
        except OSError as error:
            raise ConfigurationError(
                f"cannot listen on {self.host}:{self._requested_port} for /metrics "
                f"and health checks: {error}; set metrics_port "
                "(ORDERS_CONSUMER_METRICS_PORT) to a free port, or 0 for any"
            ) from error
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="ops-http",
            daemon=True,
        )
        self._thread.start()
        log.info("ops_server_started", host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread.

        Does nothing when the server is not running.
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        port = self.port
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        self._server = None
        self._thread = None
        log.info("ops_server_stopped", host=self.host, port=port)

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
