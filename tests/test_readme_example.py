"""The handler example and the harness example test shown in README.md, run as is.

The app and handler repeat the README's "Writing handlers" section. The test at the
bottom is the five-line example test for the README.
"""

from __future__ import annotations

from consumer import ConsumerApp, DeadLetter, EventContext, load_settings
from consumer.events import OrderCreated

app = ConsumerApp(load_settings("dev"))


@app.handler("ORDER_CREATED")
async def reserve_stock(event: OrderCreated, ctx: EventContext) -> None:
    ctx.log.info("reserving_stock", items=len(event.payload.items))
    if not event.payload.items:
        raise DeadLetter("EmptyOrder", "ORDER_CREATED has no items")


# The README example test starts here.
from consumer.testing import ConsumerTestHarness, make_event  # noqa: E402


async def test_reserve_stock_completes_new_order() -> None:
    harness = ConsumerTestHarness(app)
    result = await harness.deliver(make_event("ORDER_CREATED", "order-1"))
    assert result.completed
