"""Hostile input from clients: the balancer is the internet-facing parser, every byte it forwards is
trusted by the upstreams behind it, so it must be at least as strict as HAProxy and nginx
(HAProxy reg-tests/http-messaging, RFC 9112 sections 2-7, RFC 9110 section 5).

Everything here speaks raw bytes to the balancer (conftest `RawClient`) and uses a recording
upstream built on conftest `RawUpstream`, which logs every byte it receives and parses it strictly
as HTTP/1.1 (so a balancer that relays bad framing is caught as well as one that relays anything).

For every rejected case the test checks:
  * the exact status code, with `Connection: close`;
  * the client connection is closed afterwards;
  * no byte of the request reached the upstream (for chunked-body errors, where valid earlier
    chunks may already have been streamed: the upstream never received a complete request, the
    balancer closed that upstream connection, and the bytes it did receive were valid framing);
  * a normal request on a new connection afterwards still succeeds (and the backend was not
    marked down because a client misbehaved: the default --max-fails 1 is kept on purpose).

Accepted-but-normalised cases (chunk extensions, trailers, absolute-form, Upgrade, boundaries of
the limits) check what the upstream received and that the same connection still works after.

The table-driven cases share one balancer per module (its shutdown costs ~0.2 s): before each case
`env` checks that it still serves a normal request, and if not, fails that set-up naming the case
before and starts a fresh balancer, so a broken case cannot silently cascade. The slow-client
tests each start their own balancer with their own timeouts.

Every socket has a timeout; waiting is on events or reads, never on "long enough" sleeps (the only
sleeps pace deliberately slow clients).
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from conftest import SLACK, RawClient, RawUpstream, SlowUpstreamHandler, get

import load_balancer as lb  # conftest put the project root on sys.path

# Small limits so each case is fast (see LIMITS users below).
MAX_REQUEST_LINE = 100
MAX_HEADER_SIZE = 1024
MAX_HEADERS = 10
MAX_BODY = 1000

LIMITS = dict(max_request_line=MAX_REQUEST_LINE, max_header_size=MAX_HEADER_SIZE,
              max_headers=MAX_HEADERS, max_body_size=MAX_BODY, header_timeout=2, idle_timeout=2,
              max_connections=64, timeout=5)

CLIENT_TIMEOUT = 6.0          # > header/idle timeouts of LIMITS: a hang shows as a wrong status
CLOSE_WAIT = 3.0              # how long the balancer gets to close a connection after its answer
UPSTREAM_CLOSE_WAIT = 3.0     # ... and to close an upstream connection it abandoned mid-body

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# ---------------------------------------------------------------------------------------------------
# A strict, recording upstream (built on conftest RawUpstream)
# ---------------------------------------------------------------------------------------------------

class FramingError(ValueError):
    """The balancer sent the upstream something that is not valid HTTP/1.1."""


@dataclass
class UpConn:
    """One connection from the balancer to the upstream."""
    data: bytearray = field(default_factory=bytearray)
    mark: int = 0                                   # len(data) when the current case started
    eof: threading.Event = field(default_factory=threading.Event)   # balancer closed it
    complete: int = 0                               # complete requests read on it
    complete_mark: int = 0                          # ... when the current case started

    def touched(self) -> bool:
        return len(self.data) > self.mark

    def completed_in_case(self) -> int:
        return self.complete - self.complete_mark


@dataclass
class Seen:
    """A complete request as the upstream parsed it."""
    method: str
    target: str
    version: str
    fields: list
    body: bytes
    trailers: list
    conn: UpConn

    def header(self, name: str):
        values = [v for n, v in self.fields if n.lower() == name.lower()]
        return ", ".join(values) if values else None

    def headers_named(self, name: str) -> list:
        return [v for n, v in self.fields if n.lower() == name.lower()]

    def __repr__(self):
        return f"<Seen {self.method} {self.target} {self.version} {self.fields!r} {self.body[:60]!r}>"


class _Reader:
    def __init__(self, conn, up, rec: UpConn):
        self.conn, self.up, self.rec = conn, up, rec
        self.buf = b""

    def _more(self) -> None:
        data = self.up.recv(self.conn)
        if not data:
            raise EOFError("upstream connection closed by the balancer")
        self.rec.data += data
        self.buf += data

    def wait_first_byte(self) -> bool:
        if not self.buf:
            try:
                self._more()
            except EOFError:
                return False
        return True

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > 100_000:
                raise FramingError("line longer than 100000 bytes")
            self._more()
        line, _, self.buf = self.buf.partition(b"\n")
        if not line.endswith(b"\r"):
            raise FramingError(f"bare LF line end: {line[:80]!r}")
        line = line[:-1]
        if b"\r" in line or b"\0" in line:
            raise FramingError(f"CR/NUL inside a line: {line[:80]!r}")
        return line

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _field_lines(reader: _Reader) -> list:
    fields = []
    while True:
        line = reader.line()
        if not line:
            return fields
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name):
            raise FramingError(f"bad field line {line[:80]!r}")
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise FramingError(f"control character in field value {line[:80]!r}")
        fields.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))


class Recorder:
    """RawUpstream that parses each request strictly, records it, and answers
    `200 OK` with body `ok <target>\\n` (keep-alive unless the request said close)."""

    def __init__(self, raw_upstream):
        self.requests: list[Seen] = []
        self.conns: list[UpConn] = []
        self.framing_errors: list[str] = []
        self.cond = threading.Condition()
        self.up = raw_upstream(self._serve)

    @property
    def url(self) -> str:
        return self.up.url

    @property
    def received(self) -> bytes:
        with self.up._lock:
            return bytes(self.up.received)

    def targets(self) -> list:
        with self.cond:
            return [r.target for r in self.requests]

    def touched(self) -> list:
        with self.cond:
            return [c for c in self.conns if c.touched()]

    def reset(self) -> None:
        """Start a new case: forget what was received so far (connections stay open)."""
        with self.cond, self.up._lock:
            self.requests.clear()
            self.framing_errors.clear()
            self.up.received.clear()
            for conn in self.conns:
                conn.mark = len(conn.data)
                conn.complete_mark = conn.complete

    def _read_request(self, r: _Reader, conn: UpConn) -> Seen:
        request_line = r.line()
        parts = request_line.split(b" ")
        if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise FramingError(f"bad request line {request_line!r}")
        method, target, version = (p.decode("latin-1") for p in parts)
        fields = _field_lines(r)
        te = [v for n, v in fields if n.lower() == "transfer-encoding"]
        cl = [v for n, v in fields if n.lower() == "content-length"]
        body, trailers = b"", []
        if te and cl:
            raise FramingError("both Transfer-Encoding and Content-Length forwarded")
        if te:
            if len(te) != 1 or te[0].lower() != "chunked":
                raise FramingError(f"forwarded Transfer-Encoding {te!r}")
            chunks = []
            while True:
                size_line = r.line()
                size_text = size_line.split(b";", 1)[0]
                if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                    raise FramingError(f"bad chunk size line {size_line!r}")
                size = int(size_text, 16)
                if size == 0:
                    trailers = _field_lines(r)
                    break
                chunks.append(r.read(size))
                if r.read(2) != b"\r\n":
                    raise FramingError("chunk data not followed by CRLF")
            body = b"".join(chunks)
        elif cl:
            if len(cl) != 1 or not re.fullmatch(r"[0-9]+", cl[0]):
                raise FramingError(f"forwarded Content-Length {cl!r}")
            body = r.read(int(cl[0]))
        return Seen(method, target, version, fields, body, trailers, conn)

    def _serve(self, sock, up) -> None:
        sock.settimeout(60)   # longer than the module: idle pooled connections must not time out
        conn = UpConn()
        with self.cond:
            self.conns.append(conn)
        reader = _Reader(sock, up, conn)
        try:
            while reader.wait_first_byte():
                req = self._read_request(reader, conn)
                conn.complete += 1
                with self.cond:
                    self.requests.append(req)
                    self.cond.notify_all()
                body = f"ok {req.target}\n".encode("latin-1")
                close = "close" in (req.header("Connection") or "").lower()
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        + b"Content-Length: %d\r\n" % len(body)
                        + (b"Connection: close\r\n" if close else b"") + b"\r\n")
                sock.sendall(head + (b"" if req.method == "HEAD" else body))
                if close:
                    return
            conn.eof.set()
        except (EOFError, ConnectionError):
            conn.eof.set()
        except FramingError as e:
            with self.cond:
                self.framing_errors.append(repr(e))
        except socket.timeout:
            pass


@pytest.fixture(scope="module")
def _shared():
    """One balancer + recorder for the table-driven cases (a balancer's shutdown costs ~0.2 s, times
    ~180 cases). `env` checks before each case that it still serves, and replaces it if not."""
    state = {"previous": None}

    def stop():
        if "balancer" in state:
            state.pop("balancer").close()
            state.pop("recorder").up.stop()

    state["stop"] = stop
    yield state
    stop()


@pytest.fixture
def env(_shared, request):
    """(balancer, recorder) with the small LIMITS; default --max-fails, so a client cannot get the
    backend marked down. Fails (at set-up) if the previous case left the balancer unable to serve a
    normal request, naming that case; the next case then gets a fresh balancer."""
    state = _shared
    if "balancer" in state:
        b, rec = state["balancer"], state["recorder"]
        try:
            resp = get(b.port, "/probe")
            healthy = resp.status == 200 and resp.body == b"ok /probe\n"
        except (OSError, EOFError, ValueError) as error:
            resp, healthy = error, False
        if not healthy:
            state["stop"]()
            previous, state["previous"] = state["previous"], request.node.nodeid
            pytest.fail(f"after {previous} the balancer no longer serves a normal request: {resp!r}")
    if "balancer" not in state:
        rec = Recorder(lambda serve: RawUpstream(serve))
        config = lb.Config(host="127.0.0.1", port=0, backends=(rec.url,), health_interval=0,
                           drain_timeout=2, **LIMITS)
        b = lb.LoadBalancer(config)
        b.start()
        state["balancer"], state["recorder"] = b, rec
    state["previous"] = request.node.nodeid
    b, rec = state["balancer"], state["recorder"]
    rec.reset()
    return b, rec


# ---------------------------------------------------------------------------------------------------
# Assertion helpers
# ---------------------------------------------------------------------------------------------------

def assert_rejected_response(client: RawClient, status: int, sent: bytes):
    resp = client.response()
    assert resp.status == status, f"sent {sent!r}: expected {status}, got {resp!r}"
    connection = (resp.header("Connection") or "").lower()
    assert "close" in connection, f"sent {sent!r}: {status} without Connection: close: {resp!r}"
    assert resp.body.startswith(str(status).encode()), resp
    assert client.is_closed(CLOSE_WAIT), f"sent {sent!r}: connection left open after {status}"
    return resp


def assert_normal_request_works(b, rec: Recorder, path: str = "/after"):
    resp = get(b.port, path)
    assert resp.status == 200, f"normal request after the case failed: {resp!r}"
    assert resp.body == f"ok {path}\n".encode(), resp
    assert rec.targets()[-1:] == [path]


def reject_case(b, rec: Recorder, status: int, data: bytes):
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        client.send(data)
        assert_rejected_response(client, status, data)
    assert rec.received == b"", f"sent {data!r}: the upstream received {rec.received!r}"
    assert_normal_request_works(b, rec)
    # Nothing of the rejected request arrived late either: the only thing the upstream ever saw is
    # the normal request, parsed cleanly.
    assert rec.received.startswith(b"GET /after HTTP/1.1\r\n"), rec.received
    assert rec.targets() == ["/after"], rec.requests
    assert rec.framing_errors == []


# ---------------------------------------------------------------------------------------------------
# Request builders
# ---------------------------------------------------------------------------------------------------

HOST = b"Host: test.local\r\n"
SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: test.local\r\n\r\n"


def post(*fields: bytes, body: bytes = b"", target: bytes = b"/hostile") -> bytes:
    return (b"POST " + target + b" HTTP/1.1\r\n" + HOST
            + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body)


def get_with(*fields: bytes) -> bytes:
    return b"GET /hostile HTTP/1.1\r\n" + HOST + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def line(request_line: bytes, host: bool = True) -> bytes:
    return request_line + b"\r\n" + (HOST if host else b"") + b"\r\n"


def case(status: int, data: bytes, id: str):
    return pytest.param(status, data, id=id)


CHUNKED = b"Transfer-Encoding: chunked"


# ---------------------------------------------------------------------------------------------------
# Rejected before anything is forwarded
# ---------------------------------------------------------------------------------------------------

FRAMING = [
    # RFC 9112 6.1 / 6.3 (3): CL together with TE is a smuggling attempt (contract: 400).
    case(400, post(b"Content-Length: 5", CHUNKED, body=b"0\r\n\r\n" + SMUGGLE), "6.1-cl-then-te"),
    case(400, post(CHUNKED, b"Content-Length: 5", body=b"0\r\n\r\n" + SMUGGLE), "6.1-te-then-cl"),
    case(400, post(b"Content-Length: 0", CHUNKED, body=b"5\r\nhello\r\n0\r\n\r\n"), "6.1-cl0-and-te"),
    # RFC 9112 6.3 (5), RFC 9110 8.6: Content-Length must be one 1*DIGIT value.
    case(400, post(b"Content-Length: 5", b"Content-Length: 10", body=b"hello" + SMUGGLE), "6.3-cl-two-differing-lines"),
    case(400, post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), "6.3-cl-two-identical-lines"),
    case(400, post(b"Content-Length: 5, 10", body=b"hello"), "6.3-cl-list-differing"),
    case(400, post(b"Content-Length: 5, 5", body=b"hello"), "6.3-cl-list-identical"),
    case(400, post(b"Content-Length: 5,", body=b"hello"), "6.3-cl-trailing-comma"),
    case(400, post(b"Content-Length: +5", body=b"hello"), "6.3-cl-plus-sign"),
    case(400, post(b"Content-Length: -1", body=b"hello"), "6.3-cl-negative"),
    case(400, post(b"Content-Length: -0", body=b""), "6.3-cl-minus-zero"),
    case(400, post(b"Content-Length: 0x5", body=b"hello"), "6.3-cl-hex"),
    case(400, post(b"Content-Length: 5.0", body=b"hello"), "6.3-cl-decimal-point"),
    case(400, post(b"Content-Length: 1e1", body=b"hello"), "6.3-cl-exponent"),
    case(400, post(b"Content-Length: 1_0", body=b"helloworld"), "6.3-cl-underscore-python-int"),
    case(400, post("Content-Length: \uff15".encode("utf-8"), body=b"hello"), "6.3-cl-fullwidth-digit-utf8"),
    case(400, post(b"Content-Length: 5 5", body=b"hello"), "6.3-cl-inner-space"),
    case(400, post(b"Content-Length: abc", body=b"hello"), "6.3-cl-non-digit"),
    case(400, post(b"Content-Length: 5a", body=b"hello"), "6.3-cl-digit-then-junk"),
    case(400, post(b"Content-Length:", body=b""), "6.3-cl-empty"),
    case(400, post(b"Content-Length:  ", body=b""), "6.3-cl-whitespace-only"),
    case(400, post(b"Content-Length: 9223372036854775808"), "6.3-cl-2pow63-overflow"),
    case(400, post(b"Content-Length: 100000000000000000000000000000"), "6.3-cl-huge-overflow"),
    # RFC 9112 6.3 (4): request TE whose final coding is not chunked -> 400 and close.
    case(400, post(b"Transfer-Encoding: gzip", body=b"hello"), "6.3-te-gzip-only"),
    case(400, post(b"Transfer-Encoding: identity", body=b"hello"), "6.3-te-identity"),
    case(400, post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"), "6.3-te-chunked-not-final"),
    case(400, post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), "6.3-te-xchunked"),
    case(400, post(b"Transfer-Encoding: chunkedx", body=b"0\r\n\r\n"), "6.3-te-chunked-suffix"),
    case(400, post(b"Transfer-Encoding: chunked x", body=b"0\r\n\r\n"), "6.3-te-chunked-trailing-junk"),
    case(400, post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"), "7-te-quoted"),
    case(400, post(b"Transfer-Encoding: chunked;x=1", body=b"0\r\n\r\n"), "7-te-chunked-with-parameter"),
    case(400, post(b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"), "7-te-vertical-tab-before"),
    case(400, post(b"Transfer-Encoding: chunked\x0b", body=b"0\r\n\r\n"), "7-te-vertical-tab-after"),
    case(400, post(b"Transfer-Encoding:", body=b"0\r\n\r\n"), "7-te-empty"),
    # RFC 9112 7: chunked MUST NOT be applied more than once.
    case(400, post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"), "7-te-chunked-twice-list"),
    case(400, post(CHUNKED, CHUNKED, body=b"0\r\n\r\n"), "7-te-chunked-twice-lines"),
    # RFC 9112 6.1: TE in an HTTP/1.0 message MUST be treated as faulty framing.
    case(400, b"POST /hostile HTTP/1.0\r\n" + HOST + CHUNKED + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "6.1-te-in-http10"),
    # RFC 9112 6.1: unknown transfer coding (chunked final) SHOULD be 501.
    case(501, post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), "6.1-te-gzip-chunked-501"),
    case(501, post(b"Transfer-Encoding: foo, chunked", body=b"0\r\n\r\n"), "6.1-te-unknown-chunked-501"),
]

HEADER_SYNTAX = [
    # RFC 9112 5.1: no whitespace between field name and colon -> MUST 400.
    case(400, get_with(b"X-Foo : bar"), "5.1-space-before-colon"),
    case(400, get_with(b"X-Foo\t: bar"), "5.1-tab-before-colon"),
    case(400, post(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLE), "5.1-te-space-before-colon"),
    case(400, post(b"Content-Length : 5", body=b"hello"), "5.1-cl-space-before-colon"),
    # RFC 9112 5.2: obs-fold (contract: reject with 400).
    case(400, get_with(b"X-Foo: a", b" b"), "5.2-obs-fold-sp"),
    case(400, get_with(b"X-Foo: a", b"\tb"), "5.2-obs-fold-htab"),
    case(400, post(b"Transfer-Encoding: gzip,", b" chunked", body=b"0\r\n\r\n"), "5.2-obs-fold-te"),
    # RFC 9112 2.2: whitespace-preceded line right after the request line.
    case(400, b"GET /hostile HTTP/1.1\r\n X-Foo: bar\r\n" + HOST + b"\r\n", "2.2-ws-before-first-field"),
    # RFC 9112 2.2 / RFC 9110 5.5: bare CR, NUL, other CTLs (contract: 400).
    case(400, get_with(b"X-Foo: a\rb"), "9110-5.5-bare-cr-in-value"),
    case(400, get_with(b"X-Foo: a\r"), "2.2-bare-cr-before-crlf"),
    case(400, get_with(b"X-Foo: a\rX-Bar: b"), "2.2-bare-cr-as-line-end"),
    case(400, get_with(b"X-Foo: a\x00b"), "9110-5.5-nul-in-value"),
    case(400, get_with(b"X-F\x00oo: bar"), "9110-5.1-nul-in-name"),
    case(400, get_with(b"X-Foo: a\x01b"), "9110-5.5-soh-in-value"),
    case(400, get_with(b"X-Foo: a\x1bb"), "9110-5.5-esc-in-value"),
    case(400, get_with(b"X-Foo: a\x7fb"), "9110-5.5-del-in-value"),
    case(400, get_with(b"X-Foo: a\x0bb"), "9110-5.5-vtab-in-value"),
    case(400, get_with(b"X-Foo: a\x0cb"), "9110-5.5-formfeed-in-value"),
    case(400, get_with(b"X-F\x01oo: bar"), "9110-5.1-ctl-in-name"),
    # RFC 9112 2.2: bare LF as line terminator (contract: 400).
    case(400, b"GET /hostile HTTP/1.1\r\nHost: test.local\nX-Foo: bar\r\n\r\n", "2.2-bare-lf-in-header-section"),
    case(400, b"GET /hostile HTTP/1.1\nHost: test.local\n\n", "2.2-bare-lf-everywhere"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost: test.local\r\n\n", "2.2-bare-lf-final-line"),
    # RFC 9112 5 / RFC 9110 5.1: field-line = token ":" OWS value OWS.
    case(400, get_with(b"X-Foo bar"), "5-line-without-colon"),
    case(400, get_with(b": bar"), "9110-5.1-empty-name"),
    case(400, get_with(b"X Foo: bar"), "9110-5.1-space-in-name"),
    case(400, get_with(b'X"Foo: bar'), "9110-5.1-dquote-in-name"),
    case(400, get_with(b"X(Foo): bar"), "9110-5.1-paren-in-name"),
    case(400, get_with(b"X@Foo: bar"), "9110-5.1-at-in-name"),
    case(400, get_with(b"X/Foo: bar"), "9110-5.1-slash-in-name"),
    case(400, get_with(b"X-F\xf6o: bar"), "9110-5.1-non-ascii-name"),
]

REQUEST_LINE = [
    # RFC 9112 3: request-line = method SP request-target SP HTTP-version, single SPs.
    case(400, line(b"GET  /hostile HTTP/1.1"), "3-double-space-after-method"),
    case(400, line(b"GET /hostile  HTTP/1.1"), "3-double-space-before-version"),
    case(400, line(b"GET\t/hostile\tHTTP/1.1"), "3-tab-separators"),
    case(400, line(b"GET /hostile HTTP/1.1 "), "3-trailing-space"),
    case(400, line(b" GET /hostile HTTP/1.1"), "3-leading-space"),
    case(400, line(b"GET HTTP/1.1"), "3-missing-target"),
    case(400, line(b"/hostile HTTP/1.1"), "3-missing-method"),
    case(400, line(b"GET /hostile"), "3-http09-with-host"),
    case(400, b"GET /hostile\r\n\r\n", "3-http09-style"),
    case(400, line(b"GET /a b HTTP/1.1"), "3-space-in-target"),
    case(400, line(b"G(T /hostile HTTP/1.1"), "9110-9.1-method-not-token"),
    case(400, line(b"GET /a\x00b HTTP/1.1"), "3.2-nul-in-target"),
    case(400, line(b"GET /a\x01b HTTP/1.1"), "3.2-ctl-in-target"),
    case(400, line(b"GET /a\x7fb HTTP/1.1"), "3.2-del-in-target"),
    case(400, line(b"GET /a\rb HTTP/1.1"), "3.2-bare-cr-in-target"),
    case(400, line(b"GET /a#frag HTTP/1.1"), "3.2-fragment-in-target"),
    # RFC 9112 2.3: HTTP-version = "HTTP" "/" DIGIT "." DIGIT, case-sensitive.
    case(400, line(b"GET /hostile http/1.1"), "2.3-lowercase-version"),
    case(400, line(b"GET /hostile HTTP/1"), "2.3-version-no-minor"),
    case(400, line(b"GET /hostile HTTP/1.1x"), "2.3-version-junk"),
    case(400, line(b"GET /hostile HTTP/1.10"), "2.3-version-two-digit-minor"),
    case(400, line(b"GET /hostile HTTP/01.1"), "2.3-version-two-digit-major"),
    case(400, line(b"GET /hostile FOO/1.1"), "2.3-not-http"),
    # Well-formed but unsupported versions: 505 (RFC 9110 15.6.6).
    case(505, line(b"GET /hostile HTTP/2.0"), "9110-15.6.6-http20-505"),
    case(505, line(b"GET /hostile HTTP/1.2"), "9110-15.6.6-http12-505"),
    case(505, line(b"GET /hostile HTTP/3.0"), "9110-15.6.6-http30-505"),
    case(505, line(b"GET /hostile HTTP/0.9"), "9110-15.6.6-explicit-http09-505"),
    # RFC 9112 3.2: request-target forms.
    case(400, line(b"GET * HTTP/1.1"), "3.2.4-asterisk-not-options"),
    case(400, line(b"GET x HTTP/1.1"), "3.2-relative-target"),
    case(400, line(b"GET test.local:80 HTTP/1.1"), "3.2.3-authority-form-not-connect"),
    case(501, b"CONNECT test.local:443 HTTP/1.1\r\nHost: test.local:443\r\n\r\n", "9110-9.3.6-connect-501"),
    # RFC 9112 3.2 / RFC 9110 7.2: Host.
    case(400, b"GET /hostile HTTP/1.1\r\n\r\n", "3.2-missing-host-http11"),
    case(400, b"GET /hostile HTTP/1.1\r\nX-A: b\r\n\r\n", "3.2-missing-host-with-other-fields"),
    case(400, b"GET /hostile HTTP/1.1\r\n" + HOST + HOST + b"\r\n", "3.2-two-identical-host"),
    case(400, b"GET /hostile HTTP/1.1\r\n" + HOST + b"Host: evil.example\r\n\r\n", "3.2-two-differing-host"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost: test.local, evil.example\r\n\r\n", "3.2-host-list"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost:\r\n\r\n", "3.2-empty-host-http11"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost: test local\r\n\r\n", "9110-7.2-host-with-space"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost: user@test.local\r\n\r\n", "9110-7.2-host-with-userinfo"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost: test.local/x\r\n\r\n", "9110-7.2-host-with-path"),
    case(400, b"GET /hostile HTTP/1.1\r\nHost: test.local:8o\r\n\r\n", "9110-7.2-host-port-not-numeric"),
    case(400, b"GET http://test.local/p HTTP/1.1\r\n\r\n", "3.2-absolute-form-without-host-http11"),
    case(400, b"GET http://user@test.local/p HTTP/1.1\r\n" + HOST + b"\r\n", "9110-4.2.4-absolute-form-userinfo"),
]

LIMIT_CASES = [
    # RFC 9112 3 / RFC 9110 15.5.15: request line too long -> 414.
    case(414, line(b"GET /" + b"a" * 300 + b" HTTP/1.1"), "9110-15.5.15-request-line-414"),
    case(414, line(b"GET /" + b"a" * (MAX_REQUEST_LINE + 1 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"),
         "9110-15.5.15-request-line-one-byte-over-414"),
    # RFC 6585 5: header block too large / too many fields -> 431.
    case(431, get_with(b"X-Big: " + b"a" * 2000), "6585-5-one-huge-field-431"),
    case(431, get_with(*[b"X-Fill-%d: " % i + b"b" * 180 for i in range(7)]), "6585-5-block-over-size-431"),
    case(431, get_with(*[b"X-N%d: v" % i for i in range(MAX_HEADERS)]), "6585-5-one-field-too-many-431"),
    case(431, get_with(*[b"X-N%d: v" % i for i in range(50)]), "6585-5-many-fields-431"),
    # RFC 9110 15.5.14: Content-Length above the limit -> 413 before anything goes upstream
    # (only the head is sent: the answer must not wait for the body).
    case(413, post(b"Content-Length: %d" % (MAX_BODY + 1)), "9110-15.5.14-cl-just-over-413"),
    case(413, post(b"Content-Length: 9223372036854775807"), "9110-15.5.14-cl-2pow63-minus-1-413"),
]


@pytest.mark.parametrize("status,data", FRAMING + HEADER_SYNTAX + REQUEST_LINE + LIMIT_CASES)
def test_rejected_before_forwarding(env, status, data):
    b, rec = env
    reject_case(b, rec, status, data)


def test_h2_prior_knowledge_preface_not_forwarded(env):
    """`PRI * HTTP/2.0` (RFC 9113 3.4 preface): 505, the version is checked first; refused,
    closed and never sent upstream."""
    b, rec = env
    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        client.send(data)
        resp = client.response()
        assert resp.status == 505, resp
        assert "close" in (resp.header("Connection") or "").lower(), resp
        assert client.is_closed(CLOSE_WAIT)
    assert rec.received == b""
    assert_normal_request_works(b, rec)


# ---------------------------------------------------------------------------------------------------
# Chunked body errors: earlier valid chunks may have been streamed, but the upstream never sees a
# complete request and the balancer abandons (closes) that upstream connection.
# ---------------------------------------------------------------------------------------------------

CHUNK_HEAD = post(CHUNKED, target=b"/chunked")
GOOD = b"4\r\nwiki\r\n"   # a valid first chunk, so the head and some data may already be upstream
TAIL = b"0\r\n\r\n" + SMUGGLE

CHUNK_CASES = [
    # RFC 9112 7.1: chunk-size = 1*HEXDIG; chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
    case(400, GOOD + b"0x5\r\nhello\r\n" + TAIL, "7.1-size-0x-prefix"),
    case(400, b"+5\r\nhello\r\n" + TAIL, "7.1-size-plus-sign"),
    case(400, GOOD + b"-1\r\nhello\r\n" + TAIL, "7.1-size-negative"),
    case(400, GOOD + b"5 5\r\nhello\r\n" + TAIL, "7.1-size-inner-space"),
    case(400, GOOD + b"\r\nhello\r\n" + TAIL, "7.1-size-empty-line"),
    case(400, b"zz\r\nhello\r\n" + TAIL, "7.1-size-non-hex"),
    case(400, GOOD + b"5_0\r\nhello\r\n" + TAIL, "7.1-size-underscore-python-int"),
    case(400, GOOD + b"00000000000000005\r\nhello\r\n" + TAIL, "7.1-size-17-hex-digits"),
    case(400, GOOD + b"10000000000000000\r\nhello\r\n" + TAIL, "7.1-size-overflow-2pow64"),
    case(400, GOOD + b"5\r\nhelloXX" + TAIL, "7.1-missing-crlf-after-data"),
    case(400, GOOD + b"3\r\nhello\r\n" + TAIL, "7.1-data-longer-than-size"),
    case(400, GOOD + b"5\nhello\r\n" + TAIL, "7.1-bare-lf-after-size"),
    case(400, GOOD + b"5\r\nhello\n" + TAIL, "7.1-bare-lf-after-data"),
    case(400, GOOD + b"0\n\r\n", "7.1-bare-lf-after-last-chunk"),
    case(400, GOOD + b"0\r\n\n", "7.1-bare-lf-ending-trailers"),
    case(400, GOOD + b"5\rhello\r\n" + TAIL, "7.1-bare-cr-after-size"),
    case(400, GOOD + b"0\r\nBadTrailer\r\n\r\n" + SMUGGLE, "7.1.2-trailer-line-without-colon"),
    case(400, GOOD + b"0\r\nX-T : v\r\n\r\n", "7.1.2-trailer-space-before-colon"),
    case(400, GOOD + b"0\r\nX-T: a\x00b\r\n\r\n", "7.1.2-trailer-nul-in-value"),
    # RFC 9110 15.5.14: chunked body growing past --max-body-size -> 413.
    case(413, b"%x\r\n" % (MAX_BODY + 1) + b"a" * (MAX_BODY + 1) + b"\r\n" + TAIL, "9110-15.5.14-one-chunk-over-limit"),
    case(413, b"%x\r\n" % MAX_BODY + b"a" * MAX_BODY + b"\r\n1\r\nb\r\n" + TAIL, "9110-15.5.14-chunks-add-up-over-limit"),
]


@pytest.mark.parametrize("status,body", CHUNK_CASES)
def test_chunked_body_rejected(env, status, body):
    b, rec = env
    data = CHUNK_HEAD + body
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        client.send(data)
        assert_rejected_response(client, status, data)
    # Every upstream connection that got part of this request was closed by the balancer.
    for conn in rec.touched():
        assert conn.eof.wait(UPSTREAM_CLOSE_WAIT), (
            f"sent {data!r}: upstream connection left open mid-body after receiving {bytes(conn.data[conn.mark:])!r}")
        assert conn.completed_in_case() == 0, (
            f"sent {data!r}: upstream saw a complete request {bytes(conn.data[conn.mark:])!r}")
    assert rec.requests == [], f"sent {data!r}: upstream saw a complete request {rec.requests!r}"
    assert rec.framing_errors == [], f"sent {data!r}: balancer relayed invalid framing {rec.framing_errors}"
    assert b"smuggled" not in rec.received
    assert_normal_request_works(b, rec)
    assert rec.targets() == ["/after"]
    assert rec.framing_errors == []


# ---------------------------------------------------------------------------------------------------
# Accepted, normalised on the way through
# ---------------------------------------------------------------------------------------------------

def ok(data: bytes, id: str, **expect):
    return pytest.param(data, expect, id=id)


ACCEPTED = [
    # RFC 9112 7.1.1: chunk extensions are allowed (recipient ignores unknown ones).
    ok(CHUNK_HEAD + b"5;name=value\r\nhello\r\n0\r\n\r\n", "7.1.1-chunk-ext-token", body=b"hello"),
    ok(CHUNK_HEAD + b'5;name="a b;c"\r\nhello\r\n0\r\n\r\n', "7.1.1-chunk-ext-quoted", body=b"hello"),
    ok(CHUNK_HEAD + b"5;a;b=c\r\nhello\r\n0;last=1\r\n\r\n", "7.1.1-chunk-ext-several-and-last", body=b"hello"),
    ok(CHUNK_HEAD + b"5 ;a=b\r\nhello\r\n0\r\n\r\n", "7.1.1-chunk-ext-bws-before-semicolon", body=b"hello"),
    ok(CHUNK_HEAD + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "7.1-two-chunks", body=b"hello world"),
    ok(CHUNK_HEAD + b"000005\r\nhello\r\n0\r\n\r\n", "7.1-size-leading-zeros", body=b"hello"),
    ok(CHUNK_HEAD + b"A\r\nhelloworld\r\n0\r\n\r\n", "7.1-size-uppercase-hex", body=b"helloworld"),
    # RFC 9112 7.1.2: trailers are not merged into the header section (contract: dropped).
    ok(CHUNK_HEAD + b"5\r\nhello\r\n0\r\nX-Trailer: evil\r\nContent-Length: 999\r\nHost: evil.example\r\n\r\n",
       "7.1.2-trailers-dropped", body=b"hello", absent=["X-Trailer"], raw_absent=[b"evil", b"999"],
       headers={"Host": "test.local"}),
    # RFC 9112 7: coding names are case-insensitive.
    ok(post(b"Transfer-Encoding: Chunked", body=b"5\r\nhello\r\n0\r\n\r\n"), "7-te-mixed-case", body=b"hello"),
    ok(post(b"Transfer-Encoding:  chunked  ", body=b"5\r\nhello\r\n0\r\n\r\n"), "5.1-te-with-ows", body=b"hello"),
    # RFC 9110 8.6: 1*DIGIT, leading zeros allowed; RFC 9112 5.1 OWS around the value.
    ok(post(b"Content-Length: 005", body=b"hello"), "9110-8.6-cl-leading-zeros", body=b"hello"),
    ok(post(b"Content-Length:   5  ", body=b"hello"), "5.1-cl-with-ows", body=b"hello"),
    ok(post(b"Content-Length: 0"), "9110-8.6-cl-zero", body=b""),
    # RFC 9112 3.2.2: absolute-form -> origin-form; the URL authority is the Host.
    ok(b"GET http://example.com/p?q HTTP/1.1\r\nHost: example.com\r\n\r\n", "3.2.2-absolute-form-same-host",
       target="/p?q", headers={"Host": "example.com"}),
    ok(b"GET http://example.com/p?q HTTP/1.1\r\nHost: other.example\r\n\r\n", "3.2.2-absolute-form-host-differs",
       target="/p?q", headers={"Host": "example.com"}, raw_absent=[b"other.example"]),
    ok(b"GET http://example.com:8080/x HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", "3.2.2-absolute-form-with-port",
       target="/x", headers={"Host": "example.com:8080"}),
    ok(b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", "3.2.1-absolute-form-empty-path",
       target="/", headers={"Host": "example.com"}),
    ok(b"GET http://example.com?a=1 HTTP/1.1\r\nHost: example.com\r\n\r\n", "3.2.1-absolute-form-query-only",
       target="/?a=1", headers={"Host": "example.com"}),
    # RFC 9110 7.8: Upgrade is hop-by-hop; h2c / websocket are forwarded as plain requests.
    ok(b"GET /up HTTP/1.1\r\n" + HOST + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
       b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", "9110-7.8-upgrade-h2c-stripped",
       target="/up", absent=["Upgrade", "HTTP2-Settings"], connection_lacks=["upgrade", "http2-settings"]),
    ok(b"GET /ws HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
       "9110-7.8-upgrade-websocket-forwarded", target="/ws", headers={"Upgrade": "websocket",
                                                                       "Connection": "upgrade"}),
    ok(b"POST /up HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 5\r\n\r\nhello",
       "9110-7.8-upgrade-with-body-stripped", target="/up", body=b"hello", absent=["Upgrade"],
       connection_lacks=["upgrade"]),
    # RFC 9110 5.5: HTAB and obs-text are allowed inside values; RFC 9110 5.6.2: all tchars in names.
    ok(get_with(b"X-Tab: a\tb"), "9110-5.5-htab-in-value", headers={"X-Tab": "a\tb"}),
    ok(get_with(b"X-Obs: caf\xe9"), "9110-5.5-obs-text-in-value", headers={"X-Obs": "caf\xe9"}),
    ok(get_with(b"X-!#$%&'*+.^_`|~09: v"), "9110-5.6.2-all-tchars-in-name", headers={"X-!#$%&'*+.^_`|~09": "v"}),
    ok(get_with(b"X-Empty:"), "9110-5.5-empty-value", headers={"X-Empty": ""}),
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line.
    ok(b"\r\nGET /lead HTTP/1.1\r\n" + HOST + b"\r\n", "2.2-leading-crlf-ignored", target="/lead"),
    # RFC 9112 3.2.4: asterisk-form is fine for OPTIONS.
    ok(b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", "3.2.4-options-asterisk", target="*", method="OPTIONS"),
    # Limits: at the boundary still accepted.
    ok(line(b"GET /" + b"a" * (MAX_REQUEST_LINE - len(b"GET / HTTP/1.1") - 2) + b" HTTP/1.1"),
       "limit-request-line-below-max", target="/" + "a" * (MAX_REQUEST_LINE - len("GET / HTTP/1.1") - 2)),
    ok(get_with(*[b"X-N%d: v" % i for i in range(MAX_HEADERS - 1)]), "limit-exactly-max-headers",
       headers={"X-N8": "v"}),
    ok(get_with(b"X-Big: " + b"a" * 600), "limit-header-block-below-max", headers={"X-Big": "a" * 600}),
    ok(post(b"Content-Length: %d" % MAX_BODY, body=b"x" * MAX_BODY), "limit-cl-exactly-max-body",
       body=b"x" * MAX_BODY),
    ok(CHUNK_HEAD + b"%x\r\n" % (MAX_BODY - 1) + b"y" * (MAX_BODY - 1) + b"\r\n1\r\nz\r\n0\r\n\r\n",
       "limit-chunked-exactly-max-body", body=b"y" * (MAX_BODY - 1) + b"z"),
]


@pytest.mark.parametrize("data,expect", ACCEPTED)
def test_accepted_and_normalised(env, data, expect):
    b, rec = env
    method = expect.get("method", data.lstrip(b"\r\n").split(b" ", 1)[0].decode())
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        client.send(data)
        resp = client.response(method)
        assert resp.status == 200, f"sent {data!r}: {resp!r}"
        assert rec.framing_errors == [], rec.framing_errors
        assert len(rec.requests) == 1, rec.requests
        seen = rec.requests[0]
        if "target" in expect:
            assert seen.target == expect["target"], seen
        assert seen.method == method
        if "body" in expect:
            assert seen.body == expect["body"], seen
        assert seen.trailers == [], f"trailers forwarded: {seen.trailers!r}"
        for name, value in expect.get("headers", {}).items():
            assert seen.headers_named(name) == [value], f"{name}: {seen!r}"
        for name in expect.get("absent", []):
            assert seen.header(name) is None, f"{name} forwarded: {seen!r}"
        connection = (seen.header("Connection") or "").lower()
        for token in expect.get("connection_lacks", []):
            assert token not in connection, seen
        for needle in expect.get("raw_absent", []):
            assert needle not in rec.received, f"{needle!r} reached the upstream: {rec.received!r}"
        assert not resp.status_line.startswith("HTTP/1.1 101"), resp
        # The same connection carries on with a normal request: the framing was consumed exactly.
        resp = client.request(b"GET /after HTTP/1.1\r\n" + HOST + b"\r\n")
        assert resp.status == 200 and resp.body == b"ok /after\n", resp
    assert rec.targets()[1:] == ["/after"]


def test_expect_continue_over_body_limit_gets_413_without_100(env):
    """RFC 9110 10.1.1 / 15.5.14: a request announcing too large a body with Expect: 100-continue is
    answered 413 at once; no 100 (Continue) invites the body, nothing goes upstream."""
    b, rec = env
    data = post(b"Content-Length: %d" % (MAX_BODY + 1), b"Expect: 100-continue")
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        client.send(data)
        first = client.file.readline(1000)
        assert first.startswith(b"HTTP/1.1 413 "), first
        rest = client.read_until_close()
        assert b"\r\n\r\n" in rest and b" 100 " not in rest, rest
    assert rec.received == b""
    assert_normal_request_works(b, rec)


def test_http10_without_host_is_accepted_and_closed(env):
    """RFC 9112 3.2: Host is only required from HTTP/1.1 clients; HTTP/1.0 without keep-alive
    is closed after the response."""
    b, rec = env
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        resp = client.request(b"GET /old HTTP/1.0\r\n\r\n")
        assert resp.status == 200, resp
        assert client.is_closed(CLOSE_WAIT)
    assert rec.targets() == ["/old"]
    assert rec.requests[0].version in ("HTTP/1.0", "HTTP/1.1")
    assert_normal_request_works(b, rec)


def test_pipelined_request_after_rejected_one_is_never_processed(env):
    """A request pipelined behind a rejected one must not be forwarded (the connection is closed
    after the error, RFC 9112 9.3 / 6.3)."""
    b, rec = env
    data = get_with(b"X-Foo : bar") + b"GET /pipelined HTTP/1.1\r\n" + HOST + b"\r\n"
    with RawClient(b.port, timeout=CLIENT_TIMEOUT) as client:
        client.send(data)
        assert_rejected_response(client, 400, data)
    assert rec.received == b""
    assert_normal_request_works(b, rec)
    assert rec.targets() == ["/after"]


# ---------------------------------------------------------------------------------------------------
# Slow clients
# ---------------------------------------------------------------------------------------------------



def _timed_408(client: RawClient, start: float, low: float, high: float, sent: bytes):
    resp = client.response()
    elapsed = time.monotonic() - start
    assert resp.status == 408, f"sent {sent!r}: {resp!r}"
    assert "close" in (resp.header("Connection") or "").lower(), resp
    assert low <= elapsed <= high, f"408 after {elapsed:.2f}s, expected within [{low}, {high}]"
    assert client.is_closed(CLOSE_WAIT)


def test_header_deadline_partial_head(raw_upstream, balancer):
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=1, idle_timeout=5)
    data = b"GET /slow HTTP/1.1\r\nHost: test.local\r\n"
    with RawClient(b.port, timeout=5) as client:
        start = time.monotonic()
        client.send(data)
        _timed_408(client, start, 0.8, 1 + SLACK, data)
    assert rec.received == b""
    assert_normal_request_works(b, rec)


def test_header_deadline_is_total_not_per_read(raw_upstream, balancer):
    """Slowloris: a byte every 0.2 s keeps each read short, but the whole head must arrive within
    --header-timeout (a deadline, not an idle timer)."""
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=1, idle_timeout=5)
    stop = threading.Event()
    payload = b"GET /slowloris HTTP/1.1\r\nHost: test.local\r\nX-Slow: "
    with RawClient(b.port, timeout=5) as client:
        def trickle():
            i = 0
            while not stop.is_set():
                try:
                    client.sock.send(payload[i:i + 1] or b"a")
                except OSError:
                    return
                i += 1
                stop.wait(0.2)

        start = time.monotonic()
        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            _timed_408(client, start, 0.8, 1 + SLACK, payload + b"...")
        finally:
            stop.set()
            t.join(2)
    assert rec.received == b""
    assert_normal_request_works(b, rec)


def test_silent_connection_closed_after_header_timeout(raw_upstream, balancer):
    """A connection that sends nothing is closed silently by the header deadline (as nginx does:
    there is no request to answer)."""
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=1, idle_timeout=5)
    with RawClient(b.port, timeout=5) as client:
        start = time.monotonic()
        rest = client.read_until_close()
        elapsed = time.monotonic() - start
        assert 0.8 <= elapsed <= 1 + SLACK, elapsed
        assert rest == b"", rest
    assert_normal_request_works(b, rec)


@pytest.mark.parametrize("framing,partial", [
    pytest.param(b"Content-Length: 10", b"abc", id="content-length-3-of-10"),
    pytest.param(CHUNKED, b"5\r\nhello\r\n", id="chunked-no-last-chunk"),
    pytest.param(CHUNKED, b"5\r\nhel", id="chunked-mid-chunk"),
])
def test_idle_timeout_while_reading_body(raw_upstream, balancer, framing, partial):
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=5, idle_timeout=1)
    data = post(framing, body=partial, target=b"/slow-body")
    with RawClient(b.port, timeout=5) as client:
        start = time.monotonic()
        client.send(data)
        _timed_408(client, start, 0.8, 1 + SLACK, data)
    for conn in rec.touched():
        assert conn.eof.wait(UPSTREAM_CLOSE_WAIT), "upstream connection left open mid-body"
        assert conn.completed_in_case() == 0
    assert rec.requests == [] and rec.framing_errors == []
    assert_normal_request_works(b, rec)


def test_slow_body_with_short_gaps_is_accepted(raw_upstream, balancer):
    """--idle-timeout is per read, and --header-timeout does not cover the body: a body sent in
    pieces 0.4 s apart (2 s total, twice both timeouts) gets through."""
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=1, idle_timeout=1)
    with RawClient(b.port, timeout=5) as client:
        client.send(post(b"Content-Length: 10", target=b"/paced"))
        for piece in (b"ab", b"cd", b"ef", b"gh", b"ij"):
            time.sleep(0.4)   # pacing a deliberately slow client
            client.send(piece)
        resp = client.response()
        assert resp.status == 200, resp
    assert rec.requests[0].body == b"abcdefghij"


def test_keepalive_idle_connection_closed_silently(raw_upstream, balancer):
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=5, idle_timeout=1)
    with RawClient(b.port, timeout=5) as client:
        resp = client.request(b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n")
        assert resp.status == 200
        start = time.monotonic()
        rest = client.read_until_close()
        elapsed = time.monotonic() - start
        assert rest == b"", f"idle keep-alive connection got bytes before closing: {rest!r}"
        assert 0.7 <= elapsed <= 1 + SLACK, elapsed


def test_keepalive_partial_second_head_gets_408(raw_upstream, balancer):
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=1, idle_timeout=5)
    with RawClient(b.port, timeout=5) as client:
        resp = client.request(b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n")
        assert resp.status == 200
        data = b"GET /second HTTP/1.1\r\nHost: te"
        start = time.monotonic()
        client.send(data)
        _timed_408(client, start, 0.8, 1 + SLACK, data)
    assert rec.targets() == ["/first"]
    assert_normal_request_works(b, rec)


def _still_open(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""  # data means the balancer answered: not open
    except OSError:
        return False


def test_fifty_tricklers_do_not_delay_a_normal_client(raw_upstream, balancer):
    rec = Recorder(raw_upstream)
    b = balancer([rec.url], header_timeout=10, idle_timeout=10, max_connections=200)
    payload = b"GET /trickle HTTP/1.1\r\nHost: test.local\r\nX-Trickle: "
    stop = threading.Event()
    socks = []
    try:
        for _ in range(50):
            socks.append(socket.create_connection(("127.0.0.1", b.port), timeout=5))

        def trickle(sock):
            i = 0
            while not stop.is_set():
                try:
                    sock.send(payload[i:i + 1] or b"a")
                except OSError:
                    return
                i += 1
                stop.wait(0.5)

        threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in socks]
        for t in threads:
            t.start()
        stop.wait(1.2)   # let the tricklers get going (a few bytes each)
        latencies = []
        for i in range(5):
            start = time.monotonic()
            resp = get(b.port, f"/normal{i}")
            latencies.append(time.monotonic() - start)
            assert resp.status == 200, resp
            assert resp.body == f"ok /normal{i}\n".encode()
        assert max(latencies) < 1.0, f"normal requests took {latencies}"
        # The test only means something if the tricklers were still being held open.
        open_count = sum(_still_open(s) for s in socks)
        assert open_count == 50, f"only {open_count} of 50 tricklers still connected"
    finally:
        stop.set()
        for s in socks:
            s.close()
    assert all(t.startswith("/normal") for t in rec.targets())


def _response_or_none(client: RawClient, request: bytes):
    """The balancer may refuse before or after the request is sent; read whichever comes."""
    readable, _, _ = select.select([client.sock], [], [], 0.5)
    if not readable:
        client.send(request)
    return client.response()


def test_at_max_connections_the_longest_idle_connection_makes_room(upstreams, balancer):
    """nginx closes idle keep-alive connections when it runs out of connections: idle clients
    must not lock new ones out for the whole idle timeout."""
    up, = upstreams(1)
    b = balancer([up.url], max_connections=5, idle_timeout=60)
    held = []
    try:
        for i in range(5):
            c = RawClient(b.port, timeout=5)
            held.append(c)
            assert c.request(b"GET /held%d HTTP/1.1\r\n" % i + HOST + b"\r\n").status == 200
        with RawClient(b.port, timeout=5) as extra:
            resp = extra.request(b"GET /extra HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
            assert resp.status == 200, resp
        assert held[0].is_closed(CLOSE_WAIT), "the longest-idle connection was not closed"
        for c in held[1:]:  # the others still work
            assert c.request(b"GET /still HTTP/1.1\r\n" + HOST + b"\r\n").status == 200
    finally:
        for c in held:
            c.close()


def test_at_max_connections_with_every_connection_busy_new_ones_get_503(upstreams, balancer, caplog):
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    b = balancer([up.url], max_connections=3)
    busy = [RawClient(b.port, timeout=5) for _ in range(3)]
    try:
        for c in busy:
            c.send(b"GET /slow HTTP/1.1\r\n" + HOST + b"\r\n")
        assert up.wait_for_requests(3)
        with RawClient(b.port, timeout=5) as extra:
            resp = _response_or_none(extra, b"GET /extra HTTP/1.1\r\n" + HOST + b"\r\n")
            assert resp.status == 503, resp
            assert "close" in (resp.header("Connection") or "").lower(), resp
            assert extra.is_closed(CLOSE_WAIT)
        refusals = [r for r in caplog.records if "connections refused" in r.getMessage()]
        assert [r.levelname for r in refusals] == ["WARNING"], refusals
        slow.release.set()
        assert [c.response().status for c in busy] == [200, 200, 200]
        assert "/extra" not in [r.target for r in up.requests]
    finally:
        slow.release.set()
        for c in busy:
            c.close()
