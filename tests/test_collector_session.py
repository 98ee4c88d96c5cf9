"""The OTLP exporters' session: a collector's answer is bounded in time and in size."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from uploader.http_session import MAX_COLLECTOR_ANSWER_BYTES, CollectorSession

Answer = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def collector() -> Iterator[Callable[[Answer], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(answer: Answer) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1/traces"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def headers_for(length: int) -> Answer:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
    return answer


def test_a_usual_answer_is_read_whole(collector: Callable[[Answer], str]) -> None:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        headers_for(5)(handler)
        handler.wfile.write(b"\x0a\x03abc")

    response = CollectorSession().post(collector(answer), data=b"spans", timeout=5)
    assert response.status_code == 200 and response.content == b"\x0a\x03abc"


def test_an_answer_that_trickles_ends_in_a_timeout(collector: Callable[[Answer], str]) -> None:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        headers_for(1000)(handler)
        for _ in range(1000):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        CollectorSession().post(collector(answer), data=b"spans", timeout=1)
    assert time.monotonic() - started < 3  # its timeout bounds the answer, not each read


def test_only_the_start_of_a_huge_answer_is_kept(collector: Callable[[Answer], str]) -> None:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        headers_for(1 << 30)(handler)
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(1024):
                handler.wfile.write(chunk)
        except OSError:
            pass  # the client hung up: what it needed it had

    response = CollectorSession().post(collector(answer), data=b"spans", timeout=5)
    assert response.status_code == 200 and len(response.content) == MAX_COLLECTOR_ANSWER_BYTES
