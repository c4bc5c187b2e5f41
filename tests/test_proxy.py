"""Integration tests of the proxy core through real sockets: forwarding fidelity, keep-alive, request
and response bodies, streaming, hop-by-hop headers and upstream errors.

Every upstream is a real server on an ephemeral 127.0.0.1 port (conftest's Upstream / RawUpstream), the
balancer runs in-process (conftest's `balancer` fixture) and the client speaks raw bytes, so framing is
checked byte for byte: responses are parsed here with a strict reader (CRLF line ends, token field
names, never Content-Length together with Transfer-Encoding, strict chunk-size lines).

Authority: RFC 9110 / RFC 9112 and the behaviour contract (/tmp/lb_spec.md).
"""

from __future__ import annotations

import hashlib
import re
import select
import socket
import threading
import time
from http import HTTPStatus

import pytest

from conftest import SLACK, Response, default_handler, header, parse_head, read_head, refused_url, RawClient

CLIENT_TIMEOUT = 5.0        # every client socket here; a hang fails the test within this
BIG = 50 * 1024 * 1024      # 50 MiB transfers

TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
STATUS_LINE_RE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([^\x00\r\n]*))?\r\n")
FIELD_LINE_RE = re.compile(rb"(" + TCHAR + rb"+):[ \t]*([^\x00\r\n]*?)[ \t]*\r\n")
CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?\r\n")


# ---------------------------------------------------------------------------------------------------
# Strict response reading (the balancer's output is what is under test)
# ---------------------------------------------------------------------------------------------------

def _readline(f, limit: int) -> bytes:
    try:
        return f.readline(limit)
    except ConnectionResetError as exc:
        raise EOFError("connection reset") from exc


def _read1(f, n: int) -> bytes:
    try:
        return f.read1(n)
    except ConnectionResetError as exc:
        raise EOFError("connection reset") from exc


def read_exact(f, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        more = _read1(f, n - len(data))
        if not more:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += more
    return bytes(data)


def read_head_strict(f) -> bytes:
    """One head through the blank line; every line must end with CRLF."""
    lines = []
    while True:
        line = _readline(f, 65537)
        if not line:
            raise EOFError(b"".join(lines))
        assert line.endswith(b"\r\n"), f"head line not CRLF-terminated: {line!r}"
        lines.append(line)
        if line == b"\r\n":
            return b"".join(lines)


def parse_response_head(head: bytes, http10_client: bool = False):
    """(status, fields) of a response head, asserting its syntax (RFC 9112 sections 4 and 5)."""
    lines = head.splitlines(keepends=True)
    m = STATUS_LINE_RE.fullmatch(lines[0])
    assert m, f"bad status line {lines[0]!r}"
    if not http10_client:
        assert m.group(1) == b"HTTP/1.1", f"response to an HTTP/1.1 client has version {m.group(1)!r}"
    fields = []
    for line in lines[1:-1]:
        fm = FIELD_LINE_RE.fullmatch(line)
        assert fm, f"bad field line {line!r} in {head!r}"
        fields.append((fm.group(1).decode("latin-1"), fm.group(2).decode("latin-1")))
    assert lines[-1] == b"\r\n"
    return int(m.group(2)), fields


def iter_length(f, n: int):
    """Yield a Content-Length body piece by piece as it arrives; EOFError if it is cut short."""
    left = n
    while left:
        data = _read1(f, min(left, 1 << 20))
        if not data:
            raise EOFError(f"connection closed with {left} of {n} body bytes missing")
        left -= len(data)
        yield data


def iter_chunked(f, trailers: list | None = None):
    """Yield the payload of a chunked body as it arrives, validating the framing strictly
    (RFC 9112 section 7.1). Trailer field lines are appended to `trailers`. EOFError if cut short."""
    while True:
        line = _readline(f, 1024)
        if not line:
            raise EOFError("connection closed before the last-chunk")
        m = CHUNK_SIZE_RE.fullmatch(line)
        assert m, f"bad chunk-size line {line!r}"
        size = int(m.group(1), 16)
        if size == 0:
            break
        yield from iter_length(f, size)
        crlf = read_exact(f, 2)
        assert crlf == b"\r\n", f"chunk data not followed by CRLF: {crlf!r}"
    while True:
        line = _readline(f, 65537)
        if not line:
            raise EOFError("connection closed inside the trailer section")
        assert line.endswith(b"\r\n"), f"trailer line not CRLF-terminated: {line!r}"
        if line == b"\r\n":
            return
        assert FIELD_LINE_RE.fullmatch(line), f"bad trailer line {line!r}"
        if trailers is not None:
            trailers.append(line)


def iter_until_close(f):
    while True:
        data = _read1(f, 1 << 20)
        if not data:
            return
        yield data


def framing(fields, status: int, method: str = "GET") -> str:
    te, cl = header(fields, "Transfer-Encoding"), header(fields, "Content-Length")
    assert te is None or cl is None, f"both Transfer-Encoding and Content-Length sent: {fields}"
    if method == "HEAD" or status in (204, 304) or status < 200:
        return "none"
    if te is not None:
        assert te.lower() == "chunked", f"Transfer-Encoding {te!r}"
        return "chunked"
    if cl is not None:
        assert re.fullmatch(r"[0-9]+", cl), f"Content-Length {cl!r}"
        return "length"
    return "close"


def iter_body(f, fields, status: int, method: str = "GET", trailers: list | None = None):
    kind = framing(fields, status, method)
    if kind == "chunked":
        return iter_chunked(f, trailers)
    if kind == "length":
        return iter_length(f, int(header(fields, "Content-Length")))
    if kind == "close":
        return iter_until_close(f)
    return iter(())


class Client(RawClient):
    """RawClient with a strict response reader; a short timeout so a hang fails fast."""

    def __init__(self, port: int, timeout: float = CLIENT_TIMEOUT):
        super().__init__(port, timeout)

    def read_head(self, http10_client: bool = False):
        """(status, fields, interim statuses) of the next final response head."""
        interim = []
        while True:
            status, fields = parse_response_head(read_head_strict(self.file), http10_client)
            if status >= 200:
                return status, fields, interim
            assert status != 101, "101 Switching Protocols relayed"
            assert not http10_client, "1xx response sent to an HTTP/1.0 client (RFC 9110 15.2)"
            interim.append(status)

    def read(self, method: str = "GET", http10_client: bool = False) -> Response:
        status, fields, interim = self.read_head(http10_client)
        trailers: list = []
        body = b"".join(iter_body(self.file, fields, status, method, trailers))
        return Response(f"HTTP/1.1 {status}", fields, body, framing=framing(fields, status, method),
                        interim=interim, trailers=trailers)

    def roundtrip(self, data: bytes, method: str = "GET", http10_client: bool = False) -> Response:
        self.send(data)
        return self.read(method, http10_client)


def request(method: str = "GET", target: str = "/", headers=(), body: bytes | None = None,
            version: str = "HTTP/1.1", host: str | None = "test.local") -> bytes:
    """Raw request bytes. Content-Length is added for `body` unless the headers frame it already."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    names = set()
    for name, value in headers:
        lines.append(f"{name}: {value}")
        names.add(name.lower())
    if body is not None and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def expected_default_body(upstream, method: str, target: str) -> bytes:
    return f"upstream {upstream.port} {method} {target}\n".encode()


def assert_default_ok(resp: Response, upstream, method: str = "GET", target: str = "/"):
    assert resp.status == 200, resp
    assert resp.header("X-Upstream-Port") == str(upstream.port), resp
    if method != "HEAD":
        assert resp.body == expected_default_body(upstream, method, target), resp


def assert_error(resp: Response, status: int, *mentions: str):
    """The contract's error format: text/plain; charset=utf-8, Content-Length, one line
    `<code> <reason>...\\n`."""
    assert resp.status == status, resp
    assert resp.header("Content-Type") == "text/plain; charset=utf-8", resp
    assert resp.framing == "length", resp
    assert int(resp.header("Content-Length")) == len(resp.body), resp
    phrase = HTTPStatus(status).phrase
    assert resp.body.startswith(f"{status} {phrase}".encode()), resp
    assert resp.body.endswith(b"\n") and resp.body.count(b"\n") == 1, resp
    for text in mentions:
        assert text.encode() in resp.body, (text, resp)


def raw_handler(data: bytes, close: bool = False):
    """Upstream handler that answers every request with exactly these bytes."""
    def handler(h, req):
        if close:
            h.close_connection = True
        h.wfile.write(data)
    return handler


def routes(table: dict):
    """Upstream handler: table[target](h, req), anything else -> default_handler."""
    def handler(h, req):
        table.get(req.target, default_handler)(h, req)
    return handler


_PATTERN = hashlib.shake_256(b"load balancer proxy test pattern").digest(65536)


def pattern_blocks(total: int, size: int = 65536):
    """Deterministic, position-dependent data (each block starts with its index), streamed."""
    for index, offset in enumerate(range(0, total, size)):
        n = min(size, total - offset)
        yield (index.to_bytes(8, "big") + _PATTERN[8:size])[:n]


def pattern(total: int) -> bytes:
    return b"".join(pattern_blocks(total))


def upstream_head(conn) -> tuple[bytes, list, object]:
    """For RawUpstream serve functions: (head, fields, buffered file) of the incoming request."""
    f = conn.makefile("rb")
    head = read_head(f)
    _, fields = parse_head(head)
    return head, fields, f


# ---------------------------------------------------------------------------------------------------
# Keep-alive and connection management
# ---------------------------------------------------------------------------------------------------

def test_many_requests_on_one_keepalive_connection(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        for i in range(50):
            resp = c.roundtrip(request("GET", f"/k/{i}?n={i}"))
            assert_default_ok(resp, up, "GET", f"/k/{i}?n={i}")
            assert "close" not in resp.connection_tokens(), resp
        assert not c.is_closed(0.05)
    assert [r.target for r in up.requests] == [f"/k/{i}?n={i}" for i in range(50)]


def test_pipelined_requests_answered_in_order(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url for u in ups])
    data = (request("GET", "/p1") + request("POST", "/p2", body=b"pipelined body")
            + request("GET", "/p3"))
    with Client(b.port) as c:
        c.send(data)  # all three in one write: the balancer must split them at the body boundary
        for up, method, target in zip(ups, ["GET", "POST", "GET"], ["/p1", "/p2", "/p3"]):
            assert_default_ok(c.read(method), up, method, target)
    assert ups[1].requests[0].body == b"pipelined body"


def test_client_connection_close(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        first = c.roundtrip(request("GET", "/one"))
        assert_default_ok(first, up, "GET", "/one")
        assert "close" not in first.connection_tokens()
        last = c.roundtrip(request("GET", "/two", [("Connection", "close")]))
        assert_default_ok(last, up, "GET", "/two")
        assert "close" in last.connection_tokens(), last
        assert c.is_closed(), "connection still open after a `Connection: close` request"


def test_http10_without_keepalive_is_closed(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("GET", "/old", version="HTTP/1.0"), http10_client=True)
        assert_default_ok(resp, up, "GET", "/old")
        assert resp.framing != "chunked"
        assert c.is_closed(), "HTTP/1.0 connection without keep-alive not closed after the response"


def test_http10_without_host_gets_host_upstream(upstreams, balancer):
    """Host is optional in HTTP/1.0 but the balancer speaks HTTP/1.1 upstream, where a client MUST
    send exactly one Host field (RFC 9112 3.2)."""
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("GET", "/nohost", version="HTTP/1.0", host=None), http10_client=True)
        assert_default_ok(resp, up, "GET", "/nohost")
    fwd = up.requests[0]
    if fwd.version == "HTTP/1.1":
        assert len([v for n, v in fwd.fields if n.lower() == "host"]) == 1, fwd


def test_http10_keepalive(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    ka = [("Connection", "keep-alive")]
    with Client(b.port) as c:
        first = c.roundtrip(request("GET", "/ka1", ka, version="HTTP/1.0"), http10_client=True)
        assert_default_ok(first, up, "GET", "/ka1")
        assert first.framing in ("length", "close"), first  # never chunked to HTTP/1.0 (RFC 9112 6.1)
        if first.framing == "close":
            return  # body delimited by closing: the connection is gone by definition
        if "keep-alive" in first.connection_tokens():
            # announced persistent: it must serve the next request
            second = c.roundtrip(request("GET", "/ka2", ka, version="HTTP/1.0"), http10_client=True)
            assert_default_ok(second, up, "GET", "/ka2")
        else:
            # not announced: closing is fine, but if it is still open it must answer correctly
            try:
                c.send(request("GET", "/ka2", ka, version="HTTP/1.0"))
                second = c.read(http10_client=True)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                return
            assert_default_ok(second, up, "GET", "/ka2")


@pytest.mark.parametrize("upstream_framing", ["chunked", "close"])
def test_http10_client_never_gets_chunked(upstreams, balancer, upstream_framing):
    """RFC 9112 6.1: no Transfer-Encoding in a response to an HTTP/1.0 request."""
    payload = b"first piece|" + b"x" * 5000 + b"|last piece"
    if upstream_framing == "chunked":
        raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"c\r\n" + payload[:12] + b"\r\n" + b"%x\r\n" % (len(payload) - 12) + payload[12:]
               + b"\r\n0\r\n\r\n")
        handler = raw_handler(raw)
    else:
        handler = raw_handler(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + payload, close=True)
    up, = upstreams(1, handler)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("GET", "/x", version="HTTP/1.0"), http10_client=True)
        assert resp.status == 200
        assert resp.header("Transfer-Encoding") is None, resp
        assert resp.body == payload
        if resp.framing == "length":
            assert c.is_closed()


# ---------------------------------------------------------------------------------------------------
# Fidelity: method, target, Host, header lines
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,body", [
    ("GET", None), ("HEAD", None), ("POST", b"form=1&b=2"), ("PUT", b"\x00\x01binary\xff"),
    ("DELETE", None), ("PATCH", b"{}"), ("OPTIONS", None), ("PURGE", None),
    ("PROPFIND", b"<?xml version='1.0'?><propfind xmlns='DAV:'><allprop/></propfind>"), ("MKCOL", None),
    ("M-SEARCH", None), ("X_CUSTOM.v2", b"abc"), ("purge", None),
])
def test_method_forwarded_unchanged(upstreams, balancer, method, body):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request(method, "/m", body=body), method)
        assert_default_ok(resp, up, method, "/m")
        assert c.roundtrip(request("GET", "/after")).status == 200  # framing intact afterwards
    fwd = up.requests[0]
    assert (fwd.method, fwd.target) == (method, "/m")
    assert fwd.body == (body or b"")


@pytest.mark.parametrize("target", [
    "/a%2Fb/../c?x=1&x=2&y=%20&z",
    "//double//slash/./x/..",
    "/caf%C3%A9/%7Euser;p=1?q=a+b&r=%2F&s=%e2%9c%93",
    "/?",
    "/p?:@!$&'()*+,;=/?&&",
    "/" + "long/" * 400 + "?" + "k=v&" * 200,
])
def test_target_forwarded_byte_for_byte(upstreams, balancer, target):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        assert_default_ok(c.roundtrip(request("GET", target)), up, "GET", target)
    assert up.requests[0].target == target


def test_options_asterisk_forwarded(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        assert_default_ok(c.roundtrip(request("OPTIONS", "*")), up, "OPTIONS", "*")
    assert (up.requests[0].method, up.requests[0].target) == ("OPTIONS", "*")


def test_host_preserved(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        assert c.roundtrip(request("GET", "/h", host="Shop.Example.test:8443")).status == 200
    fwd = up.requests[0]
    assert [v for n, v in fwd.fields if n.lower() == "host"] == ["Shop.Example.test:8443"]


def test_request_headers_and_duplicates_kept(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    headers = [("X-Dup", "first"), ("Accept", "text/html"), ("X-Dup", "second"),
               ("Accept", "application/json;q=0.5"), ("X-Dup", "third, with comma"),
               ("X-Quoted", '"a, b";q=1,  c\td'), ("User-Agent", "proxy-test/1.0 (x; y)"),
               ("Cookie", "a=1; b=2")]
    with Client(b.port) as c:
        assert c.roundtrip(request("GET", "/hdr", headers)).status == 200
    fwd = up.requests[0]
    values = lambda name: [v for n, v in fwd.fields if n.lower() == name.lower()]  # noqa: E731
    assert values("X-Dup") == ["first", "second", "third, with comma"], fwd.fields
    assert values("Accept") == ["text/html", "application/json;q=0.5"], fwd.fields
    assert values("X-Quoted") == ['"a, b";q=1,  c\td']
    assert values("User-Agent") == ["proxy-test/1.0 (x; y)"]
    assert values("Cookie") == ["a=1; b=2"]


def test_response_set_cookie_lines_kept_separate_in_order(upstreams, balancer):
    cookies = ["a=1; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
               "b=2; HttpOnly", "c=3; Secure; SameSite=Lax"]

    def handler(h, req):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n"
                      + b"".join(f"Set-Cookie: {c}\r\nX-Between: {i}\r\n".encode() for i, c in enumerate(cookies))
                      + b"X-Response: kept\r\nContent-Length: 2\r\n\r\nok")
    up, = upstreams(1, handler)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request())
    assert resp.status == 200 and resp.body == b"ok"
    assert resp.headers_named("Set-Cookie") == cookies, resp.fields
    assert resp.headers_named("X-Between") == ["0", "1", "2"]
    assert resp.header("X-Response") == "kept"


@pytest.mark.parametrize("status", [201, 299, 400, 404, 418, 500, 503, 599])
def test_upstream_status_and_body_relayed(upstreams, balancer, status):
    body = f"upstream said {status}\n".encode()
    up, = upstreams(1, raw_handler(f"HTTP/1.1 {status} Whatever Reason\r\nX-S: {status}\r\n"
                                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body))
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request())
        assert (resp.status, resp.body, resp.header("X-S")) == (status, body, str(status)), resp
        assert c.roundtrip(request()).status == status  # still usable
    assert len(up.requests) == 2  # relayed, not retried elsewhere or replaced


# ---------------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------------

def test_content_length_upload(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    body = pattern(300_001)
    with Client(b.port) as c:
        assert_default_ok(c.roundtrip(request("POST", "/cl", body=body)), up, "POST", "/cl")
        assert_default_ok(c.roundtrip(request("POST", "/empty", body=b"")), up, "POST", "/empty")
    fwd, empty = up.requests
    assert fwd.header("Content-Length") == "300001" and fwd.header("Transfer-Encoding") is None
    assert fwd.body == body
    assert empty.header("Content-Length") == "0" and empty.body == b""


def test_chunked_upload_forwarded_chunked(raw_upstream, balancer):
    """Upstream sees `Transfer-Encoding: chunked`, no Content-Length, strictly valid framing, the same
    payload, and none of the client's trailer fields (contract: accepted but dropped)."""
    seen: dict = {}

    def serve(conn, up):
        head, fields, f = upstream_head(conn)
        seen["head"], seen["fields"] = head, fields
        try:
            trailers: list = []
            seen["body"] = b"".join(iter_chunked(f, trailers))
            seen["trailers"] = trailers
        except (AssertionError, EOFError) as exc:
            seen["error"] = repr(exc)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    up = raw_upstream(serve)
    b = balancer([up.url])
    big = pattern(70_000)
    payload = b"hello" + b" " + big + b"tail"
    body = (b"5\r\nhello\r\n" + b"1;name=value\r\n \r\n" + b"%X\r\n" % len(big) + big + b"\r\n"
            + b"4\r\ntail\r\n" + b"0\r\nX-Checksum: abc\r\n\r\n")
    with Client(b.port) as c:
        resp = c.roundtrip(request("POST", "/chunked", [("Transfer-Encoding", "chunked"),
                                                          ("Trailer", "X-Checksum")]) + body)
        assert (resp.status, resp.body) == (200, b"ok")
    assert "error" not in seen, seen.get("error")
    assert header(seen["fields"], "Transfer-Encoding") == "chunked", seen["head"]
    assert header(seen["fields"], "Content-Length") is None, seen["head"]
    assert seen["body"] == payload
    assert b"x-checksum" not in seen["head"].lower()
    assert seen["trailers"] == [], "client trailer fields forwarded"


@pytest.mark.parametrize("size, framing", [(20_000, "length"), (200_000, "chunked")])
def test_chunked_upload_decoded_by_upstream(upstreams, balancer, size, framing):
    """A chunked body that arrived whole with its head and is small (SMALL_BODY) goes upstream in
    the same send, with a Content-Length, as nginx forwards a buffered body; a larger one streams
    on, chunked."""
    up, = upstreams(1)
    b = balancer([up.url])
    chunks = [b"a" * 1, b"bc" * 100, pattern(size), b"\r\n0\r\n\r\n"]  # payload that looks like framing
    body = b"".join(b"%x\r\n" % len(ch) + ch + b"\r\n" for ch in chunks) + b"0\r\n\r\n"
    with Client(b.port) as c:
        resp = c.roundtrip(request("PUT", "/up", [("Transfer-Encoding", "chunked")]) + body, "PUT")
        assert_default_ok(resp, up, "PUT", "/up")
        assert_default_ok(c.roundtrip(request("GET", "/next")), up, "GET", "/next")
    fwd = up.requests[0]
    payload = b"".join(chunks)
    if framing == "length":
        assert fwd.header("Content-Length") == str(len(payload)) and fwd.header("Transfer-Encoding") is None
    else:
        assert fwd.header("Transfer-Encoding") == "chunked" and fwd.header("Content-Length") is None
    assert fwd.body == payload
    assert up.requests[1].target == "/next"


@pytest.mark.parametrize("body_framing", ["content-length", "content-length-small", "chunked", "chunked-split"])
def test_request_body_streamed_not_buffered(raw_upstream, balancer, body_framing):
    """The upstream receives the first bytes of a (large) body while the client still holds the rest:
    bytes go through as they arrive. "chunked-split": one chunk whose data arrives in two parts.
    Bodies of 1 MiB, and "content-length-small" an 11-byte one (contract: bodies are never buffered
    whole, so also a small body that has not fully arrived must not be waited for)."""
    first_part, second_part = b"hello", pattern(1 << 20)
    if body_framing == "content-length-small":
        second_part = b" world"
    first_seen = threading.Event()
    seen: dict = {}

    def serve(conn, up):
        _, fields, f = upstream_head(conn)
        if header(fields, "Transfer-Encoding"):
            pieces = iter_chunked(f)
        else:
            pieces = iter_length(f, int(header(fields, "Content-Length")))
        got = bytearray()
        try:
            for piece in pieces:
                got += piece
                if len(got) >= len(first_part):
                    first_seen.set()
        except (AssertionError, EOFError) as exc:
            seen["error"] = repr(exc)
        seen["body"] = bytes(got)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    up = raw_upstream(serve)
    b = balancer([up.url])
    total = len(first_part) + len(second_part)
    with Client(b.port) as c:
        if body_framing == "chunked":
            c.send(request("POST", "/s", [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n")
            rest = b"%x\r\n" % len(second_part) + second_part + b"\r\n0\r\n\r\n"
        elif body_framing == "chunked-split":
            c.send(request("POST", "/s", [("Transfer-Encoding", "chunked")]) + b"%x\r\n" % total + first_part)
            rest = second_part + b"\r\n0\r\n\r\n"
        else:
            c.send(request("POST", "/s", [("Content-Length", str(total))]) + first_part)
            rest = second_part
        assert first_seen.wait(5), "upstream did not get the first body bytes before the rest was sent"
        c.send(rest)
        resp = c.read()
        assert (resp.status, resp.body) == (200, b"ok")
    assert seen == {"body": first_part + second_part}


def test_upload_50mb_byte_exact(raw_upstream, balancer):
    seen: dict = {}

    def serve(conn, up):
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        _, fields = parse_head(head + b"\r\n")
        need = int(header(fields, "Content-Length"))
        digest, got = hashlib.sha256(rest), len(rest)
        while got < need:
            more = conn.recv(1 << 20)
            if not more:
                break
            digest.update(more)
            got += len(more)
        seen.update(length=got, sha=digest.hexdigest(), fields=fields)
        answer = digest.hexdigest().encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(answer)
                     + answer)

    up = raw_upstream(serve)
    b = balancer([up.url])
    digest = hashlib.sha256()
    with Client(b.port, timeout=10) as c:
        c.send(request("POST", "/big", [("Content-Length", str(BIG)),
                                       ("Content-Type", "application/octet-stream")]))
        for block in pattern_blocks(BIG):
            digest.update(block)
            c.send(block)
        resp = c.read()
    assert resp.status == 200, resp
    assert seen["length"] == BIG
    assert header(seen["fields"], "Content-Length") == str(BIG)
    assert seen["sha"] == digest.hexdigest()
    assert resp.body == digest.hexdigest().encode()


@pytest.mark.parametrize("upstream_framing", ["content-length", "chunked"])
def test_download_50mb_byte_exact(raw_upstream, balancer, upstream_framing):
    sent: dict = {}

    def serve(conn, up):
        if not up.read_request(conn).startswith(b"GET /big "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nsmall")
            return
        digest = hashlib.sha256()
        if upstream_framing == "chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            for block in pattern_blocks(BIG):
                digest.update(block)
                conn.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
            conn.sendall(b"0\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % BIG)
            for block in pattern_blocks(BIG):
                digest.update(block)
                conn.sendall(block)
        sent["sha"] = digest.hexdigest()

    up = raw_upstream(serve)
    b = balancer([up.url])
    digest, length = hashlib.sha256(), 0
    with Client(b.port, timeout=10) as c:
        c.send(request("GET", "/big"))
        status, fields, _ = c.read_head()
        assert status == 200
        if upstream_framing == "content-length":
            assert header(fields, "Content-Length") == str(BIG), fields
        for piece in iter_body(c.file, fields, status):
            digest.update(piece)
            length += len(piece)
        again = c.roundtrip(request("GET", "/again"))  # framing ended exactly where it should
        assert (again.status, again.body) == (200, b"small"), again
    assert length == BIG
    assert digest.hexdigest() == sent["sha"]


# ---------------------------------------------------------------------------------------------------
# Response bodies
# ---------------------------------------------------------------------------------------------------

def test_chunked_response_exact_framing(upstreams, balancer):
    """Parse the raw bytes of a chunked response ourselves, then check the connection continues
    exactly after the last-chunk (a next response parses from its first byte)."""
    parts = [b"x", b"0\r\n\r\n", pattern(40_000), b"end"]
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"1;ext=1\r\nx\r\n" + b"5\r\n0\r\n\r\n\r\n" + b"%X\r\n" % 40_000 + parts[2] + b"\r\n"
           + b"3\r\nend\r\n" + b"0\r\n\r\n")
    up, = upstreams(1, routes({"/chunked": raw_handler(raw)}))
    b = balancer([up.url])
    with Client(b.port) as c:
        c.send(request("GET", "/chunked"))
        head = read_head_strict(c.file)
        status, fields = parse_response_head(head)
        assert status == 200
        # streamed, never buffered whole: the length is unknown, so it stays chunked
        assert header(fields, "Transfer-Encoding") == "chunked", head
        assert header(fields, "Content-Length") is None, head
        body = bytearray()
        while True:  # raw chunk parsing, byte-exact framing checks
            size_line = c.file.readline(1024)
            assert re.fullmatch(rb"[0-9A-Fa-f]+(;[^\r\n]*)?\r\n", size_line), size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                assert c.file.readline(1024) == b"\r\n"  # no trailers were sent upstream
                break
            body += read_exact(c.file, size)
            assert read_exact(c.file, 2) == b"\r\n"
        assert bytes(body) == b"".join(parts)
        assert_default_ok(c.roundtrip(request("GET", "/next")), up, "GET", "/next")


def test_read_until_close_response_is_chunked_to_http11_client(raw_upstream, balancer):
    payload = pattern(100_000)

    def serve(conn, up):
        up.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for i in range(0, len(payload), 30_000):
            conn.sendall(payload[i:i + 30_000])
        conn.shutdown(socket.SHUT_WR)

    up = raw_upstream(serve)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("GET", "/eof"))
        assert resp.status == 200
        assert resp.framing == "chunked", resp
        assert resp.body == payload
        if "close" in resp.connection_tokens():
            assert c.is_closed()
        else:  # the chunked response delimited itself, the connection goes on
            again = c.roundtrip(request("GET", "/eof2"))
            assert (again.status, again.body) == (200, payload)


NO_BODY_CASES = {
    "HEAD": ("HEAD", "/head", None),
    "HEAD-chunked": ("HEAD", "/head-chunked",
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: head-chunked\r\n\r\n"),
    "204": ("GET", "/204", b"HTTP/1.1 204 No Content\r\nX-Kind: 204\r\n\r\n"),
    "304": ("GET", "/304", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 500\r\n\r\n'),
}


@pytest.mark.parametrize("case", list(NO_BODY_CASES))
def test_no_body_responses_keep_connection_usable(upstreams, balancer, case):
    method, target, raw = NO_BODY_CASES[case]
    table = {target: raw_handler(raw)} if raw else {}
    up, = upstreams(1, routes(table))
    b = balancer([up.url], timeout=5)
    with Client(b.port) as c:
        c.send(request(method, target))
        status, fields, _ = c.read_head()
        if case == "HEAD":
            assert status == 200
            length = header(fields, "Content-Length")
            assert length in (None, str(len(expected_default_body(up, "HEAD", target)))), fields
        elif case == "204":
            assert status == 204
            assert header(fields, "Content-Length") is None, fields     # RFC 9110 8.6
            assert header(fields, "Transfer-Encoding") is None, fields  # RFC 9112 6.1
            assert header(fields, "X-Kind") == "204"
        elif case == "304":
            assert status == 304 and header(fields, "ETag") == '"v1"'
            assert header(fields, "Transfer-Encoding") is None, fields
        else:
            assert status == 200 and header(fields, "X-Kind") == "head-chunked"
        # The very next bytes on the connection must be the next response's status line.
        for i in range(2):
            assert_default_ok(c.roundtrip(request("GET", f"/next{i}")), up, "GET", f"/next{i}")


def test_upstream_interim_1xx_then_final(upstreams, balancer):
    raw = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
    up, = upstreams(1, routes({"/hints": raw_handler(raw)}))
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("GET", "/hints"))
        assert (resp.status, resp.body) == (200, b"final"), resp
        assert_default_ok(c.roundtrip(request("GET", "/n")), up, "GET", "/n")


# ---------------------------------------------------------------------------------------------------
# Expect: 100-continue
# ---------------------------------------------------------------------------------------------------

def serve_continue_then_body(conn, up) -> None:
    """An upstream that honours Expect: 100 Continue after the head, then reads the body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += up.recv(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nExpect: 100-continue" in head, head
    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += up.recv(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(str(len(body))),
                                                                       str(len(body)).encode()))


@pytest.mark.parametrize("size", [10_000, 300_000])
def test_expect_100_continue_forwarded_and_the_upstreams_100_relayed(raw_upstream, balancer, size):
    """Go's ReverseProxy and HAProxy forward Expect: the upstream decides (a 100, or a final
    answer that spares the client its upload); its 100 reaches the waiting client."""
    up = raw_upstream(serve_continue_then_body)
    b = balancer([up.url])
    body = pattern(size)
    with Client(b.port) as c:
        c.send(request("POST", "/expect", [("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
        try:
            head = read_head_strict(c.file)  # we hold the body until the interim response arrives
        except socket.timeout:
            pytest.fail("the upstream's `100 Continue` did not reach the waiting client")
        assert parse_response_head(head)[0] == 100, head
        c.send(body)
        resp = c.read("POST")
        assert resp.interim == [], "more than one interim response"
        assert resp.status == 200 and resp.body == str(size).encode(), resp


def test_expect_100_continue_with_an_upstream_that_ignores_it(upstreams, balancer):
    """An upstream that reads the body without sending 100: the client sends after its own wait
    (curl waits one second), and everything goes through."""
    up, = upstreams(1)
    b = balancer([up.url])
    body = pattern(70_000)
    with Client(b.port) as c:
        c.send(request("POST", "/expect", [("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
        # No 100 within half a second: the balancer does not answer it on the upstream's behalf.
        assert select.select([c.sock], [], [], 0.5)[0] == []
        c.send(body)
        assert_default_ok(c.read("POST"), up, "POST", "/expect")
        assert_default_ok(c.roundtrip(request("GET", "/n")), up, "GET", "/n")
    fwd = up.requests[0]
    assert fwd.header("Expect") == "100-continue", fwd.fields
    assert fwd.body == body and fwd.header("Content-Length") == str(len(body))


def test_expect_100_continue_body_sent_without_waiting(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("PUT", "/eager", [("Expect", "100-continue")], body=b"eager body"), "PUT")
        assert resp.interim in ([], [100]), resp.interim
        assert_default_ok(resp, up, "PUT", "/eager")
        assert_default_ok(c.roundtrip(request("GET", "/n")), up, "GET", "/n")
    assert up.requests[0].body == b"eager body" and up.requests[0].header("Expect") is None


def test_expect_100_continue_ignored_for_http10(upstreams, balancer):
    """RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored (and no
    1xx may be sent to an HTTP/1.0 client, 15.2)."""
    up, = upstreams(1)
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("POST", "/old", [("Expect", "100-continue")], body=b"hello",
                                   version="HTTP/1.0"), "POST", http10_client=True)
        assert_default_ok(resp, up, "POST", "/old")
    assert up.requests[0].body == b"hello"


# ---------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("upstream_framing", ["close", "chunked", "chunked-split", "content-length"])
def test_event_stream_relayed_event_by_event(upstreams, balancer, upstream_framing):
    """The first event reaches the client while the upstream still holds the second one.
    The second event is large (an SSE comment line of 300 kB first), so announced lengths are large
    too; "chunked-split": one chunk whose data holds both events, sent in two parts."""
    event1 = b"event: tick\ndata: one\n\n"
    event2 = b": " + b"p" * 300_000 + b"\n\ndata: two\n\n"
    release, finished = threading.Event(), threading.Event()

    def events(h, req):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        if upstream_framing == "close":
            h.close_connection = True
            first, last = head + b"\r\n" + event1, event2
        elif upstream_framing == "chunked":
            first = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(event1) + event1 + b"\r\n"
            last = b"%x\r\n" % len(event2) + event2 + b"\r\n0\r\n\r\n"
        elif upstream_framing == "chunked-split":
            first = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(event1 + event2) + event1
            last = event2 + b"\r\n0\r\n\r\n"
        else:
            first = head + b"Content-Length: %d\r\n\r\n" % len(event1 + event2) + event1
            last = event2
        h.wfile.write(first)
        release.wait(10)
        h.wfile.write(last)
        finished.set()

    up, = upstreams(1, routes({"/events": events}))
    b = balancer([up.url])
    try:
        with Client(b.port, timeout=3) as c:
            c.send(request("GET", "/events", [("Accept", "text/event-stream")]))
            got = b""
            try:  # the upstream holds the second event until `release`: nothing here may wait for it
                status, fields, _ = c.read_head()
                assert status == 200 and header(fields, "Content-Type") == "text/event-stream"
                if upstream_framing != "content-length":
                    assert framing(fields, status) == "chunked", fields  # contract: re-framed for HTTP/1.1
                pieces = iter_body(c.file, fields, status)
                while len(got) < len(event1):
                    got += next(pieces)
            except socket.timeout:
                pytest.fail(f"first event not relayed while the upstream waits (got {got!r}): buffered")
            assert got == event1
            release.set()
            got += b"".join(pieces)
            assert got == event1 + event2
            assert finished.wait(5)
            assert_default_ok(c.roundtrip(request("GET", "/after")), up, "GET", "/after")
    finally:
        release.set()


# ---------------------------------------------------------------------------------------------------
# Hop-by-hop and forwarding headers
# ---------------------------------------------------------------------------------------------------

def _tokens(values):
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def test_request_hop_by_hop_headers_not_forwarded(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    # Upgrade without "Connection: upgrade" is no upgrade request: removed like the others.
    headers = [("Connection", "keep-alive, x-SECRET"), ("connection", "X-Other"),
               ("X-Secret", "1"), ("X-Other", "2"), ("Keep-Alive", "timeout=5, max=100"),
               ("Proxy-Connection", "keep-alive"), ("TE", "trailers, deflate;q=0.5"),
               ("Trailer", "X-Checksum"), ("Upgrade", "websocket"),
               ("Proxy-Authorization", "Basic dXNlcjpwYXNz"), ("X-End-To-End", "kept"),
               ("Authorization", "Bearer end-to-end")]
    with Client(b.port) as c:
        assert_default_ok(c.roundtrip(request("GET", "/hop", headers)), up, "GET", "/hop")
        assert_default_ok(c.roundtrip(request("GET", "/hop2")), up, "GET", "/hop2")  # still open
    fwd = up.requests[0]
    names = {n.lower() for n, _ in fwd.fields}
    leaked = names & {"x-secret", "x-other", "keep-alive", "proxy-connection", "te", "trailer",
                      "upgrade", "proxy-authorization"}
    assert not leaked, fwd.fields
    # The balancer may manage its own upstream connection, nothing the client named survives.
    conn_values = [v for n, v in fwd.fields if n.lower() == "connection"]
    assert _tokens(conn_values) <= {"keep-alive", "close"}, conn_values
    assert fwd.header("X-End-To-End") == "kept"
    assert fwd.header("Authorization") == "Bearer end-to-end"


def test_response_hop_by_hop_headers_not_forwarded(upstreams, balancer):
    raw = (b"HTTP/1.1 200 OK\r\nConnection: x-foo, keep-alive\r\nX-Foo: bar\r\nKeep-Alive: timeout=5\r\n"
           b"Proxy-Authenticate: Basic realm=\"upstream\"\r\nUpgrade: h2c\r\nTrailer: X-Checksum\r\n"
           b"Proxy-Connection: keep-alive\r\nX-End-To-End: kept\r\nWWW-Authenticate: Basic realm=\"app\"\r\n"
           b"Content-Length: 2\r\n\r\nok")
    up, = upstreams(1, routes({"/hop": raw_handler(raw)}))
    b = balancer([up.url])
    with Client(b.port) as c:
        resp = c.roundtrip(request("GET", "/hop"))
        assert (resp.status, resp.body) == (200, b"ok")
        names = {n.lower() for n, _ in resp.fields}
        leaked = names & {"x-foo", "keep-alive", "proxy-authenticate", "upgrade", "trailer", "proxy-connection"}
        assert not leaked, resp.fields
        assert resp.connection_tokens() <= {"keep-alive"}, resp.fields  # nothing of the upstream's
        assert resp.header("X-End-To-End") == "kept"
        assert resp.header("WWW-Authenticate") == 'Basic realm="app"'
        assert_default_ok(c.roundtrip(request("GET", "/n")), up, "GET", "/n")


@pytest.mark.parametrize("client_xff,expected", [
    (None, "127.0.0.1"),
    (["1.2.3.4"], "1.2.3.4, 127.0.0.1"),
    (["1.2.3.4", "5.6.7.8, 9.9.9.9"], "1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1"),
])
@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-proxy", "untrusted-client"])
def test_forwarded_headers_added(upstreams, balancer, client_xff, expected, trusted):
    # Issue 20: a --trusted-proxies peer's list is extended; anyone else's replaced.
    up, = upstreams(1)
    b = balancer([up.url], trusted_proxies="127.0.0.1" if trusted else None)
    expected = expected if trusted else "127.0.0.1"
    headers = [("X-Forwarded-For", v) for v in client_xff or []]
    with Client(b.port) as c:
        assert c.roundtrip(request("GET", "/xff", headers, host="app.example:8443")).status == 200
    fwd = up.requests[0]
    assert fwd.header("X-Forwarded-For") == expected, fwd.fields
    assert [v for n, v in fwd.fields if n.lower() == "x-forwarded-host"] == ["app.example:8443"], fwd.fields
    assert [v for n, v in fwd.fields if n.lower() == "x-forwarded-proto"] == ["http"], fwd.fields


def test_connection_header_cannot_remove_forwarded_headers(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    headers = [("Connection", "X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto"),
               ("X-Forwarded-For", "1.2.3.4")]
    with Client(b.port) as c:
        assert c.roundtrip(request("GET", "/xff", headers)).status == 200
    fwd = up.requests[0]
    assert fwd.header("X-Forwarded-For") in ("1.2.3.4, 127.0.0.1", "127.0.0.1"), fwd.fields
    assert fwd.header("X-Forwarded-Host") == "test.local", fwd.fields
    assert fwd.header("X-Forwarded-Proto") == "http", fwd.fields


# ---------------------------------------------------------------------------------------------------
# Upstream errors
# ---------------------------------------------------------------------------------------------------

def _healthy_after(balancer_obj, healthy):
    """After an error, a normal request on a fresh connection is served by the healthy upstream."""
    with Client(balancer_obj.port) as c:
        assert_default_ok(c.roundtrip(request("GET", "/healthy")), healthy, "GET", "/healthy")


def test_refused_upstream_502(balancer, caplog):
    """The body says what failed; the upstream's address is internal and goes to the log only (as
    nginx, HAProxy and Go's ReverseProxy: clients on the internet never learn it)."""
    url = refused_url()
    b = balancer([url])
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="load_balancer"):
        with Client(b.port) as c:
            resp = c.roundtrip(request("GET", "/refused"))
    assert time.monotonic() - started < 3
    assert_error(resp, 502, "connection refused")
    assert url.removeprefix("http://").encode() not in resp.body
    assert any(url in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_refused_upstream_fails_over_to_healthy(upstreams, balancer, method):
    """Contract: a failed TCP connect is retried on the next upstream, also for POST with a body."""
    healthy, = upstreams(1)
    b = balancer([refused_url(), healthy.url])
    body = b"payload" if method == "POST" else None
    for i in range(3):
        with Client(b.port) as c:
            assert_default_ok(c.roundtrip(request(method, f"/f{i}", body=body), method), healthy, method, f"/f{i}")
    assert [r.target for r in healthy.requests] == ["/f0", "/f1", "/f2"]
    assert all(r.body == (body or b"") for r in healthy.requests)


def _hanging_upstream(raw_upstream, release: threading.Event):
    def serve(conn, up):
        up.read_request(conn)
        release.wait(10)
    return raw_upstream(serve)


def test_upstream_read_timeout_504(raw_upstream, balancer):
    release = threading.Event()
    try:
        hang = _hanging_upstream(raw_upstream, release)
        b = balancer([hang.url], timeout=0.5)
        with Client(b.port) as c:
            started = time.monotonic()
            resp = c.roundtrip(request("GET", "/slow"))
            elapsed = time.monotonic() - started
        assert_error(resp, 504)
        assert 0.4 <= elapsed < 0.5 + SLACK, elapsed
    finally:
        release.set()


def test_upstream_read_timeout_then_healthy(raw_upstream, upstreams, balancer):
    release = threading.Event()
    try:
        hang = _hanging_upstream(raw_upstream, release)
        healthy, = upstreams(1)
        b = balancer([hang.url, healthy.url], timeout=0.5)
        with Client(b.port) as c:  # POST is not retried once sent: the timeout is the answer
            started = time.monotonic()
            resp = c.roundtrip(request("POST", "/slow", body=b"data"), "POST")
            assert_error(resp, 504)
            assert time.monotonic() - started < 3
        assert healthy.requests == []
        _healthy_after(b, healthy)
    finally:
        release.set()


GARBAGE = {
    "garbage": b"garbage\r\n\r\n",
    "4-digit-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "no-status-code": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "binary-then-close": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


def _garbage_upstream(raw_upstream, data: bytes, release: threading.Event):
    def serve(conn, up):
        up.read_request(conn)
        conn.sendall(data)
        if data.endswith(b"\r\n\r\n"):  # complete head: keep the connection open, 502 must not wait for EOF
            release.wait(10)
    return raw_upstream(serve)


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_status_line_502(raw_upstream, balancer, kind):
    release = threading.Event()
    try:
        bad = _garbage_upstream(raw_upstream, GARBAGE[kind], release)
        b = balancer([bad.url], timeout=5)
        with Client(b.port) as c:
            started = time.monotonic()
            resp = c.roundtrip(request("GET", "/g"))
        assert_error(resp, 502)
        assert time.monotonic() - started < 3
    finally:
        release.set()


def test_garbage_status_line_then_healthy(raw_upstream, upstreams, balancer):
    release = threading.Event()
    try:
        bad = _garbage_upstream(raw_upstream, GARBAGE["garbage"], release)
        healthy, = upstreams(1)
        b = balancer([bad.url, healthy.url], timeout=5)
        with Client(b.port) as c:  # POST: not retried after it was sent
            assert_error(c.roundtrip(request("POST", "/g", body=b"x"), "POST"), 502)
        assert healthy.requests == []
        _healthy_after(b, healthy)
    finally:
        release.set()


@pytest.mark.parametrize("upstream_framing", ["content-length", "chunked"])
def test_upstream_dies_mid_body(raw_upstream, upstreams, balancer, upstream_framing):
    partial = pattern(100)

    def serve(conn, up):
        up.read_request(conn)
        if upstream_framing == "content-length":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + partial)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + partial + b"\r\n")
        conn.shutdown(socket.SHUT_RDWR)

    broken = raw_upstream(serve)
    healthy, = upstreams(1)
    b = balancer([broken.url, healthy.url])
    with Client(b.port) as c:
        c.send(request("GET", "/dies"))
        status, fields, _ = c.read_head()
        assert status == 200
        if upstream_framing == "content-length":
            assert header(fields, "Content-Length") == "1000", fields
        got = []
        with pytest.raises(EOFError):  # closed (or reset) before the body is complete: no fake ending
            for piece in iter_body(c.file, fields, status):
                got.append(piece)
        assert b"".join(got) == partial  # what arrived was relayed, nothing invented
        assert c.is_closed(1)
    _healthy_after(b, healthy)
