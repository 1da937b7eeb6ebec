"""A small open-loop HTTP/1.1 load client on asyncio streams (for ``api_load.py``).

httpx spent about 1.4 ms of CPU on a request (more than the admin API's list
route), so on the 2-core benchmark machine it could not offer 1,000 requests/s to
a server sharing those cores; this client spends about 0.15 ms at 1,000 req/s.
It does only what a load generator needs: requests are bytes built once (request
line, headers, body), each connection is a persistent keep-alive stream owned by
one worker, and a response is read as its status line, its headers up to the
blank line, and a body framed by ``Content-Length`` or ``Transfer-Encoding:
chunked`` (none for 204 and 304). No redirects, cookies, TLS, pipelining or
retries.

The load is open-loop: a scheduler coroutine puts ``(scheduled time, request)`` on
a queue at the offered rate and never waits for answers; ``connections`` workers
take items in turn. Latency runs from the scheduled time to the end of the
response body, so time queued in the client (all connections busy) counts. A
request still unanswered ``timeout_s`` after its scheduled time is a timeout; an
item that waited that long in the queue is one without being sent. After a
timeout or a transport error the connection's state is unknown: it is closed and
the next request on that worker opens a new one (inside that request's time).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# uvicorn closes a keep-alive connection idle for 5 s (its default); a connection
# idle this long is reopened before use rather than raced against that close.
IDLE_REOPEN_S = 4.0
CONNECT_TIMEOUT_S = 5.0
TIMER_RESOLUTION_S = 0.001
NO_BODY_STATUSES = frozenset({204, 304})


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion under uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@dataclass(frozen=True)
class Request:
    """One prebuilt request; ``keep_body``: hand its response body back."""

    data: bytes
    keep_body: bool = False


def build_request(
    method: str,
    path: str,
    host: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    keep_body: bool = False,
) -> Request:
    """The bytes of one HTTP/1.1 request (``Content-Length`` unless a bodiless GET)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return Request(head + body, keep_body)


class ProtocolError(Exception):
    """The server's answer was not an HTTP/1.x response this client can frame."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the connection may be reused."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
        raise ProtocolError(f"bad status line {status_line[:80]!r}")
    status = int(rest[:3])
    length = -1
    chunked = False
    reuse = version == b"HTTP/1.1"
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            if token == b"close":
                reuse = False
            elif token == b"keep-alive":
                reuse = True
    if status in NO_BODY_STATUSES:
        return status, b"", reuse
    if chunked:
        return status, await _read_chunked(reader), reuse
    if length >= 0:
        return status, await reader.readexactly(length), reuse
    return status, await reader.read(), False  # framed by the close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


@dataclass
class Window:
    """Outcomes of one rate window.

    ``latencies_s``: scheduled time to the end of the answer (or to the failure),
    every request. ``send_lag_s``: scheduled time to the write, every request sent:
    the scheduler's lateness plus the wait for a free connection. ``bodies``:
    ``(status, body)`` of answered requests built with ``keep_body``.
    """

    latencies_s: list[float] = field(default_factory=list)
    send_lag_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    bodies: list[tuple[int, bytes]] = field(default_factory=list)
    wall_s: float = 0.0


class _Conn:
    __slots__ = ("reader", "writer", "last_used")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.last_used = time.perf_counter()

    def usable(self, now: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.last_used < IDLE_REOPEN_S
        )

    def abort(self) -> None:
        transport: Any = self.writer.transport
        transport.abort()  # no close handshake: its stream state is unknown


class Pool:
    """``size`` keep-alive connections to ``host:port``, one per worker.

    Use as ``async with Pool(...) as pool``; connections are opened on entry (a
    failed one is retried by its first request) and aborted on exit.
    """

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.slots: list[_Conn | None] = [None] * size

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Conn(reader, writer)

    async def __aenter__(self) -> Pool:
        async def one() -> _Conn:
            return await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)

        opened = await asyncio.gather(
            *(one() for _ in self.slots), return_exceptions=True
        )
        self.slots = [c if isinstance(c, _Conn) else None for c in opened]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.slots:
            if conn is not None:
                conn.abort()
        self.slots = [None] * len(self.slots)
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def open_loop(
        self,
        requests: Sequence[Request],
        rate: float,
        count: int,
        timeout_s: float,
    ) -> Window:
        """Send ``count`` requests (cycling ``requests``) at ``rate``/s; drain.

        ``wall_s`` of the result runs from the first scheduled send to the last
        answer or failure.
        """
        out = Window()
        queue: asyncio.Queue[tuple[float, Request] | None] = asyncio.Queue()
        t0 = time.perf_counter() + 0.05
        workers = [
            asyncio.create_task(self._worker(i, queue, timeout_s, out))
            for i in range(len(self.slots))
        ]
        await _schedule(queue, requests, rate, count, t0)
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        out.wall_s = time.perf_counter() - t0
        return out

    async def _worker(
        self,
        slot: int,
        queue: asyncio.Queue[tuple[float, Request] | None],
        timeout_s: float,
        out: Window,
    ) -> None:
        perf = time.perf_counter
        while True:
            item = await queue.get()
            if item is None:
                return
            due, req = item
            now = perf()
            failure: str | None = None
            remaining = due + timeout_s - now
            if remaining <= 0:
                failure = "timeout"
            else:
                conn = self.slots[slot]
                try:
                    async with asyncio.timeout(remaining):
                        if conn is None or not conn.usable(now):
                            if conn is not None:
                                conn.abort()
                            self.slots[slot] = conn = None
                            conn = await self._connect()
                            self.slots[slot] = conn
                        conn.writer.write(req.data)
                        out.send_lag_s.append(perf() - due)
                        status, body, reuse = await read_response(conn.reader)
                    conn.last_used = perf()
                    if not reuse:
                        conn.abort()
                        self.slots[slot] = None
                    if req.keep_body:
                        out.bodies.append((status, body))
                    if not 200 <= status < 300:
                        failure = f"HTTP {status}"
                except TimeoutError:
                    failure = "timeout"
                except (
                    OSError,
                    asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                    ProtocolError,
                    ValueError,
                ) as exc:
                    failure = type(exc).__name__
                if failure is not None and not failure.startswith("HTTP"):
                    if conn is not None:
                        conn.abort()
                    self.slots[slot] = None
            out.latencies_s.append(perf() - due)
            if failure is None:
                out.ok += 1
            elif failure == "timeout":
                out.timeouts += 1
            else:
                out.errors += 1
                out.kinds[failure] += 1


async def _schedule(
    queue: asyncio.Queue[tuple[float, Request] | None],
    requests: Sequence[Request],
    rate: float,
    count: int,
    t0: float,
) -> None:
    """Queue request ``i`` at ``t0 + i/rate``: every one due is queued on waking.

    uvloop's timers count whole milliseconds (a shorter sleep returns at once, and
    this loop spun on it), so a wake-up may come up to a millisecond late and, above
    ~1,000 requests/s, queue several; their latency still counts from their own
    due time.
    """
    n = len(requests)
    i = 0
    while i < count:
        now = time.perf_counter()
        while i < count and t0 + i / rate <= now:
            queue.put_nowait((t0 + i / rate, requests[i % n]))
            i += 1
        if i < count:
            delay = t0 + i / rate - time.perf_counter()
            await asyncio.sleep(max(delay, TIMER_RESOLUTION_S))
