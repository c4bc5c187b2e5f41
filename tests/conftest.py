"""Shared fixtures: real upstream servers on ephemeral 127.0.0.1 ports, a balancer started in-process,
and raw-socket clients for byte-level assertions; and the helpers more than one test module needs
(free ports, wait_until, a held /slow upstream handler, /proc readers for processes and sockets).

Every socket made here has a timeout, and every server is stopped at the end of the test that
started it.
"""

from __future__ import annotations

import compileall
import contextlib
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import load_balancer as lb  # noqa: E402

# Compiled once for the whole run, even where PYTHONDONTWRITEBYTECODE is set: every balancer the
# tests start as a process (`python -m load_balancer`, and each worker, which imports the module)
# then reads the bytecode instead of compiling 6,000 lines again (a fifth of a second of CPU each).
compileall.compile_file(str(ROOT / "load_balancer.py"), quiet=1)

SOCKET_TIMEOUT = 10.0
# The `websockets` package's clients and servers in tests: bounded waits, no pings or compression
# to blur what is measured, and messages up to 8 MiB (it refuses over 1 MiB unless told otherwise).
WEBSOCKET_MAX_MESSAGE = 8 << 20
WEBSOCKET_CLIENT = dict(open_timeout=5, close_timeout=2, ping_interval=None, max_size=WEBSOCKET_MAX_MESSAGE,
                        compression=None)
WEBSOCKET_SERVER = WEBSOCKET_CLIENT
# How late a timeout may fire on 2 busy cores: an upper bound on a wait is the timeout plus this.
# Lower bounds need none (a deadline cannot fire early).
SLACK = 2.5
# Tests that need a system program (Chromium, nginx, HAProxy) skip with a reason where it is
# missing; .ci/run installs them and sets this, which turns such a skip into a failure.
REQUIRE_SYSTEM_PROGRAMS = os.environ.get("LB_REQUIRE_SYSTEM_PROGRAMS") == "1"


# ---------------------------------------------------------------------------------------------------
# Byte-level helpers
# ---------------------------------------------------------------------------------------------------

def read_head(sock_file) -> bytes:
    """Read one message head (through the blank line) from a buffered socket file."""
    lines = []
    while True:
        line = sock_file.readline(65537)
        if not line:
            raise EOFError(b"".join(lines))
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a head into its first line and (name, value) pairs, names as sent."""
    lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
    return lines[0], fields


def header(fields: list[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in fields if n.lower() == name.lower()]
    return ", ".join(values) if values else None


def read_chunked(sock_file) -> bytes:
    body = bytearray()
    while True:
        size_line = sock_file.readline(1026)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while sock_file.readline(65537) not in (b"\r\n", b""):
                pass
            return bytes(body)
        body += sock_file.read(size)
        assert sock_file.read(2) == b"\r\n"


def read_body(sock_file, fields, status: int = 200, method: str = "GET") -> bytes:
    """Read a message body framed per RFC 9112 section 6.3 (request or response)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    te = header(fields, "Transfer-Encoding")
    if te is not None:
        assert te.lower() == "chunked", te
        return read_chunked(sock_file)
    length = header(fields, "Content-Length")
    if length is not None:
        return sock_file.read(int(length))
    if status == 0:  # a request without framing has no body
        return b""
    return sock_file.read()


class Response:
    """One response as a test client read it: the status line, the fields (names as sent) and the
    body; a strict reader also says how the body was framed, which interim (1xx) statuses came
    before it and the trailer fields."""

    def __init__(self, status_line: str, fields, body: bytes, *, framing: str | None = None,
                 interim=(), trailers=()):
        self.status_line = status_line
        self.status = int(status_line.split(" ")[1])
        self.fields = fields
        self.body = body
        self.framing, self.interim, self.trailers = framing, interim, trailers

    def header(self, name: str) -> str | None:
        return header(self.fields, name)

    def headers_named(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n.lower() == name.lower()]

    def connection_tokens(self) -> set:
        return {t.strip().lower() for v in self.headers_named("Connection") for t in v.split(",") if t.strip()}

    def __repr__(self):
        return f"<Response {self.status_line!r} {self.fields!r} {self.body[:80]!r}>"


class RawClient:
    """One client connection speaking raw bytes, reading responses with framing checks."""

    def __init__(self, port: int, timeout: float = SOCKET_TIMEOUT, *, host: str = "127.0.0.1",
                 source: str | None = None):
        """`source`: the local address to connect from (any of 127.0.0.0/8 works on Linux)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> Response:
        head = read_head(self.file)
        while True:  # skip interim responses
            status_line, fields = parse_head(head)
            if not status_line.split(" ")[1].startswith("1"):
                break
            head = read_head(self.file)
        status = int(status_line.split(" ")[1])
        return Response(status_line, fields, read_body(self.file, fields, status, method))

    def request(self, data: bytes, method: str = "GET") -> Response:
        self.send(data)
        return self.response(method)

    def read_until_close(self) -> bytes:
        """Everything left until the peer closes; raises socket.timeout if it never does."""
        chunks = []
        while True:
            data = self.file.read1(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True once the peer has closed (EOF or reset) within timeout, False if it stays open."""
        self.sock.settimeout(timeout)
        try:
            return self.file.read1(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def get(port: int, path: str = "/", headers: dict | None = None, method: str = "GET",
        body: bytes | None = None, *, host: str = "127.0.0.1", source: str | None = None) -> Response:
    """One request on a fresh connection with Connection: close (to `host`, from `source`)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test.local", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with RawClient(port, host=host, source=source) as client:
        return client.request(data, method)


# ---------------------------------------------------------------------------------------------------
# Upstreams
# ---------------------------------------------------------------------------------------------------

def request(target: str, method: str = "GET", body: bytes | None = None, close: bool = False,
            host: str = "test.local") -> bytes:
    """Raw bytes of a small HTTP/1.1 request (Content-Length when there is a body)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if close:
        lines.append("Connection: close")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class RecordedRequest:
    def __init__(self, method, target, version, fields, body):
        self.method, self.target, self.version = method, target, version
        self.fields, self.body = fields, body

    def header(self, name):
        return header(self.fields, name)

    def __repr__(self):
        return f"<RecordedRequest {self.method} {self.target} {self.fields!r} {len(self.body)}B>"


Handler = Callable[["UpstreamHandler", RecordedRequest], None]


def default_handler(h: "UpstreamHandler", req: RecordedRequest) -> None:
    """200 text/plain naming the upstream, method and target; HEAD gets the same head, no body."""
    body = f"upstream {h.server.server_port} {req.method} {req.target}\n".encode()
    h.send_response(200)
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", str(len(body)))
    h.send_header("X-Upstream-Port", str(h.server.server_port))
    h.end_headers()
    if req.method != "HEAD":
        h.wfile.write(body)


class SlowUpstreamHandler:
    """Upstream handler: a request for /slow waits for `release` (SOCKET_TIMEOUT at most) and then,
    like every other request, gets default_handler's answer. `arrived` is set when /slow reached
    the upstream. Tests set `release` in a `finally`, so that no handler is left waiting."""

    def __init__(self):
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __call__(self, h: "UpstreamHandler", req: RecordedRequest) -> None:
        if req.target == "/slow":
            self.arrived.set()
            self.release.wait(SOCKET_TIMEOUT)
        default_handler(h, req)


class UpstreamHandler(BaseHTTPRequestHandler):
    """Records each request (head as sent, body decoded) and lets the test's function answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = SOCKET_TIMEOUT

    def handle_one_request(self):
        try:
            head = read_head(self.rfile)
        except (EOFError, OSError):
            self.close_connection = True
            return
        request_line, fields = parse_head(head)
        self.raw_requestline = request_line.encode("latin-1")
        self.requestline = request_line
        self.command, self.path, self.request_version = request_line.split(" ", 2)
        self.close_connection = (header(fields, "Connection") or "").lower() == "close"
        body = read_body(self.rfile, fields, status=0, method=self.command)
        req = RecordedRequest(self.command, self.path, self.request_version, fields, body)
        self.server.upstream.record(req)
        self.server.upstream.handler(self, req)
        self.wfile.flush()

    def log_message(self, *args):
        pass


# What a peer that went away looks like to a server writing to it or reading from it.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 drops SYNs when tests open many connections at once

    def handle_error(self, request, client_address):
        """The balancer closing a connection that a handler still writes to (after a drain timeout
        or a health-probe timeout, say) is no error here; anything else is printed as socketserver
        prints it."""
        if isinstance(sys.exc_info()[1], CLIENT_GONE):
            return
        super().handle_error(request, client_address)


class Upstream:
    """A real HTTP/1.1 server on 127.0.0.1 (ephemeral port) served from a thread."""

    server_class = UpstreamServer

    def __init__(self, handler: Handler = default_handler, port: int = 0):
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self.server = None
        self.holder: socket.socket | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.holder is not None:
            self.holder.close()
            self.holder = None
        server = self.server_class(("127.0.0.1", self.port), UpstreamHandler)
        server.upstream = self
        self.server, self.port = server, server.server_port
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self, hold: bool = True) -> None:
        """Stop listening (connections to the port are then refused). The port stays held until
        start() or release (see hold_port)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            if hold:
                self.holder = hold_port(self.port)

    def release(self) -> None:
        self.stop(hold=False)
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    def record(self, req: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)


class RawUpstream:
    """A TCP server whose connections are handed to `serve(conn, upstream)`; every byte it receives
    is recorded in `received` (all connections, in order) so tests can assert what reached it."""

    def __init__(self, serve: Callable[[socket.socket, "RawUpstream"], None]):
        self.serve = serve
        self.received = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recv(self, conn: socket.socket, n: int = 65536) -> bytes:
        data = conn.recv(n)
        with self._lock:
            self.received += data
        return data

    def read_request(self, conn: socket.socket) -> bytes:
        """Receive until a complete head (and its Content-Length body, if any) has arrived."""
        data = b""
        while b"\r\n\r\n" not in data:
            more = self.recv(conn)
            if not more:
                return data
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        _, fields = parse_head(head + b"\r\n")
        need = int(header(fields, "Content-Length") or 0) - len(rest)
        while need > 0:
            more = self.recv(conn)
            if not more:
                break
            need -= len(more)
            data += more
        return data

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(SOCKET_TIMEOUT)
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()


def free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that were free a moment ago (for listeners that need a number
    up front). All n are bound at once, so they differ."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.settimeout(SOCKET_TIMEOUT)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def port_of(resp) -> int:
    """The port of the default upstream handler that answered (its X-Upstream-Port header)."""
    value = resp.header("X-Upstream-Port")
    assert value is not None, resp
    return int(value)


def refuses(port: int) -> bool:
    """True if a TCP connect to 127.0.0.1:port is refused right now."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    s.close()
    return False


def hold_port(port: int) -> socket.socket | None:
    """A socket bound to `port` that never listens: connects there are refused, and no process
    binding port 0 is given the port meanwhile (Linux passes over ports in use). Without it, under
    `pytest -n 2` the other process's next listener could open on a port that a balancer here
    still sends to as a dead upstream."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its connections' TIME_WAIT
    try:
        holder.bind(("127.0.0.1", port))
    except OSError:
        holder.close()
        return None
    return holder


_refused_ports: list[socket.socket] = []  # held for the whole run


def pytest_sessionfinish(session) -> None:
    for holder in _refused_ports:
        holder.close()


def refused_url() -> str:
    """A URL on 127.0.0.1 where connects are refused for the whole run (see hold_port)."""
    holder = hold_port(0)
    _refused_ports.append(holder)
    return f"http://127.0.0.1:{holder.getsockname()[1]}"


def require_program(*names: str) -> str:
    """The path of the first of `names` installed (PATH, then the sbin directories), or a skip
    with the reason (a failure under LB_REQUIRE_SYSTEM_PROGRAMS=1, as in CI)."""
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
        if path:
            return path
    reason = f"{' or '.join(names)} is not installed"
    if REQUIRE_SYSTEM_PROGRAMS:
        pytest.fail(reason + ", and LB_REQUIRE_SYSTEM_PROGRAMS=1 requires it")
    pytest.skip(reason + " (CI installs it; apt-get install " + names[0] + ")")


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------

HEALTH = "/health"


class HealthSwitch:
    """Upstream handler: HEALTH answers 200 ("ok") while `healthy`, else `failing_code` ("sick");
    every other path gets default_handler."""

    def __init__(self, healthy: bool = True, failing_code: int = 500):
        self.healthy = healthy
        self.failing_code = failing_code

    def __call__(self, h, req):
        if not req.target.startswith(HEALTH):
            return default_handler(h, req)
        body = b"ok\n" if self.healthy else b"sick\n"
        h.send_response(200 if self.healthy else self.failing_code)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def upstreams():
    """Factory: upstreams(n, handler=default_handler) -> list[Upstream], stopped after the test."""
    made: list = []

    def make(n: int = 1, handler: Handler = default_handler) -> list[Upstream]:
        new = [Upstream(handler) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for u in made:
        u.release()


@pytest.fixture
def raw_upstream():
    """Factory: raw_upstream(serve) -> RawUpstream, stopped after the test."""
    made: list = []

    def make(serve) -> RawUpstream:
        u = RawUpstream(serve)
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


@pytest.fixture
def balancer():
    """Factory: balancer(urls, **config) -> started lb.LoadBalancer on 127.0.0.1, closed after the
    test. Active health checks are off unless the test sets health_interval."""
    made: list = []

    def make(urls, **options) -> "lb.LoadBalancer":
        options.setdefault("health_interval", 0)
        options.setdefault("drain_timeout", 2)
        options.setdefault("host", "127.0.0.1")
        config = lb.Config(port=0, backends=tuple(urls), **options)
        b = lb.LoadBalancer(config)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


class ChildProcess:
    """A child process whose output a thread per pipe reads line by line, so that a test can wait
    for a line and no pipe ever fills. `merge`: stderr goes into stdout, one stream; else `lines`
    is stderr (the balancer's log) and `stdout_lines` what it prints. `new_session`: the leader of
    a process group of its own (killed with its children). Stopped by PID, never by name."""

    def __init__(self, args: list, *, cwd=None, env=None, merge: bool = True, new_session: bool = True):
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                                     start_new_session=new_session)
        self.lines: list[str] = []
        self.stdout_lines: list[str] = self.lines if merge else []
        self.ended = False
        self._cond = threading.Condition()
        pipes = [(self.proc.stdout, self.lines)] if merge else [
            (self.proc.stderr, self.lines), (self.proc.stdout, self.stdout_lines)]
        self.readers = [threading.Thread(target=self._read, args=pipe, daemon=True) for pipe in pipes]
        for reader in self.readers:
            reader.start()

    def _read(self, pipe, lines: list) -> None:
        for raw in pipe:
            with self._cond:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        if lines is self.lines:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, needle: str, timeout: float = 10.0) -> str | None:
        """The first line that contains `needle`, once there is one; None if the output ended or
        `timeout` passed first."""
        with self._cond:
            self._cond.wait_for(lambda: self.ended or any(needle in line for line in self.lines), timeout)
            return next((line for line in self.lines if needle in line), None)

    def wait_ended(self, timeout: float = 10.0) -> bool:
        """Every pipe read to its end (the process, and whatever inherited its pipes, is gone)."""
        for reader in self.readers:
            reader.join(timeout)
        return not any(reader.is_alive() for reader in self.readers)

    def kill(self) -> None:
        """SIGKILL to the process (its group when it leads one), then wait for it and its pipes."""
        if self.proc.poll() is None:
            try:
                if self.proc.pid == os.getpgid(self.proc.pid):
                    os.killpg(self.proc.pid, 9)
                else:
                    os.kill(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(5)
        for reader in self.readers:
            reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()


class CliProcess(ChildProcess):
    """`python -m load_balancer ARGS` as a child process (the compiled module: test_cli.py runs
    `python load_balancer.py` itself); learns its port from the start-up line."""

    # The name it gives itself in usage and error lines (load_balancer.program_name).
    prog = f"{os.path.basename(sys.executable)} -m load_balancer"

    def __init__(self, args: list[str]):
        super().__init__([sys.executable, "-m", "load_balancer", *args], cwd=ROOT, merge=False)
        self.port = None
        self.admin_port = None

    def wait_ready(self, timeout: float = 10.0) -> "CliProcess":
        """Wait for the start-up line (http:// or https://) and take the ports from it."""
        line = self.wait_for_line("listening on http", timeout)
        assert line, f"no start-up line; stderr so far: {self.lines}"
        self.port = int(line.split("listening on http", 1)[1].split("://", 1)[1].split()[0].rsplit(":", 1)[1])
        if any(a == "--admin-port" for a in self.proc.args):
            admin = self.wait_for_line("admin on http://", timeout)
            assert admin, f"no admin line; stderr so far: {self.lines}"
            self.admin_port = int(admin.split("admin on http://", 1)[1].split("/")[0].rsplit(":", 1)[1])
        return self

    def stderr_text(self) -> str:
        return self.output()

    def stop(self, sig: int = 15, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)
            raise


@pytest.fixture
def cli():
    """Factory: cli(args) -> CliProcess (not yet waited for); killed after the test if still running."""
    made: list = []

    def make(args: list[str]) -> CliProcess:
        p = CliProcess(args)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill()


def admin_status(admin_port: int) -> dict:
    """GET /status on an admin listener, as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=SOCKET_TIMEOUT)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        assert response.status == 200, response.status
        return json.loads(response.read())
    finally:
        conn.close()


def admin_post(admin_port: int, name: str, action: str) -> dict:
    """POST /backends/<name>/<action> (drain, maint, ready) on an admin listener: the backend's
    /status entry after it."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=SOCKET_TIMEOUT)
    try:
        conn.request("POST", f"/backends/{name}/{action}")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll a condition that has no event to wait on (e.g. another process's state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()



@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tests/browser.py) shared by one module's tests; skips where it is missing."""
    from browser import Chromium
    require_program("chromium")
    chromium = Chromium(width=1280, height=900)
    try:
        chromium.call("Network.enable")
        yield chromium
    finally:
        chromium.close()


class ProxiedConnections:
    """A raw upstream that reads each connection's PROXY header, then answers HTTP/1.1 requests
    with the source it carried (an upstream behind send-proxy); records (header, requests) per connection and when each ended."""

    def __init__(self):
        self.connections: list = []

    def __call__(self, conn, up):
        record = {"header": None, "requests": 0, "ended": False}
        self.connections.append(record)
        data = b""
        try:
            while record["header"] is None:
                more = up.recv(conn)
                if not more:
                    return
                data += more
                header, length = lb.parse_proxy_header(data)
                if header is not None:
                    record["header"], data = header, data[length:]
            while True:
                while b"\r\n\r\n" not in data:
                    more = up.recv(conn)
                    if not more:
                        return
                    data += more
                data = data.partition(b"\r\n\r\n")[2]
                record["requests"] += 1
                source = record["header"].source
                body = f"{source[0]} {source[1]}".encode() if source else b"local"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        finally:
            record["ended"] = True


# ---------------------------------------------------------------------------------------------------
# Peers: nginx and HAProxy run in the foreground on a file of a test's, and the upstreams they use
# ---------------------------------------------------------------------------------------------------

PEERS = ("nginx", "haproxy")
PEER_TIMEOUT = 5.0
# The start of an nginx.conf that runs unprivileged in the directory it is given (-p): every path
# relative, logs to stderr. A test adds its server blocks and closes the http block.
NGINX_PREAMBLE = """pid nginx.pid;
lock_file nginx.lock;
error_log stderr warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
"""


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT).close()
        return True
    except OSError:
        return False


def exchange(port: int, path: str = "/", headers: dict | None = None, *,
             tls: ssl.SSLContext | None = None) -> tuple[int, bytes, bytes]:
    """get(), with the response head: (status, head, body)."""
    lines = [f"GET {path} HTTP/1.1", "Host: test.local", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT) as raw:
            sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return 0, b"", b""
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else 0), head, body


class AnswerHandler(BaseHTTPRequestHandler):
    """An upstream's handler that answers every GET 200 with the body answer() makes, quietly."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two sends: no delayed-ACK stall between them
    timeout = PEER_TIMEOUT

    def answer(self) -> bytes:
        raise NotImplementedError

    def do_GET(self):
        body = self.answer()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class PortHandler(AnswerHandler):
    """Answers 200 with its server's port as the body; records path and head of each request."""

    def answer(self) -> bytes:
        self.server.record(self.path, self.headers)
        return str(self.server.port).encode()


class PortServer(ThreadingHTTPServer):
    """A real HTTP/1.1 upstream on an ephemeral 127.0.0.1 port, served from a thread. stop() also
    closes the keep-alive connections the peer holds, so that a stopped upstream is really gone."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), PortHandler)
        if tls:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.seen: list = []
        self.connections: set = set()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle_error(self, request, client_address):
        """A peer closing a connection the handler reads or writes (HAProxy ends its health checks
        with a reset) is no error here; anything else is printed as socketserver prints it."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def get_request(self):
        sock, address = super().get_request()
        sock.settimeout(PEER_TIMEOUT)
        with self.lock:
            self.connections.add(sock)
        return sock, address

    def record(self, path, headers) -> None:
        with self.lock:
            self.seen.append((path, headers))

    def proxied(self) -> list:
        """(path, headers) of the requests other than health checks."""
        with self.lock:
            return [(path, headers) for path, headers in self.seen if path != "/health"]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with self.lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def start_peer(target: str, text: str, directory: Path) -> subprocess.Popen:
    """nginx or HAProxy in the foreground on the exported file, as its comment says to run it."""
    binary = require_program(target)
    directory.mkdir(exist_ok=True)
    name = "nginx.conf" if target == "nginx" else "haproxy.cfg"
    (directory / name).write_text(text)
    if target == "nginx":
        command = [binary, "-p", str(directory), "-c", str(directory / name), "-g", "daemon off;"]
    else:
        command = [binary, "-db", "-f", str(directory / name)]
    with open(directory / "peer.log", "wb") as log:
        return subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def stop_peer(process: subprocess.Popen) -> None:
    """SIGTERM (both stop at once on it), then SIGKILL by PID for whatever is left, workers too."""
    children = proc_children(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def running_peer(target: str, text: str, directory: Path, *ports: int, timeout: float = 5.0):
    """start_peer, then wait until it accepts on every one of `ports` (its log in the failure);
    stop_peer when the block ends, however it ends."""
    peer = start_peer(target, text, directory)
    try:
        assert wait_until(lambda: all(accepts(port) for port in ports), timeout=timeout), (
            directory / "peer.log").read_text()
        yield peer
    finally:
        stop_peer(peer)


def check_file(target: str, text: str, directory: Path) -> subprocess.CompletedProcess:
    """``nginx -t -p DIR -c FILE`` or ``haproxy -c -f FILE`` on the exported text."""
    binary = require_program(target)
    directory.mkdir(exist_ok=True)
    if target == "nginx":
        path = directory / "nginx.conf"
        path.write_text(text)
        command = [binary, "-t", "-p", str(directory), "-c", str(path)]
    else:
        path = directory / "haproxy.cfg"
        path.write_text(text)
        command = [binary, "-c", "-f", str(path)]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=10,
                          stdin=subprocess.DEVNULL)


def make_certificate(directory: Path, cert: str = "cert.pem", key: str = "key.pem") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made with the openssl command."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("the openssl command is not installed")
    cert_path, key_path = directory / cert, directory / key
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key_path), "-out", str(cert_path)],
                   check=True, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    return cert_path, key_path




# ---------------------------------------------------------------------------------------------------
# Processes and sockets as /proc shows them (Linux)
# ---------------------------------------------------------------------------------------------------

class ProcStat(NamedTuple):
    state: str      # R, S, D, T, t, Z, X, ...
    ppid: int
    pgrp: int
    session: int


def proc_stat(pid: int) -> ProcStat | None:
    """The fields of /proc/<pid>/stat the tests use, or None if the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("latin-1")
    except OSError:  # FileNotFoundError, ProcessLookupError: gone
        return None
    fields = data.rpartition(")")[2].split()  # after the command name, which may hold anything
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


def live_processes(where: Callable[[ProcStat], bool]) -> set[int]:
    """PIDs of the live processes (not zombies) whose stat satisfies `where`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat.state not in ("Z", "X") and where(stat):
                found.add(int(entry))
    return found


def proc_cmdline(pid: int) -> str:
    """The command line of a process, arguments joined by spaces; "" if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_children(pid: int) -> set[int]:
    """Child PIDs (zombies included): /proc/<pid>/task/*/children, or the ppid field of every
    /proc/*/stat where the kernel has no children file."""
    files = glob.glob(f"/proc/{pid}/task/*/children")
    kids: set[int] = set()
    if files:
        for name in files:
            try:
                with open(name) as f:
                    kids.update(int(x) for x in f.read().split())
            except OSError:
                pass
    else:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = proc_stat(int(entry))
                if stat is not None and stat.ppid == pid:
                    kids.add(int(entry))
    return kids


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets (IPv4 and IPv6) listening on `port`, whoever holds them."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(cols[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets among a process's open file descriptors (empty if it is gone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


# ---------------------------------------------------------------------------------------------------
# The CLI with --workers
# ---------------------------------------------------------------------------------------------------

def worker_pids(pid: int) -> set[int]:
    """Live worker processes of the supervisor `pid` (children started with --worker-process)."""
    return {k for k in proc_children(pid) if alive(k) and "--worker-process" in proc_cmdline(k)}


def all_workers_listening(p: CliProcess, n: int) -> bool:
    """The CLI process `p` has exactly n workers, each holding a socket listening on its port."""
    kids = worker_pids(p.proc.pid)
    return len(kids) == n and all(listening_inodes(p.port) & socket_inodes(k) for k in kids)


def must_get(p: CliProcess, target: str = "/") -> Response:
    """A GET through the CLI process that must answer 200; on failure, say what it logged."""
    try:
        r = get(p.port, target)
    except OSError as error:
        raise AssertionError(f"GET {target}: {error!r}; balancer stderr:\n{p.stderr_text()}") from None
    assert r.status == 200, (r, p.stderr_text())
    return r
