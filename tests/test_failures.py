"""Issue 9, "Living applications, not dead servers": what a living application does is its own
business, not an upstream failure, and what really is a failure stays bounded.

What this module proves:

* An application without a /health route stays in rotation with the default checks (a TCP
  connect); --health-path turns on HTTP checks, and then such an application goes down.
* An upload refused early (413, 401 before the body is read) reaches the client as the
  application's answer, with a lingering close, and counts as no failure; Expect: 100-continue
  is honoured both ways.
* One slow request is one 504 after --timeout, retried only when asked for, never for a POST,
  and takes nobody out.
* A connection that answered before the request body ended is never reused; a small chunked
  body goes upstream with its head, in one send, with a Content-Length.
* Ejection needs --max-fails (5) failed requests in a row; panic mode tries upstreams that are out
  only after failed requests, never those that checks or the operator took out.
* An invalid response is 502 and not retried; a head that trickles past --timeout is 504.
* Bad input is refused at once and logged with its method and target; a field line is limited,
  the sum of lines is not (nginx's 4 x 8k).
* A dead upstream under load writes a handful of log lines, not one a request; /status shows no
  stale reason; the admin listener answers 405 (never http.server's HTML 501); refused and failed
  answers are counted apart; credentials in a backend URL are refused; header order is kept.

How: real sockets on 127.0.0.1 with ephemeral ports; the balancer in-process (conftest
`balancer`) or as the CLI (conftest `cli`); upstreams that behave as the applications do:
conftest's `Upstream` with a handler, or the scripted `App` below on a `RawUpstream` where the
bytes matter; three run the real thing as a subprocess (`python3 -m http.server`, Flask under
gunicorn, a raw ASGI app under uvicorn), killed by PID in a `finally`. Each test says in a comment
which rule it pins: with that rule undone in a copy of load_balancer.py, the test fails. Waits are
on events, or polls of a condition with a deadline (conftest's wait_until), never fixed sleeps.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import load_balancer as lb
from conftest import (SLACK, SOCKET_TIMEOUT, RawClient, default_handler, free_port, free_ports, get, header,
                      parse_head, port_of, read_head, refused_url, refuses, wait_until)

VENV_BIN = Path(sys.executable).parent
TEN_MB = 10 * 1024 * 1024
# More than the sockets between a client and the balancer hold on loopback (about 10 MB with
# Linux's autotuned buffers): a sender of this much cannot have sent it all before an early answer.
LARGE_UPLOAD = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Local helpers
# ---------------------------------------------------------------------------------------------------

def admin_status(port: int) -> dict:
    """GET /status on an admin port, through a real socket."""
    r = get(port, "/status")
    assert r.status == 200, r
    return json.loads(r.body)


def backend_status(b, url: str) -> dict:
    """One upstream's entry in the balancer's /status."""
    entries = {x["url"]: x for x in admin_status(b.admin_port)["backends"]}
    return entries[url]


def no_errors(entry: dict) -> bool:
    return all(count == 0 for count in entry["errors"].values())


def response(status: int, body: bytes, *, close: bool = False, fields: bytes = b"") -> bytes:
    phrases = {100: b"Continue", 200: b"OK", 401: b"Unauthorized", 404: b"Not Found",
               413: b"Content Too Large"}
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s%s\r\n%s"
            % (status, phrases[status], len(body), fields,
               b"Connection: close\r\n" if close else b"", body))


def ending(client: RawClient, timeout: float = 5.0) -> str:
    """How a client connection goes on after a complete answer: "eof" (a clean close), "reset",
    "open" (nothing within `timeout`) or the bytes that came instead."""
    client.sock.settimeout(timeout)
    try:
        data = client.file.read1(65536)
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "open"
    return "eof" if data == b"" else f"more bytes: {data[:80]!r}"


class App:
    """An application on a conftest RawUpstream, scripted by request path (keep-alive otherwise):

    /early-413        answers 413 as soon as the head is in, reads none of the body, and keeps
                      the connection open without ever reading or answering on it again
    /early-401-close  answers 401 as soon as the head is in and closes, the body unread
    /expect-413       answers 413 (Connection: close) as soon as the head is in, then reads on
                      until the balancer closes: every byte after the head is in `after_head`
    /continue         sends 100 Continue, reads the body, answers 200 "got N bytes"
    /timeout          never answers; holds the connection until the balancer closes it
    /garbage          answers bytes that are not HTTP and closes
    /missing          404
    anything else     reads the body (Content-Length) and answers 200 "<target> got N bytes"
    """

    def __init__(self, raw_upstream):
        self.release = threading.Event()     # set by the test in a finally: held connections end
        self.lock = threading.Lock()
        self.targets: list[str] = []
        self.after_head = bytearray()
        self.expect_done = threading.Event()
        self.up = raw_upstream(self.serve)

    @property
    def url(self) -> str:
        return self.up.url

    def count(self, target: str) -> int:
        with self.lock:
            return self.targets.count(target)

    def serve(self, conn: socket.socket, up) -> None:
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                more = up.recv(conn)
                if not more:
                    return
                pending += more
            head, _, pending = pending.partition(b"\r\n\r\n")
            request_line, fields = parse_head(head + b"\r\n")
            target = request_line.split(" ")[1]
            with self.lock:
                self.targets.append(target)
            if target == "/early-413":
                conn.sendall(response(413, b"the app refuses uploads over 1 MiB\n"))
                self.release.wait(SOCKET_TIMEOUT)
                return
            if target == "/early-401-close":
                conn.sendall(response(401, b"the app wants a login first\n"))
                return
            if target == "/expect-413":
                try:
                    conn.sendall(response(413, b"too large, do not send it\n", close=True))
                    self.after_head += pending
                    while more := up.recv(conn):
                        self.after_head += more
                finally:
                    self.expect_done.set()
                return
            if target == "/timeout":
                while up.recv(conn):  # until the balancer gives up and closes
                    pass
                return
            if target == "/garbage":
                conn.sendall(b"this is not HTTP\r\n\r\n")
                return
            if target == "/continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = int(header(fields, "Content-Length") or 0)
            while len(pending) < length:
                more = up.recv(conn)
                if not more:
                    return
                pending += more
            body, pending = pending[:length], pending[length:]
            if target == "/missing":
                conn.sendall(response(404, b"no such page\n"))
            else:
                conn.sendall(response(200, b"%s got %d bytes\n" % (target.encode(), len(body))))


class Upload:
    """A client that sends a POST head and then `size` body bytes from a thread of its own (as curl
    and requests do), while the test reads the answer on the same connection."""

    def __init__(self, port: int, target: str, size: int, fields: bytes = b""):
        self.client = RawClient(port)
        self.size = size
        self.sent = 0
        self.error: OSError | None = None
        self.client.send(b"POST %s HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n%s\r\n"
                         % (target.encode(), size, fields))
        self.thread = threading.Thread(target=self._send_body, daemon=True)
        self.thread.start()

    def _send_body(self) -> None:
        piece = bytes(65536)
        try:
            while self.sent < self.size:
                self.sent += self.client.sock.send(piece[:self.size - self.sent])
        except OSError as error:
            self.error = error

    def close(self) -> None:
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(SOCKET_TIMEOUT)
        self.client.close()


class Held:
    """Upstream handler: a request for one of `paths` waits for `release` (set by the test in a
    finally; SOCKET_TIMEOUT at most), then gets default_handler's answer; others get it at once."""

    def __init__(self, release: threading.Event, *paths: str):
        self.release, self.paths = release, paths

    def __call__(self, h, req) -> None:
        if req.target in self.paths:
            self.release.wait(SOCKET_TIMEOUT)
        default_handler(h, req)


def not_found_on_health(h, req) -> None:
    """An application without a /health route: 404 there, default_handler's 200 elsewhere."""
    if req.target.startswith("/health"):
        body = b"404 page not found\n"
        h.send_response(404)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    else:
        default_handler(h, req)


def start_process(args: list, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, **kwargs)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, then SIGKILL to its process group (a gunicorn master's workers) if needed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    assert wait_until(lambda: proc.poll() is not None or not refuses(port), timeout=timeout,
                      interval=0.05), f"nothing listens on {port} after {timeout}s"
    assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"


def warnings_naming(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("load_balancer") and r.levelno >= logging.WARNING
            and needle in r.getMessage()]


@pytest.fixture(autouse=True)
def short_log_summaries(monkeypatch):
    """FailureLog's summary timers outlive a closed balancer: with the default 5 s, a summary of
    one test's failures would be written during a later test (or after the session). 0.3 s keeps
    them within the test or right after it."""
    monkeypatch.setattr(lb, "LOG_SUMMARY_SECONDS", 0.3)


# ---------------------------------------------------------------------------------------------------
# 1. An application without a /health route
# ---------------------------------------------------------------------------------------------------

def test_app_without_health_route_stays_up_with_default_checks(cli, tmp_path):
    """Two `python3 -m http.server` apps (404 on /health) behind the CLI with default flags but a
    short --health-interval: both stay up across several checks and every request gets 200."""
    # Rule: without --health-path the active check is a TCP connect, not GET /health.
    (tmp_path / "index.html").write_text("hello from a static app\n")
    ports = free_ports(3)
    apps = []
    try:
        for port in ports[:2]:
            apps.append(start_process([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                       "--directory", str(tmp_path), str(port)]))
        for port, proc in zip(ports, apps):
            wait_listening(port, proc)
        urls = [f"http://127.0.0.1:{port}" for port in ports[:2]]
        p = cli(["--host", "127.0.0.1", "--port", "0", "--backend", urls[0], "--backend", urls[1],
                 "--health-interval", "0.2", "--admin-port", str(ports[2])]).wait_ready()

        def checked(n):
            entries = admin_status(p.admin_port)["backends"]
            return all(x["checks"]["passed"] >= n for x in entries)

        assert wait_until(lambda: checked(4), timeout=5), admin_status(p.admin_port)
        status = admin_status(p.admin_port)
        for entry in status["backends"]:
            assert entry["state"] == "up" and entry["health"] == "up", entry
            assert entry["checks"]["failed"] == 0, entry
            assert entry["reason"].startswith("health check passed: TCP connect in "), entry
        for i in range(6):
            r = get(p.port, f"/index.html?i={i}")
            assert r.status == 200 and r.body == b"hello from a static app\n", r
    finally:
        for proc in apps:
            stop_process(proc)


def test_health_path_turns_on_http_checks_and_such_apps_go_down(upstreams, balancer):
    """The same kind of app with --health-path /health: HTTP checks, 404 fails them, down."""
    # Rule: --health-path makes the check an HTTP GET (2xx/3xx passes), as before the issue.
    ups = upstreams(2, not_found_on_health)
    b = balancer([u.url for u in ups], health_interval=0.2, health_path="/health",
                 admin_port=free_port())
    assert wait_until(lambda: all(x.state == "down" for x in b.backends), timeout=5), \
        [x.state for x in b.backends]
    for u in ups:
        entry = backend_status(b, u.url)
        assert entry["health"] == "down" and entry["state"] == "down", entry
        assert entry["reason"].startswith("down: 3 health check(s) failed in a row"), entry
        assert entry["reason"].endswith("last: HTTP 404 from /health"), entry
        assert [r.target for r in u.requests][:3] == ["/health"] * 3


# ---------------------------------------------------------------------------------------------------
# 2. An upload refused early
# ---------------------------------------------------------------------------------------------------

def test_upload_refused_early_gets_the_apps_answer_and_counts_as_no_failure(raw_upstream, balancer):
    """64 MiB POSTs to apps that answer 413 (connection kept, never read again) or 401 (connection
    closed) as soon as the head is in. max_fails=1, so a single counted failure would show."""
    # Rules: an early answer is relayed, not turned into 502 (EarlyResponse), and the client
    # connection is closed after it (Connection: close, then a clean end); an early answer is no
    # failure (no error counted, failure run stays 0, never ejected); a connection that answered
    # early is not reused (the 3rd upload would wait for --timeout on the one that ignores it).
    keep, close = App(raw_upstream), App(raw_upstream)
    b = balancer([keep.url, close.url], max_fails=1, fail_timeout=30, timeout=3,
                 admin_port=free_port())
    expected = [(413, b"the app refuses uploads over 1 MiB\n"), (401, b"the app wants a login first\n")]
    try:
        for i in range(4):  # strict alternation: keep, close, keep, close
            status, body = expected[i % 2]
            target = "/early-413" if i % 2 == 0 else "/early-401-close"
            upload = Upload(b.port, target, LARGE_UPLOAD)
            try:
                r = upload.client.response()
                # What had been sent when the answer was read: after it, the lingering close reads
                # and drops the rest as fast as it comes.
                sent_when_answered = upload.sent
                assert (r.status, r.body) == (status, body), r
                assert r.header("Connection") == "close", r
                assert ending(upload.client) == "eof"
            finally:
                upload.close()
            assert sent_when_answered < LARGE_UPLOAD, \
                f"the whole body was sent before an answer came: the answer was not early ({target})"
        assert (keep.targets, close.targets) == (["/early-413"] * 2, ["/early-401-close"] * 2)
        for app in (keep, close):
            entry = backend_status(b, app.url)
            assert entry["state"] == "up" and not entry["ejected"], entry
            assert entry["consecutive_failures"] == 0 and entry["ejections"] == 0, entry
            assert no_errors(entry), entry
            assert entry["responses"]["4xx"] == 2, entry
    finally:
        keep.release.set()
        close.release.set()


def test_early_answer_is_followed_by_a_lingering_close(raw_upstream, balancer):
    """A client that goes on sending its body after the app's early 413 (as clients that read
    only once their body is out do) may finish sending: the balancer reads and drops the rest
    before it closes, so no reset hits the client. Linux keeps received data readable after a
    reset, so the reset itself is what is checked: the client's sends succeed and its socket
    ends without an error (SO_ERROR 0)."""
    # Rule: after an early answer the client connection is closed with a lingering close
    # (relay_response sets `linger`; linger_close reads for a while), nginx's lingering_close.
    app = App(raw_upstream)
    b = balancer([app.url], timeout=3)
    size, first = 512 * 1024, 16 * 1024
    try:
        with RawClient(b.port) as client:
            client.send(b"POST /early-413 HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n\r\n"
                        % size + bytes(first))
            r = client.response()
            assert (r.status, r.header("Connection")) == (413, "close"), r
            assert ending(client) == "eof"
            try:
                client.sock.sendall(bytes(size - first))  # the rest of the body
                client.sock.shutdown(socket.SHUT_WR)
            except OSError as error:
                pytest.fail(f"reset while the client sent the rest of its body: {error}")

            def tcp_state() -> int:
                return client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

            assert wait_until(lambda: tcp_state() == 7, timeout=5), tcp_state()  # TCP_CLOSE
            error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert error == 0, f"the connection was reset: {os.strerror(error)}"
    finally:
        app.release.set()


def test_expect_continue_early_refusal_reaches_a_client_that_sent_no_body(raw_upstream, balancer):
    # Rule: with Expect: 100-continue and nothing of the body sent, the balancer forwards the head
    # and waits for the upstream (or the client): the app's 413 goes to the client, no body moves.
    app = App(raw_upstream)
    b = balancer([app.url], timeout=3)
    with RawClient(b.port) as client:
        client.send(b"POST /expect-413 HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n"
                    b"Expect: 100-continue\r\n\r\n" % TEN_MB)
        head = read_head(client.file)
        status_line, fields = parse_head(head)
        assert status_line == "HTTP/1.1 413 Content Too Large", head  # no 100 first
        assert client.file.read(int(header(fields, "Content-Length"))) == b"too large, do not send it\n"
        assert header(fields, "Connection") == "close", head
        assert ending(client) == "eof"
    assert app.expect_done.wait(5), "the balancer kept the upstream connection open"
    assert bytes(app.after_head) == b"", "body bytes reached the upstream"


def test_expect_continue_from_the_upstream_gets_the_body(raw_upstream, balancer):
    # Rule: the upstream's 100 Continue is relayed to the client, which then sends the body.
    app = App(raw_upstream)
    b = balancer([app.url], timeout=3)
    body = bytes(range(256)) * 1024
    with RawClient(b.port) as client:
        client.send(b"POST /continue HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n"
                    b"Expect: 100-continue\r\n\r\n" % len(body))
        assert read_head(client.file) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(body)
        r = client.response()
    assert (r.status, r.body) == (200, b"/continue got %d bytes\n" % len(body)), r


def test_expect_continue_with_an_app_that_ignores_it(upstreams, balancer):
    # Rule: an app that ignores Expect (sends no 100, just reads) still gets the body the client
    # sends after its own wait; the balancer neither blocks it nor answers for the app.
    up, = upstreams(1)
    b = balancer([up.url], timeout=3)
    body = b"x" * 100_000
    with RawClient(b.port) as client:
        client.send(b"POST /ignores HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n"
                    b"Expect: 100-continue\r\n\r\n" % len(body))
        readable, _, _ = select.select([client.sock], [], [], 0.3)  # the client's own wait (curl: 1 s)
        assert not readable, "an answer before the body although the app sent none"
        client.send(body)
        r = client.response()
    assert r.status == 200 and port_of(r) == up.port, r
    assert up.requests[0].body == body


def test_flask_under_gunicorn_refusing_a_10mb_upload_gives_413(balancer, tmp_path):
    """The real thing: Flask (MAX_CONTENT_LENGTH = 1 MiB) under gunicorn, a 10 MB POST through
    the balancer with `requests`."""
    # Rule: as test_upload_refused_early_...: the app's early 413 reaches a real client whole.
    (tmp_path / "flaskapp.py").write_text(
        "from flask import Flask, request\n"
        "app = Flask(__name__)\n"
        "app.config['MAX_CONTENT_LENGTH'] = 1024 * 1024\n"
        "@app.post('/upload')\n"
        "def upload():\n"
        "    return f'got {len(request.get_data())} bytes\\n'\n")
    port = free_port()
    proc = start_process([str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers",
                          "1", "--no-control-socket", "--chdir", str(tmp_path), "flaskapp:app"])
    try:
        wait_listening(port, proc)
        b = balancer([f"http://127.0.0.1:{port}"], timeout=10, admin_port=free_port())
        small = requests.post(f"http://127.0.0.1:{b.port}/upload", data=b"x" * 1000, timeout=10)
        assert (small.status_code, small.text) == (200, "got 1000 bytes\n")
        r = requests.post(f"http://127.0.0.1:{b.port}/upload", data=bytes(TEN_MB), timeout=10)
        assert r.status_code == 413, (r.status_code, r.text[:200])
        assert "Too Large" in r.text, r.text[:200]
        entry = backend_status(b, f"http://127.0.0.1:{port}")
        assert entry["consecutive_failures"] == 0 and no_errors(entry), entry
    finally:
        stop_process(proc)


ASGI_APP = """
async def app(scope, receive, send):
    # A raw ASGI app (no framework): uploads over 1 MiB are refused from the head alone, without
    # a receive() (so uvicorn sends no 100 Continue); others are read whole and counted.
    length = int(dict(scope["headers"]).get(b"content-length", b"0"))
    if length > 1024 * 1024:
        status, body = 413, b"uploads are limited to 1 MiB\\n"
    else:
        received, more = 0, True
        while more:
            message = await receive()
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        status, body = 200, b"got %d bytes\\n" % received
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
"""


def test_expect_continue_with_a_raw_asgi_app_under_uvicorn(balancer, tmp_path):
    """The real thing: uvicorn sends 100 Continue when the app first reads the body, and none
    when the app answers from the head alone."""
    # Rules: as the Expect tests above, with a real server: the app's 413 reaches a client that
    # waits for 100 and sent no body; the 100 uvicorn sends when the app reads is relayed.
    (tmp_path / "asgiapp.py").write_text(ASGI_APP)
    port = free_port()
    proc = start_process([str(VENV_BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(port),
                          "--app-dir", str(tmp_path), "--lifespan", "off", "--no-access-log",
                          "asgiapp:app"])
    try:
        wait_listening(port, proc)
        b = balancer([f"http://127.0.0.1:{port}"], timeout=5, admin_port=free_port())
        with RawClient(b.port) as client:
            client.send(b"POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n"
                        b"Expect: 100-continue\r\n\r\n" % TEN_MB)
            head = read_head(client.file)
            status_line, fields = parse_head(head)
            assert status_line.startswith("HTTP/1.1 413 "), head  # no 100 before it
            body = client.file.read(int(header(fields, "Content-Length")))
            assert body == b"uploads are limited to 1 MiB\n", body
            assert ending(client) == "eof"
        data = bytes(range(256)) * 400
        with RawClient(b.port) as client:
            client.send(b"POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Length: %d\r\n"
                        b"Expect: 100-continue\r\n\r\n" % len(data))
            assert read_head(client.file) == b"HTTP/1.1 100 Continue\r\n\r\n"
            client.send(data)
            r = client.response()
            assert (r.status, r.body) == (200, b"got %d bytes\n" % len(data)), r
        entry = backend_status(b, f"http://127.0.0.1:{port}")
        assert entry["consecutive_failures"] == 0 and no_errors(entry), entry
    finally:
        stop_process(proc)


# ---------------------------------------------------------------------------------------------------
# 3. One slow request
# ---------------------------------------------------------------------------------------------------

def test_one_slow_request_is_one_504_after_timeout_and_takes_nobody_out(upstreams, balancer):
    """timeout=1, three apps whose /slow is held: one GET /slow is one 504 after ~1 s."""
    # Rules: a response timeout is not retried by default (retry_on lacks response-timeout): one
    # upstream sees /slow, the answer comes after 1 s, not 3; one timeout ejects nobody.
    release = threading.Event()
    ups = [upstreams(1, Held(release, "/slow"))[0] for _ in range(3)]
    b = balancer([u.url for u in ups], timeout=1, admin_port=free_port())
    try:
        t0 = time.monotonic()
        r = get(b.port, "/slow")
        elapsed = time.monotonic() - t0
        assert r.status == 504, r
        assert 0.9 <= elapsed < 1 + SLACK, f"504 after {elapsed:.2f}s with --timeout 1"
        assert sum(req.target == "/slow" for u in ups for req in u.requests) == 1, \
            [[req.target for req in u.requests] for u in ups]
        ports = collections.Counter(port_of(get(b.port, f"/next{i}")) for i in range(6))
        assert ports == {u.port: 2 for u in ups}, ports
        for u in ups:
            entry = backend_status(b, u.url)
            assert entry["state"] == "up" and entry["ejections"] == 0, entry
    finally:
        release.set()


def test_response_timeout_retry_is_opt_in_and_never_for_a_post(upstreams, balancer):
    # Rules: retry_on=...,response-timeout re-sends a GET that timed out to the next upstream
    # (HAProxy's opt-in); a POST that timed out is never re-sent, whatever retry_on says.
    release = threading.Event()
    first = upstreams(1, Held(release, "/slow", "/slow-post"))[0]
    others = [upstreams(1, Held(release, "/slow-post"))[0] for _ in range(2)]
    ups = [first, *others]
    b = balancer([u.url for u in ups], timeout=1,
                 retry_on="conn-failure,empty-response,response-timeout")
    try:
        t0 = time.monotonic()
        r = get(b.port, "/slow")  # the first pick: `first`, which holds it
        elapsed = time.monotonic() - t0
        assert r.status == 200 and port_of(r) == others[0].port, r
        assert 0.9 <= elapsed < 1 + SLACK, elapsed
        assert [[q.target for q in u.requests] for u in ups] == [["/slow"], ["/slow"], []]

        t0 = time.monotonic()
        r = get(b.port, "/slow-post", method="POST", body=b"order=1")
        elapsed = time.monotonic() - t0
        assert r.status == 504, r
        assert 0.9 <= elapsed < 1 + SLACK, elapsed
        assert sum(q.target == "/slow-post" for u in ups for q in u.requests) == 1, \
            [[q.target for q in u.requests] for u in ups]
    finally:
        release.set()


# ---------------------------------------------------------------------------------------------------
# 4. Pool safety
# ---------------------------------------------------------------------------------------------------

def test_connection_that_answered_before_the_body_ended_is_never_reused(raw_upstream, balancer):
    """The app answers a chunked POST after its head, then ignores that connection (never reads
    or answers on it again, keeps it open). The next client's request must not go there."""
    # Rule: a connection whose upstream answered before the request body was all sent is closed,
    # not pooled (relay_response: `not early`). Reused, the next request would wait for --timeout.
    hold = threading.Event()
    lock = threading.Lock()
    seen = []

    def serve(conn, up):
        with lock:
            seen.append(conn)
            first = len(seen) == 1
        if first:
            data = b""
            while b"\r\n\r\n" not in data:
                more = up.recv(conn)
                if not more:
                    return
                data += more
            conn.sendall(response(200, b"answered early\n"))  # keep-alive, as far as it says
            hold.wait(SOCKET_TIMEOUT)
            return
        while data := up.read_request(conn):
            target = data.split(b" ", 2)[1]
            conn.sendall(response(200, b"fresh " + target + b"\n"))

    up = raw_upstream(serve)
    b = balancer([up.url], timeout=5)
    try:
        with RawClient(b.port) as client:
            client.send(b"POST /stream HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked"
                        b"\r\n\r\n5\r\nhello\r\n")  # the body goes on... later
            r = client.response()
            assert (r.status, r.body) == (200, b"answered early\n"), r
            assert r.header("Connection") == "close", r
        t0 = time.monotonic()
        with RawClient(b.port) as other:
            r = other.request(b"GET /next HTTP/1.1\r\nHost: test.local\r\n\r\n")
        elapsed = time.monotonic() - t0
        assert (r.status, r.body) == (200, b"fresh /next\n"), r
        assert elapsed < SLACK, f"{elapsed:.2f}s: the ignored connection was reused (--timeout 5)"
        assert up.connections == 2
    finally:
        hold.set()


def test_small_chunked_body_goes_upstream_with_its_head_in_one_send(raw_upstream, balancer):
    # Rule: a small chunked body that arrived whole with its head is decoded and sent in the same
    # send as the head, framed by Content-Length (as nginx buffers it): one recv holds both.
    first_recv = []

    def serve(conn, up):
        first_recv.append(up.recv(conn))
        conn.sendall(response(200, b"ok\n", close=True))

    up = raw_upstream(serve)
    b = balancer([up.url], timeout=3)
    with RawClient(b.port) as client:
        r = client.request(b"POST /small HTTP/1.1\r\nHost: test.local\r\nX-Before: 1\r\n"
                           b"Transfer-Encoding: chunked\r\nX-After: 2\r\n\r\n"
                           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert r.status == 200, r
    data = first_recv[0]
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and body == b"hello world", data
    _, fields = parse_head(head + b"\r\n")
    names = [name.lower() for name, _ in fields]
    assert header(fields, "Content-Length") == "11", data
    assert "transfer-encoding" not in names, data
    assert names.index("x-before") < names.index("content-length") < names.index("x-after"), names


# ---------------------------------------------------------------------------------------------------
# 5. Ejection that fits applications
# ---------------------------------------------------------------------------------------------------

def test_app_failures_below_max_fails_never_take_an_upstream_out(raw_upstream, balancer):
    """Two apps with the default --max-fails (5): a timeout, a refused upload and an invalid
    response each; then more invalid ones, with a success in between."""
    # Rules: default max_fails is 5 and counts failures in a row; an early answer is no failure
    # (it is the app's answer: a success); a success ends the run; the 5th in a row takes the
    # upstream out, saying why.
    apps = [App(raw_upstream), App(raw_upstream)]
    b = balancer([a.url for a in apps], timeout=0.5, admin_port=free_port())

    def both(target: str, status: int) -> None:
        """Two requests for target: strict alternation gives each app one (none is retried)."""
        for _ in range(2):
            if target == "/early-413":
                upload = Upload(b.port, target, TEN_MB)
                try:
                    r = upload.client.response()
                finally:
                    upload.close()
            else:
                r = get(b.port, target)
            assert r.status == status, (target, r)

    def entries() -> list:
        return [backend_status(b, a.url) for a in apps]

    try:
        both("/early-413", 413)
        assert [e["consecutive_failures"] for e in entries()] == [0, 0]  # the app's answer
        both("/timeout", 504)
        both("/garbage", 502)
        for a in apps:
            assert a.targets == ["/early-413", "/timeout", "/garbage"], a.targets
        for entry in entries():
            assert entry["state"] == "up" and not entry["ejected"], entry
            assert entry["consecutive_failures"] == 2, entry
            assert entry["errors"]["timeout"] == 1 and entry["errors"]["invalid"] == 1, entry
        both("/garbage", 502)
        both("/garbage", 502)
        assert [(e["consecutive_failures"], e["ejected"]) for e in entries()] == [(4, False)] * 2
        both("/fine", 200)  # a success ends the run
        assert [e["consecutive_failures"] for e in entries()] == [0, 0]
        for _ in range(4):
            both("/garbage", 502)
        assert [(e["consecutive_failures"], e["ejected"]) for e in entries()] == [(4, False)] * 2
        both("/garbage", 502)  # the 5th in a row: out
        for entry in entries():
            assert entry["ejected"] is True and entry["state"] == "down", entry
            assert "after 5 failed requests in a row" in entry["reason"], entry
    finally:
        for a in apps:
            a.release.set()


def test_five_connect_failures_in_a_row_take_an_upstream_out(upstreams, balancer):
    # Rule: connect failures count toward max_fails (default 5) like any failure; the request
    # goes on to the next upstream meanwhile; out means no connect attempt until fail_timeout.
    ok, = upstreams(1)
    dead = refused_url()
    b = balancer([dead, ok.url], admin_port=free_port())
    for i in range(20):
        r = get(b.port, f"/c{i}")
        assert r.status == 200 and port_of(r) == ok.port, r
        entry = backend_status(b, dead)
        if entry["errors"]["connect"] < 5:
            assert not entry["ejected"] and entry["state"] == "up", entry
        else:
            break
    assert entry["errors"]["connect"] == 5 and entry["consecutive_failures"] == 5, entry
    assert entry["ejected"] is True and entry["state"] == "down", entry
    assert "5 failed requests in a row" in entry["reason"], entry
    assert "connection refused" in entry["reason"], entry
    for i in range(4):
        assert port_of(get(b.port, f"/d{i}")) == ok.port
    assert backend_status(b, dead)["errors"]["connect"] == 5


# ---------------------------------------------------------------------------------------------------
# 6. Panic mode
# ---------------------------------------------------------------------------------------------------

def test_panic_mode_tries_passively_ejected_upstreams_and_ends_on_success(upstreams, balancer):
    # Rules: with every upstream out only after failed requests, requests are still tried on them
    # (502 from a try, not 503 for fail_timeout); the first success after a restart ends panic.
    first, second = upstreams(2)
    for up in (first, second):
        up.stop()
    b = balancer([first.url, second.url], max_fails=1, fail_timeout=30, admin_port=free_port())
    assert get(b.port, "/").status == 502  # both tried, both refused: both out
    status = admin_status(b.admin_port)
    assert status["panic"] is True, status
    assert [x["ejected"] for x in status["backends"]] == [True, True]
    for i in range(2):
        t0 = time.monotonic()
        r = get(b.port, f"/panic{i}")
        assert r.status == 502 and time.monotonic() - t0 < 1.0, r
    tries = [x["errors"]["connect"] for x in admin_status(b.admin_port)["backends"]]
    assert tries == [3, 3], f"not tried in panic mode: {tries}"
    second.start()  # the same port again
    r = get(b.port, "/back")
    assert r.status == 200 and port_of(r) == second.port, r
    status = admin_status(b.admin_port)
    assert status["panic"] is False, status
    assert status["backends"][1]["state"] == "up" and not status["backends"][1]["ejected"]


def test_panic_mode_never_uses_upstreams_down_by_checks_or_in_maint(raw_upstream, upstreams,
                                                                     balancer):
    """A: out after an invalid response (passive); B: down by active checks (TCP refused); C: in
    maint. Panic mode tries A only."""
    # Rule: panic mode cycles over the passively ejected upstreams only: what active checks or the
    # operator took out stays out.
    a = App(raw_upstream)
    dead_b = refused_url()
    c, = upstreams(1)
    b = balancer([a.url, dead_b, c.url], max_fails=1, fail_timeout=30, health_interval=0.2,
                 fall=1, admin_port=free_port())
    assert wait_until(lambda: backend_status(b, dead_b)["health"] == "down", timeout=5)
    name = c.url.split("//")[1]
    with RawClient(b.admin_port) as admin:
        r = admin.request(b"POST /backends/%s/maint HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 0\r\n\r\n" % name.encode())
    assert r.status == 200 and json.loads(r.body)["admin"] == "maint", r
    assert get(b.port, "/garbage").status == 502  # A: invalid response, out
    status = admin_status(b.admin_port)
    assert status["panic"] is True, status
    assert [x["state"] for x in status["backends"]] == ["down", "down", "maint"], status["backends"]
    assert status["backends"][0]["ejected"] is True
    for i in range(3):
        r = get(b.port, "/garbage")
        assert r.status == 502, r  # tried on A (not 503), and only on A
    assert a.count("/garbage") == 4
    status = admin_status(b.admin_port)
    assert [x["requests"] for x in status["backends"]] == [4, 0, 0], status["backends"]
    assert c.requests == []


# ---------------------------------------------------------------------------------------------------
# 7. Invalid and trickling responses
# ---------------------------------------------------------------------------------------------------

def test_invalid_response_is_502_and_not_retried_on_another_upstream(raw_upstream, upstreams,
                                                                      balancer):
    # Rule: an invalid response is never retried, not even for a GET (nginx: invalid_header is
    # opt-in): the app may have acted on the request.
    app = App(raw_upstream)
    other, = upstreams(1)
    b = balancer([app.url, other.url])
    r = get(b.port, "/garbage")  # the first pick: the app
    assert r.status == 502, r
    assert b"invalid response" in r.body, r
    assert app.targets == ["/garbage"]
    assert other.requests == [], "retried on the other upstream"


def test_response_head_trickling_past_timeout_is_504(raw_upstream, balancer):
    # Rule: a response head not complete within --timeout is a timeout (504), however it trickles
    # (classify: the head deadline's 408 is a timeout), not an invalid response (502).
    stop = threading.Event()

    def serve(conn, up):
        if not up.read_request(conn):
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
        while not stop.wait(0.02):
            conn.sendall(b"a")

    up = raw_upstream(serve)
    b = balancer([up.url], timeout=1)
    try:
        t0 = time.monotonic()
        r = get(b.port, "/trickle")
        elapsed = time.monotonic() - t0
        assert r.status == 504, r
        assert b"did not answer within 1s" in r.body, r
        assert elapsed < 1 + SLACK, elapsed
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------------
# 8. Bad input
# ---------------------------------------------------------------------------------------------------

def test_http09_request_line_gets_400_and_a_close_at_once(upstreams, balancer):
    # Rule: a request line without a version is refused as soon as its line end arrives (read_head),
    # not after --header-timeout waiting for a blank line that never comes.
    up, = upstreams(1)
    b = balancer([up.url], header_timeout=10)
    with RawClient(b.port) as client:
        t0 = time.monotonic()
        client.send(b"GET /x\r\n")  # and the connection stays open
        r = client.response()
        assert r.status == 400, r
        assert b"HTTP/0.9" in r.body, r
        assert ending(client) == "eof"
        assert time.monotonic() - t0 < 1.0
    assert up.requests == []


def test_one_field_line_over_8k_is_431_but_4_times_8k_in_several_fields_is_fine(upstreams,
                                                                                  balancer):
    # Rule: --max-field-size (8192) bounds one field line; the sum is bounded by --max-header-size
    # (32768) only: nginx's large_client_header_buffers 4 8k.
    up, = upstreams(1)
    b = balancer([up.url])
    r = get(b.port, "/over", headers={"X-Over": "o" * (8193 - len("X-Over: "))})  # 8193 bytes
    assert r.status == 431, r
    assert b"a header field longer than 8192 bytes" in r.body, r
    fields = {f"X-Part-{i}": chr(ord("a") + i) * 8000 for i in range(3)}
    fields["X-Exact"] = "e" * (8192 - len("X-Exact: "))  # a line of exactly 8192 bytes
    r = get(b.port, "/parts", headers=fields)  # about 32 KB of fields in all
    assert r.status == 200, r
    assert [q.target for q in up.requests] == ["/parts"]
    for name, value in fields.items():
        assert up.requests[0].header(name) == value, name


def test_refused_requests_are_logged_with_method_and_target(upstreams, balancer, caplog):
    # Rule: a request refused with 400, 431 or 413 is logged with its method and target whenever
    # its request line was readable (name_request), not as "- - -".
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True, max_body_size=1000)
    cases = [
        (b"GET /bad-host HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "GET /bad-host HTTP/1.1"),
        (b"GET /long-field HTTP/1.1\r\nHost: t\r\nX-Long: " + b"l" * 9000 + b"\r\n\r\n", 431,
         "GET /long-field HTTP/1.1"),
        (b"POST /too-big HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", 413,
         "POST /too-big HTTP/1.1"),
        (b"PUT /zero-nine\r\n", 400, None),  # HTTP/0.9: no readable request line
    ]
    for data, status, _ in cases:
        with RawClient(b.port) as client:
            assert client.request(data).status == status
    assert wait_until(lambda: len([r for r in caplog.records
                                   if r.name == "load_balancer.access"]) >= len(cases), timeout=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "load_balancer.access"]
    for _, status, request_line in cases:
        if request_line is None:
            continue
        assert any(f'"{request_line}" {status} ' in line for line in lines), (request_line, lines)
    assert up.requests == []


# ---------------------------------------------------------------------------------------------------
# 10. Logs under failure, and no stale reason
# ---------------------------------------------------------------------------------------------------

def test_dead_upstreams_under_a_burst_log_a_handful_of_lines_not_one_a_request(balancer, caplog):
    # Rules: FailureLog writes the first failure of an upstream, then one summary with a count per
    # LOG_SUMMARY_SECONDS; the counts add up to every failure, so nothing is lost either; the
    # balancer's own 502 answers are not logged one by one as WARNINGs (reject logs at DEBUG).
    assert lb.LOG_SUMMARY_SECONDS == 0.3  # short_log_summaries
    caplog.set_level(logging.WARNING, logger="load_balancer")
    dead = [refused_url(), refused_url()]
    b = balancer(dead, admin_port=free_port())
    statuses = collections.Counter()
    lock = threading.Lock()

    def burst(n: int, start: int) -> None:
        for i in range(n):
            status = get(b.port, f"/burst{start + i}").status
            with lock:
                statuses[status] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=burst, args=(25, 25 * k)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    assert statuses == {502: 200}, statuses
    failures = {url: backend_status(b, url)["errors"]["connect"] for url in dead}
    assert all(n >= 100 for n in failures.values()), failures

    summary = re.compile(r"upstream (\S+): (\d+) more failed request\(s\) in the last 0\.3s "
                         r"\(connect: (\d+)\)$")

    def logged(url: str) -> int:
        """Failures of `url` the log accounts for: its first line plus the summaries' counts."""
        lines = warnings_naming(caplog, url)
        firsts = [line for line in lines if f"-> {url}: cannot connect" in line]
        counts = [int(m.group(2)) for m in map(summary.match, lines) if m and m.group(1) == url]
        return len(firsts) + sum(counts)

    assert wait_until(lambda: all(logged(url) == failures[url] for url in dead), timeout=3), \
        {url: (logged(url), failures[url]) for url in dead}
    handful = 4 + int(elapsed / 0.3)  # first + ejection + one summary a period (+ the last one)
    for url in dead:
        lines = warnings_naming(caplog, url)
        assert 3 <= len(lines) <= handful, (len(lines), handful, lines)
        assert any(summary.match(line) for line in lines), lines
    # Nor one line a request elsewhere: the 502s themselves are not logged one by one.
    everything = warnings_naming(caplog, "")
    assert len(everything) <= 2 * handful + 2, (len(everything), everything[:10])


def test_status_reason_is_not_stale_once_an_ejection_ended(upstreams, balancer):
    # Rule: /status says "back in rotation" once fail_timeout has passed, not the ejection's
    # "out for ..." reason that no longer holds.
    ok, = upstreams(1)
    dead = refused_url()
    b = balancer([dead, ok.url], max_fails=1, fail_timeout=0.3, admin_port=free_port())
    assert get(b.port).status == 200
    entry = backend_status(b, dead)
    assert entry["ejected"] and entry["reason"].startswith("out for 0.3s after 1 failed requests"), entry
    assert wait_until(lambda: backend_status(b, dead)["state"] == "up", timeout=3)
    entry = backend_status(b, dead)
    assert entry["reason"] == "back in rotation: its fail timeout passed", entry
    assert not entry["ejected"], entry


# ---------------------------------------------------------------------------------------------------
# 11. Small things
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "BREW"])
def test_admin_status_other_methods_get_405_with_allow(upstreams, balancer, method):
    # Rule: every method the admin listener has no route for gets 405 with Allow, in JSON on API
    # paths and plain text on the dashboard, never http.server's HTML 501.
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    with RawClient(b.admin_port) as admin:
        r = admin.request(b"%s /status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
                          % method.encode())
        assert r.status == 405, r
        assert r.header("Allow") == "GET, HEAD", r
        assert r.header("Content-Type") == "application/json", r
        assert json.loads(r.body) == {"error": f"{method} is not allowed here; allowed: GET, HEAD",
                                      "status": 405}
        r = admin.request(b"%s / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
                          % method.encode())
        assert r.status == 405 and r.header("Allow") == "GET, HEAD", r
        assert r.header("Content-Type") == "text/plain; charset=utf-8", r
        assert r.body.startswith(b"405 Method Not Allowed: "), r
        # HEAD is allowed where GET is: the head of GET's answer, no body
        r = admin.request(b"HEAD /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", method="HEAD")
        assert r.status == 200 and r.header("Content-Type") == "application/json", r
        assert r.body == b"" and int(r.header("Content-Length")) > 0, r
        # and a POST-only endpoint gets 405 with its own Allow
        r = admin.request(b"%s /backends/x/drain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 0\r\n\r\n" % (b"GET" if method == "POST" else method.encode()))
        assert r.status == 405 and r.header("Allow") == "POST", r


def test_refused_and_failed_totals_count_the_balancers_own_answers_apart(raw_upstream, balancer):
    # Rule: refused_total counts the 4xx the balancer answered itself (not the app's 4xx);
    # failed_total the 5xx it answered itself.
    app = App(raw_upstream)
    b = balancer([app.url], max_body_size=1000, admin_port=free_port())
    with RawClient(b.port) as client:
        assert client.request(b"GET / HTTP/1.1\r\n\r\n").status == 400          # no Host
    assert get(b.port, "/f", headers={"X-Long": "l" * 9000}).status == 431
    assert get(b.port, "/big", method="POST", body=b"b" * 1001).status == 413
    assert get(b.port, "/missing").status == 404                                  # the app's
    assert get(b.port, "/garbage").status == 502
    assert get(b.port, "/fine").status == 200
    status = admin_status(b.admin_port)
    assert (status["refused_total"], status["failed_total"]) == (3, 1), status
    assert status["responses"] == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 4, "5xx": 1}, status
    assert status["requests_total"] == 6, status


def test_backend_url_with_credentials_is_refused_in_one_line(cli):
    # Rule: user:password@ in a backend URL is refused (it would go out in clear, and nobody would
    # send it as Authorization anyway): exit 2, one line naming the reason.
    p = cli(["--port", "0", "--backend", "http://user:pw@127.0.0.1:8001"])
    assert p.proc.wait(10) == 2
    assert p.wait_for_line("credentials", timeout=5)
    assert p.wait_ended(5)
    lines = [line for line in p.stderr_text().splitlines() if line.strip()]
    assert lines == [f"{p.prog}: error: invalid backend URL 'http://user:pw@127.0.0.1:8001': "
                     "credentials in backend URLs are not supported (see --help)"], lines


def test_request_header_fields_keep_their_order_end_to_end(raw_upstream, balancer):
    # Rule: fields reach the upstream in the client's order; the balancer's rewrites (framing,
    # X-Forwarded-For) stay where the client put them; Host is first, X-Forwarded-Host/-Proto and
    # the request ID last.
    heads = []

    def serve(conn, up):
        while data := up.read_request(conn):
            heads.append(data)
            conn.sendall(response(200, b"ok\n"))

    up = raw_upstream(serve)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        r = client.request(b"POST /order HTTP/1.1\r\nX-First: 1\r\nHost: test.local\r\n"
                           b"Content-Length: 4\r\nX-Middle: 2\r\nX-Forwarded-For: 203.0.113.9\r\n"
                           b"Accept: */*\r\nX-Last: 3\r\n\r\nbody")
    assert r.status == 200, r
    head, _, body = heads[0].partition(b"\r\n\r\n")
    assert body == b"body"
    request_line, fields = parse_head(head + b"\r\n")
    assert request_line == "POST /order HTTP/1.1"
    assert [name for name, _ in fields] == [
        "Host", "X-First", "Content-Length", "X-Middle", "X-Forwarded-For", "Accept", "X-Last",
        "X-Forwarded-Host", "X-Forwarded-Proto", "X-Request-ID"], fields
    assert header(fields, "X-Forwarded-For") == "127.0.0.1"  # the client's own is replaced (issue 20)
