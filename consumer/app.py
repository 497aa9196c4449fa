"""`ConsumerApp`: the handler registry, the message pipeline and the lifecycle.

For each message the pipeline parses the body, checks that `payload.orderId` is the
session id, runs the event type's handlers in registration order with in-process
retries, and returns the settlement for the processor to apply.

Retries and several handlers: when handler 2 of 3 fails, the next in-process attempt
starts at handler 2, because handler 1 already succeeded in this delivery. After an
abandon the broker delivers the message again and every handler runs again, so
handlers must be idempotent.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from consumer import settlement
from consumer.config import Settings, load_settings
from consumer.events import EventRejected, parse_event
from consumer.http import HealthState
from consumer.logs import configure_logging, log_exception_text
from consumer.metrics import ConsumerMetrics, event_type_label
from consumer.processor import SESSION_CLOSE_MARGIN_S, SessionProcessor
from consumer.retry import AttemptFailure, RetryPolicy, is_retryable, run_with_retries
from consumer.routing import EventContext, HandlerFunc, HandlerSpec, Router, bind_log
from consumer.settlement import Settlement
from consumer.transport import InboundMessage, Transport

log = structlog.get_logger("orders_consumer.app")

# Closing the transport (the Service Bus client) after the processor stopped gets this
# long. It took up to 0.85 s with 40 acceptors against the local broker on a busy
# 2-core machine. A close still running then goes on in the background, and the broker
# releases what it held when the process exits and the connection drops.
CLIENT_CLOSE_TIMEOUT_S = 2.0
# `run()` returns at most `shutdown_grace_s` plus this long after a stop: the grace
# period, then the session closes, then the client close.
SHUTDOWN_MARGIN_S = SESSION_CLOSE_MARGIN_S + CLIENT_CLOSE_TIMEOUT_S


class ConsumerApp:
    """A session-ordered consumer: register handlers, then `await app.run()`.

    `registry` receives the Prometheus collectors (a fresh registry when None).
    `transport` replaces the Azure Service Bus transport, for tests and harnesses.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = settings
        self.router = Router()
        self.metrics = ConsumerMetrics(registry)
        self.health = HealthState()
        self._transport = transport
        self._processor: SessionProcessor | None = None
        self._stop_requested = False
        self._stop_requested_at: float | None = None
        self._retry_policy = RetryPolicy.from_settings(settings)
        self._executor: ThreadPoolExecutor | None = None
        self._handler_threads = _ThreadCount()
        self._transport_close: asyncio.Task[None] | None = None
        self._entity = ""

    @classmethod
    def from_config(cls, env: str | None = None, **overrides: Any) -> ConsumerApp:
        """Build an app from `config/<env>.yaml`, `ORDERS_CONSUMER_*` and `overrides`.

        Raises `ConfigurationError` listing each invalid field.
        """
        return cls(load_settings(env, **overrides))

    def handler(self, event_type: str) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register the decorated `(event, ctx)` function for `event_type`."""
        return self.router.handler(event_type)

    def include_router(self, router: Router) -> None:
        """Add every handler of `router`, after the handlers already registered."""
        self.router.include_router(router)

    @property
    def handler_threads_running(self) -> int:
        """Number of sync handler calls still running in their threads.

        A thread cannot be interrupted, so a sync handler cancelled at the end of
        the grace period runs on after its message was abandoned, and after `run()`
        returned. The interpreter waits for these threads before it exits.
        """
        return self._handler_threads.value

    @property
    def stop_requested_at(self) -> float | None:
        """`time.monotonic()` of the first `stop()` call, SIGTERM or SIGINT, or None."""
        return self._stop_requested_at

    def stop(self) -> None:
        """Start a drain: accept no new sessions and let in-flight handlers finish."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stop_requested = True
        if self._processor is not None:
            self._processor.stop()

    async def run(self, until_idle_s: float | None = None) -> None:
        """Consume until `stop()`, SIGTERM or SIGINT, or batch mode runs out of work.

        With `until_idle_s`, return once no session has been available for that many
        seconds. After a stop, return within `shutdown_grace_s + SHUTDOWN_MARGIN_S`.
        Raises `BrokerUnavailable` after `max_disconnected_s` without a connection.

        Unless the application configured structlog before, this configures logging
        from `log_format` and `log_level`, with secrets masked, as the CLI does.
        """
        if not structlog.is_configured():
            configure_logging(
                self.settings.effective_log_format, self.settings.log_level
            )
        transport = self._transport or self._create_transport()
        self._entity = transport.entity
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.max_concurrent_sessions,
            thread_name_prefix="handler",
        )
        self._processor = SessionProcessor(
            transport, self._process, self.settings, self.metrics, self.health
        )
        if self._stop_requested:
            self._processor.stop()
        removers = self._install_signal_handlers()
        log.info("consumer_started", entity=self._entity, **self._run_summary())
        self._warn_about_handler_timeout()
        try:
            await self._processor.run(until_idle_s)
        finally:
            for remove in removers:
                remove()
            await self._close_transport(transport)
            self._executor.shutdown(wait=False, cancel_futures=True)
            log.info("consumer_stopped", entity=self._entity)

    async def _close_transport(self, transport: Transport) -> None:
        closing = asyncio.create_task(transport.close(), name="transport-close")
        done, _ = await asyncio.wait({closing}, timeout=CLIENT_CLOSE_TIMEOUT_S)
        if done:
            await closing
            return
        # Referenced here so that the task is not garbage-collected while it runs.
        self._transport_close = closing
        log.warning(
            "transport_close_timed_out",
            entity=self._entity,
            timeout_s=CLIENT_CLOSE_TIMEOUT_S,
        )

    def _create_transport(self) -> Transport:
        # Imported here so that building an app for tests does not load the Azure SDK.
        from consumer.transport.azure import AzureTransport

        return AzureTransport(self.settings)

    def _run_summary(self) -> dict[str, Any]:
        return {
            "max_concurrent_sessions": self.settings.max_concurrent_sessions,
            "prefetch_count": self.settings.prefetch_count,
            "event_types": sorted(self.router.event_types),
        }

    def _warn_about_handler_timeout(self) -> None:
        """Warn when a handler may outlive the session lock before it times out.

        Settings validation rejects a retry budget longer than a positive
        `max_lock_renewal_s`, so this fires when renewal is off (0) or the limit is
        shorter than one handler call.
        """
        timeout_s = self.settings.handler_timeout_s
        limit_s = self.settings.max_lock_renewal_s
        if limit_s > 0 and timeout_s <= limit_s:
            return
        log.warning(
            "handler_timeout_exceeds_lock_renewal",
            handler_timeout_s=timeout_s,
            max_lock_renewal_s=limit_s,
            detail=(
                "a handler running longer than the lock renewal limit loses the "
                "session lock and its message is delivered again; lower "
                "handler_timeout_s or raise max_lock_renewal_s"
            ),
        )

    def _install_signal_handlers(self) -> list[Callable[[], None]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        loop = asyncio.get_running_loop()
        removers: list[Callable[[], None]] = []
        for number in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(number, self._on_signal, number)
            except (NotImplementedError, RuntimeError):
                continue
            removers.append(lambda number=number: loop.remove_signal_handler(number))
        return removers

    def _on_signal(self, number: int) -> None:
        log.info("shutdown_requested", signal=signal.Signals(number).name)
        self.stop()

    async def _process(
        self, message: InboundMessage, lock_lost: asyncio.Event
    ) -> Settlement:
        policy = self.settings.unknown_event_policy
        if message.body is None:
            return settlement.rejected(
                settlement.MALFORMED_BODY,
                "body is an AMQP value or sequence, not UTF-8 JSON in data sections",
                policy,
            )
        try:
            event = parse_event(
                message.body,
                max_bytes=self.settings.max_body_bytes,
                max_depth=self.settings.max_json_depth,
            )
        except EventRejected as rejection:
            return settlement.rejected(rejection.reason, rejection.description, policy)
        if event.order_id != message.session_id:
            return settlement.session_mismatch(event.order_id, message.session_id)
        specs = self.router.handlers_for(event.event_type)
        if not specs:
            return settlement.rejected(
                settlement.UNKNOWN_EVENT_TYPE,
                f"no handler is registered for event type {event.event_type!r}",
                policy,
            )
        return await self._run_with_retries(message, event, specs, lock_lost)

    async def _run_with_retries(
        self,
        message: InboundMessage,
        event: Any,
        specs: tuple[HandlerSpec, ...],
        lock_lost: asyncio.Event,
    ) -> Settlement:
        context = self._context(message, event)
        succeeded: set[int] = set()

        async def attempt(number: int) -> None:
            current = context if number == 1 else replace(context, attempt=number)
            await self._run_handlers(specs, event, current, succeeded)

        error = await run_with_retries(
            attempt,
            self._retry_policy,
            stop=lock_lost,
            on_failure=lambda failure: self._on_attempt_failed(context, failure),
        )
        if error is None:
            return settlement.completed()
        return settlement.after_failure(
            error, message.delivery_count, self.settings.max_delivery_count
        )

    def _context(self, message: InboundMessage, event: Any) -> EventContext:
        correlation_id = event.metadata.correlation_id or message.correlation_id
        return EventContext(
            order_id=event.order_id,
            message_id=message.message_id,
            sequence_number=message.sequence_number,
            delivery_count=message.delivery_count,
            correlation_id=correlation_id,
            enqueued_at=message.enqueued_at,
            event_type=event.event_type,
            entity=self._entity,
            attempt=1,
            log=bind_log(
                order_id=event.order_id,
                message_id=message.message_id,
                correlation_id=correlation_id,
                event_type=event.event_type,
            ),
        )

    async def _run_handlers(
        self,
        specs: tuple[HandlerSpec, ...],
        event: Any,
        context: EventContext,
        succeeded: set[int],
    ) -> None:
        metrics = self.metrics
        labels = (self._entity, event_type_label(context.event_type))
        in_flight = metrics.child(metrics.handlers_in_flight, self._entity)
        duration = metrics.child(metrics.handler_duration, *labels)
        for index, spec in enumerate(specs):
            if index in succeeded:
                continue
            started = time.perf_counter()
            in_flight.inc()
            try:
                await self._call(spec, event, context)
            finally:
                in_flight.dec()
                duration.observe(time.perf_counter() - started)
            succeeded.add(index)
        metrics.child(metrics.handler_attempts, *labels, "success").inc()

    async def _call(self, spec: HandlerSpec, event: Any, context: EventContext) -> None:
        timeout_s = self.settings.handler_timeout_s
        running = self._start(spec, event, context)
        try:
            async with asyncio.timeout(timeout_s):
                await running
        except TimeoutError:
            # NOTE: a sync handler cannot be interrupted; its thread runs on after the
            # timeout, while the message is already being retried.
            raise TimeoutError(
                f"handler {spec.name} ran longer than handler_timeout_s={timeout_s}"
            ) from None

    def _start(
        self, spec: HandlerSpec, event: Any, context: EventContext
    ) -> asyncio.Future[Any]:
        """Start one handler call, in a copy of the worker's context variables.

        An async handler gets a task of its own and a sync one runs in the thread
        pool. Either way the variables the handler sets, such as structlog context,
        stay out of the worker's later log lines.
        """
        if spec.is_async:
            return asyncio.ensure_future(spec.func(event, context))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        bound = contextvars.copy_context()
        return loop.run_in_executor(
            self._executor,
            self._handler_threads.run,
            bound.run,
            spec.func,
            event,
            context,
        )

    def _on_attempt_failed(
        self, context: EventContext, failure: AttemptFailure
    ) -> None:
        error = failure.error
        if failure.will_retry:
            outcome = "retry"
        elif is_retryable(error):
            outcome = "failed"
        else:
            outcome = "dead_letter"
        labels = (self._entity, event_type_label(context.event_type), outcome)
        self.metrics.handler_attempts.labels(*labels).inc()
        log.warning(
            "handler_retried" if failure.will_retry else "handler_failed",
            attempt=failure.attempt,
            retry_in_s=round(failure.delay_s, 3),
            error=log_exception_text(error),
        )


class _ThreadCount:
    """Count the calls running in pool threads, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """Call `func(*args)` in this thread, counted while it runs."""
        with self._lock:
            self.value += 1
        try:
            return func(*args)
        finally:
            with self._lock:
                self.value -= 1
