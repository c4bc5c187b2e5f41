#!/usr/bin/env python3
"""Example upstream for load_balancer.py: a tiny HTTP/1.1 server that says which port it is on.

Usage:
    python examples/server.py --port 8001 [--host 127.0.0.1] [--fail-health] [--verbose]

Endpoints:
    GET  /health          200 "ok\\n", or 503 "failing\\n" while the server is told to fail
                          (any method works; HEAD gets the same head without a body)
    POST /health/fail     make /health answer 503 from now on; answers 200 "health: failing\\n"
    POST /health/recover  make /health answer 200 again;      answers 200 "health: ok\\n"
    anything else         any method, any path: 200 "Hello from upstream on port 8001\\n"

So, with three upstreams behind the balancer:
    curl http://localhost:8080/                          # ... port 8001, then 8002, then 8003
    curl -X POST http://localhost:8002/health/fail       # 8002 fails its health checks
    curl -X POST http://localhost:8002/health/recover    # and passes them again

`--fail-health` starts the server in the failing state. Every response is text/plain with a
Content-Length, and request bodies (Content-Length or chunked) are read and discarded, so
keep-alive connections work. Nothing is logged per request unless `--verbose` is given; one
start-up line (with the real port, also for `--port 0`) goes to stderr. Ctrl-C or SIGTERM stops
the server quietly with exit code 0; a port that is already in use gives exit code 1.

Standard library only. `make_server()` builds the server without serving, for use in-process.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROG = "server.py"
IDLE_TIMEOUT = 75.0  # seconds an idle keep-alive connection is kept (every socket has a timeout)
_READ_SIZE = 65536


class _BadRequest(Exception):
    pass


class UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "example-upstream/1.0"
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True

    # BaseHTTPRequestHandler dispatches to do_<METHOD>; every method (GET, POST, PURGE, ...) is
    # answered by _respond.
    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._respond
        raise AttributeError(name)

    def _respond(self) -> None:
        try:
            self._discard_body()
        except _BadRequest as exc:
            self.close_connection = True
            self._send(400, f"400 Bad Request: {exc}\n")
            return
        server: UpstreamServer = self.server  # type: ignore[assignment]
        path = self.path.split("?", 1)[0]
        if path in ("/health/fail", "/health/recover"):
            if self.command != "POST":
                self._send(405, "405 Method Not Allowed: use POST\n", [("Allow", "POST")])
                return
            if path == "/health/fail":
                server.health_failing.set()
            else:
                server.health_failing.clear()
            state = "failing" if server.health_failing.is_set() else "ok"
            if server.verbose:
                self.log_message("health is now %s", state)
            self._send(200, f"health: {state}\n")
        elif path == "/health":
            if server.health_failing.is_set():
                self._send(503, "failing\n")
            else:
                self._send(200, "ok\n")
        else:
            self._send(200, f"Hello from upstream on port {server.server_port}\n")

    def _send(self, status: int, text: str, extra_headers=()) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream-Port", str(self.server.server_port))
        for name, value in extra_headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- request bodies ------------------------------------------------------------------------

    def _discard_body(self) -> None:
        te = self.headers.get_all("Transfer-Encoding")
        cl = self.headers.get_all("Content-Length")
        if te:
            codings = [c.strip().lower() for c in ",".join(te).split(",")]
            if cl or codings[-1] != "chunked":
                raise _BadRequest("unsupported request framing")
            self._discard_chunked()
        elif cl:
            if len(cl) != 1 or not cl[0].strip().isdigit() or not cl[0].strip().isascii():
                raise _BadRequest("invalid Content-Length")
            self._discard(int(cl[0]))

    def _discard(self, n: int) -> None:
        while n > 0:
            data = self.rfile.read(min(n, _READ_SIZE))
            if not data:
                raise _BadRequest("body shorter than announced")
            n -= len(data)

    def _discard_chunked(self) -> None:
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _BadRequest("bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                while True:  # trailer fields, up to the blank line
                    trailer = self.rfile.readline(65537)
                    if not trailer.endswith(b"\n"):
                        raise _BadRequest("bad trailer")
                    if trailer in (b"\r\n", b"\n"):
                        return
            self._discard(size)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BadRequest("missing CRLF after chunk data")

    # -- logging -------------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        if self.server.verbose:
            super().log_message(format, *args)


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, fail_health: bool = False, verbose: bool = False):
        self.health_failing = threading.Event()
        if fail_health:
            self.health_failing.set()
        self.verbose = verbose
        super().__init__(address, UpstreamHandler)

    def handle_error(self, request, client_address) -> None:
        # A client that goes away mid-response is not worth a traceback on stderr.
        if self.verbose:
            exc = sys.exc_info()[1]
            sys.stderr.write(f"{PROG}: connection from {client_address[0]}:{client_address[1]}: "
                             f"{type(exc).__name__}: {exc}\n")


def make_server(host: str = "127.0.0.1", port: int = 0, fail_health: bool = False,
                verbose: bool = False) -> UpstreamServer:
    """Bind (but do not serve yet); raises OSError if the address is unavailable."""
    return UpstreamServer((host, port), fail_health=fail_health, verbose=verbose)


class _Stop(BaseException):
    pass


def _stop_handler(signum, frame):
    # Ignore further signals so a second Ctrl-C cannot interrupt the clean-up with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signum)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Example upstream for load_balancer.py: answers with its port; "
        "GET /health, POST /health/fail, POST /health/recover.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8001,
                        help="port to listen on (default 8001; 0 picks a free one)")
    parser.add_argument("--fail-health", action="store_true",
                        help="start with /health answering 503")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def _say(line: str) -> None:
    """One line to stderr in a single write, so lines of processes sharing a terminal don't mix."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _stop_handler)
    signal.signal(signal.SIGTERM, _stop_handler)
    server = None
    try:
        try:
            server = make_server(args.host, args.port, args.fail_health, args.verbose)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            _say(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {reason}")
            return 1
        health = "failing" if args.fail_health else "ok"
        _say(f"{PROG}: upstream listening on http://{args.host}:{server.server_port} "
             f"(health: {health})")
        server.serve_forever(poll_interval=0.5)
    except _Stop:
        pass
    finally:
        if server is not None:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
