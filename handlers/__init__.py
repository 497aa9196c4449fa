"""Bundled handlers that keep a per-order projection in a SQLite store.

`install(app)` opens the store at `app.settings.store_file` and adds the fulfillment,
payment and notification routers to the app. `build_routers(store)` returns the same
routers for use without an app, for example in tests.
"""

from __future__ import annotations

from typing import Protocol

from consumer.config import Settings
from consumer.routing import Router
from handlers import fulfillment, notification, payment
from handlers.projection import InvalidTransition, OrderStatus, Projection
from handlers.store import ProjectionStore

__all__ = [
    "InvalidTransition",
    "OrderStatus",
    "Projection",
    "ProjectionStore",
    "build_routers",
    "install",
]


class SupportsRouters(Protocol):
    """An app with settings that accepts routers, such as `ConsumerApp`."""

    @property
    def settings(self) -> Settings: ...

    def include_router(self, router: Router) -> None: ...


def build_routers(store: ProjectionStore) -> list[Router]:
    """Return the fulfillment, payment and notification routers bound to `store`."""
    return [
        fulfillment.build_router(store),
        payment.build_router(store),
        notification.build_router(store),
    ]


def install(app: SupportsRouters) -> ProjectionStore:
    """Open the store at `app.settings.store_file` and add every bundled router.

    The caller owns the returned store and closes it after the app stopped.
    """
    store = ProjectionStore(app.settings.store_file)
    for router in build_routers(store):
        app.include_router(router)
    return store
