"""Handler registration: order, signature checks and unknown event types."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.errors import ConfigurationError
from consumer.routing import Router

TYPES = frozenset({"ORDER_CREATED", "ORDER_SHIPPED"})


def test_handlers_kept_in_registration_order() -> None:
    router = Router(known_event_types=TYPES)

    @router.handler("ORDER_CREATED")
    def first(event: Any, ctx: Any) -> None: ...

    @router.handler("ORDER_CREATED")
    async def second(event: Any, ctx: Any) -> None: ...

    specs = router.handlers_for("ORDER_CREATED")

    assert [spec.func for spec in specs] == [first, second]
    assert [spec.is_async for spec in specs] == [False, True]


def test_unknown_event_type_named_in_error() -> None:
    router = Router(known_event_types=TYPES)

    def handle(event: Any, ctx: Any) -> None: ...

    with pytest.raises(ConfigurationError) as raised:
        router.add_handler("ORDER_TELEPORTED", handle)

    assert "ORDER_TELEPORTED" in str(raised.value)
    assert "handle" in str(raised.value)


@pytest.mark.parametrize(
    "func",
    [
        lambda event: None,
        lambda event, ctx, extra: None,
        lambda event, ctx, *, flag: None,
    ],
)
def test_wrong_signature_rejected(func: Any) -> None:
    router = Router(known_event_types=TYPES)

    with pytest.raises(ConfigurationError, match="must accept exactly"):
        router.add_handler("ORDER_SHIPPED", func)


def test_same_function_twice_rejected() -> None:
    router = Router(known_event_types=TYPES)

    def handle(event: Any, ctx: Any) -> None: ...

    router.add_handler("ORDER_SHIPPED", handle)

    with pytest.raises(ConfigurationError, match="already registered"):
        router.add_handler("ORDER_SHIPPED", handle)


def test_include_router_appends_in_order() -> None:
    app_router = Router(known_event_types=TYPES)
    team_router = Router(known_event_types=TYPES)

    def own(event: Any, ctx: Any) -> None: ...

    def team(event: Any, ctx: Any) -> None: ...

    app_router.add_handler("ORDER_SHIPPED", own)
    team_router.add_handler("ORDER_SHIPPED", team)
    app_router.include_router(team_router)

    assert [s.func for s in app_router.handlers_for("ORDER_SHIPPED")] == [own, team]
    assert app_router.event_types == {"ORDER_SHIPPED"}
