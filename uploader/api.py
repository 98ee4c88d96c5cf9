"""The HTTP API: a Quart-trio app, served by Hypercorn's trio worker inside the root nursery.

``/healthz`` and ``/readyz`` touch no filesystem and no thread, so they answer whatever NFS
or Azure are doing. Every error is JSON with one sentence: ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import h2.events
import h11
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event
from hypercorn.protocol import events as stream_events
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.sansio.utils import get_host

from uploader.config import Settings
from uploader.errors import describe, first_leaf
from uploader.layout import InvalidSessionName, validate_session_name
from uploader.session import (
    NfsRefused,
    NfsUnavailable,
    SessionConflict,
    SessionControl,
    SessionState,
)

if TYPE_CHECKING:
    from uploader.service import Service

log = logging.getLogger(__name__)
# An ASGI application: (scope, receive, send) -> None.
ASGIApp = Callable[[dict[str, Any], Callable[..., Any], Callable[..., Any]], Awaitable[None]]
MAX_BODY_BYTES = 64 * 1024
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class BadRequest(Exception):
    pass


def error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status=status, mimetype="application/json")


# The one field of both start and stop: the name to start, or the name the client means to stop.
BODY_FIELDS = {"session_name"}


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, as json.loads builds it, but refused where it names a key twice: the
    parser would silently keep the last, which may not be the name the client meant."""
    body: dict[str, object] = {}
    for key, value in pairs:
        if key in body:
            raise BadRequest(f"The request body names {key!r} twice; give each field once.")
        body[key] = value
    return body


def parse_body(raw: str | bytes) -> dict[str, object]:
    """The fields of a start or stop request (an empty body: none), or BadRequest with one
    sentence."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The request body is not valid JSON.") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply to be a start or stop request.") from None
    if not isinstance(body, dict):
        raise BadRequest('The request body must be a JSON object such as {"session_name": "run-1"}.')
    unknown = sorted(set(body) - BODY_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0]!r}; the only field is 'session_name'.")
    return body


def parse_start_body(raw: str | bytes) -> object | None:
    """The requested session name (None: generate one), or BadRequest with one sentence."""
    body = parse_body(raw)
    if "session_name" in body and body["session_name"] is None:
        # Only an omitted name is generated (the contract): a null is more likely a client's
        # unset variable than a wish for a generated name.
        raise BadRequest("session_name must be a string; leave it out to get a generated name.")
    return body.get("session_name")


def parse_stop_body(raw: str | bytes) -> str | None:
    """The session the client means to stop (None: whichever is active), or BadRequest /
    InvalidSessionName with one sentence."""
    body = parse_body(raw)
    if "session_name" not in body:
        return None
    if body["session_name"] is None:
        raise BadRequest("session_name must be a string; leave it out to stop whichever session is active.")
    if body["session_name"] == "":
        # validate_session_name's advice (omit it for a generated name) is a start's.
        raise BadRequest("session_name must not be empty; leave it out to stop whichever session is active.")
    # A name no session can have is a mistake to say as such, not a mere mismatch (409).
    return validate_session_name(body["session_name"])


NOT_READY = (
    "The service is not ready yet: start-up is not done (/v1/status says what it waits for in "
    "last_error); try again later."
)


def create_app(service: Service) -> QuartTrio:
    app = QuartTrio("uploader")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # OPTIONS is refused like any method a path does not take (the probes' way too), rather
    # than answered with an empty HTML 200: the API has no CORS or other use for it.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # A path is taken as written: "//v1/watch/stop" is no API path, though werkzeug's default
    # map would merge its slashes and stop the session. Set before any route is added.
    app.url_map = app.url_map_class(host_matching=app.url_map.host_matching, merge_slashes=False)

    @app.before_request
    async def path_as_written() -> None:
        # werkzeug's request.path drops extra leading slashes, which the map never sees.
        if request.scope.get("path", request.path) != request.path:
            raise NotFound()

    async def session_call(
        verb: str, usage: str, parse: Callable[[str | bytes], object | None],
        operation: Callable[[SessionControl, Any], Awaitable[SessionState]],
    ) -> Any:
        """Start or stop (``verb``) the session the body names; one JSON sentence on error."""
        if request.query_string:
            return error(400, f"POST /v1/watch/{verb} takes no query parameters; {usage}")
        if service.sessions is None:
            return error(503, NOT_READY)
        try:
            state = await operation(service.sessions, parse(await request.get_data(as_text=False)))
        except (BadRequest, InvalidSessionName) as exc:
            return error(400, str(exc))
        except SessionConflict as exc:
            return error(409, str(exc))
        except NfsRefused as exc:  # a permission or a read-only share: no use retrying
            return error(500, f"Cannot {verb} the session: {exc}")
        except NfsUnavailable as exc:
            return error(503, f"Cannot {verb} the session: {exc}")
        return {**state.public(), "draining": service.draining()}

    @app.post("/v1/watch/start")
    async def start() -> Any:
        return await session_call(
            "start", 'send {"session_name": "..."} as its JSON body.', parse_start_body, SessionControl.start
        )

    @app.post("/v1/watch/stop")
    async def stop() -> Any:
        return await session_call(
            "stop", 'send {"session_name": "..."} as its JSON body, or no body to stop the active session.',
            parse_stop_body, SessionControl.stop,
        )

    @app.get("/v1/status")
    async def status() -> Any:
        return service.status()

    @app.get("/metrics")
    async def prometheus() -> Response:
        if service.telemetry is not None and service.telemetry.sdk_disabled:
            # Not an empty 200: a scrape would see every series vanish, not why.
            return error(503, "Metrics are off: OTEL_SDK_DISABLED=true turns off the OpenTelemetry SDK, which counts them.")
        text = service.telemetry.prometheus_text() if service.telemetry else ""
        return Response(text, content_type=PROMETHEUS_TEXT)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        # As it came (werkzeug's request.path merges slashes: "//healthz" would read "/healthz").
        path = shown_path(str(request.scope.get("path", request.path)))
        if status == 404:
            return error(404, f"There is no {path} here; see the README for the API.")
        if status == 405:
            answer = error(405, f"{request.method} is not allowed on {path}.")
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
                answer.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
            return answer
        if status == 413:
            return error(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        if status == 408:
            return error(408, f"The request body did not arrive within {app.config['BODY_TIMEOUT']} s.")
        return error(status, f"{exc.name}.")

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error(500, f"Internal error: {type(exc).__name__}.")

    # A server span per request; the scrape would only add noise. (A regular expression
    # searched in scheme://host/path: /metrics itself, not every path that has the word.)
    traced = OpenTelemetryMiddleware(
        app.asgi_app, excluded_urls="^[^/]*//[^/]*/metrics$", exclude_spans=["receive", "send"]
    )
    app.asgi_app = probes_first(  # type: ignore[method-assign,assignment]
        sends_shielded(traced), lambda: service.ready
    )
    return app


# How long one send may take, shielded: a client that does not read (an HTTP/2 flow-control
# window left at zero; HTTP/1 writes are shielded by Hypercorn itself) must not hold up
# shutdown for ever. The API's answers are a few kilobytes.
SEND_BUDGET_S = 2.0


def sends_shielded(app: ASGIApp) -> ASGIApp:
    """Let each ``send`` of ``app`` finish, within SEND_BUDGET_S, whatever cancels the app.

    Hypercorn closes a connection that is not kept alive (HTTP/1.0, ``Connection: close``)
    and starts the keep-alive timer of one that is, from inside the ``send`` of the last
    body chunk, after it has told the app ``http.disconnect``. Quart-trio cancels the request
    as soon as it sees that message, which cancelled the ``send`` halfway: the connection was
    never closed nor timed out, and each client that did not close it held a socket for good.
    """

    async def asgi(
        scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        async def send_to_the_end(message: dict[str, Any]) -> None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_BUDGET_S):
                await send(message)

        await app(scope, receive, send_to_the_end)

    return asgi


PROBES = ("/healthz", "/readyz")
BAD_HOST = "The Host header is not a valid host name."
LENGTH_REQUIRED = "An HTTP/1.0 POST needs a Content-Length header (0 when there is no body)."
SHOWN_PATH_CHARS = 200


def shown_path(path: str) -> str:
    # A path is the client's own, of any length: shown in part, never echoed whole.
    return path if len(path) <= SHOWN_PATH_CHARS else f"{path[:SHOWN_PATH_CHARS]}..."


def probes_first(app: ASGIApp, ready: Callable[[], bool]) -> ASGIApp:
    """Answer /healthz and /readyz before the web framework sees them, and refuse what the
    framework would fail on with a bare 500 and a traceback (a bad Host) or misread (an
    HTTP/1.0 POST of unknown length). WebSocket handshakes never come here: see
    RefusedWebSocket.

    The probes touch no filesystem, no thread and no framework machinery: they answer from
    a flag, whatever NFS or Azure are doing, at a fraction of a routed request's cost.
    """

    async def asgi(
        scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":  # lifespan: Quart's own
            await app(scope, receive, send)
            return
        if scope["path"].startswith(("http://", "https://")):
            scope = in_origin_form(scope)
        scope = encoded_slashes_kept(scope)
        head = scope["method"] == "HEAD"
        if scope["path"] in PROBES:
            # Whatever the Host: a probe's answer depends on nothing the client sends.
            if scope["method"] not in ("GET", "HEAD"):
                await send_json(
                    send, 405, {"error": f"{scope['method']} is not allowed on {scope['path']}."},
                    head=head, headers=[(b"allow", b"GET, HEAD")],
                )
            elif scope["path"] == "/healthz":
                await send_json(send, 200, {"ok": True}, head=head)
            elif ready():
                await send_json(send, 200, {"ready": True}, head=head)
            else:
                await send_json(send, 503, {"ready": False}, head=head)
            return
        if body_length_unknown(scope):
            await send_json(send, 411, {"error": LENGTH_REQUIRED}, head=head)
            return
        if not host_is_valid(scope):
            await send_json(send, 400, {"error": BAD_HOST}, head=head)
            return
        await app(scope, receive, send)

    return asgi


async def send_json(
    send: Callable[..., Any], status: int, body: dict[str, object], *, head: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An answer of ``body`` as JSON, sent without the framework."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else payload, "more_body": False})


def body_length_unknown(scope: dict[str, Any]) -> bool:
    """Whether the request is an HTTP/1.0 POST that does not say how long its body is.

    h11 reads its body as empty and what the client sent as its body as bytes after it: a
    stop sent with a name but no Content-Length stopped whichever session was active.
    HTTP/1.0 requires the header on a POST (RFC 1945, 8.3); in HTTP/1.1 a request without
    it has no body, and what follows is the next request.
    """
    if scope["method"] != "POST" or scope.get("http_version") != "1.0":
        return False
    return not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])


def host_is_valid(scope: dict[str, Any]) -> bool:
    """Whether the request's host can be routed. Quart binds werkzeug's URL map to it while it
    builds the request context, before any error handler of the app: werkzeug encodes the
    host's name (the port aside) as IDNA and raises BadHost where it cannot (an empty label,
    ``a..b``; a label over 63 characters), which the client got as a bare 500. The same
    steps here: werkzeug's ``get_host`` (a host of characters no host name has reads as
    empty, which binds), lower case, the port left out, IDNA."""
    header = next((value.decode("latin-1") for name, value in scope["headers"] if name.lower() == b"host"), None)
    host = get_host(scope.get("scheme", "http"), header, scope.get("server"))
    try:
        host.lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True


_ENCODED_SLASH = re.compile(rb"(%2f)", re.IGNORECASE)  # a group: split() keeps it


def encoded_slashes_kept(scope: dict[str, Any]) -> dict[str, Any]:
    """The request with ``%2F`` left encoded in its path. Hypercorn decodes the whole path,
    so ``/v1%2Fwatch%2Fstop`` routed as ``/v1/watch/stop``, though an encoded slash is part
    of one segment's name (RFC 3986, 2.2), not a separator: it is a path of no endpoint."""
    raw = scope.get("raw_path") or b""
    if not _ENCODED_SLASH.search(raw):
        return scope
    parts = _ENCODED_SLASH.split(raw)  # the text between, and each %2F as written
    path = "".join(part.decode("latin-1") if i % 2 else unquote(part.decode("latin-1")) for i, part in enumerate(parts))
    return {**scope, "path": path}


def in_origin_form(scope: dict[str, Any]) -> dict[str, Any]:
    """A request whose target is a whole URL (``GET http://host/healthz``, which HTTP/1.1
    servers must accept), as if it named only the path."""
    path = urlsplit(scope["path"]).path or "/"
    raw = urlsplit(scope.get("raw_path", b"").decode("latin-1")).path or "/"
    return {**scope, "path": path, "raw_path": raw.encode("latin-1")}


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    return config


# What a request Hypercorn refuses before the app sees it gets (h11's status hints).
PROTOCOL_ERRORS = {
    400: "The request is not valid HTTP/1.1.",
    431: "The request's target or header fields are too large.",
    501: "The request's Transfer-Encoding is not supported: only chunked is.",
}


class LastRequestConnection(h11.Connection):
    """h11's server side, deaf to whatever a client sends after a request it said was its
    last (HTTP/1.0, ``Connection: close``).

    h11 takes any such byte, even a stray CRLF, for a protocol error, and Hypercorn then
    answered 400 in place of the app's answer to a request the app carried out all the same:
    the client was told its start failed while the session ran. The bytes belong to no
    request of this connection, which closes once the answer is sent.
    """

    # Set per request: a body announced larger than the API takes is not asked for.
    body_refused = False

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        # Hypercorn answers "100 Continue" as soon as the client waits for it, before the app
        # sees the request: the client then sent a body only to hear 413.
        return super().they_are_waiting_for_100_continue and not self.body_refused

    def receive_data(self, data: bytes) -> None:
        # An empty read is the client's EOF, which h11 must still see.
        if data and self.their_state is h11.MUST_CLOSE:
            return
        super().receive_data(data)

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        if self.their_state is h11.MUST_CLOSE and self.trailing_data[0]:
            # Bytes that came in the same read as the end of the request.
            return h11.NEED_DATA
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.body_refused = announced_length(event.headers) > MAX_BODY_BYTES
        return event


def announced_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The Content-Length of a request's headers (h11 checked its form), 0 without one."""
    return next((int(value) for name, value in headers if name == b"content-length"), 0)


class JsonErrorsH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, whose own error answers (a malformed request, headers
    too large) are JSON with one sentence, as every other error of the API, and which
    answers a request whose client half-closed the connection once it had sent it all, or
    sent more after a request it said was its last."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection = LastRequestConnection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )

    async def handle(self, event: Event) -> None:
        if (
            isinstance(event, Closed)
            and self.stream is not None
            # The whole request, then EOF (CLOSED; MUST_CLOSE where bytes after it are left).
            and self.connection.their_state in (h11.CLOSED, h11.MUST_CLOSE)
            and self.connection.our_state is h11.SEND_RESPONSE
        ):
            # Hypercorn would close the stream, and the app's answer would go nowhere; once
            # it is sent, the connection closes (the client can send nothing more).
            return
        await super().handle(event)

    async def _send_error_response(self, status_code: int) -> None:
        body = json.dumps(
            {"error": PROTOCOL_ERRORS.get(status_code, f"The request could not be read (HTTP {status_code}).")}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class RefusedWebSocket(WSStream):
    """Hypercorn's WebSocket stream (HTTP/1.1 upgrade, HTTP/2 CONNECT), made to answer every
    handshake, valid or not, with a JSON 404 and end there: the API has no WebSocket endpoint.

    Hypercorn's own answered a handshake it found invalid (no key, another version, HTTP/1.0,
    a frame before the answer) with an empty 400 and never ended the stream, so the
    connection was never closed (HTTP/1.1) nor idle (HTTP/2): each such client held a socket
    for good. A valid one reached the app, where Quart fails to answer it outside a request
    context: a bare 500 and two tracebacks.
    """

    async def handle(self, event: stream_events.Event) -> None:
        # What the client sends after its handshake is for no one. The answer comes from a
        # task of its own, as the app's would: HTTP/2 marks the connection busy after this
        # returns, which would undo the idle mark of a stream already ended here, and the
        # idle connection would never be closed.
        if isinstance(event, stream_events.Request):
            self.task_group.spawn(self._refuse, event)

    async def _refuse(self, event: stream_events.Request) -> None:
        path = unquote(event.raw_path.partition(b"?")[0].decode("latin-1"))
        body = json.dumps({"error": no_websocket_endpoint(path)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if event.http_version != "2":  # HTTP/2 has no Connection header; its stream ends
            headers.append((b"connection", b"close"))
        await self.send(stream_events.Response(stream_id=self.stream_id, status_code=404, headers=headers))
        await self.send(stream_events.Body(stream_id=self.stream_id, data=body))
        await self.send(stream_events.EndBody(stream_id=self.stream_id))
        # Hypercorn then closes an HTTP/1.1 connection, and forgets an HTTP/2 stream.
        await self.send(stream_events.StreamClosed(stream_id=self.stream_id))


def no_websocket_endpoint(path: str) -> str:
    return f"There is no WebSocket endpoint at {shown_path(path)}; the API answers plain HTTP requests only."


class AuthorityPathH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol, made to answer a plain CONNECT (a tunnel, no ``:path``).

    Hypercorn reads a request's path from ``:path`` only, which such a request lacks: the
    connection failed, and every other request on it lost its answer, a start carried out
    included. Its authority stands for its path, as the request target of an HTTP/1.1
    CONNECT does, and the request is refused like any WebSocket handshake (RefusedWebSocket).
    """

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        headers = request.headers or []
        if not any(name == b":path" for name, _ in headers):
            authority = next((value for name, value in headers if name == b":authority"), b"*")
            request.headers = [*headers, (b":path", authority)]
        await super()._create_stream(request)


class ConnectionServer(TCPServer):
    """Hypercorn's trio connection handler, made unable to end the service.

    Hypercorn runs each connection in its server nursery, inside the root nursery: whatever
    escapes one connection would stop the whole service (a client hanging up in the middle
    of a request body did, exit 70). Hypercorn 0.18 sends its EOF (``_close``) without the
    send lock its other sends take, so an answer racing it fails with BusyResourceError.
    """

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            # The stream is being closed by another task: for this send, as good as closed.
            await self.protocol.handle(Closed())

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as failure:
            log.warning("an HTTP connection failed and was dropped: %s", describe(first_leaf(failure)))


async def serve(
    app: QuartTrio,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Hypercorn's trio worker builds its connections, their HTTP/1.1 protocol and the WebSocket
    # streams of both HTTP versions from these module attributes; there is no setting for any.
    hypercorn.trio.run.TCPServer = ConnectionServer  # type: ignore[attr-defined]
    hypercorn.protocol.H11Protocol = JsonErrorsH11Protocol  # type: ignore[attr-defined]
    hypercorn.protocol.H2Protocol = AuthorityPathH2Protocol  # type: ignore[attr-defined]
    hypercorn.protocol.h11.WSStream = RefusedWebSocket  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = RefusedWebSocket  # type: ignore[attr-defined]
    await hypercorn_serve(
        app,
        hypercorn_config(settings),
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
