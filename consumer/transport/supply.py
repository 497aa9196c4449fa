"""Sessions accepted ahead of the workers, so accepting stays off the critical path.

Accepting a session with the Python SDK opens a new AMQP connection and link, which
took about 0.5 s per session against the local broker (azure-servicebus 7.15.0, measured
on a developer machine). Workers that accept only after finishing a session would spend
that time idle. The supply keeps up to `standby` sessions accepted and waiting, on top
of the sessions the workers hold, and accepts several at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from consumer.errors import TransportError
from consumer.logs import RateLimiter, log_exception_text
from consumer.metrics import ConsumerMetrics
from consumer.transport import SessionReceiver, Transport

log = structlog.get_logger("orders_consumer.supply")

# Accept failures back off from this to the cap, so a broker outage costs no CPU.
RECONNECT_BACKOFF_S = 0.5
RECONNECT_MAX_BACKOFF_S = 10.0
# While stopping, how often acceptors with no accept in flight are cancelled.
STOP_POLL_INTERVAL_S = 0.05
# Shortest wait between two renewals of a waiting session's lock.
STANDBY_RENEW_MIN_S = 0.2
# Accepts kept in flight while the entity has no session to offer.
EMPTY_ENTITY_PROBES = 2
# A session taken with less lock time left than this is renewed before the worker
# starts on it. Service Bus lock durations are 5 s at the least.
TAKE_RENEW_BELOW_S = 5.0
TAKE_RENEW_BELOW = timedelta(seconds=TAKE_RENEW_BELOW_S)
# Repeated connection errors are logged once per this interval, with a count.
ERROR_LOG_INTERVAL_S = 30.0
# How long a worker that takes a session waits for the session's keeper to end. A
# keeper still inside a renewal may finish that renewal later, but renews no more.
KEEPER_STOP_WAIT_S = 1.0


@dataclass
class _Keeper:
    """The renewal task of a waiting session and the flag that ends it."""

    task: asyncio.Task[None]
    stop: asyncio.Event


class SessionSupply:
    """Accept sessions ahead of time and hand them to workers one by one.

    Accepts in flight plus sessions waiting for a worker are kept at `standby`, plus
    one for each worker waiting in `take()`. The sessions workers hold do not count,
    so a held session waiting out its idle timeout does not slow the supply. At most
    `held + standby` sessions are locked at once.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        held: int,
        standby: int,
        accept_timeout_s: float,
        metrics: ConsumerMetrics,
        health: object | None = None,
    ) -> None:
        self._transport = transport
        self._accept_timeout_s = accept_timeout_s
        self._metrics = metrics
        self._health = health
        self._standby = standby
        self._acceptor_count = held + standby
        # Accepts in flight plus accepted sessions no worker has taken yet, and the
        # workers waiting in take(). `_changed` is set, then replaced, when either
        # count changes, which wakes every coroutine waiting on it.
        self._outstanding = 0
        self._takers = 0
        self._changed = asyncio.Event()
        self._ready: asyncio.Queue[SessionReceiver] = asyncio.Queue()
        # Renewal tasks of the sessions waiting in `_ready`, so no standby lock lapses.
        self._keepers: dict[int, _Keeper] = {}
        self._acceptors: list[asyncio.Task[None]] = []
        self._accepting: set[asyncio.Task[Any] | None] = set()
        self._stopped = False
        # Closes started by `stop()`, kept referenced until they end.
        self._stop_closes: set[asyncio.Task[None]] = set()
        # Set by an accept failure and cleared, counting a reconnect, by the next
        # accept that reaches the broker.
        self._disconnected = False
        self._limiter = RateLimiter(interval_s=ERROR_LOG_INTERVAL_S)
        self.last_connected_at = time.monotonic()
        # Start of the first accept that found no session since the last one that
        # did, or None while sessions keep coming.
        self.empty_since: float | None = None

    def start(self) -> None:
        """Start the accept loops."""
        self._acceptors = [
            asyncio.create_task(self._accept_loop(), name=f"session-acceptor-{index}")
            for index in range(self._acceptor_count)
        ]

    def has_waiting(self) -> bool:
        """Return whether an accepted session is waiting for a worker."""
        return not self._ready.empty()

    async def take(self) -> SessionReceiver:
        """Return the next accepted session, its lock renewed if it is near expiry.

        A waiting session's lock is renewed only at intervals, so it can be close to
        expiry when a worker takes it. Renewing such a lock here gives the worker time
        before its own renewal starts. A lock with `TAKE_RENEW_BELOW_S` or more left
        is not renewed, which saves a round trip per session. A session whose lock is
        already gone is closed, and the next one is tried.
        """
        while True:
            # A waiting worker may start one accept more than the standby count,
            # and stops counting as soon as it has a session, before any await.
            self._takers += 1
            self._notify()
            try:
                receiver = await self._ready.get()
            finally:
                self._takers -= 1
            self._finish_outstanding()
            try:
                handed_over = await self._hand_over(receiver)
            except asyncio.CancelledError:
                # The worker stopped during the handover. The session is then neither
                # queued nor held, so nothing else would close it.
                await self._close_quietly(receiver)
                raise
            if handed_over:
                return receiver

    async def _hand_over(self, receiver: SessionReceiver) -> bool:
        await self._stop_keeping(receiver)
        locked_until = receiver.locked_until
        now = datetime.now(UTC)
        if locked_until is not None and locked_until > now + TAKE_RENEW_BELOW:
            return True
        if locked_until is None or locked_until > now:
            try:
                await receiver.renew_lock()
                return True
            except TransportError as error:
                log.warning(
                    "standby_session_renewal_failed",
                    order_id=receiver.session_id,
                    error=log_exception_text(error),
                )
        else:
            log.warning("standby_session_expired", order_id=receiver.session_id)
        await self._close_quietly(receiver)
        return False

    async def _reserve(self) -> None:
        """Wait until another accept may start, and count it as outstanding."""
        while not self._may_accept():
            await self._changed.wait()
        self._outstanding += 1

    def _may_accept(self) -> bool:
        if self._outstanding >= self._standby + self._takers:
            return False
        # While accepts find no session, a few keep asking and the rest wait for
        # one to succeed. Every accept in flight on an empty entity keeps an open
        # connection and reopens it each accept_timeout_s, costing CPU for nothing.
        return self.empty_since is None or len(self._accepting) < EMPTY_ENTITY_PROBES

    def _finish_outstanding(self) -> None:
        self._outstanding -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def stop(self, grace_ends_at: float, closes_end_at: float) -> None:
        """Stop accepting and close every accepted session no worker took.

        Accepts in flight may go on until `grace_ends_at`. Each ends within
        `accept_timeout_s`, and a session it locked is closed here. They are not
        cancelled at once, because azure-servicebus 7.15.0 leaves the socket of an
        accept cancelled while connecting open until garbage collection. Accepts
        still running at `grace_ends_at` are cancelled, which releases what they
        locked (see `Transport.accept_session`). Those cancels and the closes get
        until `closes_end_at`. Both times are `time.monotonic()` values. What still
        runs then is left, and the broker releases its sessions when the
        connection closes.
        """
        self._stopped = True
        closes = self._close_waiting()
        accepts = await self._let_accepts_end(grace_ends_at)
        for task in accepts:
            task.cancel()
        if accepts:
            timeout_s = max(0.0, closes_end_at - time.monotonic())
            _, accepts = await asyncio.wait(accepts, timeout=timeout_s)
        # Sessions that the accepts in flight locked after the first sweep.
        closes |= self._close_waiting()
        if closes:
            timeout_s = max(0.0, closes_end_at - time.monotonic())
            _, closes = await asyncio.wait(closes, timeout=timeout_s)
        if accepts or closes:
            log.warning(
                "supply_stop_timed_out",
                accepts=len(accepts),
                session_closes=len(closes),
            )

    async def _let_accepts_end(self, deadline: float) -> set[asyncio.Task[None]]:
        """Wait for the acceptors until `deadline` and return those still running.

        An acceptor waiting for budget, or backing off after a failed accept, is
        cancelled, because only an accept in flight can leave a socket behind.
        """
        running = set(self._acceptors)
        while running:
            for task in running:
                if task not in self._accepting:
                    task.cancel()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            timeout_s = min(remaining_s, STOP_POLL_INTERVAL_S)
            _, running = await asyncio.wait(running, timeout=timeout_s)
        return running

    def _close_waiting(self) -> set[asyncio.Task[None]]:
        """Start closing every session in the queue, each in a task of its own."""
        closes = set()
        while not self._ready.empty():
            receiver = self._ready.get_nowait()
            task = asyncio.create_task(self._stop_keeping_and_close(receiver))
            self._stop_closes.add(task)
            task.add_done_callback(self._stop_closes.discard)
            closes.add(task)
        return closes

    async def _stop_keeping_and_close(self, receiver: SessionReceiver) -> None:
        await self._stop_keeping(receiver)
        await self._close_quietly(receiver)

    async def _keep_locked(
        self, receiver: SessionReceiver, stop: asyncio.Event
    ) -> None:
        """Renew a waiting session's lock at half its remaining time until taken.

        The loop ends when `stop` is set, because a cancel alone can be lost.
        azure-servicebus 7.15.0 awaits `asyncio.wait_for`, which in Python 3.11
        returns the result and drops a cancellation that arrives just as the awaited
        call ends. A keeper that missed its cancel renewed a session that no worker
        held until the process stopped.
        """
        while not stop.is_set():
            locked_until = receiver.locked_until
            if locked_until is None:
                return
            remaining_s = (locked_until - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(remaining_s / 2, STANDBY_RENEW_MIN_S))
            if stop.is_set():
                return
            try:
                await receiver.renew_lock()
            except TransportError as error:
                log.warning(
                    "standby_session_renewal_failed",
                    order_id=receiver.session_id,
                    error=log_exception_text(error),
                )
                return

    async def _stop_keeping(self, receiver: SessionReceiver) -> None:
        keeper = self._keepers.pop(id(receiver), None)
        if keeper is None:
            return
        keeper.stop.set()
        keeper.task.cancel()
        await asyncio.wait({keeper.task}, timeout=KEEPER_STOP_WAIT_S)

    async def _accept_loop(self) -> None:
        backoff_s = RECONNECT_BACKOFF_S
        task = asyncio.current_task()
        while not self._stopped:
            await self._reserve()
            started_at = time.monotonic()
            self._accepting.add(task)
            try:
                receiver = await self._transport.accept_session(self._accept_timeout_s)
            except Exception as error:  # noqa: BLE001 - keep accepting after any failure
                self._finish_outstanding()
                self._on_error(error)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, RECONNECT_MAX_BACKOFF_S)
                continue
            except BaseException:
                self._finish_outstanding()
                raise
            finally:
                self._accepting.discard(task)
            backoff_s = RECONNECT_BACKOFF_S
            self._on_connected()
            if receiver is None:
                self._finish_outstanding()
                if self.empty_since is None:
                    self.empty_since = started_at
                continue
            if self.empty_since is not None:
                self.empty_since = None
                self._notify()
            self._metrics.sessions_accepted.labels(self._transport.entity).inc()
            stop = asyncio.Event()
            task = asyncio.create_task(
                self._keep_locked(receiver, stop), name=f"standby-{receiver.session_id}"
            )
            self._keepers[id(receiver)] = _Keeper(task, stop)
            self._ready.put_nowait(receiver)

    def _on_connected(self) -> None:
        if self._disconnected:
            self._disconnected = False
            self._metrics.reconnects.labels(self._transport.entity).inc()
            log.info("connection_restored", entity=self._transport.entity)
        self.last_connected_at = time.monotonic()
        self._metrics.connection_up.labels(self._transport.entity).set(1)
        if self._health is not None:
            self._health.set_connected(True)  # type: ignore[attr-defined]

    def _on_error(self, error: Exception) -> None:
        self._disconnected = True
        self._metrics.connection_up.labels(self._transport.entity).set(0)
        if self._health is not None:
            self._health.set_connected(False)  # type: ignore[attr-defined]
        if self._limiter.allow("accept_failed"):
            log.warning(
                "connection_lost",
                entity=self._transport.entity,
                error=log_exception_text(error),
                suppressed=self._limiter.pop_suppressed("accept_failed"),
            )

    async def _close_quietly(self, receiver: SessionReceiver) -> None:
        try:
            await receiver.close()
        except Exception as error:  # noqa: BLE001 - the session is being given up
            log.debug(
                "session_close_failed",
                order_id=receiver.session_id,
                error=log_exception_text(error),
            )
