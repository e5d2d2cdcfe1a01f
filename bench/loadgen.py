"""A small HTTP/1.1 load generator over raw keep-alive sockets (asyncio on uvloop).

Three modes:

* `open_loop`: Poisson arrivals at a fixed offered rate, independent of how fast answers
  come back. Each request's latency is measured from its *scheduled* send time, so a slow
  answer (or a late generator) shows up in the figures instead of silently lowering the
  offered load: no coordinated omission. A request that finds no idle connection opens a
  new one (up to `max_conns`), whose connect time then counts too.
* `closed_loop`: N connections, each sending its next request as soon as the previous
  answer is complete (max throughput; wrk does this more cheaply when installed).
* `hold_streams`: open N streaming requests, wait for each one's first body byte, keep them
  all open for a while, then close them.

Timestamps come from `time.perf_counter()`; the loop's own clock has 1 ms resolution.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import uvloop

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _EOF_BODY, _IDLE = range(8)


class ConnectionClosed(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self, keep_body: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _IDLE
        self.remaining = 0
        self.status = 0
        self.first_body = 0.0
        self.done_at = 0.0
        self.reusable = True
        self.closed = False
        self.keep_body = keep_body
        self.body = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.first_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state == _EOF_BODY:
            self._finish(time.perf_counter())
            return
        for fut in (self.waiter, self.first_waiter):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionClosed("connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        if self.state == _IDLE:
            return
        self.buf += data
        self._parse(time.perf_counter())

    # -- requests ------------------------------------------------------------------

    def request(self, raw: bytes) -> asyncio.Future[None]:
        """Send one request; the future completes when the whole response is in."""
        if self.closed or self.transport is None:
            raise ConnectionClosed("connection is closed")
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.first_waiter = None
        self.state = _HEAD
        self.status = 0
        self.first_body = 0.0
        self.body.clear()
        self.transport.write(raw)
        return self.waiter

    def wait_first_byte(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.first_body:
            fut.set_result(None)
        else:
            self.first_waiter = fut
        return fut

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    # -- response parsing ----------------------------------------------------------

    def _got_body(self, now: float, data: bytes | bytearray) -> None:
        if not self.first_body:
            self.first_body = now
            if self.first_waiter is not None and not self.first_waiter.done():
                self.first_waiter.set_result(None)
        if self.keep_body:
            self.body += data

    def _finish(self, now: float) -> None:
        if not self.first_body:
            self.first_body = now
            if self.first_waiter is not None and not self.first_waiter.done():
                self.first_waiter.set_result(None)
        self.done_at = now
        self.state = _IDLE
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _parse(self, now: float) -> None:
        buf = self.buf
        while buf:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                self.status = int(lines[0].split(b" ", 2)[1])
                length = -1
                chunked = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                    elif name == b"connection" and b"close" in value.lower():
                        self.reusable = False
                if chunked:
                    self.state = _CHUNK_SIZE
                elif length >= 0:
                    self.remaining = length
                    self.state = _BODY
                    if length == 0:
                        self._finish(now)
                        return
                else:
                    self.reusable = False
                    self.state = _EOF_BODY
            elif state in (_BODY, _CHUNK_DATA):
                n = min(len(buf), self.remaining)
                self._got_body(now, buf[:n] if self.keep_body else b"")
                del buf[:n]
                self.remaining -= n
                if self.remaining == 0:
                    if state == _BODY:
                        self._finish(now)
                        return
                    self.state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish(now)
                    return
            elif state == _EOF_BODY:
                self._got_body(now, buf)
                buf.clear()
            else:
                buf.clear()


async def connect(host: str, port: int, keep_body: bool = False) -> Connection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Connection(keep_body), host, port)
    return proto


def build_request(
    path: str, body: bytes, host: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- results ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def summarize_ms(values: list[float]) -> dict[str, float]:
    data = sorted(v * 1000 for v in values)
    if not data:
        return {}
    return {
        "p50": round(percentile(data, 50), 3),
        "p90": round(percentile(data, 90), 3),
        "p99": round(percentile(data, 99), 3),
        "p999": round(percentile(data, 99.9), 3),
        "max": round(data[-1], 3),
        "mean": round(sum(data) / len(data), 3),
    }


@dataclass
class LoadResult:
    mode: str  # "open" or "closed"
    generator: str
    duration_s: float
    ok: int  # successful answers inside the measured window
    throughput_rps: float
    total: int = 0  # every answer, warm-up included (the basis of CPU per request)
    errors: dict[str, int] = field(default_factory=dict)
    offered_rps: float | None = None
    connections: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # from the scheduled send
    service_ms: dict[str, float] = field(default_factory=dict)  # from the actual send
    ttfb_ms: dict[str, float] = field(default_factory=dict)  # first body byte
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # actual - scheduled send
    generator_cpu_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Samples:
    latency: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, scheduled: float, sent: float, conn: Connection) -> None:
        if not 200 <= conn.status < 300:
            self.errors[f"http_{conn.status}"] += 1
            return
        self.latency.append(conn.done_at - scheduled)
        self.service.append(conn.done_at - sent)
        self.ttfb.append(conn.first_body - scheduled)
        self.lag.append(sent - scheduled)
        self.done.append(conn.done_at)


# -- open loop -------------------------------------------------------------------------


class _Pool:
    def __init__(self, host: str, port: int, max_conns: int) -> None:
        self.host, self.port, self.max_conns = host, port, max_conns
        self.idle: list[Connection] = []
        self.total = 0
        self.peak = 0
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()

    async def acquire(self) -> Connection:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
                self.total -= 1
            if self.total < self.max_conns:
                self.total += 1
                self.peak = max(self.peak, self.total)
                try:
                    return await connect(self.host, self.port)
                except BaseException:
                    self.total -= 1
                    raise
            fut: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            conn_or_none = await fut
            if conn_or_none is not None:
                return conn_or_none

    def release(self, conn: Connection, ok: bool) -> None:
        if not ok or conn.closed or not conn.reusable:
            conn.close()
            self.total -= 1
            self._wake(None)  # a waiter may connect anew
            return
        if not self._wake(conn):
            self.idle.append(conn)

    def _wake(self, conn: Connection | None) -> bool:
        """Hand `conn` (or leave to connect) to the first waiter still waiting."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():  # cancelled waiters (end of run) are skipped
                fut.set_result(conn)
                return True
        return False

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def open_loop(
    host: str,
    port: int,
    request: bytes,
    rate: float,
    duration: float,
    warmup: float = 1.0,
    *,
    max_conns: int = 4096,
    prewarm: int = 32,
    drain_timeout: float = 10.0,
    seed: int = 1,
) -> LoadResult:
    pool = _Pool(host, port, max_conns)
    for conn in await asyncio.gather(
        *(connect(host, port) for _ in range(min(prewarm, max_conns)))
    ):
        pool.total += 1
        pool.idle.append(conn)
    pool.peak = pool.total
    samples = _Samples()
    rng = random.Random(seed)
    inflight: set[asyncio.Task[None]] = set()
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.01
    measure_from = start + warmup
    end = measure_from + duration
    arrivals = 0
    completed = [0]

    async def one(scheduled: float, record: bool) -> None:
        ok = False
        conn: Connection | None = None
        try:
            conn = await pool.acquire()
            sent = time.perf_counter()
            await conn.request(request)
            ok = True
            completed[0] += 1
            if record:
                samples.add(scheduled, sent, conn)
        except (OSError, ConnectionClosed) as exc:
            if record:
                samples.errors[type(exc).__name__] += 1
        finally:
            if conn is not None:
                pool.release(conn, ok)

    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = t >= measure_from
        arrivals += record
        task = asyncio.create_task(one(t, record))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        _, pending = await asyncio.wait(
            inflight, timeout=max(0.0, end - time.perf_counter()) + drain_timeout
        )
        for task in pending:
            task.cancel()
        samples.errors["unfinished"] += len(pending)
        if pending:
            await asyncio.wait(pending)
    pool.close()
    # Answers that came after the window (an overloaded target drains its queue) count in
    # the latency figures but not in the answered rate.
    done_in_window = sum(1 for t in samples.done if t <= end)
    return LoadResult(
        mode="open",
        generator="python",
        duration_s=duration,
        ok=len(samples.latency),
        throughput_rps=round(done_in_window / duration, 1),
        total=completed[0],
        errors=dict(samples.errors),
        offered_rps=round(arrivals / duration, 1),
        connections=pool.peak,
        latency_ms=summarize_ms(samples.latency),
        service_ms=summarize_ms(samples.service),
        ttfb_ms=summarize_ms(samples.ttfb),
        send_lag_ms=summarize_ms(samples.lag),
        generator_cpu_s=round(time.process_time() - cpu0, 3),
    )


# -- closed loop -----------------------------------------------------------------------


async def closed_loop(
    host: str,
    port: int,
    requests: list[bytes],
    connections: int,
    duration: float,
    warmup: float = 1.0,
    *,
    max_requests: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """N connections back to back; `requests` are sent round-robin per connection.

    With `max_requests` the run stops after that many answers (used by the soak test)."""
    conns = await asyncio.gather(*(connect(host, port) for _ in range(connections)))
    samples = _Samples()
    cpu0 = time.process_time()
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration if max_requests is None else float("inf")
    counted = 0
    total = 0

    async def worker(index: int, conn: Connection) -> None:
        nonlocal counted, total
        i = index
        while True:
            now = time.perf_counter()
            if now >= end or (max_requests is not None and total >= max_requests):
                return
            try:
                if conn.closed or not conn.reusable:
                    conn.close()
                    conn = await connect(host, port)
                await conn.request(requests[i % len(requests)])
            except (OSError, ConnectionClosed) as exc:
                samples.errors[type(exc).__name__] += 1
                total += 1
                await asyncio.sleep(0.01)
                continue
            i += 1
            total += 1
            if on_progress is not None:
                on_progress(total)
            if now >= measure_from and conn.done_at <= end:
                counted += 1
                samples.add(now, now, conn)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    elapsed = duration if max_requests is None else max(1e-9, time.perf_counter() - measure_from)
    for conn in conns:
        conn.close()
    ok = len(samples.latency)
    return LoadResult(
        mode="closed",
        generator="python",
        duration_s=round(elapsed, 3),
        ok=ok,
        throughput_rps=round(ok / elapsed, 1),
        total=total,
        errors=dict(samples.errors),
        connections=connections,
        latency_ms=summarize_ms(samples.latency),
        service_ms=summarize_ms(samples.service),
        ttfb_ms=summarize_ms(samples.ttfb),
        generator_cpu_s=round(time.process_time() - cpu0, 3),
    )


# -- held streams ----------------------------------------------------------------------


@dataclass
class HoldResult:
    requested: int
    established: int
    alive_after_hold: int
    hold_s: float
    establish_s: float
    errors: dict[str, int]
    during_hold: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def hold_streams(
    host: str,
    port: int,
    request: bytes,
    count: int,
    hold_s: float,
    *,
    concurrency: int = 256,
    first_byte_timeout: float = 60.0,
    establish_timeout: float = 120.0,
    during_hold: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> HoldResult:
    """Open `count` streams; a slow target gets `establish_timeout` seconds to take them
    (streams not started by then are counted as `not_attempted`), then all are held."""
    sem = asyncio.Semaphore(concurrency)
    conns: list[Connection] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()

    async def open_one() -> None:
        async with sem:
            if time.perf_counter() - started > establish_timeout:
                errors["not_attempted"] += 1
                return
            try:
                conn = await connect(host, port)
                conns.append(conn)
                conn.request(request).add_done_callback(_ignore_outcome)
                await asyncio.wait_for(conn.wait_first_byte(), first_byte_timeout)
                if not 200 <= conn.status < 300:
                    errors[f"http_{conn.status}"] += 1
            except (OSError, ConnectionClosed, TimeoutError) as exc:
                errors[type(exc).__name__] += 1

    await asyncio.gather(*(open_one() for _ in range(count)))
    establish_s = time.perf_counter() - started
    established = sum(1 for c in conns if not c.closed and 200 <= c.status < 300)
    sampled: dict[str, Any] = {}
    await asyncio.sleep(hold_s / 2)
    if during_hold is not None:
        sampled = await during_hold()
    await asyncio.sleep(hold_s / 2)
    alive = sum(1 for c in conns if not c.closed and 200 <= c.status < 300)
    for conn in conns:
        # Consumed chunks and waiters are no longer of interest.
        if conn.waiter is not None and not conn.waiter.done():
            conn.waiter.cancel()
        conn.close()
    return HoldResult(
        requested=count,
        established=established,
        alive_after_hold=alive,
        hold_s=hold_s,
        establish_s=round(establish_s, 2),
        errors=dict(errors),
        during_hold=sampled,
    )


def _ignore_outcome(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def run(coro: Awaitable[Any]) -> Any:
    """Run a coroutine on a fresh uvloop event loop."""

    async def main() -> Any:
        return await coro

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
