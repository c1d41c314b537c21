"""A fault-injecting HTTP proxy for object storage in tests, on 127.0.0.1 only.

Point an S3 client's endpoint at :attr:`ChaosProxy.url`: each request goes to the real
server (SeaweedFS) over a fresh connection, and the answer carries ``Connection: close``
so the client opens a new connection for the next one; that makes every request a
point where a fault can be injected. Faults are asked for by count, never at random:

- :meth:`reset_next` ``n`` answers are cut after their headers and part of their body
  (the connection aborted with a TCP reset);
- :meth:`unavailable_next` ``n`` requests get ``503 SlowDown`` without reaching the server;
- :meth:`pause` for ``seconds`` every connection is closed at once, as by a storage
  outage.

:attr:`injected` counts what was done. The proxy runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter

SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 96\r\n"
    b"Connection: close\r\n\r\n"
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    b"\n\n\n\n\n\n\n\n"
)
HEAD_END = b"\r\n\r\n"


class ChaosProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.injected: Counter[str] = Counter()
        self._resets = 0
        self._unavailable = 0
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="chaos-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_next(self, count: int) -> None:
        with self._lock:
            self._resets += count

    def unavailable_next(self, count: int) -> None:
        with self._lock:
            self._unavailable += count

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = time.monotonic() + seconds

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # -- the loop -----------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def _take(self, kind: str) -> bool:
        """Whether to inject ``kind`` into this request (and count it)."""
        with self._lock:
            if kind == "pause" and time.monotonic() < self._paused_until:
                self.injected["paused"] += 1
                return True
            if kind == "unavailable" and self._unavailable > 0:
                self._unavailable -= 1
                self.injected["unavailable"] += 1
                return True
            if kind == "reset" and self._resets > 0:
                self._resets -= 1
                self.injected["reset"] += 1
                return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._take("pause"):
                return
            request = await _read_request(reader)
            if request is None:
                return
            if self._take("unavailable"):
                writer.write(SLOW_DOWN)
                await writer.drain()
                return
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            upstream_writer.write(_closing(request))
            await upstream_writer.drain()
            answer = await upstream_reader.read()
            upstream_writer.close()
            if self._take("reset"):
                head_end = answer.find(HEAD_END) + len(HEAD_END)
                writer.write(answer[: head_end + max(1, (len(answer) - head_end) // 2)])
                await writer.drain()
                _abort(writer)
                return
            writer.write(_closing(answer))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP request: its head and a ``Content-Length`` body (``None`` at EOF)."""
    try:
        head = await reader.readuntil(HEAD_END)
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head + body


def _closing(message: bytes) -> bytes:
    """``message`` (a request or an answer) with ``Connection: close`` in its head."""
    head, _, body = message.partition(HEAD_END)
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + HEAD_END + body


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
