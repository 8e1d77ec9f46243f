"""Load generator for ``bench/broadcast.py``: subscriber workers and the publisher.

A worker process opens COUNT sockets, joins each to the bench topic and then
counts the broadcasts it receives, with a latency histogram per step (the
publisher embeds its ``time.time_ns()``, the step number and a sequence number
in every payload; ``SeqCheck`` counts, per socket, sequence numbers missing,
repeated or out of order).
It is driven by JSON lines on stdin and answers with JSON lines on stdout.

Two client implementations:

* ``lite`` (default): plain non-blocking sockets on one ``epoll`` loop with a
  minimal RFC 6455 client (no extensions, masked client frames, pongs to
  pings). It costs a few microseconds per received frame, so on a small
  machine most of the CPU is left to the server under test.
* ``websockets``: one ``websockets.asyncio.client`` connection per socket on
  an asyncio loop, to cross-check the lite client (several times its CPU).

Usage (from broadcast.py): ``python bench/_loadgen.py lite|websockets CONFIG_JSON``.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import hmac
import json
import math
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

TOPIC = "realtime:bench"
EVENT = "tick"
JOIN_FRAME = (
    '["1","1","' + TOPIC + '","phx_join",{"config":{"broadcast":{"self":false,"ack":false}}}]'
).encode()
HEARTBEAT_FRAME = b'[null,"h","phoenix","heartbeat",{}]'
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

FINE_US = 100
FINE_BUCKETS = 1000
COARSE_US = 10_000
NBUCKETS = 2000
FINE_LIMIT_US = FINE_US * FINE_BUCKETS


def mint_jwt(secret: str, role: str, ttl_s: int = 24 * 3600) -> str:
    """An HS256 JWT with ``role`` and ``exp``."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = b64(json.dumps({"role": role, "iat": now, "exp": now + ttl_s}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = b64(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"


def bucket_upper_ms(index: int) -> float:
    """The upper edge of a histogram bucket, in milliseconds."""
    if index < FINE_BUCKETS:
        return (index + 1) * FINE_US / 1000
    return (FINE_LIMIT_US + (index - FINE_BUCKETS + 1) * COARSE_US) / 1000


def percentile_ms(hist: list[int], total: int, q: float) -> float | None:
    """The q-quantile (upper bucket edge, ms) of a histogram holding ``total`` samples."""
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total - 1e-9))
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return bucket_upper_ms(index)
    return bucket_upper_ms(len(hist) - 1)


def new_step_stats(now_ns: int) -> list[Any]:
    """[count, first_ns, last_ns, histogram, max_us]."""
    return [0, now_ns, now_ns, [0] * NBUCKETS, 0]


def record(stats: dict[int, list[Any]], step: int, sent_ns: int, now_ns: int) -> None:
    st = stats.get(step)
    if st is None:
        st = stats[step] = new_step_stats(now_ns)
    st[0] += 1
    st[2] = now_ns
    lat = (now_ns - sent_ns) // 1000
    if lat < FINE_LIMIT_US:
        st[3][lat // FINE_US if lat > 0 else 0] += 1
    else:
        st[3][min(FINE_BUCKETS + (lat - FINE_LIMIT_US) // COARSE_US, NBUCKETS - 1)] += 1
    if lat > st[4]:
        st[4] = lat


def stats_reply(stats: dict[int, list[Any]], step: int, remove: bool) -> dict[str, Any]:
    """A step's numbers for the controller; ``dups`` too when the step's list carries a sixth item."""
    st = stats.pop(step, None) if remove else stats.get(step)
    if st is None:
        return {"recv": 0, "first_ns": 0, "last_ns": 0, "hist": [], "max_us": 0}
    reply = {
        "recv": st[0],
        "first_ns": st[1],
        "last_ns": st[2],
        "hist": [[i, c] for i, c in enumerate(st[3]) if c],
        "max_us": st[4],
    }
    if len(st) > 5:
        reply["dups"] = st[5]
    return reply


class Receipts(NamedTuple):
    """The workers' ``stats`` replies of one step, summed."""

    received: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float
    first_ns: int  # the earliest receipt (0 when nothing arrived)
    last_ns: int  # the latest receipt (0 when nothing arrived)


def merge_stats(replies: list[dict[str, Any]], nbuckets: int = NBUCKETS,
                percentile: Callable[[list[int], int, float], float | None] = percentile_ms) -> Receipts:
    """Sum the workers' ``stats`` replies (histograms of ``nbuckets`` read by ``percentile``)."""
    hist = [0] * nbuckets
    for r in replies:
        for i, c in r["hist"]:
            hist[i] += c
    received = sum(int(r["recv"]) for r in replies)
    got = [r for r in replies if r["recv"]]
    return Receipts(received, percentile(hist, received, 0.50), percentile(hist, received, 0.99),
                    max([int(r["max_us"]) for r in replies] or [0]) / 1000,
                    min((int(r["first_ns"]) for r in got), default=0), max((int(r["last_ns"]) for r in got), default=0))


def parse_tick(text: bytes | str) -> tuple[int, int] | None:
    """(step, sent_ns) from a broadcast frame whose payload ends with ``"s":S,"seq":N,"t":T}``."""
    quote_t = b'"t":' if isinstance(text, bytes) else '"t":'
    j = text.rfind(quote_t)  # type: ignore[arg-type]
    if j < 0:
        return None
    k = text.rfind(b'"s":' if isinstance(text, bytes) else '"s":', 0, j)  # type: ignore[arg-type]
    if k < 0:
        return None
    close = b"}" if isinstance(text, bytes) else "}"
    comma = b"," if isinstance(text, bytes) else ","
    return int(text[k + 4 : text.index(comma, k, j)]), int(text[j + 4 : text.index(close, j)])  # type: ignore[arg-type]


def parse_tick_seq(text: bytes | str) -> tuple[int, int, int] | None:
    """(step, seq, sent_ns) from a broadcast frame whose payload ends with ``"s":S,"seq":N,"t":T}``."""
    data = text.encode() if isinstance(text, str) else text
    j = data.rfind(b'"t":')
    k = data.rfind(b'"s":', 0, j) if j >= 0 else -1
    q = data.rfind(b'"seq":', k, j) if k >= 0 else -1
    if q < 0:
        return None
    return (int(data[k + 4 : data.index(b",", k, j)]), int(data[q + 6 : data.index(b",", q, j)]),
            int(data[j + 4 : data.index(b"}", j)]))


class SeqCheck:
    """Per-socket checks of the publisher's sequence numbers (one publisher, seq rising by 1 per message).

    Per step: how many sequence numbers each socket saw for the first time (``fresh``), how many
    arrived at or below the socket's last one (``dups``: repeated or out of order) and how many were
    skipped (``gaps``: holes in a socket's sequence, counted in the step where its next message
    arrives). ``reply`` turns a step into per-socket loss against the number the publisher sent,
    over every socket that joined, the ones closed since included.
    """

    __slots__ = ("sockets", "last", "steps")

    def __init__(self, sockets: list[Any]) -> None:
        self.sockets = list(sockets)
        self.last: dict[Any, int] = {}
        self.steps: dict[int, list[Any]] = {}

    def see(self, key: Any, step: int, seq: int) -> None:
        st = self.steps.get(step)
        if st is None:
            st = self.steps[step] = [0, 0, {}]
        last = self.last.get(key, -1)
        if seq > last:
            if last >= 0 and seq > last + 1:
                st[1] += seq - last - 1
            self.last[key] = seq
            fresh = st[2]
            fresh[key] = fresh.get(key, 0) + 1
        else:
            st[0] += 1

    def reply(self, step: int, sent: int, is_open: Callable[[Any], bool]) -> dict[str, int]:
        """Drop the step and sum it up: with ``sent`` messages published, what each socket missed."""
        dups, gaps, fresh = self.steps.pop(step, None) or (0, 0, {})
        missing = lossy = worst = closed = closed_missing = 0
        for key in self.sockets:
            miss = max(0, sent - fresh.get(key, 0))
            gone = not is_open(key)
            closed += gone
            if miss:
                missing += miss
                lossy += 1
                worst = max(worst, miss)
                if gone:
                    closed_missing += miss
        return {"sockets": len(self.sockets), "sent": sent, "dups": dups, "gaps": gaps, "missing": missing,
                "lossy_sockets": lossy, "max_socket_missing": worst, "closed_sockets": closed,
                "closed_missing": closed_missing}


def tick_frame(step: int, seq: int, sent_ns: int) -> bytes:
    return (
        '["1","2","' + TOPIC + '","broadcast",{"type":"broadcast","event":"' + EVENT + '",'
        f'"payload":{{"s":{step},"seq":{seq},"t":{sent_ns}}}}}]'
    ).encode()


# --- minimal RFC 6455 client ---------------------------------------------------


def mask_payload(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def client_frame(opcode: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + key + mask_payload(payload, key)


def frame_spans(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The whole server frames at the start of ``data``: (first header byte, payload start, payload end)
    each, and where the rest (an incomplete frame) begins."""
    spans = []
    pos, n = 0, len(data)
    while n - pos >= 2:
        length = data[pos + 1] & 0x7F
        if length < 126:
            hl = 2
        elif length == 126:
            if n - pos < 4:
                break
            length = (data[pos + 2] << 8) | data[pos + 3]
            hl = 4
        else:
            if n - pos < 10:
                break
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            hl = 10
        end = pos + hl + length
        if end > n:
            break
        spans.append((data[pos], pos + hl, end))
        pos = end
    return spans, pos


def receive(conn: Any, rbuf: bytearray, rview: memoryview) -> bytes | str | None:
    """What ``conn`` (with ``sock`` and ``buf``) has to read, its buffered tail first.

    None when there is nothing to read now; a string saying why when the
    socket is gone (the caller drops it).
    """
    try:
        got = conn.sock.recv_into(rbuf)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as error:
        return f"recv {errno.errorcode.get(error.errno or 0, error)}"
    if not got:
        return "eof"
    data = rview[:got].tobytes()
    if conn.buf:
        data = conn.buf + data
        conn.buf = b""
    return data


def answer_control(
    line: bytes, stats: dict[int, list[Any]], counters: dict[str, int], close_reasons: dict[str, int], open_sockets: int,
    seqs: SeqCheck | None = None, is_open: Callable[[Any], bool] | None = None, sample: list[str] | None = None,
    count_key: str = "ticks",
) -> bool:
    """Answer one command of the controller to a subscriber worker; False after ``quit``.

    With ``seqs``, ``stats`` also answers the step's per-socket sequence checks (``seq``) against the
    ``sent`` count the command carries; with ``sample``, ``status`` carries the first broadcast frame received.
    ``count`` answers the step's receipts and the worker's running total, ``counters[count_key]``.
    """
    msg = json.loads(line)
    cmd = msg.get("cmd")
    if cmd == "count":
        st = stats.get(int(msg["step"]))
        emit({"recv": st[0] if st else 0, count_key: counters[count_key]})
    elif cmd == "stats":
        reply = stats_reply(stats, int(msg["step"]), remove=bool(msg.get("remove", True)))
        reply["cpu"] = time.process_time()
        if seqs is not None and is_open is not None:
            reply["seq"] = seqs.reply(int(msg["step"]), int(msg.get("sent", 0)), is_open)
        emit(reply)
    elif cmd == "status":
        status: dict[str, Any] = {"open": open_sockets, "cpu": time.process_time(), "counters": counters,
                                  "close_reasons": close_reasons}
        if sample is not None:
            status["sample"] = sample[0] if sample else None
        emit(status)
    elif cmd == "quit":
        emit({"bye": True})
        return False
    else:
        emit({"error": f"unknown command {cmd!r}"})
    return True


def read_control(ctl_buf: bytes, handle: Callable[[bytes], bool]) -> tuple[bytes, bool]:
    """Read the worker's stdin and ``handle`` each whole line; (the unfinished rest, whether to go on).

    End of input, or a line ``handle`` answers False to, stops the worker.
    """
    chunk = os.read(0, 65536)
    if not chunk:
        return ctl_buf, False
    ctl_buf += chunk
    going = True
    while b"\n" in ctl_buf:
        line, ctl_buf = ctl_buf.split(b"\n", 1)
        if line.strip() and not handle(line):
            going = False
    return ctl_buf, going

class HandshakeError(Exception):
    pass


class LiteConn:
    """One client socket: blocking during setup, then driven by a poll loop."""

    __slots__ = ("sock", "fd", "buf", "out", "key", "open", "pending")

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.buf = b""
        self.out = b""
        self.key = b""
        self.open = False
        self.pending: list[tuple[int, bytes]] = []

    def send_handshake(self, host: str, port: int, path: str) -> None:
        self.key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.sock.sendall(request)

    def recv_handshake(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HandshakeError("connection closed during handshake")
            data += chunk
            if len(data) > 65536:
                raise HandshakeError("handshake response too long")
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status_line + b" ":
            raise HandshakeError(status_line.decode("latin-1", "replace") + " " + rest[:200].decode("latin-1", "replace"))
        accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        if accept.lower() not in head.lower():
            raise HandshakeError("bad Sec-WebSocket-Accept")
        self.open = True
        if rest:
            self.pending.extend(self.frames(rest))

    def send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(client_frame(opcode, payload))

    def frames(self, data: bytes) -> list[tuple[int, bytes]]:
        """Parse whole frames from buffered + new data; keep the tail."""
        if self.buf:
            data = self.buf + data
            self.buf = b""
        spans, pos = frame_spans(data)
        if pos < len(data):
            self.buf = data[pos:]
        return [(b0 & 0x0F, data[start:end]) for b0, start, end in spans]

    def recv_text(self, deadline: float) -> bytes:
        """Blocking: the next text frame (answers pings on the way)."""
        while True:
            while self.pending:
                opcode, payload = self.pending.pop(0)
                if opcode == 1:
                    return payload
                if opcode == 9:
                    self.send(0xA, payload)
                elif opcode == 8:
                    raise HandshakeError(f"closed by server: {payload[:2].hex()} {payload[2:80]!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandshakeError("timed out waiting for a frame")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HandshakeError("connection closed")
            self.pending.extend(self.frames(chunk))

    def wait_join_reply(self, deadline: float) -> None:
        while True:
            frame = self.recv_text(deadline)
            if b'"phx_reply"' in frame and frame.startswith(b'["1","1"'):
                if b'"status":"ok"' not in frame:
                    raise HandshakeError("join refused: " + frame[:300].decode("utf-8", "replace"))
                return

    def join(self, deadline: float) -> None:
        self.send(1, JOIN_FRAME)
        self.wait_join_reply(deadline)

    def close(self) -> None:
        try:
            if self.open:
                self.sock.setblocking(False)
                self.sock.send(client_frame(8, (1000).to_bytes(2, "big")))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.open = False


T = TypeVar("T")
Stage = Callable[[LiteConn, T, float], None]


def open_in_batches(host: str, port: int, path: str, wanted: Sequence[T], batch: int, timeout: float,
                    stages: Sequence[tuple[str, Stage[T]]]) -> tuple[list[tuple[LiteConn, T]], list[str]]:
    """Open a socket per item of ``wanted``, ``batch`` at a time, and take each through ``stages``.

    Per batch: connect, send every handshake, read every answer, then run each stage
    (``(name, action(conn, item, deadline))``, e.g. send the join, then wait for its reply) on every
    socket still alive, so a batch's requests are in flight together. A socket that fails a stage is
    closed and its error (``"<stage>: ..."``) kept. The survivors come back non-blocking, with their item.
    """
    def send(conn: LiteConn, item: T, deadline: float) -> None:
        conn.send_handshake(host, port, path)

    def recv(conn: LiteConn, item: T, deadline: float) -> None:
        conn.sock.settimeout(max(0.1, deadline - time.monotonic()))
        conn.recv_handshake()

    done: list[tuple[LiteConn, T]] = []
    errors: list[str] = []
    for start in range(0, len(wanted), batch):
        group: list[tuple[LiteConn, T]] = []
        for item in wanted[start : start + batch]:
            try:
                group.append((LiteConn(host, port, timeout), item))
            except OSError as error:
                errors.append(f"connect: {error!r}"[:300])
        deadline = time.monotonic() + timeout
        for stage, action in (("send", send), ("recv", recv), *stages):
            alive: list[tuple[LiteConn, T]] = []
            for conn, item in group:
                try:
                    action(conn, item, deadline)
                    alive.append((conn, item))
                except (OSError, HandshakeError) as error:
                    errors.append(f"{stage}: {error!r}"[:300])
                    conn.close()
            group = alive
        done.extend(group)
    for conn, _ in done:
        conn.pending.clear()
        conn.sock.setblocking(False)
    return done, errors


def open_joined(
    host: str, port: int, path: str, count: int, batch: int, timeout: float, join: bytes = JOIN_FRAME,
    wait_reply: Callable[[LiteConn, float], None] = LiteConn.wait_join_reply,
) -> tuple[list[LiteConn], list[str]]:
    """Open ``count`` sockets and join each with ``join`` (``wait_reply`` reads the join's ok), ``batch`` at a time."""
    opened, errors = open_in_batches(host, port, path, range(count), batch, timeout, (
        ("join", lambda conn, _, deadline: conn.send(1, join)),
        ("join", lambda conn, _, deadline: wait_reply(conn, deadline)),
    ))
    return [conn for conn, _ in opened], errors


# --- the workers' socket pool ------------------------------------------------------


Spans = list[tuple[int, int, int]]


class Pool:
    """A worker's joined sockets on one ``epoll`` loop, with the controller's JSON lines on stdin (fd 0).

    The loop reads each readable socket once per wake-up, splits what it read into whole frames and
    hands them to the bench's ``on_frames(conn, data, spans, now_ns)`` in one call (the bench walks the
    spans itself: no call per frame), keeps an incomplete tail in ``conn.buf``, flushes what the kernel
    did not take at once, and sends Phoenix heartbeats spread over ``heartbeat_s``. A frame other than
    text goes to ``control_frame``: pongs, close replies and drops are the same in every bench.
    With ``batch_wait_s``, a wake-up with fewer than ``batch_min`` ready sockets sleeps that long and
    polls again, to read more frames per system call (the wait is part of the measured latency).
    ``counters`` gets ``frames``, ``pings``, ``other``, ``closed`` and ``write_errors``; ``close_reasons``
    counts why sockets were dropped.
    """

    def __init__(self, conns: list[LiteConn], counters: dict[str, int], heartbeat_s: float = 0.0,
                 batch_wait_s: float = 0.0, batch_min: int = 64) -> None:
        self.by_fd: dict[int, LiteConn] = {c.fd: c for c in conns}
        self.order = list(conns)
        self.counters = counters
        for key in ("frames", "pings", "other", "closed", "write_errors"):
            counters.setdefault(key, 0)
        self.close_reasons: dict[str, int] = {}
        self.pending_out: set[LiteConn] = set()
        self.heartbeat_s = heartbeat_s
        self.batch_wait_s = batch_wait_s
        self.batch_events = batch_min if batch_wait_s > 0 else 0
        self.ep = select.epoll(max(16, len(conns) + 2))
        for conn in conns:
            self.ep.register(conn.fd, select.EPOLLIN)
        self.ep.register(0, select.EPOLLIN)

    def is_open(self, conn: LiteConn) -> bool:
        return self.by_fd.get(conn.fd) is conn

    def drop(self, conn: LiteConn, reason: str) -> None:
        if self.by_fd.pop(conn.fd, None) is None:
            return
        self.counters["closed"] += 1
        self.close_reasons[reason] = self.close_reasons.get(reason, 0) + 1
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        self.pending_out.discard(conn)
        conn.close()

    def write(self, conn: LiteConn, frame: bytes) -> None:
        """Send ``frame`` now, or queue it behind what ``conn`` still has to send."""
        if conn.out:
            conn.out += frame
            return
        try:
            sent = conn.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.counters["write_errors"] += 1
            self.drop(conn, f"write {errno.errorcode.get(error.errno or 0, error)}")
            return
        if sent < len(frame):
            conn.out = frame[sent:]
            self.pending_out.add(conn)

    def flush_pending(self) -> None:
        for conn in list(self.pending_out):
            data, conn.out = conn.out, b""
            self.pending_out.discard(conn)
            self.write(conn, data)

    def control_frame(self, conn: LiteConn, b0: int, data: bytes, start: int, end: int) -> bool:
        """Answer a frame that is not text (a ping, a close); False when ``conn`` is dropped (stop reading it)."""
        opcode = b0 & 0x0F
        if opcode == 9:
            self.counters["pings"] += 1
            self.write(conn, client_frame(0xA, data[start:end]))
        elif opcode == 8:
            code = int.from_bytes(data[start : start + 2], "big") if end - start >= 2 else 1005
            self.write(conn, client_frame(8, data[start : start + 2]))
            self.drop(conn, f"close {code}")
            return False
        elif opcode != 0xA:
            self.counters["other"] += 1
        return True

    def run(self, on_frames: Callable[[LiteConn, bytes, Spans, int], None], on_control: Callable[[bytes], bool],
            poll_timeout: Callable[[], float] | None = None) -> None:
        """The loop, until stdin ends or ``on_control`` answers False; then every socket is closed.

        ``poll_timeout`` (called before each poll) lets the bench do its own work between wake-ups
        and say how long the next poll may wait (otherwise 50 ms).
        """
        by_fd = self.by_fd
        ep = self.ep
        counters = self.counters
        order = self.order
        heartbeat_s = self.heartbeat_s
        batch_events, batch_wait = self.batch_events, self.batch_wait_s
        rbuf = bytearray(1 << 18)
        rview = memoryview(rbuf)
        hb_start = time.monotonic()
        hb_done = 0
        ctl_buf = b""
        running = True
        while running:
            events = ep.poll(0.05 if poll_timeout is None else poll_timeout())
            if len(events) < batch_events:
                time.sleep(batch_wait)
                events = ep.poll(0)
            now = time.time_ns()
            for fd, _ in events:
                if fd == 0:
                    ctl_buf, running = read_control(ctl_buf, on_control)
                    if not running:
                        break
                    continue
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                data = receive(conn, rbuf, rview)
                if not isinstance(data, bytes):
                    if data is not None:
                        self.drop(conn, data)
                    continue
                spans, pos = frame_spans(data)
                counters["frames"] += len(spans)
                on_frames(conn, data, spans, now)
                if pos < len(data) and fd in by_fd:
                    conn.buf = data[pos:]
            if self.pending_out:
                self.flush_pending()
            if heartbeat_s > 0 and order:
                due = int((time.monotonic() - hb_start) / heartbeat_s * len(order))
                while hb_done < due:
                    conn = order[hb_done % len(order)]
                    hb_done += 1
                    if by_fd.get(conn.fd) is conn:
                        self.write(conn, client_frame(1, HEARTBEAT_FRAME))
        for conn in list(by_fd.values()):
            conn.close()


# --- lite worker -----------------------------------------------------------------


def load_config(arg: str) -> dict[str, Any]:
    """A worker's configuration: ``@path`` to a JSON file (large configs), or the JSON itself."""
    if arg.startswith("@"):
        with open(arg[1:], "rb") as f:
            return dict(json.load(f))
    return dict(json.loads(arg))


def emit(obj: dict[str, Any]) -> None:
    os.write(1, (json.dumps(obj, separators=(",", ":")) + "\n").encode())


def run_lite_worker(cfg: dict[str, Any]) -> None:
    host, port, path = cfg["host"], int(cfg["port"]), cfg["path"]
    started = time.monotonic()
    conns, errors = open_joined(host, port, path, int(cfg["count"]), int(cfg.get("batch", 20)), float(cfg.get("timeout", 30)))
    emit({"ready": True, "joined": len(conns), "failed": int(cfg["count"]) - len(conns),
          "errors": errors[:5], "setup_s": round(time.monotonic() - started, 3)})

    stats: dict[int, list[Any]] = {}
    counters = {"frames": 0, "ticks": 0, "other": 0, "pings": 0, "fragments": 0, "closed": 0, "write_errors": 0}
    pool = Pool(conns, counters, heartbeat_s=float(cfg.get("heartbeat_s", 30) or 0),
                batch_wait_s=float(cfg.get("batch_wait_ms", 1.0)) / 1000)
    seqs = SeqCheck(conns)
    see = seqs.see
    control_frame = pool.control_frame
    sample: list[str] = []

    def on_frames(conn: LiteConn, data: bytes, spans: Spans, now: int) -> None:
        for b0, start, end in spans:
            if b0 & 0x0F != 1:
                if not control_frame(conn, b0, data, start, end):
                    return
                continue
            if not b0 & 0x80:
                counters["fragments"] += 1
            j = data.rfind(b'"t":', start, end)
            k = data.rfind(b'"s":', start, j) if j > 0 else -1
            if k > 0:
                counters["ticks"] += 1
                step = int(data[k + 4 : data.index(b",", k, j)])
                q = data.rfind(b'"seq":', k, j)
                if q > 0:
                    see(conn, step, int(data[q + 6 : data.index(b",", q, j)]))
                if not sample:
                    sample.append(data[start:end].decode("utf-8", "replace"))
                lat = (now - int(data[j + 4 : data.index(b"}", j, end)])) // 1000
                st = stats.get(step)
                if st is None:
                    st = stats[step] = new_step_stats(now)
                st[0] += 1
                st[2] = now
                if lat < FINE_LIMIT_US:
                    st[3][lat // FINE_US if lat > 0 else 0] += 1
                else:
                    st[3][min(FINE_BUCKETS + (lat - FINE_LIMIT_US) // COARSE_US, NBUCKETS - 1)] += 1
                if lat > st[4]:
                    st[4] = lat
            else:
                counters["other"] += 1

    def on_control(line: bytes) -> bool:
        return answer_control(line, stats, counters, pool.close_reasons, len(pool.by_fd), seqs, pool.is_open, sample)

    pool.run(on_frames, on_control)


# --- websockets worker --------------------------------------------------------


def run_websockets_worker(cfg: dict[str, Any]) -> None:
    asyncio.run(_websockets_worker(cfg))


async def _websockets_worker(cfg: dict[str, Any]) -> None:
    from websockets.asyncio.client import connect

    url = f"ws://{cfg['host']}:{cfg['port']}{cfg['path']}"
    count = int(cfg["count"])
    timeout = float(cfg.get("timeout", 30))
    sem = asyncio.Semaphore(int(cfg.get("batch", 20)))
    heartbeat_s = float(cfg.get("heartbeat_s", 30) or 0)
    stats: dict[int, list[Any]] = {}
    counters = {"frames": 0, "ticks": 0, "other": 0, "closed": 0}
    close_reasons: dict[str, int] = {}
    started = time.monotonic()
    loop = asyncio.get_running_loop()

    async def open_one() -> Any:
        async with sem:
            ws = await connect(url, compression=None, max_size=None, ping_interval=None, open_timeout=timeout)
            await ws.send(JOIN_FRAME.decode())
            while True:
                msg = await asyncio.wait_for(ws.recv(), timeout)
                if isinstance(msg, str) and '"phx_reply"' in msg and msg.startswith('["1","1"'):
                    if '"status":"ok"' not in msg:
                        raise HandshakeError("join refused: " + msg[:300])
                    return ws

    results = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r)[:300] for r in results if isinstance(r, BaseException)]
    emit({"ready": True, "joined": len(conns), "failed": count - len(conns), "errors": errors[:5],
          "setup_s": round(time.monotonic() - started, 3)})
    open_count = [len(conns)]
    seqs = SeqCheck(list(range(len(conns))))
    gone: set[int] = set()
    sample: list[str] = []

    async def reader(ws: Any, index: int) -> None:
        try:
            async for msg in ws:
                counters["frames"] += 1
                tick = parse_tick_seq(msg) if isinstance(msg, str) else None
                if tick is None:
                    counters["other"] += 1
                else:
                    counters["ticks"] += 1
                    record(stats, tick[0], tick[2], time.time_ns())
                    seqs.see(index, tick[0], tick[1])
                    if not sample:
                        sample.append(msg)
        except Exception as error:
            close_reasons[type(error).__name__] = close_reasons.get(type(error).__name__, 0) + 1
        finally:
            counters["closed"] += 1
            open_count[0] -= 1
            gone.add(index)

    async def heartbeats(ws: Any, index: int) -> None:
        await asyncio.sleep(heartbeat_s * index / max(1, len(conns)))
        while True:
            try:
                await ws.send(HEARTBEAT_FRAME.decode())
            except Exception:
                return
            await asyncio.sleep(heartbeat_s)

    tasks = [asyncio.ensure_future(reader(ws, i)) for i, ws in enumerate(conns)]
    if heartbeat_s > 0:
        tasks += [asyncio.ensure_future(heartbeats(ws, i)) for i, ws in enumerate(conns)]

    lines: asyncio.Queue[bytes] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, b"")

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        line = await lines.get()
        if not line:
            break
        if not line.strip():
            continue
        if not answer_control(line, stats, counters, close_reasons, open_count[0], seqs,
                              lambda index: index not in gone, sample):
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


# --- publisher -----------------------------------------------------------------


class Publisher:
    """One joined socket that pushes ticks at a target rate (blocking, in the caller's thread)."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 30.0) -> None:
        self.conn = LiteConn(host, port, timeout)
        self.conn.send_handshake(host, port, path)
        self.conn.recv_handshake()
        self.conn.join(time.monotonic() + timeout)
        self.conn.sock.settimeout(timeout)
        self.seq = 0
        self.last_heartbeat = time.monotonic()

    def service(self) -> None:
        """Answer pings and drop whatever else arrived, without blocking."""
        while select.select([self.conn.sock], [], [], 0)[0]:
            chunk = self.conn.sock.recv(65536)
            if not chunk:
                raise ConnectionError("publisher socket closed by server")
            for opcode, payload in self.conn.frames(chunk):
                if opcode == 9:
                    self.conn.send(0xA, payload)
                elif opcode == 8:
                    raise ConnectionError(f"publisher socket closed by server: {payload[:2].hex()}")
        if time.monotonic() - self.last_heartbeat > 25:
            self.conn.send(1, HEARTBEAT_FRAME)
            self.last_heartbeat = time.monotonic()

    def publish(self, rate: float, duration: float, step: int) -> dict[str, Any]:
        total = max(1, round(rate * duration))
        sent = 0
        first_ns = 0
        seq_first = self.seq + 1
        t0 = time.monotonic()
        while sent < total:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            while sent < due:
                now_ns = time.time_ns()
                if not first_ns:
                    first_ns = now_ns
                self.seq += 1
                self.conn.send(1, tick_frame(step, self.seq, now_ns))
                sent += 1
            self.service()
            delay = t0 + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        wall = time.monotonic() - t0
        return {"sent": sent, "first_ns": first_ns, "last_ns": time.time_ns(), "wall": wall, "rate": sent / wall if wall else 0.0,
                "seq_first": seq_first, "seq_last": self.seq}

    def close(self) -> None:
        self.conn.close()


def worker_main(argv: list[str], modes: dict[str, Callable[[dict[str, Any]], None]]) -> int:
    """A load-generator process: ``<script> MODE CONFIG_JSON|@CONFIG_FILE`` runs ``modes[MODE](config)``."""
    if len(argv) != 3 or argv[1] not in modes:
        print(f"usage: {os.path.basename(argv[0])} {'|'.join(modes)} CONFIG_JSON|@CONFIG_FILE", file=sys.stderr)
        return 2
    modes[argv[1]](load_config(argv[2]))
    return 0


def main(argv: list[str]) -> int:
    return worker_main(argv, {"lite": run_lite_worker, "websockets": run_websockets_worker})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
