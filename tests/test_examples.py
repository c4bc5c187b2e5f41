"""examples/server.py, the example upstream used by `make demo`, tested through real sockets.

Each test starts `python examples/server.py` as a child process on a free 127.0.0.1 port (or, for
the last test, the server in-process via make_server()). Every socket has a timeout and every
child process is stopped by PID at the end of its test.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ChildProcess, RawClient, Response, free_port, header, parse_head

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "server.py"
TIMEOUT = 10.0          # every socket
START_TIMEOUT = 10.0    # until the server accepts connections
EXIT_TIMEOUT = 10.0     # until the server exits after a signal


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

class ServerProcess(ChildProcess):
    """`python examples/server.py --port PORT ARGS` with its output collected line by line."""

    def __init__(self, port: int, args: list[str]):
        self.port = port
        super().__init__([sys.executable, str(SERVER), "--port", str(port), *args], cwd=ROOT)

    def wait_for_output(self, needle: str, timeout: float = 5.0) -> bool:
        return self.wait_for_line(needle, timeout) is not None

    def wait_accepting(self) -> bool:
        """Poll until the port accepts a connection; False if the process exited first."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"server.py not accepting on {self.port} after {START_TIMEOUT} s; "
                             f"output: {self.output()!r}")

    def signal_and_wait(self, sig: int) -> int:
        os.kill(self.proc.pid, sig)
        rc = self.proc.wait(EXIT_TIMEOUT)
        self.wait_ended(EXIT_TIMEOUT)
        return rc


@pytest.fixture
def start_server():
    """Factory: start_server(*args) -> running ServerProcess on a free port; stopped after the test."""
    made: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        for _ in range(3):  # another process may take the free port before the server binds it
            server = ServerProcess(free_port(), list(args))
            made.append(server)
            if server.wait_accepting():
                return server
            server.proc.wait(EXIT_TIMEOUT)
            if "in use" not in server.output():
                break
        raise AssertionError(f"server.py exited early with {server.proc.returncode}: "
                             f"{server.output()!r}")

    yield start
    for server in made:
        server.kill()


class Conn(RawClient):
    """conftest's raw client, stricter: HTTP/1.1 responses, every one with Content-Length."""

    def __init__(self, port: int):
        super().__init__(port, timeout=TIMEOUT)

    def request(self, method: str = "GET", path: str = "/", headers: dict | None = None,
                body: bytes = b"", raw_body: bytes | None = None) -> Response:
        lines = [f"{method} {path} HTTP/1.1", "Host: test.local"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if raw_body is None and body:
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(data + (raw_body if raw_body is not None else body))
        return self.response(method)

    def response(self, method: str = "GET") -> Response:
        head = b""
        while True:
            line = self.file.readline(65537)
            if not line:
                raise EOFError(f"connection closed; head so far {head!r}")
            head += line
            if line == b"\r\n":
                break
        status_line, fields = parse_head(head)
        assert status_line.startswith("HTTP/1.1 "), status_line
        assert header(fields, "Content-Length") is not None, head
        body = b"" if method == "HEAD" else self.file.read(int(header(fields, "Content-Length")))
        return Response(status_line, fields, body)


def request(port: int, method: str = "GET", path: str = "/", **kwargs) -> Response:
    with Conn(port) as conn:
        return conn.request(method, path, **kwargs)


def hello(port: int) -> bytes:
    return f"Hello from upstream on port {port}\n".encode()


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

def test_root_names_its_port(start_server):
    server = start_server()
    r = request(server.port, "GET", "/")
    assert r.status == 200
    assert r.header("content-type").startswith("text/plain")
    assert r.body == hello(server.port)
    assert r.header("content-length") == str(len(r.body))


@pytest.mark.parametrize("method,path", [("GET", "/some/path?x=1&y=2"), ("POST", "/"),
                                         ("PUT", "/a"), ("DELETE", "/b"), ("PURGE", "/c"),
                                         ("OPTIONS", "/")])
def test_any_method_and_path_names_its_port(start_server, method, path):
    server = start_server()
    r = request(server.port, method, path, body=b"payload" if method in ("POST", "PUT") else b"")
    assert (r.status, r.body) == (200, hello(server.port))


def test_health_fail_and_recover(start_server):
    server = start_server()
    r = request(server.port, "GET", "/health")
    assert (r.status, r.body) == (200, b"ok\n")

    r = request(server.port, "POST", "/health/fail")
    assert (r.status, r.body) == (200, b"health: failing\n")
    r = request(server.port, "GET", "/health")
    assert (r.status, r.body) == (503, b"failing\n")
    # failing health does not affect ordinary requests
    assert request(server.port, "GET", "/").body == hello(server.port)
    # and stays failing until told otherwise
    assert request(server.port, "GET", "/health").status == 503

    r = request(server.port, "POST", "/health/recover")
    assert (r.status, r.body) == (200, b"health: ok\n")
    r = request(server.port, "GET", "/health")
    assert (r.status, r.body) == (200, b"ok\n")


def test_health_switches_need_post(start_server):
    server = start_server()
    r = request(server.port, "GET", "/health/fail")
    assert r.status == 405
    assert r.header("allow") == "POST"
    assert request(server.port, "GET", "/health").status == 200


def test_fail_health_flag_starts_failing(start_server):
    server = start_server("--fail-health")
    assert request(server.port, "GET", "/health").status == 503
    assert request(server.port, "POST", "/health/recover").status == 200
    assert request(server.port, "GET", "/health").status == 200


def test_head_has_no_body(start_server):
    server = start_server()
    with Conn(server.port) as conn:
        r = conn.request("HEAD", "/")
        assert r.status == 200
        assert r.header("content-length") == str(len(hello(server.port)))
        r = conn.request("HEAD", "/health")
        assert r.status == 200
        # nothing was sent after the HEAD heads, so the next response parses cleanly
        assert conn.request("GET", "/").body == hello(server.port)


def test_keep_alive_two_requests_on_one_connection(start_server):
    server = start_server()
    with Conn(server.port) as conn:
        first = conn.request("GET", "/")
        second = conn.request("GET", "/health")
        assert (first.status, first.body) == (200, hello(server.port))
        assert (second.status, second.body) == (200, b"ok\n")
        assert "close" not in (first.header("connection") or "").lower()
        assert not conn.is_closed(timeout=0.2)


def test_keep_alive_after_request_bodies(start_server):
    """Bodies (Content-Length and chunked) are read and discarded, so the connection stays usable."""
    server = start_server()
    with Conn(server.port) as conn:
        r = conn.request("POST", "/upload", body=b"x" * 100_000)
        assert (r.status, r.body) == (200, hello(server.port))
        chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        r = conn.request("POST", "/upload", headers={"Transfer-Encoding": "chunked"},
                         raw_body=chunked)
        assert (r.status, r.body) == (200, hello(server.port))
        r = conn.request("POST", "/health/fail", body=b"ignored")
        assert r.status == 200
        r = conn.request("GET", "/health")
        assert (r.status, r.body) == (503, b"failing\n")


def test_connection_close_is_honoured(start_server):
    server = start_server()
    with Conn(server.port) as conn:
        r = conn.request("GET", "/", headers={"Connection": "close"})
        assert r.body == hello(server.port)
        assert (r.header("connection") or "").lower() == "close"
        assert conn.is_closed()


def test_invalid_content_length_is_400_and_closed(start_server):
    server = start_server()
    with Conn(server.port) as conn:
        conn.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n")
        r = conn.response()
        assert r.status == 400
        assert conn.is_closed()
    assert request(server.port, "GET", "/").status == 200  # the server is still fine


def test_quiet_by_default_and_sigterm_exits_0(start_server):
    server = start_server()
    for path in ("/", "/health", "/nope"):
        request(server.port, "GET", path)
    request(server.port, "POST", "/health/fail")
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and go away without reading
    assert server.signal_and_wait(signal.SIGTERM) == 0
    lines = server.output().splitlines()
    assert len(lines) == 1, lines  # the start-up line only
    assert f"http://127.0.0.1:{server.port}" in lines[0]


def test_sigint_exits_0_without_traceback(start_server):
    server = start_server()
    with Conn(server.port) as conn:  # an open keep-alive connection does not hold up the exit
        conn.request("GET", "/")
        assert server.signal_and_wait(signal.SIGINT) == 0
    output = server.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


def test_verbose_logs_requests(start_server):
    server = start_server("--verbose")
    request(server.port, "GET", "/logged-path")
    assert server.wait_for_output("/logged-path"), server.output()


def test_busy_port_exits_1_with_one_line():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        busy.settimeout(TIMEOUT)
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, str(SERVER), "--port", str(port)], cwd=ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=EXIT_TIMEOUT)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


def test_port_zero_reports_real_port():
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", "0"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stderr.readline()  # the start-up line comes before serving
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        assert request(port, "GET", "/").body == hello(port)
    finally:
        proc.kill()
        proc.wait(EXIT_TIMEOUT)
        proc.stderr.close()


def test_make_server_in_process():
    spec = importlib.util.spec_from_file_location("example_server", SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = module.make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        assert request(server.server_port, "GET", "/").body == hello(server.server_port)
        server.health_failing.set()
        assert request(server.server_port, "GET", "/health").status == 503
    finally:
        server.shutdown()
        server.server_close()
        thread.join(EXIT_TIMEOUT)
