"""A TCP proxy on 127.0.0.1 that can cut every connection passing through it.

The local broker offers no way to drop client connections on demand, so the consumers
connect through this proxy and `cut()` aborts their connections in both directions, as
a network failure or a broker-side disconnect would.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK_BYTES = 64 * 1024


class ConnectionCutter:
    """Forward connections from a local port to `127.0.0.1:upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1, stored in `port`."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> int:
        """Abort every open connection at once; return how many were cut."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        self._writers.clear()
        return len(writers) // 2

    async def close(self) -> None:
        """Stop listening and cut the connections that remain."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
        except OSError:
            # The broker is down (restarting): the client sees a closed connection.
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, upstream_writer))
        pumps = [
            self._pump(client_reader, upstream_writer),
            self._pump(upstream_reader, client_writer),
        ]
        for pump in pumps:
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side closed: close the other, so the pair ends together.
            self._writers.discard(writer)
            with contextlib.suppress(RuntimeError):
                writer.transport.abort()
