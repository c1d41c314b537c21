"""A fault-injecting HTTP proxy for object storage in tests, on 127.0.0.1 only.

Point an S3 client's endpoint at :attr:`ChaosProxy.url`: each request goes to the real
server (SeaweedFS) over a fresh connection, and the answer carries ``Connection: close``
so the client opens a new connection for the next one; that makes every request a
point where a fault can be injected. Faults are asked for by count, never at random:

- :meth:`reset_next` ``n`` answers are cut after their headers and part of their body
  (the connection aborted with a TCP reset);
- :meth:`unavailable_next` ``n`` requests get ``503 SlowDown`` without reaching the server;
- :meth:`pause` for ``seconds`` every connection is closed at once, as by a storage
  outage;
- :meth:`fault_every` cuts every ``n``-th GET answer, or answers it 503, up to a limit:
  the test session's S3 fixture runs through the proxy at a low rate of cuts into
  mmrad's own calls, so every S3 test is also a fault test.

:attr:`injected` counts what was done. The proxy runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 96\r\n"
    b"Connection: close\r\n\r\n"
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    b"\n\n\n\n\n\n\n\n"
)
HEAD_END = b"\r\n\r\n"


@dataclass
class Periodic:
    """Inject into every ``every``-th request seen whose request line holds ``path``,
    ``left`` more times."""

    every: int
    left: int
    path: bytes = b""
    seen: int = 0

    def due(self) -> bool:
        if self.left <= 0:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.left -= 1
        return True


class ChaosProxy:
    def __init__(self, upstream_host: str, upstream_port: int, user_agent: bytes = b""):
        """Faults go to requests whose ``User-Agent`` holds ``user_agent`` (all: ``b""``;
        ``b"Botocore"``: mmrad's own storage layer, not pyarrow's or Ray's clients, whose
        retries are theirs); a pause stops every request."""
        self.upstream = (upstream_host, upstream_port)
        self.user_agent = user_agent.lower()
        self.injected: Counter[str] = Counter()
        self.requests = 0  # forwarded or refused
        self._resets = 0
        self._unavailable = 0
        self._paused_until = 0.0
        self._periodic: dict[str, Periodic] = {}
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

    def fault_every(self, kind: str, every: int, limit: int, path: bytes = b"") -> Periodic | None:
        """From now on inject ``kind`` (``reset``: the answer cut mid-body; ``unavailable``:
        503 SlowDown) into every ``every``-th GET of a key whose path holds ``path``,
        ``limit`` times at most: a low background fault rate for a whole test session,
        or a denser one for a while. Returns the setting it replaced."""
        with self._lock:
            replaced = self._periodic.get(kind)
            self._periodic[kind] = Periodic(every, limit, path)
            return replaced

    def restore_every(self, kind: str, setting: Periodic | None) -> None:
        with self._lock:
            if setting is None:
                self._periodic.pop(kind, None)
            else:
                self._periodic[kind] = setting

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = time.monotonic() + seconds

    def counts(self) -> Counter[str]:
        """A copy of :attr:`injected`, taken under the lock."""
        with self._lock:
            return Counter(self.injected)

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

    def _targeted(self, request: bytes) -> bool:
        head = request[: request.find(HEAD_END)]
        return self.user_agent in (_header(head, b"user-agent") or b"").lower()

    def _take_periodic(self, kind: str, request: bytes) -> bool:
        """Whether this GET is the ``every``-th of :meth:`fault_every` ``kind`` (counted as
        ``every_<kind>``)."""
        if not request.startswith(b"GET "):
            return False
        request_line = request[: request.find(b"\r\n")]
        with self._lock:
            periodic = self._periodic.get(kind)
            if periodic is None or periodic.path not in request_line or not periodic.due():
                return False
            self.injected[f"every_{kind}"] += 1
            return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._take("pause"):
                return
            request = await _read_request(reader, writer)
            if request is None:
                return
            self.requests += 1
            targeted = self._targeted(request)
            if targeted and (
                self._take("unavailable") or self._take_periodic("unavailable", request)
            ):
                writer.write(SLOW_DOWN)
                await writer.drain()
                return
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            upstream_writer.write(_closing(request))
            await upstream_writer.drain()
            answer = await upstream_reader.read()
            upstream_writer.close()
            if targeted and (
                self._take("reset")
                or (answer.startswith(b"HTTP/1.1 200") and self._take_periodic("reset", request))
            ):
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


def _header(head: bytes, wanted: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == wanted:
            return value.strip()
    return None


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    """One HTTP request: its head and its body, by ``Content-Length`` or chunked (``None``
    at EOF). A client that expects ``100 Continue`` gets it here; the request goes on
    whole, without the expectation."""
    try:
        head = await reader.readuntil(HEAD_END)
    except asyncio.IncompleteReadError:
        return None
    if (_header(head, b"expect") or b"").lower() == b"100-continue":
        head = _without_header(head, b"expect")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        return head + await _read_chunks(reader)
    length = int(_header(head, b"content-length") or 0)
    return head + (await reader.readexactly(length) if length else b"")


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    """A chunked body as it came, up to and including its trailers."""
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        parts.append(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        parts.append(await reader.readexactly(size + 2))
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
        parts.append(line)
    parts.append(b"\r\n")
    return b"".join(parts)


def _without_header(head: bytes, unwanted: bytes) -> bytes:
    lines = head[: -len(HEAD_END)].split(b"\r\n")
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() != unwanted]
    return b"\r\n".join(kept) + HEAD_END


def _closing(message: bytes) -> bytes:
    """``message`` (a request or an answer) with ``Connection: close`` in its head."""
    head, _, body = message.partition(HEAD_END)
    kept = _without_header(head + HEAD_END, b"connection")[: -len(HEAD_END)]
    return kept + b"\r\nConnection: close" + HEAD_END + body


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
