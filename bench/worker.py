"""Child process that runs one consumer, ours or the baseline, and reports on stdout.

`bench.run` starts `python -m bench.worker` with a JSON `WorkerSpec` on stdin and the
connection string in `ORDERS_CONSUMER_CONNECTION_STRING`, so the secret never shows in
a process listing. The child prints `ready` once it is about to consume, and its result
as one JSON line when `expected` messages are completed. Its CPU time covers this
process only: the broker and the publisher run elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.baseline import BaselineOptions, run_baseline
from bench.recorder import Recorder, TimingTransport, percentile
from consumer.events import EVENT_TYPES
from consumer.logs import configure_logging
from consumer.routing import Router

CONNECTION_ENV = "ORDERS_CONSUMER_CONNECTION_STRING"
READY_LINE = "ready"
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerSpec:
    """One consumer run: which consumer, on which entity, until how many messages."""

    kind: str  # "ours" or "baseline"
    entity: str
    expected: int
    concurrency: int
    idle_timeout_s: float
    prefetch_count: int = 0
    handler_delay_s: float = 0.0
    record_latency: bool = False
    rss_at: tuple[int, ...] = ()
    profile_path: str | None = None
    # Ours only: whether the session state is written before each completion.
    checkpoint: bool = True


async def _handle(delay_s: float) -> None:
    if delay_s:
        await asyncio.sleep(delay_s)


def _router(delay_s: float) -> Router:
    router = Router()

    async def handle(event: Any, ctx: Any) -> None:
        await _handle(delay_s)

    for event_type in EVENT_TYPES:
        router.handler(event_type)(handle)
    return router


async def _run_ours(spec: WorkerSpec, connection: str, recorder: Recorder) -> None:
    from consumer.app import ConsumerApp
    from consumer.config import Settings
    from consumer.transport.azure import AzureTransport

    settings = Settings(
        connection_string=connection,
        entity=spec.entity,
        max_concurrent_sessions=spec.concurrency,
        session_idle_timeout_s=spec.idle_timeout_s,
        prefetch_count=spec.prefetch_count,
        checkpoint=spec.checkpoint,
        shutdown_grace_s=STOP_TIMEOUT_S,
    )
    transport = TimingTransport(AzureTransport(settings), recorder)
    app = ConsumerApp(settings, transport=transport)
    app.include_router(_router(spec.handler_delay_s))
    task = asyncio.create_task(app.run())
    try:
        await recorder.done.wait()
    finally:
        app.stop()
        await task


async def _run_baseline(spec: WorkerSpec, connection: str, recorder: Recorder) -> None:
    from azure.servicebus.aio import ServiceBusClient

    options = BaselineOptions(
        entity=spec.entity,
        concurrency=spec.concurrency,
        prefetch_count=spec.prefetch_count,
        idle_timeout_s=spec.idle_timeout_s,
    )

    async def handler(event: Any) -> None:
        await _handle(spec.handler_delay_s)

    async with ServiceBusClient.from_connection_string(connection) as client:
        await run_baseline(client, options, handler, recorder)


async def consume(spec: WorkerSpec, connection: str) -> dict[str, Any]:
    """Run the consumer of `spec` until `spec.expected` messages are completed.

    Return the figures of the run: elapsed seconds and CPU seconds of this process from
    the start of consuming to the last completion, completions, the phase times, the
    latency percentiles, RSS samples, and how long the consumer took to stop. A
    consumer that does not stop within `STOP_TIMEOUT_S` is reported with
    `stop_timed_out` and the process exits at once without waiting for it. An error
    raised while stopping is reported as `stop_error`.
    """
    recorder = Recorder(spec.expected, spec.record_latency, frozenset(spec.rss_at))
    run = _run_ours if spec.kind == "ours" else _run_baseline
    print(READY_LINE, flush=True)
    cpu_started = time.process_time()
    started = time.perf_counter()
    runner = asyncio.create_task(run(spec, connection, recorder))
    finished = asyncio.ensure_future(recorder.done.wait())
    await asyncio.wait({runner, finished}, return_when=asyncio.FIRST_COMPLETED)
    if not recorder.done.is_set():
        finished.cancel()
        runner.result()
        raise RuntimeError(
            f"the {spec.kind} consumer stopped after {recorder.completed} of "
            f"{spec.expected} messages without an error"
        )
    cpu_s = time.process_time() - cpu_started
    elapsed_s = (recorder.finished_at or time.perf_counter()) - started
    stop_started = time.perf_counter()
    _, pending = await asyncio.wait({runner}, timeout=STOP_TIMEOUT_S)
    result = {
        "kind": spec.kind,
        "messages": recorder.completed,
        "elapsed_s": elapsed_s,
        "cpu_s": cpu_s,
        "stop_s": time.perf_counter() - stop_started,
        "stop_timed_out": bool(pending),
        "times": recorder.times.as_dict(),
        "latency_p50_ms": percentile(recorder.latencies_s, 0.50) * 1000,
        "latency_p99_ms": percentile(recorder.latencies_s, 0.99) * 1000,
        "rss_mb": {str(count): mb for count, mb in sorted(recorder.rss_mb.items())},
    }
    if pending:
        # Waiting for a consumer stuck in shutdown would hang the benchmark.
        _emit(spec, result)
        os._exit(0)
    error = runner.exception()
    if error is not None:
        # The figures are complete by now, so a failed shutdown is reported with them.
        result["stop_error"] = f"{type(error).__name__}: {error}"
    return result


def _emit(spec: WorkerSpec, result: dict[str, Any]) -> None:
    print(json.dumps({"spec": asdict(spec), **result}), flush=True)


def _profiled(spec: WorkerSpec, connection: str) -> dict[str, Any]:
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="disabled")
    profiler.start()
    try:
        return asyncio.run(consume(spec, connection))
    finally:
        profiler.stop()
        assert spec.profile_path is not None
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        Path(spec.profile_path).write_text(text, encoding="utf-8")


def main() -> int:
    """Read the spec from stdin, consume, and print the result as one JSON line."""
    fields = json.loads(sys.stdin.read())
    fields["rss_at"] = tuple(fields.get("rss_at", ()))
    spec = WorkerSpec(**fields)
    connection = os.environ.get(CONNECTION_ENV)
    if not connection:
        print(f"missing {CONNECTION_ENV}", file=sys.stderr)
        return 2
    configure_logging("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115
    if spec.profile_path:
        result = _profiled(spec, connection)
    else:
        result = asyncio.run(consume(spec, connection))
    _emit(spec, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
