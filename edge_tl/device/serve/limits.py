"""Connection limits for `edge-tl serve`: idle and slow clients can't exhaust the file descriptors or the log.

uvicorn (0.2x-0.5x) closes a keep-alive connection only after a response, and any byte a client sends cancels that
timer; a connection that never completes its request headers is never closed, and once the process runs out of
descriptors ``accept()`` fails in a loop that logs a traceback each time. So the HTTP protocol here is uvicorn's
own h11 protocol plus three rules:

* **idle timeout**: a connection that has no request in progress (none yet, partial headers, or between
  keep-alive requests) is closed ``idle_timeout_s`` after it opened or after its last response, whatever bytes
  trickle in meanwhile (slowloris);
* **connection cap**: at most ``max_connections`` connections (kept below the descriptor limit); when a new one
  would exceed it, the connection idle for longest is closed to make room, and if none is idle the new one is
  closed at once;
* **request framing** (RFC 9112): a request with both Content-Length and Transfer-Encoding is refused with a
  400 and the connection closed (section 6.1: a server "MAY reject a request that contains both ... Regardless,
  the server MUST close the connection after responding to such a request"; h11 lets Transfer-Encoding win and
  keeps the connection, the request-smuggling split), and a chunk header that takes the body past
  ``max_body_bytes`` (h11 takes up to 20 hex digits, 2^80) is answered at once (413, as the app answers a body
  over the limit), not read until the body timeout;
* **quiet logs**: repeats of the same log message (accept errors, invalid requests, these limits) are rate-limited
  to a few per interval, with a count of what was suppressed.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger("edge_tl.device.serve")

#: descriptors kept free for the process itself (model files, ORT/TensorRT, log, pipes) beyond those open at start
FD_RESERVE = 64


@dataclass
class ConnectionLimits:
    idle_timeout_s: float = 5.0
    max_connections: int = 1024
    #: the largest request body (serve's --max-request-bytes): a chunk header taking the body past it is refused
    max_body_bytes: int | None = None


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's LimitNOFILE=); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_budget(asked: int) -> tuple[int, int]:
    """(max connections, listen backlog) that fit under the descriptor limit.

    asyncio accepts up to ``backlog`` sockets per wake-up before any protocol code runs, and the sockets closed to
    make room are released one loop iteration later, so up to two bursts can be open beyond the cap: the cap is
    kept ``2 x backlog`` below what is free (after the files open now and a reserve)."""
    soft = raise_fd_limit()
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    room = max(soft - open_now - FD_RESERVE, 8)
    backlog = max(4, min(2048, room // 8))
    cap = max(1, min(asked, room - 2 * backlog))
    if cap < asked:
        log.warning("--max-connections %d lowered to %d (listen backlog %d): the file descriptor limit is %d "
                    "(raise LimitNOFILE)", asked, cap, backlog, soft)
    return cap, backlog


def effective_max_connections(asked: int) -> int:
    """``asked``, lowered to fit under the descriptor limit (see :func:`connection_budget`)."""
    return connection_budget(asked)[0]


class RateLimitFilter(logging.Filter):
    """Lets the first ``burst`` records of each message through per ``interval_s`` (numbers in it ignored, so
    "closed connection 7" and "... 8" count as one); the first one after the interval says how many were dropped."""

    def __init__(self, burst: int = 3, interval_s: float = 10.0):
        super().__init__()
        self.burst, self.interval_s = burst, interval_s
        self._seen: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:  # the message as logged, numbers blanked: repeats of one event share a key, other events don't
            text = record.getMessage()
        except Exception:  # a malformed record: let logging report it
            return True
        key = (record.name, _DIGITS.sub("#", text)[:200])
        now = time.monotonic()
        with self._lock:
            window = self._seen.setdefault(key, [now, 0, 0])  # start, passed, suppressed
            if now - window[0] > self.interval_s:
                suppressed = window[2]
                window[:] = [now, 0, 0]
                if suppressed:
                    record.msg = f"{record.msg} (and {suppressed} more like it in the last {self.interval_s:.0f} s)"
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            return False


_DIGITS = re.compile(r"\d+")
_FILTER = RateLimitFilter()
NOISY_LOGGERS = ("asyncio", "uvicorn.error", "edge_tl.device.serve")


def install_log_rate_limit() -> None:
    """Rate-limit repeated messages of asyncio (accept errors), uvicorn and the server (idempotent)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def guarded_h11_protocol(limits: ConnectionLimits) -> type:  # noqa: C901 (one subclass: its small hooks count here)
    """uvicorn's H11Protocol with the idle timeout and the connection cap (pass as ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _limits = limits
        #: this server's idle connections, longest idle first (O(1) to find the one to close at the cap)
        _idle: ClassVar[OrderedDict] = OrderedDict()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_timer = None
            self.conn.next_event = _framing_checked(self.conn, self._limits.max_body_bytes)
            self._arm_idle()
            if len(self.connections) > self._limits.max_connections:
                self._make_room()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 (or the framing check) refused: a 400, or the 413 of a chunk
            that takes the body past the limit (the same answer the app gives, JSON and all); both close."""
            too_big = getattr(self.conn, "edge_tl_too_big", None)
            if too_big is None:
                return super().send_400_response(msg)
            import json

            import h11

            body = json.dumps({"error": f"request body is over the limit of {too_big} bytes "
                               "(--max-request-bytes)"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=413, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_idle(self) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle[self] = None
            self._idle.move_to_end(self)
            self._idle_timer = self.loop.call_later(self._limits.idle_timeout_s, self._idle_expired)

        def _not_idle(self) -> None:
            self._idle.pop(self, None)
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        def _idle_expired(self) -> None:
            self._idle_timer = None
            if not self._busy():
                self._close()

        def _close(self) -> None:
            self._idle.pop(self, None)
            if not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            for oldest in self._idle:
                if oldest is not self:
                    log.warning("connection limit %d reached: closing the connection idle for longest",
                                self._limits.max_connections)
                    oldest._close()
                    return
            log.warning("connection limit %d reached and every connection is busy: refusing a new one",
                        self._limits.max_connections)
            self._close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._busy():  # a request's headers arrived: not idle any more
                self._not_idle()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._busy():
                self._arm_idle()

        def connection_lost(self, exc: Exception | None) -> None:
            self._not_idle()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _framing_checked(conn: Any, max_body: int | None) -> Any:
    """``conn.next_event`` (an h11.Connection) that raises h11.RemoteProtocolError, which uvicorn answers with a
    400 and a closed connection, for a request carrying both Content-Length and Transfer-Encoding and for a
    chunk header that takes the body past ``max_body`` bytes. The announced chunk size is read from h11's
    ChunkedReader (``_bytes_in_chunk``, h11 0.14-0.16); tests/test_serve_limits.py fails if h11 renames it."""
    import h11

    inner = conn.next_event
    seen = [0]  # body bytes of the current request so far

    def next_event() -> Any:
        event = inner()
        if isinstance(event, h11.Request):
            seen[0] = 0
            names = {name.lower() for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding (RFC 9112 section 6.1)")
        elif isinstance(event, h11.Data):
            seen[0] += len(event.data)
        if max_body is not None:
            pending = getattr(getattr(conn, "_reader", None), "_bytes_in_chunk", 0)
            if isinstance(pending, int) and seen[0] + pending > max_body:
                conn.edge_tl_too_big = max_body  # answered 413 (send_400_response above), not 400
                raise h11.RemoteProtocolError(f"a chunk takes the body past the {max_body}-byte request limit")
        return event

    return next_event


def uvicorn_limits(limits: ConnectionLimits, backlog: int = 2048) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for these limits."""
    return {"http": guarded_h11_protocol(limits), "timeout_keep_alive": max(1, int(limits.idle_timeout_s)),
            "h11_max_incomplete_event_size": 64 * 1024,  # request line + headers at most 64 KiB
            "backlog": backlog}
