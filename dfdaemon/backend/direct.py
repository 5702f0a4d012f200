"""A response body read straight from its socket by a worker thread, after aiohttp has sent the request and parsed
the head.

Read through aiohttp, every chunk of a body is received on the event loop, copied once more by the HTTP parser and
then handed to a thread for writing; by then it has left the CPU's cache, and the hand-over costs as much as the
copies. A body that is plain bytes on a plain TCP connection with a known length needs no parser: a worker thread
can receive it into a small reused buffer and write and CRC each block while it is still in cache. aiohttp
keeps everything else (pooling, redirects, the source policy, the head); the connection is closed afterwards, as
the parser no longer knows where it stands.
"""

from __future__ import annotations

import os
import socket
import struct

import aiohttp

from dfdaemon.backend.policy import BackendError
from dfdaemon.blocking import SharedSocket, receive_into, receive_timeout

# Largest buffer a body's unwanted head is received into and dropped (an origin that ignores ranges).
_SKIP_BUFFER = 1024 * 1024


class DirectBody:
    """The rest of one response body, ``length`` bytes after ``skip`` bytes to drop, for one worker thread at a time;
    ``end`` (from the event loop, at any moment) fails a read at once (see ``SharedSocket``)."""

    def __init__(self, sock: socket.socket, buffered: bytes, skip: int, length: int, url: str, timeout: float) -> None:
        self._socket = SharedSocket(sock)
        self._timeout = timeout
        self._buffered = memoryview(buffered)
        self._skip = skip
        self.length = length
        self.received = 0
        self._url = url

    def read_into(self, target: memoryview) -> int:
        """Block until the body's next bytes are in ``target``: all of it, unless the origin pauses for the read
        timeout after sending some (a body that ends early, or a longer pause, raises ``BackendError``)."""
        try:
            return self._socket.run(self._read, target)
        except ConnectionAbortedError:
            raise BackendError(f"the read of {self._url} was given up") from None

    def end(self) -> None:
        self._socket.end()

    def _read(self, target: memoryview) -> int:
        if self._skip:  # an origin that ignores ranges sends what comes before the range as well
            scratch = memoryview(bytearray(min(self._skip, _SKIP_BUFFER)))
            while self._skip:
                self._skip -= self._next(scratch[: self._skip])
        count = self._next(target[: min(len(target), self.length - self.received)])
        self.received += count
        return count

    def _next(self, target: memoryview) -> int:
        if self._buffered:
            count = min(len(target), len(self._buffered))
            target[:count] = self._buffered[:count]
            self._buffered = self._buffered[count:]
            return count
        try:
            return receive_into(self._socket.sock, target)
        except BlockingIOError:  # the receive timeout: not one byte for that long
            raise self._broke(f"nothing received for {self._timeout:g}s") from None
        except OSError as exc:
            raise self._broke(str(exc) or type(exc).__name__) from None

    def _broke(self, detail: str) -> BackendError:
        return BackendError(f"origin connection broke after {self.received} of {self.length} bytes: {detail}")


def take_over(response: aiohttp.ClientResponse, skip: int, length: int, url: str, timeout: float) -> DirectBody | None:
    """The rest of ``response``'s body as a ``DirectBody``, when it is plain bytes of a known length on plain TCP;
    None otherwise (TLS, a chunked or length-less body, a connection aiohttp already gave up).

    Reading on the event loop stops here. The bytes aiohttp had already received come first; the thread reads the
    rest from a duplicate of the socket (same connection, its own descriptor), failing when nothing arrives for
    ``timeout`` seconds.
    """
    connection = response.connection
    transport = connection.transport if connection is not None else None
    protocol = connection.protocol if connection is not None else None
    if transport is None or protocol is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    raw = transport.get_extra_info("socket")
    if raw is None or raw.type != socket.SOCK_STREAM:
        return None
    total = response.content_length
    if "Transfer-Encoding" in response.headers or total is None or total < skip + length:
        return None
    if response.content.exception() is not None:
        return None
    try:
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except OSError:
        return None  # out of descriptors: aiohttp reads it
    try:
        receive_timeout(sock, timeout)
    except (OSError, OverflowError, struct.error):
        sock.close()
        return None
    buffered = response.content.read_nowait()  # everything aiohttp holds (it may resume reading: paused next)
    protocol.pause_reading()  # the protocol's pause also stops its read timeout
    # Blocking, which the event loop's descriptor shares: the loop never reads or writes this connection again.
    # MSG_WAITALL then fills each block in one call; the kernel's receive timeout stands in for aiohttp's.
    sock.setblocking(True)
    return DirectBody(sock, buffered, skip, length, url, timeout)
