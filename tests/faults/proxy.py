"""A steerable HTTP/1.1 fault proxy that sits between a client and Azurite on loopback.

Tests drive it from their own (usually sync) thread; the proxy runs its own Trio loop in a
background thread so it keeps serving while the test blocks on a subprocess or the sync SDK.

Each request is parsed with h11 on both sides, so faults act per request even on keep-alive
connections, and bodies stream through in chunks, never buffered whole.

Rules match on method and a regex searched in the request target (path + query). Note that a
bare ``comp=block`` also matches ``comp=blocklist``; use :data:`PUT_BLOCK` / :data:`PUT_BLOCK_LIST`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import select
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from types import MappingProxyType, TracebackType
from typing import Literal, Self, cast
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

import h11
import trio

__all__ = [
    "PUT_BLOCK",
    "PUT_BLOCK_LIST",
    "FaultKind",
    "FaultProxy",
    "ProxyStats",
    "query_op",
]

log = logging.getLogger(__name__)

# Target regexes anchored on query-parameter boundaries, so Put Block does not also catch
# Put Block List (a plain `comp=block` search matches both).
PUT_BLOCK = r"[?&]comp=block(?:&|$)"
PUT_BLOCK_LIST = r"[?&]comp=blocklist(?:&|$)"

FaultKind = Literal["reset_mid_body", "error", "stall", "latency"]

# Large enough that per-chunk Python overhead is negligible at hundreds of MiB/s, small enough
# that memory per connection stays bounded.
_CHUNK = 256 * 1024

# Connection management is per hop: the proxy keeps its own keep-alive with each side, so an
# upstream `Connection: close` must not tear down the client's connection (and vice versa).
# Expect is answered locally, so upstream never sends a 100 that nobody is waiting for.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"expect", b"upgrade"})

_DEFAULT_ERRORS: dict[int, tuple[str, str]] = {
    500: (
        "InternalError",
        "Server encountered an internal error. Please try again after some time.",
    ),
    503: ("ServerBusy", "The server is busy."),
}


def query_op(target: str) -> str:
    """The simplified operation of a request target, as used in :attr:`ProxyStats.requests_by_op`.

    ``comp=<value>`` if the query has ``comp`` (Put Block is ``comp=block``), else
    ``restype=<value>``, else ``""`` (Put Blob, Get Blob, Delete Blob...).
    """
    params = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))
    if "comp" in params:
        return f"comp={params['comp']}"
    if "restype" in params:
        return f"restype={params['restype']}"
    return ""


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters since start or the last :meth:`FaultProxy.reset_stats`."""

    requests: int
    requests_by_op: Mapping[tuple[str, str], int]
    # Request-body bytes actually written to upstream: bytes drained for an injected error or
    # left unsent by a reset are not counted.
    bytes_up: int
    # Response-body bytes relayed from upstream to the client; synthesized error bodies excluded.
    bytes_down: int
    faults: Mapping[FaultKind, int]
    connections: int
    stalled_now: int
    internal_errors: int

    def count(self, method: str, op: str) -> int:
        """Requests seen for ``(method, op)``, e.g. ``count("PUT", "comp=block")``."""
        return self.requests_by_op.get((method.upper(), op), 0)


@dataclass(eq=False)
class _Rule:
    id: int
    kind: Literal["reset_mid_body", "error", "stall"]
    method: str | None
    target: re.Pattern[str] | None
    remaining: int | None
    after_bytes: int = 0
    status: int = 500
    code: str = ""
    message: str = ""
    seconds: float | None = None
    # Only ever set from the proxy's loop (via trio.from_thread); creating it outside needs no loop.
    released: trio.Event = field(default_factory=trio.Event)
    held_total: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.remaining == 0:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.target is None or self.target.search(target) is not None


class _Abort(Exception):
    """Tear down both sides of a session with RST (an injected reset, or a broken upstream)."""


class FaultProxy:
    """Loopback HTTP/1.1 proxy with injectable faults; see the module docstring.

    Use ``FaultProxy.start(host, port)`` (or as a context manager); every public method is safe
    to call from any thread other than the proxy's own.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self._port: int | None = None
        self._lock = threading.Lock()
        # Shares the lock so wait_stalled() sees rule/held updates atomically.
        self._changed = threading.Condition(self._lock)
        self._rules: dict[int, _Rule] = {}
        self._ids = itertools.count(1)
        self._latency = 0.0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._stalled_now = 0
        # Stall rules by id, kept after release so wait_stalled() can still answer.
        self._all_stalls: dict[int, _Rule] = {}
        self._reset_counters()

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(cls, upstream_host: str, upstream_port: int) -> FaultProxy:
        """Start a proxy on a free 127.0.0.1 port forwarding to ``upstream_host:upstream_port``."""
        proxy = cls(upstream_host, upstream_port)
        proxy._start()
        return proxy

    def _start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        # Daemon: a test that forgets stop() must not hang interpreter exit.
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError("FaultProxy failed to start") from self._startup_error

    def stop(self) -> None:
        """Stop serving: cancel every connection (stalled ones included) and join the thread."""
        thread = self._thread
        if thread is None:
            return
        scope = self._cancel_scope
        if scope is not None and thread.is_alive():
            self._call_in_loop(scope.cancel)
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("FaultProxy thread did not stop within 10 s")
        self._thread = None

    def __enter__(self) -> Self:
        if self._thread is None:
            self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- fault rules -------------------------------------------------------------------------

    def reset_mid_body(
        self,
        after_bytes: int = 0,
        *,
        method: str | None = None,
        target: str | None = None,
        times: int | None = 1,
    ) -> int:
        """Forward the head and ``after_bytes`` of the body, then RST both connections.

        If the body is no longer than ``after_bytes``, the whole request reaches upstream, its
        response is awaited and dropped, then both sides are reset: the write happened but the
        client never hears about it (a lost response). Returns the rule id.
        """
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        return self._add(
            _Rule(
                next(self._ids),
                "reset_mid_body",
                _norm_method(method),
                _compile(target),
                _check_times(times),
                after_bytes=after_bytes,
            )
        )

    def error(
        self,
        status: int = 500,
        *,
        method: str | None = None,
        target: str | None = None,
        times: int | None = 1,
        code: str | None = None,
        message: str | None = None,
    ) -> int:
        """Answer matching requests with an Azure-shaped error without contacting upstream.

        ``code`` defaults to ServerBusy for 503 and InternalError otherwise. The request body is
        drained first, so the client's keep-alive connection stays usable. Returns the rule id.
        """
        default_code, default_message = _DEFAULT_ERRORS.get(status, _DEFAULT_ERRORS[500])
        return self._add(
            _Rule(
                next(self._ids),
                "error",
                _norm_method(method),
                _compile(target),
                _check_times(times),
                status=status,
                code=code or default_code,
                message=message or default_message,
            )
        )

    def stall(
        self,
        *,
        method: str | None = None,
        target: str | None = None,
        times: int | None = 1,
        seconds: float | None = None,
    ) -> int:
        """Hold matching requests after their head until released (or ``seconds``), then forward.

        The body stays unread meanwhile, as with a hung endpoint. If the client gave up in the
        meantime the request is still forwarded on release: the write may land upstream.
        Returns the rule id for :meth:`release` / :meth:`wait_stalled`.
        """
        return self._add(
            _Rule(
                next(self._ids),
                "stall",
                _norm_method(method),
                _compile(target),
                _check_times(times),
                seconds=seconds,
            )
        )

    def release(self, rule_id: int) -> None:
        """Let requests held by a stall rule proceed, and stop that rule from holding more."""
        with self._lock:
            rule = self._rules.pop(rule_id, None)
        if rule is not None:
            self._release_rules([rule])

    def release_all(self) -> None:
        """Release every stall rule (other rules stay)."""
        with self._lock:
            stalls = [r for r in self._rules.values() if r.kind == "stall"]
            for rule in stalls:
                del self._rules[rule.id]
        self._release_rules(stalls)

    def remove(self, rule_id: int) -> None:
        """Drop a rule before its ``times`` run out (releases it if it is a stall)."""
        self.release(rule_id)

    def latency(self, seconds: float) -> None:
        """Delay every request by ``seconds`` before acting on it; 0 turns it off."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        with self._lock:
            self._latency = seconds

    def clear(self) -> None:
        """Remove every rule and the latency, releasing stalled requests."""
        with self._lock:
            rules = list(self._rules.values())
            self._rules.clear()
            self._latency = 0.0
        self._release_rules([r for r in rules if r.kind == "stall"])

    def wait_stalled(self, rule_id: int, count: int = 1, timeout: float = 10.0) -> None:
        """Block until ``count`` requests in total have been held by stall ``rule_id``."""

        def enough() -> bool:
            rule = self._all_stalls.get(rule_id)
            return rule is not None and rule.held_total >= count

        with self._changed:
            if not self._changed.wait_for(enough, timeout):
                raise TimeoutError(
                    f"stall rule {rule_id} did not hold {count} request(s) in {timeout} s"
                )

    # -- counters --------------------------------------------------------------------------------

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                requests=self._requests,
                requests_by_op=MappingProxyType(dict(self._by_op)),
                bytes_up=self._bytes_up,
                bytes_down=self._bytes_down,
                faults=MappingProxyType(dict(self._faults)),
                connections=self._connections,
                stalled_now=self._stalled_now,
                internal_errors=self._internal_errors,
            )

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()

    def _reset_counters(self) -> None:
        self._requests = 0
        self._by_op: Counter[tuple[str, str]] = Counter()
        self._bytes_up = 0
        self._bytes_down = 0
        self._faults: Counter[FaultKind] = Counter()
        self._connections = 0
        self._internal_errors = 0

    # -- internals shared with sessions ----------------------------------------------------------

    def _add(self, rule: _Rule) -> int:
        with self._lock:
            self._rules[rule.id] = rule
            if rule.kind == "stall":
                self._all_stalls[rule.id] = rule
        return rule.id

    def _release_rules(self, rules: list[_Rule]) -> None:
        for rule in rules:
            self._call_in_loop(rule.released.set)

    def _call_in_loop(self, fn: Callable[[], object]) -> None:
        token = self._token
        if token is None or self._thread is None or not self._thread.is_alive():
            return  # nothing can be waiting: the loop is not running
        if threading.get_ident() == self._thread.ident:
            fn()
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(fn, trio_token=token)

    def _on_request(self, method: str, target: str) -> tuple[_Rule | None, float]:
        """Count a request and claim the first live rule that matches it."""
        with self._lock:
            self._requests += 1
            self._by_op[(method, query_op(target))] += 1
            claimed = None
            for rule in self._rules.values():
                if rule.matches(method, target):
                    claimed = rule
                    break
            if claimed is not None:
                if claimed.remaining is not None:
                    claimed.remaining -= 1
                    # Exhausted stalls stay registered so release(rule_id) still finds them.
                    if claimed.remaining == 0 and claimed.kind != "stall":
                        del self._rules[claimed.id]
                self._faults[claimed.kind] += 1
            if self._latency > 0:
                self._faults["latency"] += 1
            return claimed, self._latency

    def _add_bytes(self, *, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self._bytes_up += up
            self._bytes_down += down

    async def _hold(self, rule: _Rule) -> None:
        with self._changed:
            rule.held_total += 1
            self._stalled_now += 1
            self._changed.notify_all()
        try:
            if rule.seconds is None:
                await rule.released.wait()
            else:
                with trio.move_on_after(rule.seconds):
                    await rule.released.wait()
        finally:
            with self._lock:
                self._stalled_now -= 1

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                log.exception("fault proxy loop crashed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        listener = listeners[0]
        self._port = int(listener.socket.getsockname()[1])
        self._token = trio.lowlevel.current_trio_token()
        async with listener, trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            self._ready.set()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of fds under a connection storm: back off rather than die.
                    log.warning("fault proxy accept failed: %s", exc)
                    await trio.sleep(0.05)
                    continue
                nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, client: trio.SocketStream) -> None:
        with self._lock:
            self._connections += 1
        session = _Session(self, client)
        abort = False
        try:
            await session.run()
        except _Abort:
            abort = True
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.RemoteProtocolError,
            OSError,
        ):
            # A peer went away or spoke garbage: what a real server would see too.
            abort = True
        except Exception:
            log.exception("fault proxy session failed")
            with self._lock:
                self._internal_errors += 1
            abort = True
        finally:
            await session.close(abort=abort)


class _Session:
    """One client connection and its (lazily opened) upstream connection."""

    def __init__(self, proxy: FaultProxy, client: trio.SocketStream) -> None:
        self.proxy = proxy
        self.client = client
        self.down = h11.Connection(h11.SERVER)
        self.upstream: trio.SocketStream | None = None
        self.up: h11.Connection | None = None

    async def run(self) -> None:
        while True:
            event = await self._client_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise h11.RemoteProtocolError(f"expected a request, got {event!r}")
            await self._handle(event)
            if self.down.our_state is h11.DONE and self.down.their_state is h11.DONE:
                self.down.start_next_cycle()
            else:
                return

    async def _handle(self, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        rule, latency = self.proxy._on_request(method, target)
        if latency > 0:
            await trio.sleep(latency)
        if rule is None:
            await self._forward(request)
        elif rule.kind == "error":
            await self._drain_request_body()
            await self._send_error(request, rule)
        elif rule.kind == "stall":
            await self.proxy._hold(rule)
            await self._forward(request)
        else:
            await self._forward(request, reset_after=rule.after_bytes)

    # -- forwarding --------------------------------------------------------------------------

    async def _forward(self, request: h11.Request, reset_after: int | None = None) -> None:
        up = await self._ensure_upstream()
        await self._send_up(
            h11.Request(
                method=request.method, target=request.target, headers=_strip(request.headers)
            )
        )
        sent = 0
        while True:
            event = await self._client_event()
            if isinstance(event, h11.Data):
                data = event.data
                if reset_after is not None and sent + len(data) > reset_after:
                    part = data[: reset_after - sent]
                    if part:
                        await self._send_up(h11.Data(data=part))
                        self.proxy._add_bytes(up=len(part))
                    raise _Abort("reset_mid_body")
                await self._send_up(h11.Data(data=data))
                self.proxy._add_bytes(up=len(data))
                sent += len(data)
            elif isinstance(event, h11.EndOfMessage):
                await self._send_up(h11.EndOfMessage(headers=_strip(event.headers)))
                break
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")

        response = await self._upstream_event()
        while isinstance(response, h11.InformationalResponse):
            response = await self._upstream_event()
        if not isinstance(response, h11.Response):
            # Upstream hung up without answering: the client must see a broken connection.
            raise _Abort(f"upstream gave no response: {response!r}")
        lose_response = reset_after is not None
        if not lose_response:
            await self._send_down(
                h11.Response(
                    status_code=response.status_code,
                    headers=_strip(response.headers),
                    reason=response.reason,
                )
            )
        while True:
            event = await self._upstream_event()
            if isinstance(event, h11.Data):
                if not lose_response:
                    # Counted before the send: once the bytes are in the socket the client can
                    # read them all and ask for the stats before this task runs again.
                    self.proxy._add_bytes(down=len(event.data))
                    await self._send_down(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                if lose_response:
                    raise _Abort("reset_mid_body after the whole request was delivered")
                await self._send_down(h11.EndOfMessage(headers=_strip(event.headers)))
                break
            else:
                raise _Abort(f"upstream broke off a response: {event!r}")

        if up.our_state is h11.DONE and up.their_state is h11.DONE:
            up.start_next_cycle()
        else:
            await self._close_upstream(abort=False)

    async def _drain_request_body(self) -> None:
        while True:
            event = await self._client_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if not isinstance(event, h11.Data):
                raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")

    async def _send_error(self, request: h11.Request, rule: _Rule) -> None:
        request_id = str(uuid.uuid4())
        now = formatdate(usegmt=True)
        body = (
            '<?xml version="1.0" encoding="utf-8"?>'
            f"<Error><Code>{escape(rule.code)}</Code>"
            f"<Message>{escape(rule.message)}\nRequestId:{request_id}\nTime:{now}</Message></Error>"
        ).encode()
        headers = [
            (b"Content-Type", b"application/xml"),
            (b"Content-Length", str(len(body)).encode()),
            (b"x-ms-error-code", rule.code.encode()),
            (b"x-ms-request-id", request_id.encode()),
            (b"Date", now.encode()),
            (b"Server", b"fault-proxy"),
        ]
        # Azure echoes the client's id; the SDK logs it to correlate retries.
        for name, value in request.headers:
            if name == b"x-ms-client-request-id":
                headers.append((b"x-ms-client-request-id", value))
        # Azure puts the error message in the reason phrase; for HEAD it is all the SDK can show.
        reason = rule.message.splitlines()[0].encode("ascii", "replace") if rule.message else b""
        await self._send_down(h11.Response(status_code=rule.status, headers=headers, reason=reason))
        if request.method != b"HEAD":
            await self._send_down(h11.Data(data=body))
        await self._send_down(h11.EndOfMessage())

    # -- plumbing --------------------------------------------------------------------------------

    async def _client_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.down.next_event()
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            if self.down.they_are_waiting_for_100_continue:
                # Only now do we want the body, so only now invite the client to send it.
                await self._send_down(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                data = await self.client.receive_some(_CHUNK)
            except trio.BrokenResourceError:
                data = b""
            self.down.receive_data(data)

    async def _upstream_event(self) -> h11.Event | type[h11.PAUSED]:
        assert self.up is not None and self.upstream is not None
        while True:
            try:
                event = self.up.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Abort(f"upstream protocol error: {exc}") from exc
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            try:
                data = await self.upstream.receive_some(_CHUNK)
            except trio.BrokenResourceError:
                data = b""
            self.up.receive_data(data)

    async def _send_down(self, event: h11.Event) -> None:
        data = self.down.send(event)
        if data:
            await self.client.send_all(data)

    async def _send_up(self, event: h11.Event) -> None:
        assert self.up is not None and self.upstream is not None
        data = self.up.send(event)
        if data:
            try:
                await self.upstream.send_all(data)
            except trio.BrokenResourceError as exc:
                raise _Abort("upstream went away mid-request") from exc

    async def _ensure_upstream(self) -> h11.Connection:
        if self.upstream is not None and _idle_peer_spoke(self.upstream):
            # Azurite (Node) drops keep-alive connections idle for 5 s. Reusing one would turn
            # a client's pause, e.g. an SDK retry backoff, into a spurious reset.
            await self._close_upstream(abort=False)
        if self.upstream is None or self.up is None:
            try:
                self.upstream = await trio.open_tcp_stream(
                    self.proxy.upstream_host, self.proxy.upstream_port
                )
            except OSError as exc:
                raise _Abort(f"cannot reach upstream: {exc}") from exc
            self.up = h11.Connection(h11.CLIENT)
        return self.up

    async def _close_upstream(self, *, abort: bool) -> None:
        stream, self.upstream, self.up = self.upstream, None, None
        if stream is not None:
            await _close(stream, abort=abort)

    async def close(self, *, abort: bool) -> None:
        await self._close_upstream(abort=abort)
        await _close(self.client, abort=abort)


async def _close(stream: trio.SocketStream, *, abort: bool) -> None:
    if abort:
        # Linger 0 makes close() send RST instead of FIN: the peer sees ECONNRESET, as with a
        # real dropped connection, rather than a clean EOF.
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


def _idle_peer_spoke(stream: trio.SocketStream) -> bool:
    """Whether an idle connection is readable: EOF, RST or an unsolicited 408 all mean unusable."""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _strip(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # h11 hands over lowercased names, so the hop-by-hop set can be compared directly.
    return [(name, value) for name, value in headers if name not in _HOP_BY_HOP]


def _norm_method(method: str | None) -> str | None:
    return None if method is None else method.upper()


def _compile(target: str | None) -> re.Pattern[str] | None:
    return None if target is None else re.compile(target)


def _check_times(times: int | None) -> int | None:
    if times is not None and times < 1:
        raise ValueError("times must be >= 1, or None for always")
    return times
