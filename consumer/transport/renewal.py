"""Background renewal of a session lock while its worker holds the session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from consumer.transport import SessionReceiver

log = structlog.get_logger("orders_consumer.renewal")

# Renew when this fraction of the remaining lock time is left.
RENEW_AT_FRACTION = 0.5
# Without a reported expiry, renew at this interval (Service Bus locks last >= 5 s).
RENEW_DEFAULT_INTERVAL_S = 5.0
# Shortest wait between renewals, so an expired lock does not make the loop spin.
MIN_RENEW_DELAY_S = 0.05
# A failed renewal is retried after this delay.
RENEW_RETRY_S = 1.0


async def renew_session_lock(
    receiver: SessionReceiver,
    *,
    max_lock_renewal_s: float,
    busy_since: Callable[[], float | None],
    on_renewed: Callable[[], None],
    on_failed: Callable[[Exception], None],
    lock_lost: asyncio.Event,
    released: asyncio.Event,
) -> None:
    """Renew the lock of `receiver` until `lock_lost` or `released` is set.

    The worker sets `released` and also cancels this task when it lets the session
    go. The flag is needed because azure-servicebus 7.15.0 awaits
    `asyncio.wait_for`, which in Python 3.11 drops a cancellation that arrives just
    as the awaited call ends. This loop would then go on renewing.

    `busy_since()` returns the `time.monotonic()` at which the current message started,
    or None between messages. Renewal stops once one message has run longer than
    `max_lock_renewal_s`, so a stuck handler cannot keep an order locked forever; 0
    turns renewal off. A failed renewal is reported to `on_failed`, which decides
    whether the lock is lost, and retried.
    """
    if max_lock_renewal_s <= 0:
        return
    while not lock_lost.is_set() and not released.is_set():
        await asyncio.sleep(_renew_delay_s(receiver))
        if released.is_set():
            return
        started = busy_since()
        if started is not None and time.monotonic() - started > max_lock_renewal_s:
            log.warning("lock_renewal_limit_reached", limit_s=max_lock_renewal_s)
            return
        try:
            await receiver.renew_lock()
        except Exception as error:  # noqa: BLE001 - the caller classifies the failure
            on_failed(error)
            await asyncio.sleep(RENEW_RETRY_S)
        else:
            on_renewed()


def _renew_delay_s(receiver: SessionReceiver) -> float:
    locked_until = receiver.locked_until
    if locked_until is None:
        return RENEW_DEFAULT_INTERVAL_S
    remaining_s = (locked_until - datetime.now(UTC)).total_seconds()
    return max(remaining_s * RENEW_AT_FRACTION, MIN_RENEW_DELAY_S)
