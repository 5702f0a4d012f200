"""A blocking socket that worker threads use one at a time and the event loop may give up on at any moment.

The threads that write a piece's bytes also receive them (an origin's body, a parent's piece), with blocking calls.
The loop, which owns the fetch, must be able to stop such a call at once (a timeout, a cancelled download) and
must never close a descriptor a thread is still using: ``end`` closes the socket, or, while a thread is in a call
on it, shuts it down so the call fails at once, and that thread closes it on its way out.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def receive_into(sock: socket.socket, target: memoryview) -> int:
    """Block until ``target`` is full (``MSG_WAITALL``; a TLS socket gives what one record holds); raises
    ``ConnectionResetError`` when the other side closed the connection, ``BlockingIOError`` on the receive timeout."""
    count = sock.recv_into(target, 0, 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL)
    if not count:
        raise ConnectionResetError("the other side closed the connection")
    return count


def receive_timeout(sock: socket.socket, seconds: float) -> None:
    """Make a blocking socket's receives fail (``BlockingIOError``) after ``seconds`` without a byte: the kernel's
    timeout, which keeps the socket blocking (``settimeout`` would not, and ``MSG_WAITALL`` needs it blocking)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))


class SharedSocket:
    """One blocking socket: calls in worker threads through ``run``, ``end`` from anywhere."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._busy = False
        self._ended = False

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionAbortedError("the fetch was given up")
        return self._sock

    def attach(self, sock: socket.socket) -> None:
        """Take the socket just opened (or wrapped); refused when ``end`` came meanwhile (``end`` or the ``run``
        that attached it then closes it)."""
        with self._lock:
            self._sock = sock
            if self._ended:  # ended while connecting, before there was a socket to shut down
                raise ConnectionAbortedError("the fetch was given up")

    def run(self, call: Callable[..., T], *args: object) -> T:
        """In a worker thread: ``call`` on the socket, unless it was ended."""
        with self._lock:
            if self._ended:
                raise ConnectionAbortedError("the fetch was given up")
            self._busy = True
        try:
            return call(*args)
        finally:
            with self._lock:
                self._busy = False
                if self._ended:
                    self._close()

    def end(self) -> None:
        with self._lock:
            self._ended = True
            if not self._busy:
                self._close()
            elif self._sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # the plain shutdown, for TLS too

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
