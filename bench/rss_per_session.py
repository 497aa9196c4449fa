"""Reproduce the RSS growth per session receiver opened that the consumer showed.

    python bench/rss_per_session.py [--sessions N] [--shared-ssl] [--objects]

Starts the local broker as a subprocess on a free port of 127.0.0.1, publishes
`--sessions` single-message sessions and drains them with plain
`azure.servicebus.aio` session receivers: open, receive, complete, close, as a
hand-written consumer does. Every `--every` closed sessions it prints the process
RSS (psutil), the asyncio task count and the count of full garbage collections so
far. `--trim` adds the RSS after glibc's `malloc_trim(0)`, `--objects` the SDK
objects by class (uncollected garbage included) and `--collect` the RSS after a full
`gc.collect()`. `--context-cost` prints instead the RSS that one SSL context with
the certifi CA bundle costs (the context the SDK builds for each connection) and
exits, because the heap it frees would hide growth in a run that follows.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import ssl
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as a script, Python puts bench/ on the path, not the repository root.
    sys.path.insert(0, str(ROOT))

import certifi  # noqa: E402
import psutil  # noqa: E402
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage  # noqa: E402
from azure.servicebus.aio import ServiceBusClient  # noqa: E402
from azure.servicebus.exceptions import (  # noqa: E402
    OperationTimeoutError,
    SessionCannotBeLockedError,
)

from bench.workload import publish_all  # noqa: E402

ENTITY = "bench.rss"
MIB = 1024 * 1024
# The SDK classes whose live instances are counted with --objects.
COUNTED_CLASSES = (
    "Connection",
    "Session",
    "ReceiveLink",
    "SenderLink",
    "ManagementLink",
    "CBSAuthenticator",
    "AsyncTransport",
    "SASLTransport",
    "ReceiveClientAsync",
    "ServiceBusReceiver",
    "SSLContext",
)


def build_parser() -> argparse.ArgumentParser:
    """Describe the command-line options."""
    parser = argparse.ArgumentParser(
        prog="python bench/rss_per_session.py",
        description="Open, drain and close single-message session receivers on the "
        "local broker and print the process RSS as they accumulate.",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=1000,
        help="sessions to publish and drain (default 1000)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="session receivers open at once (default 8)",
    )
    parser.add_argument(
        "--every",
        type=int,
        default=100,
        help="print a sample every N closed sessions (default 100)",
    )
    parser.add_argument(
        "--shared-ssl",
        action="store_true",
        help="pass one ssl.SSLContext to ServiceBusClient (its ssl_context option)",
    )
    parser.add_argument(
        "--context-cost",
        action="store_true",
        help="only print the RSS in MiB per SSL context with the certifi CA bundle",
    )
    parser.add_argument(
        "--trim",
        action="store_true",
        help="also call glibc malloc_trim(0) at each sample and print the RSS after it",
    )
    parser.add_argument(
        "--objects",
        action="store_true",
        help="also count SDK objects by class at each sample, uncollected cyclic "
        "garbage included",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run a full gc.collect() at each sample, after the objects are counted",
    )
    return parser


def rss_mib() -> float:
    """Return the RSS of this process in MiB."""
    return psutil.Process().memory_info().rss / MIB


def context_cost_mib(count: int = 100) -> float:
    """Measure the RSS in MiB that one live SSL context with certifi's CAs adds.

    This is the context azure-servicebus 7.15.0 builds for every connection when the
    client gets no `ssl_context`. OpenSSL allocates it outside tracemalloc's view.
    """
    before = rss_mib()
    contexts = []
    for _ in range(count):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(certifi.where())
        contexts.append(context)
    cost = (rss_mib() - before) / count
    contexts.clear()
    return cost


def malloc_trim() -> None:
    """Return free heap memory to the OS with glibc's `malloc_trim(0)`."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)


def count_objects() -> Counter[str]:
    """Count objects of the classes in `COUNTED_CLASSES` that gc tracks.

    No collection runs first, so the counts include cyclic garbage that the next
    collection of its generation would free.
    """
    counts: Counter[str] = Counter()
    for instance in gc.get_objects():
        name = type(instance).__name__
        if name in COUNTED_CLASSES:
            counts[name] += 1
    return counts


class Sampler:
    """Progress printer: one sample line per `every` closed sessions."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.closed = 0
        self.started = time.perf_counter()
        self.first_mib: float | None = None

    def session_closed(self) -> None:
        """Count a closed session and print a sample when one is due."""
        self.closed += 1
        if self.closed % self.args.every == 0:
            self.sample()

    def sample(self) -> None:
        """Print one sample line with the figures the options request."""
        rss = rss_mib()
        if self.first_mib is None:
            self.first_mib = rss
        fields = [
            f"sessions={self.closed}",
            f"rss_mib={rss:.1f}",
            f"growth_mib={rss - self.first_mib:.1f}",
        ]
        if self.args.trim:
            malloc_trim()
            fields.append(f"rss_after_trim_mib={rss_mib():.1f}")
        fields.append(f"tasks={len(asyncio.all_tasks())}")
        if self.args.objects:
            counts = count_objects()
            fields += [f"{name}={counts[name]}" for name in COUNTED_CLASSES]
        if self.args.collect:
            gc.collect()
            fields.append(f"rss_after_collect_mib={rss_mib():.1f}")
        full_collections = gc.get_stats()[2]["collections"]
        fields.append(f"full_collections={full_collections}")
        fields.append(f"elapsed_s={time.perf_counter() - self.started:.0f}")
        print(" ".join(fields), flush=True)


async def serve_sessions(
    client: ServiceBusClient, remaining: list[int], sampler: Sampler
) -> None:
    """Open, drain and close session receivers until `remaining[0]` reaches zero."""
    while remaining[0] > 0:
        receiver = client.get_queue_receiver(
            queue_name=ENTITY, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=5
        )
        try:
            await receiver.__aenter__()
        except (OperationTimeoutError, SessionCannotBeLockedError):
            # Other workers locked the last sessions, so none is left for this one.
            await receiver.close()
            continue
        if not isinstance(receiver.session.session_id, str):
            # An accept that timed out can report the link open without a session
            # (azure-servicebus 7.15.0), so this receiver locked nothing.
            await receiver.close()
            continue
        try:
            messages = await receiver.receive_messages(
                max_message_count=1, max_wait_time=5
            )
            for message in messages:
                await receiver.complete_message(message)
            remaining[0] -= len(messages)
        finally:
            await receiver.close()
        sampler.session_closed()


def client_options(shared_ssl: bool) -> dict[str, Any]:
    """Return the extra `ServiceBusClient` options of the run."""
    if not shared_ssl:
        return {}
    return {"ssl_context": ssl.create_default_context()}


async def run(connection_string: str, args: argparse.Namespace) -> None:
    """Publish the sessions, then drain them with `args.concurrency` workers."""
    messages = [
        ServiceBusMessage(b"{}", session_id=f"order-{number}")
        for number in range(args.sessions)
    ]
    await publish_all(connection_string, ENTITY, messages)
    sampler = Sampler(args)
    remaining = [args.sessions]
    options = client_options(args.shared_ssl)
    sampler.sample()
    async with ServiceBusClient.from_connection_string(
        connection_string, **options
    ) as client:
        await asyncio.gather(
            *(
                serve_sessions(client, remaining, sampler)
                for _ in range(args.concurrency)
            )
        )
    print(f"done: sessions={sampler.closed} rss_mib={rss_mib():.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Start the broker subprocess and run the reproduction against it."""
    from localbus.testing import run_broker_process

    args = build_parser().parse_args(argv)
    if args.context_cost:
        print(f"ssl_context_mib={context_cost_mib():.2f}", flush=True)
        return 0
    with run_broker_process(entities=[ENTITY]) as broker:
        asyncio.run(run(broker.connection_string, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
