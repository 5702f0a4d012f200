"""A gRPC caller that never reads: raw HTTP/2 with a stream window of 0, so the server cannot send a response body.

A unary call made this way stays in flight on the server (its handler has returned, its response is queued) for as
long as the connection is open: that is how a test holds an upload slot without timing anything.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x6, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def literal(name: str, value: str) -> bytes:
    """An HPACK literal header field, not indexed, new name, no Huffman coding (RFC 7541, 6.2.2)."""
    out = b"\x00"
    for text in (name.encode(), value.encode()):
        assert len(text) < 127
        out += bytes([len(text)]) + text
    return out


class StalledCaller:
    """Unary gRPC calls on one HTTP/2 connection whose responses the server can never send (stream window 0)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str) -> None:
        self.reader, self.writer, self.authority = reader, writer, authority
        self.next_stream = 1
        self.answered: set[int] = set()  # streams whose response headers arrived: the handler has returned
        self.ended: set[int] = set()  # streams the server finished
        self._pump = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int) -> StalledCaller:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 0)))
        await writer.drain()
        return cls(reader, writer, f"{host}:{port}")

    async def call(self, method: str, request: bytes) -> int:
        """Send one unary call (``/package.Service/Method``); returns its stream id."""
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        headers = b"".join(
            literal(name, value)
            for name, value in [
                (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", self.authority),
                ("content-type", "application/grpc"), ("te", "trailers"),
            ]
        )  # fmt: skip
        message = b"\x00" + len(request).to_bytes(4, "big") + request
        self.writer.write(frame(HEADERS, END_HEADERS, stream, headers) + frame(DATA, END_STREAM, stream, message))
        await self.writer.drain()
        return stream

    async def _read(self) -> None:
        while True:
            try:
                head = await self.reader.readexactly(9)
                payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if kind == SETTINGS and not flags & ACK:
                self.writer.write(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.writer.write(frame(PING, ACK, 0, payload))
            elif kind == HEADERS:
                self.answered.add(stream)
            if kind in (HEADERS, DATA) and flags & END_STREAM:
                self.ended.add(stream)

    async def wait_answered(self, streams: list[int]) -> None:
        """Until every stream's response headers have arrived (the connection ending first fails)."""
        await self._until(lambda: set(streams) <= self.answered, "every call was answered")

    async def _until(self, condition: Callable[[], bool], what: str) -> None:
        for _ in range(3000):  # a liveness bound (about 30 s), not a measurement
            if condition():
                return
            assert not self._pump.done(), f"the server closed the connection before {what}"
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out before {what}")

    async def finish(self) -> None:
        """Open every window wide, let the server send all it queued, and close once every call has ended."""
        increment = (1 << 30).to_bytes(4, "big")
        calls = set(range(1, self.next_stream, 2))
        for stream in (0, *calls):  # 0: the connection's window
            self.writer.write(frame(WINDOW_UPDATE, 0, stream, increment))
        await self.writer.drain()
        await self._until(lambda: calls <= self.ended, "every call ended")
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
