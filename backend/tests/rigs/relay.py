"""A TCP relay in front of a real server that can keep a client's socket open after the server
closed its side.

That stretches the moment between a server's farewell to an idle connection (the FATAL it sends
when it ends a session) and the socket's close, which a client otherwise meets only by chance
under load, into one a test hits every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from backend.db.url import DatabaseTarget, Host


class Relay:
    """Relays to ``target``'s first host; ``relayed`` is ``target`` reached through the relay.

    While ``holding``, a connection the server closes stays open on the client's side until
    ``release()`` (or the relay's end); ``server_closed`` is set when that happens.
    """

    def __init__(self, target: DatabaseTarget) -> None:
        self.target = target
        self.relayed = target
        self.holding = False
        self.server_closed = asyncio.Event()
        self._released = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def release(self) -> None:
        self.holding = False
        self._released.set()

    async def _open_server(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = self.target.hosts[0]
        if host.is_socket:
            return await asyncio.open_unix_connection(f"{host.name}/.s.PGSQL.{host.port or 5432}")
        return await asyncio.open_connection(host.name, host.port or 5432)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_server: bool) -> None:
        try:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            if from_server and self.holding:
                self.server_closed.set()
                await self._released.wait()
        finally:
            sink.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await self._open_server()
        await asyncio.gather(
            self._pipe(client_reader, server_writer, False), self._pipe(server_reader, client_writer, True)
        )

    def _start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        server = await asyncio.start_server(self._start, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.relayed = dataclasses.replace(self.target, hosts=(Host("127.0.0.1", port),))
        try:
            yield self
        finally:
            self.release()
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
