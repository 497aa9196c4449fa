"""The /metrics, /healthz and /readyz endpoints over real HTTP on 127.0.0.1.

The last tests check that the example Dockerfile and Kubernetes files probe them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.config import ENV_PREFIX, Settings
from consumer.errors import ConfigurationError
from consumer.http import DEFAULT_PORT, HealthState, OpsServer, run_heartbeat
from consumer.metrics import ConsumerMetrics


class FakeClock:
    """A monotonic clock that the test advances by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _get(url: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, _, body = _get(url)
    return status, json.loads(body)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> HealthState:
    return HealthState(stall_after_s=30.0, clock=clock)


@pytest.fixture
def metrics() -> ConsumerMetrics:
    return ConsumerMetrics()


@pytest.fixture
def server(metrics: ConsumerMetrics, health: HealthState) -> Iterator[OpsServer]:
    ops = OpsServer(metrics.registry, health, port=0)
    ops.start()
    yield ops
    ops.stop()


def test_metrics_endpoint_serves_values(
    server: OpsServer, metrics: ConsumerMetrics
) -> None:
    metrics.messages_completed.labels("orders", "ORDER_CREATED").inc(3)
    metrics.messages_dead_lettered.labels("orders", "ORDER_CREATED", "OutOfOrder").inc()

    status, headers, body = _get(f"{server.url}/metrics")

    text = body.decode()
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert (
        'orders_consumer_messages_completed_total{entity="orders",'
        'event_type="ORDER_CREATED"} 3.0' in text
    )
    assert 'reason="OutOfOrder"' in text
    assert "# TYPE orders_consumer_handler_duration_seconds histogram" in text


def test_metrics_endpoint_speaks_openmetrics(server: OpsServer) -> None:
    status, headers, body = _get(
        f"{server.url}/metrics", accept="application/openmetrics-text; version=1.0.0"
    )

    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_healthz_ok_while_beating(server: OpsServer, health: HealthState) -> None:
    health.beat()

    status, body = _get_json(f"{server.url}/healthz")

    assert status == 200
    assert body["status"] == "ok"
    assert body["stall_after_s"] == 30.0


def test_healthz_503_when_stalled(
    server: OpsServer, health: HealthState, clock: FakeClock
) -> None:
    health.beat()
    clock.now += 30.5

    status, body = _get_json(f"{server.url}/healthz")

    assert status == 503
    assert body["status"] == "stalled"
    assert body["seconds_since_beat"] == pytest.approx(30.5)


def test_healthz_recovers_after_beat(
    server: OpsServer, health: HealthState, clock: FakeClock
) -> None:
    clock.now += 60.0
    health.beat()

    status, _ = _get_json(f"{server.url}/healthz")

    assert status == 200


def test_readyz_follows_connection_and_accepting(
    server: OpsServer, health: HealthState
) -> None:
    url = f"{server.url}/readyz"
    assert _get_json(url) == (
        503,
        {"status": "not_ready", "connected": False, "accepting": False},
    )

    health.set_connected(True)
    assert _get_json(url)[0] == 503

    health.set_accepting(True)
    assert _get_json(url) == (
        200,
        {"status": "ready", "connected": True, "accepting": True},
    )

    health.set_accepting(False)
    assert _get_json(url)[0] == 503

    health.set_accepting(True)
    health.set_connected(False)
    assert _get_json(url)[0] == 503


def test_unknown_path_is_404(server: OpsServer) -> None:
    status, body = _get_json(f"{server.url}/status?x=1")

    assert status == 404
    assert "not found: /status" in body["error"]


def test_binds_loopback_by_default(metrics: ConsumerMetrics) -> None:
    ops = OpsServer(metrics.registry, HealthState(), port=0)

    assert ops.host == "127.0.0.1"
    with ops:
        assert ops.port != 0
        assert ops.url == f"http://127.0.0.1:{ops.port}"


def test_port_in_use_raises_configuration_error(
    server: OpsServer, metrics: ConsumerMetrics
) -> None:
    second = OpsServer(metrics.registry, HealthState(), port=server.port)

    with pytest.raises(ConfigurationError, match=f"127.0.0.1:{server.port}"):
        second.start()


def test_start_twice_raises(server: OpsServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_stop_closes_port(metrics: ConsumerMetrics) -> None:
    ops = OpsServer(metrics.registry, HealthState(), port=0)
    ops.start()
    port = ops.port

    ops.stop()
    ops.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_health_state_rejects_invalid_stall() -> None:
    with pytest.raises(ValueError, match="stall_after_s must be > 0"):
        HealthState(stall_after_s=0)


async def test_heartbeat_task_keeps_alive(clock: FakeClock) -> None:
    health = HealthState(stall_after_s=5.0, clock=clock)
    clock.now += 10.0
    assert not health.alive()

    task = asyncio.create_task(run_heartbeat(health, interval_s=0.01))
    try:
        async with asyncio.timeout(10):
            while not health.alive():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()

    assert health.alive()
    with pytest.raises(asyncio.CancelledError):
        await task


# The example deployment must probe the paths and port that OpsServer serves. These
# checks parse the files only: no container engine or cluster is used.

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"


def _documents(name: str) -> dict[str, dict[str, Any]]:
    text = (KUBERNETES / name).read_text(encoding="utf-8")
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}


def _container() -> dict[str, Any]:
    deployment = _documents("deployment.yaml")["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container

    return result


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container["env"]}


def test_deployment_probes_match_server() -> None:
    container = _container()
    [port] = container["ports"]

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["port"] == port["name"]
    assert container["readinessProbe"]["httpGet"]["port"] == port["name"]
    assert port["containerPort"] == DEFAULT_PORT
    assert _env(container)["ORDERS_CONSUMER_METRICS_PORT"]["value"] == str(DEFAULT_PORT)
    assert _env(container)["ORDERS_CONSUMER_METRICS_HOST"]["value"] == "0.0.0.0"


def test_deployment_env_names_are_settings() -> None:
    for name in _env(_container()):
        field = name.removeprefix(ENV_PREFIX).lower()
        assert name.startswith(ENV_PREFIX)
        assert field in Settings.model_fields, f"{name} sets no Settings field"


def test_deployment_reads_secret_keys() -> None:
    secret = _documents("secret.example.yaml")["Secret"]
    source = _env(_container())["ORDERS_CONSUMER_CONNECTION_STRING"]["valueFrom"]
    reference = source["secretKeyRef"]

    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret["stringData"]


def test_deployment_runs_as_image_user() -> None:
    deployment = _documents("deployment.yaml")["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    prod = yaml.safe_load((REPO_ROOT / "config" / "prod.yaml").read_text("utf-8"))

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"ARG UID={pod['securityContext']['runAsUser']}" in dockerfile
    assert pod["terminationGracePeriodSeconds"] > prod["shutdown_grace_s"]
    assert _container()["args"] == ["run", "--env", "prod"]


def test_dockerfile_is_slim_and_non_root() -> None:
    lines = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    stages = [line for line in lines if line.startswith("FROM ")]

    assert stages
    for stage in stages:
        assert stage.startswith("FROM python:3.11-slim")
    assert "USER ${UID}" in lines
    assert 'ENTRYPOINT ["orders-consumer"]' in lines
    assert 'CMD ["run", "--env", "prod"]' in lines


def test_scaled_object_targets_deployment() -> None:
    documents = _documents("scaledobject.yaml")
    scaled = documents["ScaledObject"]["spec"]
    authentication = documents["TriggerAuthentication"]
    secret = _documents("secret.example.yaml")["Secret"]
    [trigger] = scaled["triggers"]
    [secret_ref] = authentication["spec"]["secretTargetRef"]
    entity = _env(_container())["ORDERS_CONSUMER_ENTITY"]["value"]

    assert scaled["scaleTargetRef"]["name"] == "orders-consumer"
    assert trigger["type"] == "azure-servicebus"
    assert trigger["metadata"]["queueName"] == entity
    assert int(trigger["metadata"]["messageCount"]) > 0
    assert trigger["authenticationRef"]["name"] == authentication["metadata"]["name"]
    assert secret_ref["parameter"] == "connection"
    assert secret_ref["key"] in secret["stringData"]
    assert scaled["minReplicaCount"] >= 1


def test_kustomization_lists_existing_files() -> None:
    kustomization = _documents("kustomization.yaml")["Kustomization"]

    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file()
