"""A minimal HTTP/1.1 keep-alive client on h11, for load runs and benchmarks.

Lighter than a general client so that a benchmark measures the server, and it
timestamps what a streaming consumer cares about: the first body byte (with
deferred commit, status, headers and first content arrive together) and the end.
"""

from __future__ import annotations

import attrs
import h11
import trio


@attrs.define
class Reply:
    status: int
    body: bytes
    first_byte: float  # seconds from send to the first body byte (or the head, if no body)
    total: float


class ConnectionLost(Exception):
    pass


@attrs.define(eq=False)
class HttpConnection:
    host: str
    port: int
    _stream: trio.SocketStream | None = None
    _conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self._stream = None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes = b"") -> Reply:
        if self._stream is None or self._conn.our_state is not h11.IDLE:
            await self.aclose()
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._conn = h11.Connection(h11.CLIENT)
        stream = self._stream
        start = trio.current_time()
        head = [("host", f"{self.host}:{self.port}"), ("content-length", str(len(body))),
                *headers]
        data = self._conn.send(h11.Request(method=method, target=target, headers=head))
        data += self._conn.send(h11.Data(data=body)) + self._conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status, chunks, first = 0, [], None
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                received = await stream.receive_some(65536)
                if not received:
                    await self.aclose()
                    raise ConnectionLost("server closed the connection")
                self._conn.receive_data(received)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if first is None:
                    first = trio.current_time() - start
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                await self.aclose()
                raise ConnectionLost("connection closed mid-response")
        total = trio.current_time() - start
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        else:
            await self.aclose()
        return Reply(status, b"".join(chunks), first if first is not None else total, total)
