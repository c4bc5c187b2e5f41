#!/usr/bin/env python3
"""A round-robin HTTP/1.1 load balancer in one file, standard library only.

Run it::

    python load_balancer.py                      # port 8080, over SERVER_URLS below
    python load_balancer.py --backend http://10.0.0.5:8000 --backend http://10.0.0.6:8000
    python load_balancer.py --workers auto --admin-port 8081
    python load_balancer.py --help               # every option with its default

What happens to a request, in order:

* A ``ThreadingHTTPServer`` accepts the connection (one thread each, at most
  ``--max-connections``; a finished connection's thread waits as a spare for the next one) and
  keeps it alive between requests (HTTP/1.1, HTTP/1.0 keep-alive).
* The request head is read against a deadline and checked strictly (RFC 9112): anything that two
  HTTP implementations could frame differently is refused with a 4xx before a byte of it reaches
  an upstream.
* ``RoundRobin`` picks the next upstream (one ``itertools.count``, O(1)), skipping the ones that
  active health checks or recent failures took out of rotation.
* The request goes out on a pooled keep-alive ``http.client`` connection, its body streamed in
  bounded pieces; hop-by-hop headers are removed and ``X-Forwarded-*`` added. The response comes
  back the same way, bytes passed on as they arrive.
* When no upstream can answer, the client gets 502, 503 or 504 with a one-line reason. A request
  is tried on the next upstream only while that is safe (see ``ProxyHandler.may_retry``).

Embed it::

    import load_balancer
    balancer = load_balancer.LoadBalancer(load_balancer.Config(port=0, backends=("http://127.0.0.1:9001",)))
    balancer.start()       # serves from background threads
    ...
    balancer.close()       # graceful: in-flight requests finish
"""

from __future__ import annotations

import _thread
import argparse
import collections
import email.utils
import errno
import http.client
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__version__ = "1.0.0"

#: The upstream servers, in rotation order. Edit this list, or pass ``--backend URL`` (repeatable).
SERVER_URLS = [
    "http://localhost:8001",
    "http://localhost:8002",
    "http://localhost:8003",
]

log = logging.getLogger("load_balancer")
access_log = logging.getLogger("load_balancer.access")

# Bodies never sit in memory whole: they are copied in pieces of at most READ_BUFFER bytes, through
# buffers reused across requests. A copy buffer is never larger than the socket reader's own: then
# BufferedReader.readinto1 returns what is buffered without waiting for more (with a larger one, it
# copies the buffered bytes and then blocks on the socket: a stalled event stream).
READ_BUFFER = 64 * 1024
# A request body up to this size that has fully arrived with its head goes upstream in the same
# send, and stays replayable if the upstream fails before answering.
SMALL_BODY = 64 * 1024
MAX_CHUNK_LINE = 4096            # chunk-size line with extensions (RFC 9112 section 7.1.1)
MAX_INTERIM_RESPONSES = 10       # 1xx responses skipped before a final one; more is an attack
MAX_LEADING_EMPTY_LINES = 8      # CRLFs tolerated before a request line (RFC 9112 section 2.2)
THREAD_STACK_SIZE = 512 * 1024   # per connection thread; the default 8 MiB reserves too much
# Above GATE_THRESHOLD requests in flight, at most GATE_SLOTS threads run request code at once, in
# arrival order (see FairGate). Measured here, wrk with 256 connections: p99 2.7-3.5 s without the
# gate, 0.1-0.3 s with it (fewer slots: shorter tail, fewer requests/s; 4 was the best trade).
# Below the threshold the gate costs one uncontended lock per pass: 32 connections lose nothing.
# Threshold 32 rather than 64, same session: p99 at 64 connections 11.5 ms instead of 113 ms, at
# 128 connections 94 ms instead of 376 ms, for about the same requests/s.
GATE_SLOTS = 4
GATE_THRESHOLD = 32
# A connection thread that has finished waits this long for the next connection, and up to
# SPARE_THREADS of them wait (Apache's spare threads): starting a thread costs 55-150 us here, and
# under load the accept loop then waits for the GIL once per connection. Measured with wrk opening
# 256 connections at once, same session: p99 137-203 ms with a thread started per connection,
# 67-86 ms with spare threads and burst accept.
SPARE_THREADS = 256
SPARE_THREAD_SECONDS = 60.0
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # Linux: EPIPE instead of SIGPIPE, whoever embeds us
TCP_INFO = getattr(socket, "TCP_INFO", 0)  # Linux: struct tcp_info, see is_reusable
TCP_ESTABLISHED = 1


# ===================================================================================================
# Configuration
# ===================================================================================================

@dataclass(frozen=True)
class Config:
    """Every setting, with its default. Command-line flags are these names with dashes."""

    backends: tuple = tuple(SERVER_URLS)
    host: str = "0.0.0.0"
    port: int = 8080
    # Upstream side. nginx: proxy_connect_timeout 60s, proxy_read_timeout 60s.
    timeout: float = 30.0          # for an upstream's response head, and between reads of its body
    connect_timeout: float = 5.0
    pool_size: int = 64            # idle keep-alive connections kept per upstream (Go: MaxIdleConnsPerHost)
    # Client side. nginx: client_header_timeout 60s, client_body_timeout 60s, keepalive_timeout 75s.
    header_timeout: float = 10.0   # for a new connection's first byte, and a whole head from its first
    idle_timeout: float = 60.0     # between keep-alive requests, and between reads/writes of a body
    max_request_line: int = 8190   # 414 above (Apache LimitRequestLine)
    max_header_size: int = 32768   # bytes of header fields, 431 above (nginx: 4 x 8k buffers)
    max_headers: int = 100         # header fields, 431 above (Apache LimitRequestFields)
    max_body_size: int = 1 << 30   # bytes, 413 above; 0 = unlimited (nginx client_max_body_size)
    max_connections: int = 1024    # concurrent client connections per worker, 503 above
    # Health. Active checks as HAProxy's "check inter 5s rise 2 fall 3"; passive as nginx's
    # "max_fails=1 fail_timeout=10s".
    health_path: str = "/health"
    health_interval: float = 5.0   # 0 turns active checks off
    health_timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    max_fails: int = 1             # failed requests within fail_timeout that take an upstream out
    fail_timeout: float = 10.0     # ... and for how long
    # Process.
    drain_timeout: float = 10.0    # on SIGTERM/SIGINT, how long in-flight requests may take
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None  # GET /status as JSON; off unless set
    workers: int = 1               # processes sharing the port through SO_REUSEPORT
    access_log: bool = False
    log_level: str = "info"

    def __post_init__(self):
        """Refuse impossible settings with a one-line reason naming the flag (ValueError)."""
        if not self.backends:
            raise ValueError("at least one --backend is needed")
        for url in self.backends:
            parse_backend_url(url)
        ranges = (
            ((">", 0), ("timeout", "connect_timeout", "header_timeout", "idle_timeout",
                        "health_timeout", "fail_timeout")),
            ((">=", 0), ("health_interval", "drain_timeout", "max_body_size", "pool_size")),
            ((">=", 1), ("max_request_line", "max_header_size", "max_headers", "max_connections",
                         "rise", "fall", "max_fails", "workers")),
        )
        for (relation, least), names in ranges:
            for name in names:
                value = getattr(self, name)
                if not math.isfinite(value):
                    raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
                if value < least or (relation == ">" and value == least):
                    raise ValueError(f"--{name.replace('_', '-')} must be {relation} {least}, got {value}")
        for name in ("port", "admin_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be a port number 0-65535, got {value}")
        if not self.health_path.startswith("/") or any(c in self.health_path for c in " \r\n\t"):
            raise ValueError(f"--health-path must be a path starting with '/', got {self.health_path!r}")


def parse_backend_url(url: str) -> tuple[str, int]:
    """``http://host[:port]`` -> (host, port); ValueError with a one-line reason otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as error:
        raise ValueError(f"invalid backend URL {url!r}: {error}") from None
    if parts.scheme != "http":
        raise ValueError(f"invalid backend URL {url!r}: only http:// upstreams are supported")
    if not parts.hostname or not HOST.fullmatch(parts.netloc.encode("utf-8", "replace")):
        raise ValueError(f"invalid backend URL {url!r}: no valid host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"invalid backend URL {url!r}: give scheme, host and port only")
    return parts.hostname, port


# ===================================================================================================
# HTTP/1.1 message rules (RFC 9110, RFC 9112): pure functions, bytes in, bytes out
# ===================================================================================================

class HTTPError(Exception):
    """A message that breaks the protocol or a limit. For a request, `status` is the answer."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Hop-by-hop header fields (RFC 9110 section 7.6.1) describe one connection, not the message: they
# are removed before forwarding, in both directions, with every field that Connection names.
# The same table as Go's httputil.ReverseProxy.
HOP_BY_HOP = frozenset({
    b"connection",
    b"proxy-connection",     # non-standard, but still sent by libcurl and old browsers
    b"keep-alive",           # HTTP/1.0 keep-alive parameters (RFC 2068 section 19.7.1)
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",              # "Trailer", not "Trailers" (RFC 7230 erratum 4522)
    b"transfer-encoding",    # every body is re-framed by the balancer itself
    b"upgrade",              # protocol switches (websocket, h2c) are not tunnelled
})
# Toward the upstream, the balancer also writes these itself: Host (first, RFC 9112 section 3.2),
# the framing header, and X-Forwarded-* (a client's own X-Forwarded-Host/Proto are not trusted;
# its X-Forwarded-For is kept and extended). Expect is answered here, not forwarded (as nginx).
DROP_TO_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-for",
                                 b"x-forwarded-host", b"x-forwarded-proto"}
DROP_TO_CLIENT = HOP_BY_HOP | {b"content-length"}

# The header fields whose values the proxy itself needs to read.
REQUEST_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                            b"expect", b"x-forwarded-for"})
RESPONSE_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date"})

# Body framing (RFC 9112 section 6.3).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)

TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEXDIG = b"0123456789abcdefABCDEF"
# A head may hold visible ASCII, obs-text, SP and HTAB, and CR LF as line ends (RFC 9110 section
# 5.5); NUL, other controls and DEL anywhere are refused (RFC 9112 section 2.2: at least as strict
# as HAProxy and nginx, which refuse them too).
HEAD_BYTES = b"\t\r\n" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
# A request target is visible ASCII only; a fragment ("#") is never sent (RFC 9112 section 3.2).
TARGET_BYTES = bytes(b for b in range(0x21, 0x7F) if b != ord("#"))
CHUNK_EXT_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (.*))?", re.S)
# uri-host [ ":" port ] (RFC 9110 section 7.2; RFC 3986 section 3.2.2); userinfo is refused.
HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::[0-9]*)?")
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})  # RFC 9110 9.2.2
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Headers:
    """A header section as received: (lowercase name, raw line) pairs in order, repeats kept.

    Offers the part of ``email.message.Message`` that users of ``http.server`` and ``http.client``
    reach for (``get``, ``get_all``, ``items``, ``in``), without the cost of building one."""

    __slots__ = ("fields",)

    def __init__(self, fields: list[tuple[bytes, bytes]]):
        self.fields = fields

    def get_all(self, name: str, failobj=None) -> list[str] | None:
        key = name.lower().encode("latin-1")
        found = [line.partition(b":")[2].strip(b" \t").decode("latin-1")
                 for lname, line in self.fields if lname == key]
        return found or failobj

    def get(self, name: str, failobj=None) -> str | None:
        found = self.get_all(name)
        return found[0] if found else failobj

    def items(self) -> list[tuple[str, str]]:
        pairs = (line.partition(b":") for _, line in self.fields)
        return [(name.decode("latin-1"), value.strip(b" \t").decode("latin-1")) for name, _, value in pairs]

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def __contains__(self, name: str) -> bool:
        return self.get_all(name) is not None

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.fields)


def check_head_bytes(head: bytes) -> None:
    """Refuse control characters and any CR or LF that is not part of a CRLF line end."""
    if head.translate(None, HEAD_BYTES):
        raise HTTPError(400, "control character in message head")
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf:
        raise HTTPError(400, "bare CR or LF in message head (RFC 9112 section 2.2)")


def parse_fields(lines: list[bytes], wanted: frozenset, max_fields: int) -> tuple[list, dict]:
    """Header lines -> ([(lowercase name, line)], {wanted name: [values]}), strictly."""
    if len(lines) - 1 > max_fields:
        raise HTTPError(431, f"more than {max_fields} header fields")
    fields = []
    values: dict = {}
    for line in itertools.islice(lines, 1, None):
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TCHAR):
            raise HTTPError(400, describe_bad_field(line))
        lname = name.lower()
        fields.append((lname, line))
        if lname in wanted:
            values.setdefault(lname, []).append(value.strip(b" \t"))
    return fields, values


def describe_bad_field(line: bytes) -> str:
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding in header (RFC 9112 section 5.2)"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if name.rstrip(b" \t") != name:
        return "whitespace between header name and colon (RFC 9112 section 5.1)"
    return "empty or invalid header name"


def comma_list(values: list[bytes]) -> list[bytes]:
    """Elements of a list-valued field (RFC 9110 section 5.6.1), lowercased, empty ones kept."""
    return [item.strip(b" \t").lower() for value in values for item in value.split(b",")]


def parse_content_length(values: list[bytes], *, allow_repeats: bool) -> int:
    """RFC 9110 section 8.6. A request may carry one Content-Length, as nginx requires; a response
    may repeat the same value (RFC 9110 allows recipients to accept that), never differing ones."""
    items = [v.strip(b" \t") for value in values for v in value.split(b",")]
    if len(items) > 1 and not (allow_repeats and len(set(items)) == 1):
        raise HTTPError(400, "several Content-Length values")
    length = items[0]
    # bytes.isdigit: ASCII digits only, so no sign, no "0x", no spaces; at most 2**63-1, as HAProxy.
    if not length.isdigit() or len(length) > 19 or int(length) >= 1 << 63:
        raise HTTPError(400, "invalid Content-Length")
    return int(length)


class Request:
    """A request head that passed every check, with what the proxy needs already worked out."""

    __slots__ = ("method", "target", "version", "fields", "host", "framing", "length", "keep_alive",
                 "expect_continue", "connection_tokens", "forwarded_for")

    @property
    def headers(self) -> Headers:
        return Headers(self.fields)


def parse_request_head(head: bytes, config: Config) -> Request:
    """Parse and validate a request head (through its final CRLF CRLF), or raise HTTPError with the
    status to answer: 400 syntax, 413/414/431 limits, 417 expectation, 501 unsupported, 505 version."""
    check_head_bytes(head)
    lines = head.split(b"\r\n")
    del lines[-2:]
    request_line = lines[0]
    if len(request_line) > config.max_request_line:
        raise HTTPError(414, f"request line longer than {config.max_request_line} bytes")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if HTTP_VERSION.fullmatch(version):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HTTPError(400, "malformed request line")
    if not method or method.translate(None, TCHAR):
        raise HTTPError(400, "invalid method")
    if method == b"CONNECT":
        raise HTTPError(501, "CONNECT is not supported")
    if not target or target.translate(None, TARGET_BYTES):
        raise HTTPError(400, "invalid request target")
    authority = None
    if target[0] != 0x2F:  # not origin-form "/..."
        if target == b"*":
            if method != b"OPTIONS":
                raise HTTPError(400, "asterisk-form target is for OPTIONS only")
        else:
            authority, target = split_absolute_form(target)
    if sum(len(line) + 2 for line in lines) - len(request_line) - 2 > config.max_header_size:
        raise HTTPError(431, f"header fields larger than {config.max_header_size} bytes")
    fields, values = parse_fields(lines, REQUEST_FIELDS, config.max_headers)

    request = Request()
    request.method, request.target, request.version, request.fields = method, target, version, fields
    hosts = values.get(b"host")
    if hosts:
        if len(hosts) > 1:
            raise HTTPError(400, "several Host header fields")
        if not HOST.fullmatch(hosts[0]):
            raise HTTPError(400, "invalid Host header")
    elif version == b"HTTP/1.1":
        raise HTTPError(400, "missing Host header (RFC 9112 section 3.2)")
    # RFC 9112 section 3.2.2: the authority of an absolute-form target replaces Host.
    request.host = authority or (hosts[0] if hosts else None)

    tokens = frozenset(comma_list(values[b"connection"])) if b"connection" in values else frozenset()
    request.connection_tokens = tokens
    if version == b"HTTP/1.1":
        request.keep_alive = b"close" not in tokens
    else:
        request.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    request.framing, request.length = request_framing(values, version, config.max_body_size)

    request.expect_continue = False
    if b"expect" in values:
        if comma_list(values[b"expect"]) != [b"100-continue"]:
            raise HTTPError(417, "only Expect: 100-continue is supported")
        request.expect_continue = request.framing != NO_BODY
    request.forwarded_for = values.get(b"x-forwarded-for")
    return request


def split_absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """``http://host:port/path?query`` -> (authority, origin-form target)."""
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        raise HTTPError(400, "request target is neither origin-form nor absolute-form")
    rest = target[scheme_end + 3:]
    end = len(rest)
    for separator in (b"/", b"?"):
        found = rest.find(separator)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if not HOST.fullmatch(authority):
        raise HTTPError(400, "invalid authority in absolute-form target")
    return authority, path if path.startswith(b"/") else b"/" + path


def request_framing(values: dict, version: bytes, max_body_size: int) -> tuple[int, int]:
    """How the request body ends (RFC 9112 section 6.3), refusing every ambiguous framing: the
    request smuggling defences of RFC 9112 section 6.1 and 11.2."""
    te = values.get(b"transfer-encoding")
    cl = values.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":  # RFC 9112 section 6.1: faulty framing in HTTP/1.0
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = comma_list(te)
        if codings[-1] != b"chunked":
            raise HTTPError(400, "Transfer-Encoding must end with chunked")
        if len(codings) > 1:
            if any(not c or c.translate(None, TCHAR) or c == b"chunked" for c in codings[:-1]):
                raise HTTPError(400, "invalid Transfer-Encoding")
            raise HTTPError(501, "only the chunked transfer coding is supported")
        return CHUNKED, 0
    if cl is not None:
        length = parse_content_length(cl, allow_repeats=False)
        if max_body_size and length > max_body_size:
            raise HTTPError(413, f"request body larger than {max_body_size} bytes")
        return LENGTH, length
    return NO_BODY, 0


class ResponseHead:
    """A response head that passed every check."""

    __slots__ = ("status", "reason", "version", "fields", "framing", "length", "keep_alive",
                 "connection_tokens", "content_length", "has_date")


def parse_response_head(head: bytes, request_method: bytes, config: Config) -> ResponseHead:
    """Parse and validate an upstream's response head, or raise HTTPError (answered as 502)."""
    try:
        check_head_bytes(head)
        lines = head.split(b"\r\n")
        del lines[-2:]
        match = STATUS_LINE.fullmatch(lines[0])
        if not match:
            raise HTTPError(502, f"malformed status line {lines[0][:60]!r}")
        if sum(map(len, lines)) + 2 * len(lines) > config.max_header_size + config.max_request_line:
            raise HTTPError(502, f"header fields larger than {config.max_header_size} bytes")
        fields, values = parse_fields(lines, RESPONSE_FIELDS, config.max_headers)
        response = ResponseHead()
        response.version = 10 + int(match.group(1))
        response.status = status = int(match.group(2))
        response.reason = match.group(3) or b""
        response.fields = fields
        response.has_date = b"date" in values
        tokens = frozenset(comma_list(values[b"connection"])) if b"connection" in values else frozenset()
        response.connection_tokens = tokens
        response.keep_alive = (b"close" not in tokens if response.version == 11
                               else b"keep-alive" in tokens and b"close" not in tokens)
        te = values.get(b"transfer-encoding")
        cl = values.get(b"content-length")
        response.content_length = None if cl is None else parse_content_length(cl, allow_repeats=True)
        if te is not None and cl is not None:
            raise HTTPError(502, "both Content-Length and Transfer-Encoding")
        if status < 200 or status == 204 or status == 304 or request_method == b"HEAD":
            response.framing, response.length = NO_BODY, 0
        elif te is not None:
            if response.version == 10 or comma_list(te) != [b"chunked"]:
                raise HTTPError(502, "unsupported Transfer-Encoding")
            response.framing, response.length = CHUNKED, 0
        elif cl is not None:
            response.framing, response.length = LENGTH, response.content_length
        else:
            response.framing, response.length = UNTIL_CLOSE, 0
            response.keep_alive = False
        return response
    except HTTPError as error:
        raise HTTPError(502, error.detail) from None


def headers_for_upstream(request: Request, client_ip: bytes, default_host: bytes) -> bytes:
    """The head sent upstream: hop-by-hop fields removed, then Host, framing and X-Forwarded-* set,
    after the removal, so that a client cannot strip them by naming them in Connection."""
    drop = DROP_TO_UPSTREAM | request.connection_tokens if request.connection_tokens else DROP_TO_UPSTREAM
    lines = [b"%s %s HTTP/1.1" % (request.method, request.target), b"Host: " + (request.host or default_host)]
    lines += [line for lname, line in request.fields if lname not in drop]
    prior = request.forwarded_for
    lines.append(b"X-Forwarded-For: " + (b", ".join(prior) + b", " + client_ip if prior else client_ip))
    if request.host:
        lines.append(b"X-Forwarded-Host: " + request.host)
    lines.append(b"X-Forwarded-Proto: http")
    if request.framing == LENGTH:
        lines.append(b"Content-Length: %d" % request.length)
    elif request.framing == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def headers_for_client(response: ResponseHead, *, chunked: bool, keep_alive: bool, http10: bool) -> bytes:
    """The head sent to the client: the upstream's fields minus hop-by-hop ones, re-framed."""
    drop = DROP_TO_CLIENT | response.connection_tokens if response.connection_tokens else DROP_TO_CLIENT
    lines = [b"HTTP/1.1 %d %s" % (response.status, response.reason)]
    lines += [line for lname, line in response.fields if lname not in drop]
    if response.framing == LENGTH or (response.content_length is not None and response.status != 204):
        # Also for HEAD and 304: there it states the length a GET would have (RFC 9110 8.6).
        lines.append(b"Content-Length: %d" % response.content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    if not response.has_date or b"date" in response.connection_tokens:  # RFC 9110 section 6.6.1
        lines.append(b"Date: " + http_date())
    if not keep_alive:
        lines.append(b"Connection: close")
    elif http10:
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


_date_cache = [0, b""]


def http_date() -> bytes:
    """The current IMF-fixdate, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = now, email.utils.formatdate(now, usegmt=True).encode("ascii")
    return _date_cache[1]


def error_response(status: int, detail: str, *, close: bool, extra: bytes = b"", head_only: bool = False) -> bytes:
    """The one format for every response the balancer writes itself."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n".encode("utf-8", "replace")
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Date: %s\r\n%s%s\r\n" % (status, phrase.encode(), len(body), http_date(), extra,
                                       b"Connection: close\r\n" if close else b""))
    return head if head_only else head + body


# --- Reading a head and copying a body: one implementation for both directions ---------------------

def read_head(reader: io.BufferedReader, max_size: int, max_line: int, deadline: float,
              set_timeout, *, response: bool = False) -> bytes | None:
    """Read one message head, through the empty line, from a buffered reader; leave the body.

    Returns None at a clean end of stream before the first byte. The wait for the first byte is the
    caller's (its socket timeout); from the first byte on, the whole head must arrive before
    `deadline` (time.monotonic), or HTTPError(408) -- against clients that send a byte at a time.
    Errors: 431 too large, 414 first line too long, 400 incomplete, bare LF line ends, or a
    start that no request (a method) or response ("HTTP/") begins with: a TLS handshake sent to
    this plain-HTTP port is answered at once instead of at the deadline."""
    data = reader.peek(1)
    for _ in range(MAX_LEADING_EMPTY_LINES):
        if data[:1] != b"\r":
            break
        reader.read(1)  # its LF may not have arrived yet
        if reader.peek(1)[:1] != b"\n":
            raise HTTPError(400, "bare CR before the start line")
        reader.read(1)
        data = reader.peek(1)
    if not data:
        return None
    end = data.find(b"\r\n\r\n")
    if 0 <= end <= max_size - 4:
        return reader.read(end + 4)  # the whole head was in one read: the usual case
    head = bytearray()
    while True:
        start = max(len(head) - 3, 0)
        head += data
        end = head.find(b"\r\n\r\n", start)
        if end >= 0:
            reader.read(end + 4 - (len(head) - len(data)))
            del head[end + 4:]
            if len(head) > max_size:
                break
            return bytes(head)
        reader.read(len(data))  # the buffer is now empty: the next peek reads the socket once
        if len(head) > max_size:
            break
        if (head[:5] != b"HTTP/"[:len(head)]) if response else head[:1].translate(None, TCHAR):
            raise HTTPError(400, "not an HTTP message")
        lf_pending = len(head) == max_line + 1 and head.endswith(b"\r")  # a line of exactly max_line
        if head.find(b"\r\n", 0, max_line + 2) < 0 and len(head) > max_line and not lf_pending:
            raise HTTPError(414, f"request line longer than {max_line} bytes")
        if head.count(b"\n") != head.count(b"\r\n"):  # the CRLF CRLF ending might never come
            raise HTTPError(400, "bare LF line ends (RFC 9112 section 2.2)")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HTTPError(408, "head not complete in time")
        set_timeout(remaining)
        try:
            data = reader.peek(1)
        except socket.timeout:
            raise HTTPError(408, "head not complete in time") from None
        if not data:
            raise HTTPError(400, "connection closed in the middle of a head")
    raise HTTPError(431, f"head larger than {max_size} bytes")


def parse_chunk_size(line: bytes) -> int:
    """``1a;ext=val CRLF`` -> 26, strictly (RFC 9112 section 7.1): hex digits only, no sign, no
    "0x", no whitespace except before extensions, at most 16 digits."""
    if not line.endswith(b"\r\n"):
        raise HTTPError(400, "chunk size line not ended by CRLF")
    size, semicolon, extensions = line[:-2].partition(b";")
    if semicolon:
        size = size.rstrip(b" \t")  # BWS before ";" (RFC 9112 section 7.1.1)
        if extensions.translate(None, CHUNK_EXT_BYTES):
            raise HTTPError(400, "control character in chunk extension")
    if not size or len(size) > 16 or size.translate(None, HEXDIG):
        raise HTTPError(400, f"invalid chunk size {size[:20]!r}")
    return int(size, 16)


class ReadError(Exception):
    """Copying a body failed on the reading side: the sender stopped, timed out or broke framing."""


class WriteError(Exception):
    """Copying a body failed on the writing side: the receiver went away or stopped reading."""


def copy_body(reader, write, framing: int, length: int, buffer: bytearray, *, chunked_out: bool,
              max_size: int = 0, max_trailer: int = 32768) -> int:
    """Copy one body from `reader` to `write` as its bytes arrive, in pieces no larger than
    `buffer`. Chunked input is decoded, and the output chunked when `chunked_out` (each piece one
    chunk). Trailer fields are read, checked and dropped, never merged into the header section.
    Returns the payload length. Raises ReadError or WriteError with the cause as __cause__."""
    view = memoryview(buffer)
    if framing == LENGTH:
        return _copy_exactly(reader, write, length, view, False)
    total = 0
    if framing == UNTIL_CLOSE:
        while True:
            try:
                n = reader.readinto1(view)
            except OSError as error:
                raise ReadError(error) from error
            if not n:
                break
            total += n
            _write(write, view[:n], chunked_out)
    else:
        while True:
            try:
                size = parse_chunk_size(reader.readline(MAX_CHUNK_LINE))
            except (OSError, HTTPError) as error:
                raise ReadError(error) from error
            if not size:
                break
            total += size
            if max_size and total > max_size:
                too_large = HTTPError(413, f"request body larger than {max_size} bytes")
                raise ReadError(too_large) from too_large
            _copy_exactly(reader, write, size, view, chunked_out)
            try:
                if reader.read(2) != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
            except (OSError, HTTPError) as error:
                raise ReadError(error) from error
        _skip_trailer(reader, max_trailer)
    if chunked_out:
        _write(write, b"0\r\n\r\n", False)
    return total


def _copy_exactly(reader, write, length: int, view: memoryview, chunked_out: bool) -> int:
    remaining = length
    size = len(view)
    while remaining:
        try:
            n = reader.readinto1(view[:remaining] if remaining < size else view)
        except OSError as error:
            raise ReadError(error) from error
        if not n:
            ended = EOFError(f"connection closed {remaining} bytes before the end of the body")
            raise ReadError(ended) from ended
        remaining -= n
        _write(write, view[:n], chunked_out)
    return length


def _write(write, data, chunked_out: bool) -> None:
    try:
        write(b"%x\r\n%s\r\n" % (len(data), data) if chunked_out and data else data)
    except OSError as error:
        raise WriteError(error) from error


def _skip_trailer(reader, max_trailer: int) -> None:
    seen = 0
    while True:
        try:
            line = reader.readline(max_trailer + 1)
        except OSError as error:
            raise ReadError(error) from error
        seen += len(line)
        if line == b"\r\n":
            return
        if seen > max_trailer or not line.endswith(b"\r\n"):
            invalid = HTTPError(400, "invalid or oversized trailer section")
            raise ReadError(invalid) from invalid
        try:
            check_head_bytes(line)
            parse_fields([b"", line[:-2]], frozenset(), 1)
        except HTTPError as error:
            raise ReadError(error) from error


# --- Socket timeouts --------------------------------------------------------------------------------

if sys.platform.startswith("linux"):
    # Kernel timeouts on blocking sockets: each read or write is one system call. Python's own
    # socket timeouts put a poll() before every call, and a switch of the GIL with it.
    def set_timeout(sock: socket.socket, seconds: float) -> None:
        seconds = max(seconds, 0.001)  # a zero timeval would mean "wait forever"
        value = struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
else:
    def set_timeout(sock: socket.socket, seconds: float) -> None:
        sock.settimeout(seconds)


# --- Sending without giving up the GIL ------------------------------------------------------------

def libc_send():
    """libc's send(2) through ctypes.PyDLL, which keeps the GIL during the call, or None.

    socket.send() gives up the GIL for every system call, even one that cannot block: under load
    the GIL is then taken by another thread, and getting it back costs two context switches.
    With MSG_DONTWAIT the call cannot block, so it may keep the GIL (when: FairGate.keep_gil).
    Measured here at 32 connections (wrk, nginx upstreams, one worker, A/B over 3 rounds): context
    switches per request 8.1 -> 4.6, system CPU per request 61 -> 39 us, requests/s +18%."""
    if not MSG_DONTWAIT:
        return None
    try:
        import ctypes
        send = ctypes.PyDLL(None).send
    except (ImportError, OSError, AttributeError, TypeError):  # no _ctypes, or no libc symbol
        return None
    send.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
    send.restype = ctypes.c_ssize_t
    return send


LIBC_SEND = libc_send()


def send_now(sock: socket.socket, data, keep_gil: bool = True) -> int:
    """Send what the kernel takes at once, never blocking: the number of bytes sent. 0 also when
    the send failed: the caller's blocking send of the rest reports the error. `keep_gil=False`
    lets other threads run during the system call (see FairGate.keep_gil)."""
    if keep_gil and LIBC_SEND is not None and type(data) is bytes:
        return max(LIBC_SEND(sock.fileno(), data, len(data), MSG_DONTWAIT | MSG_NOSIGNAL), 0)
    if not MSG_DONTWAIT:
        return 0
    try:
        return sock.send(data, MSG_DONTWAIT)
    except OSError:
        return 0


class SocketReader(io.RawIOBase):
    """The raw stream under a BufferedReader: one recv per read, a kernel timeout reported as
    socket.timeout (socket.makefile would turn it into an end of stream), and a position, so that
    ``unread(reader)`` can tell how many bytes wait in the buffer without reading the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self.sock.recv_into(buffer)
        except BlockingIOError:
            raise socket.timeout("timed out") from None
        self.received += n
        return n

    def tell(self) -> int:
        return self.received


def unread(reader: io.BufferedReader) -> int:
    """Bytes received and buffered but not yet read (BufferedReader.tell = raw position - those)."""
    return reader.raw.received - reader.tell()


def socket_reader(sock: socket.socket, size: int) -> io.BufferedReader:
    return io.BufferedReader(SocketReader(sock), size)


class BufferPool:
    """Copy buffers reused across requests: streaming a body allocates nothing per request."""

    def __init__(self, size: int = READ_BUFFER, keep: int = 32):
        self.size, self.keep = size, keep
        self._free: list = []

    def get(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(self.size)

    def put(self, buffer: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buffer)


copy_buffers = BufferPool()


# ===================================================================================================
# Backends and round robin
# ===================================================================================================

class Backend:
    """One upstream: where it is, whether it takes traffic and why, its counters and idle
    connections. State changes happen under `lock`; counters too, so /status adds up."""

    def __init__(self, url: str, config: Config):
        self.url = url
        self.host, self.port = parse_backend_url(url)
        netloc = urlsplit(url).netloc
        self.host_header = netloc.encode("idna") if netloc else self.host.encode("idna")
        self.config = config
        self.lock = threading.Lock()
        self.healthy = True                 # by active checks (HAProxy: starts up)
        self.ejected_until = 0.0            # by passive checks (nginx max_fails/fail_timeout)
        self.reason = "not checked yet" if config.health_interval else "no active checks"
        self.since = time.time()
        self.consecutive_failures = 0   # failed requests and checks since the last success
        self.checks_passed = 0          # consecutive, for rise
        self.checks_failed = 0          # consecutive, for fall
        self.window_start = 0.0
        self.window_failures = 0
        self.requests = 0
        self.errors = 0
        self.in_flight = 0
        self.pool = ConnectionPool(self, config)

    @property
    def state(self) -> str:
        return "up" if self.available(time.monotonic()) else "down"

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

    def start_request(self) -> None:
        with self.lock:
            self.requests += 1
            self.in_flight += 1

    def end_request(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def record_success(self) -> None:
        if self.consecutive_failures:
            with self.lock:
                self.consecutive_failures = 0

    def record_failure(self, detail: str, may_eject: bool) -> bool:
        """A failed request (nginx max_fails within fail_timeout). True if this takes it out."""
        config = self.config
        with self.lock:
            now = time.monotonic()
            self.errors += 1
            self.consecutive_failures += 1
            if now - self.window_start > config.fail_timeout:
                self.window_start, self.window_failures = now, 0
            self.window_failures += 1
            if not may_eject or self.window_failures < config.max_fails or self.ejected_until > now:
                return False
            self.ejected_until = now + config.fail_timeout
            self.reason = f"{self.window_failures} failed request(s) within {config.fail_timeout:g}s, last: {detail}"
            self.since = time.time()
        log.warning("upstream %s out of rotation for %gs: %s", self.url, config.fail_timeout, self.reason)
        return True

    def record_probe(self, ok: bool, detail: str) -> bool:
        """An active health check result, with HAProxy's rise/fall hysteresis: down after `fall`
        failed checks in a row, up after `rise` passed ones. A passing check also ends a passive
        ejection early. True if what round robin sees changed."""
        config = self.config
        with self.lock:
            if ok:
                self.checks_passed += 1
                self.checks_failed = self.consecutive_failures = 0
                rose = not self.healthy and self.checks_passed >= config.rise
                changed = rose or (self.healthy and self.ejected_until > time.monotonic())
                if rose:
                    self.healthy = True
                if changed:
                    self.ejected_until = 0.0
                    self.reason = f"{self.checks_passed} health check(s) passed, last: {detail}"
                    self.since = time.time()
            else:
                self.checks_passed = 0
                self.checks_failed += 1
                self.consecutive_failures += 1
                changed = self.healthy and self.checks_failed >= config.fall
                if changed:
                    self.healthy = False
                    self.reason = f"{self.checks_failed} health check(s) failed, last: {detail}"
                    self.since = time.time()
            if not changed and self.healthy and self.ejected_until <= time.monotonic():
                self.reason = f"health check {'passed' if ok else 'failed'}: {detail}"
        if changed:
            log.log(logging.INFO if ok else logging.WARNING, "upstream %s is %s: %s", self.url,
                    "UP" if ok else "DOWN", self.reason)
        return changed

    def status(self) -> dict:
        with self.lock:
            return {"url": self.url, "state": self.state, "reason": self.reason,
                    "since": email.utils.formatdate(self.since, usegmt=True),
                    "consecutive_failures": self.consecutive_failures, "requests": self.requests,
                    "errors": self.errors, "in_flight": self.in_flight,
                    "idle_connections": len(self.pool)}


class RoundRobin:
    """Strict rotation over the available backends: the n-th pick takes ``available[n % len]``.

    ``next()`` on an ``itertools.count`` is one C call, atomic under the GIL, so threads never see
    the same number and each of k*len(available) picks lands on each backend exactly k times. The
    tuple of available backends is rebuilt only when one leaves or rejoins, so a pick is O(1)."""

    def __init__(self, backends: list[Backend]):
        self.backends = tuple(backends)
        self._counter = itertools.count()
        self._available = self.backends
        self._review_at = None       # when a backend taken out by failures may come back
        self._lock = threading.Lock()

    def pick(self, exclude=()) -> Backend | None:
        if self._review_at is not None and time.monotonic() >= self._review_at:
            self.refresh()
        available = self._available
        if not available:
            return None
        if not exclude:
            return available[next(self._counter) % len(available)]
        for _ in range(len(available)):
            backend = available[next(self._counter) % len(available)]
            if backend not in exclude:
                return backend
        return None

    def refresh(self) -> None:
        """Rebuild the rotation after a backend left or may have come back."""
        with self._lock:
            now = time.monotonic()
            before = self._available
            self._available = tuple(b for b in self.backends if b.available(now))
            pending = [b.ejected_until for b in self.backends if b.ejected_until > now]
            self._review_at = min(pending) if pending else None
        for backend in self._available:
            if backend not in before and backend.ejected_until:
                backend.ejected_until = 0.0
                log.info("upstream %s back in rotation: its fail timeout passed", backend.url)

    def retry_after(self) -> int:
        """Seconds until a backend may be back, for Retry-After on a 503."""
        now = time.monotonic()
        pending = [b.ejected_until for b in self.backends if b.ejected_until > now]
        wait = min(pending) - now if pending else self.backends[0].config.health_interval
        return max(1, math.ceil(wait))


# ===================================================================================================
# Health checks
# ===================================================================================================

class HealthChecker:
    """Active checks: one thread per backend asks ``GET health_path`` every `health_interval`
    seconds; a 2xx or 3xx within `health_timeout` passes (HAProxy's httpchk). A threading.Event
    stops them all at once, as a closed channel would stop the goroutines of the Go original."""

    def __init__(self, balancer: RoundRobin, config: Config):
        self.balancer = balancer
        self.config = config
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for backend in self.balancer.backends:
            thread = threading.Thread(target=self.run, args=(backend,), daemon=True,
                                      name=f"health {backend.url}")
            thread.start()
            self.threads.append(thread)

    def run(self, backend: Backend) -> None:
        while not self.stopped.is_set():
            ok, detail = self.probe(backend)
            if self.stopped.is_set():
                return
            if backend.record_probe(ok, detail):
                self.balancer.refresh()
            self.stopped.wait(self.config.health_interval)

    def probe(self, backend: Backend) -> tuple[bool, str]:
        config = self.config
        conn = http.client.HTTPConnection(backend.host, backend.port, timeout=config.health_timeout)
        try:
            conn.request("GET", config.health_path, headers={
                "Host": backend.host_header.decode("ascii"), "Connection": "close",
                "User-Agent": f"load_balancer/{__version__} health-check"})
            response = conn.getresponse()
            response.read(65536)
            return 200 <= response.status < 400, f"HTTP {response.status} from {config.health_path}"
        except socket.timeout:
            return False, f"no answer within {config.health_timeout:g}s"
        except (OSError, http.client.HTTPException) as error:
            return False, describe_os_error(error)
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()


def describe_os_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host ({error.strerror})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


# ===================================================================================================
# Upstream connections
# ===================================================================================================

class UpstreamError(Exception):
    """An exchange with an upstream failed before anything was sent to the client."""

    CONNECT, CLOSED, TIMEOUT, INVALID = "connect", "closed", "timeout", "invalid"

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class UpstreamResponse(http.client.HTTPResponse):
    """http.client's response with its parse step replaced: the strict parser above instead of
    email.parser (about ten times faster, and it refuses what RFC 9112 forbids), reading from the
    connection's own buffered reader rather than a new one per response."""

    def __init__(self, conn: UpstreamConnection, method: bytes):
        super().__init__(conn, method=method.decode("ascii"))  # takes conn.makefile(): its reader
        self.conn = conn
        self.request_method = method
        self.head: ResponseHead | None = None

    def begin(self) -> None:
        """Read the head of the final response, skipping interim (1xx) ones, within `timeout`."""
        conn, config = self.conn, self.conn.config
        deadline = time.monotonic() + config.timeout
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            head = read_head(self.fp, config.max_request_line + config.max_header_size + 4,
                             config.max_request_line, deadline, conn.set_timeout, response=True)
            if head is None:
                raise EOFError("closed the connection without answering")
            parsed = parse_response_head(head, self.request_method, config)
            if parsed.status >= 200:
                break
            if parsed.status == 101:  # no Upgrade is ever forwarded, so no switch was asked for
                raise HTTPError(502, "switched protocols unasked (101)")
        else:
            raise HTTPError(502, f"more than {MAX_INTERIM_RESPONSES} interim (1xx) responses")
        conn.set_timeout(config.timeout)
        self.head = parsed
        self.status, self.reason, self.version = parsed.status, parsed.reason.decode("latin-1"), parsed.version
        self.headers = self.msg = Headers(parsed.fields)
        self.chunked = parsed.framing == CHUNKED
        self.length = parsed.length if parsed.framing == LENGTH else None
        self.will_close = not parsed.keep_alive

    def close(self) -> None:
        self.fp = None  # the reader belongs to the connection, which outlives its responses


class UpstreamConnection(http.client.HTTPConnection):
    """A keep-alive connection to one upstream. http.client opens it (connect timeout,
    TCP_NODELAY); the request head, validated on the way in, goes out with one ``send``."""

    response_class = UpstreamResponse

    def __init__(self, backend: Backend, config: Config):
        super().__init__(backend.host, backend.port, timeout=config.connect_timeout)
        self.config = config
        self.reader: io.BufferedReader | None = None
        self.timeout_now = 0.0
        self._poller = None

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(None)  # blocking, with kernel timeouts: see set_timeout
        self.set_timeout(self.config.timeout)
        self.reader = socket_reader(self.sock, READ_BUFFER)
        self._poller = None  # built on first use, where TCP_INFO cannot answer

    def makefile(self, mode: str) -> io.BufferedReader:
        return self.reader

    def set_timeout(self, seconds: float) -> None:
        if seconds != self.timeout_now:
            set_timeout(self.sock, seconds)
            self.timeout_now = seconds

    def is_reusable(self) -> bool:
        """An idle connection with something to read was closed by the upstream (or is out of
        step with it: bytes nobody asked for would become the next client's answer). Checked
        before every reuse. On Linux, TCP_INFO says it without a system call that gives up the
        GIL (one GIL hand-off less per request): the connection must still be ESTABLISHED and
        the kernel must have received no byte that was not read (tcpi_bytes_received, Linux
        4.1+). Elsewhere poll(0) says whether anything is waiting."""
        if self.sock is None:
            return False
        if TCP_INFO:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 136)
            if len(info) >= 136:
                return info[0] == TCP_ESTABLISHED and (
                    int.from_bytes(info[128:136], sys.byteorder) == self.reader.raw.received)
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        return not self._poller.poll(0)

    def close(self) -> None:
        reader, self.reader = self.reader, None
        super().close()
        if reader is not None:
            reader.close()


class ConnectionPool:
    """Idle keep-alive connections to one backend, most recently used first (the least likely to
    have been closed by the upstream's own idle timeout). At most `pool_size` are kept."""

    def __init__(self, backend: Backend, config: Config):
        self.backend, self.config = backend, config
        self._idle: collections.deque = collections.deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still fit for reuse, or None."""
        idle = self._idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                break
            if conn.is_reusable():
                return conn
            conn.close()
        return None

    def connect(self) -> UpstreamConnection:
        """A new connection. Raises UpstreamError when it cannot be made."""
        conn = UpstreamConnection(self.backend, self.config)
        try:
            conn.connect()
        except socket.timeout:
            conn.close()
            raise UpstreamError(504, UpstreamError.CONNECT, "the upstream did not accept a connection "
                                f"within {self.config.connect_timeout:g}s") from None
        except OSError as error:
            conn.close()
            raise UpstreamError(502, UpstreamError.CONNECT,
                                f"cannot connect to the upstream: {describe_os_error(error)}") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if not self.closed and len(self._idle) < self.config.pool_size:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self.closed = True
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break


# ===================================================================================================
# The request handler
# ===================================================================================================

class ClientError(Exception):
    """The client went away or broke the rules mid-request; it has been answered if it could be."""


class FairGate:
    """Runs request work in arrival order when many requests compete for the GIL.

    CPython's GIL is not fair: a thread returning from a system call takes it if it happens to be
    free, ahead of threads already waiting for it. With hundreds of busy connections some requests
    lose that race again and again: measured here with 256 connections, p50 25 ms but p99 2.7 s,
    and client timeouts. So above `threshold` requests in flight, at most `slots` threads run
    request code at once; the others wait on a lock of their own (outside the GIL) and each
    leaving thread hands its place to the one that has waited longest. A thread never keeps its
    place while it may block (see ProxyHandler.outside_gate): slow clients and upstreams cannot
    hold the gate. Below the threshold a pass costs one uncontended lock."""

    def __init__(self, slots: int = GATE_SLOTS, threshold: int = GATE_THRESHOLD):
        self.slots, self.threshold = slots, threshold
        self.in_flight = 0                    # requests begun and not finished
        self.running = 0                      # threads between enter() and leave()
        self.waiting: collections.deque = collections.deque()  # their turn locks, oldest first
        self.mutex = threading.Lock()

    @property
    def keep_gil(self) -> bool:
        """Should a system call that cannot block keep the GIL (send_now)? Read without the mutex:
        a hint. Yes while other requests are in flight and nobody queues: giving the GIL up would
        only cost two context switches to get it back. Not for a lone request: nobody else wants
        the GIL. And not while threads queue here: the GIL must then change hands often for the
        line to move. Measured with 256 connections, keeping it anyway gave 20% more requests/s
        but a p99 of 150-180 ms instead of 40-60 ms."""
        return 1 < self.in_flight <= self.threshold and not self.waiting

    def enter(self, new_request: bool = False) -> None:
        with self.mutex:
            self.in_flight += new_request
            if self.running < self.slots or (self.in_flight <= self.threshold and not self.waiting):
                self.running += 1
                return
            turn = threading.Lock()
            turn.acquire()
            self.waiting.append(turn)
        turn.acquire()  # until a leaving thread passes its place on

    def leave(self, request_done: bool = False) -> None:
        with self.mutex:
            self.in_flight -= request_done
            if self.waiting and (self.running <= self.slots or self.in_flight <= self.threshold):
                self.waiting.popleft().release()  # the place passes on; running stays the same
            else:
                self.running -= 1


def replayable(request: Request) -> bool:
    """May this request be sent again after an upstream saw it? Only an idempotent method without
    a body (RFC 9110 section 9.2.2)."""
    return request.method in IDEMPOTENT and (request.framing == NO_BODY or
                                             (request.framing == LENGTH and not request.length))


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: reads requests, forwards each to the next upstream, relays the answer.

    BaseHTTPRequestHandler's parse step (email.parser, lenient) is replaced by the strict one
    above; the rest keeps http.server's shape: the handle() loop, close_connection, send_error,
    log_request and log_message."""

    protocol_version = "HTTP/1.1"   # keep-alive; http.server speaks HTTP/1.0 by default
    disable_nagle_algorithm = True  # else a response written in two sends waits ~40 ms for an ACK
    rbufsize = 0                    # StreamRequestHandler's reader is replaced in setup()
    server_version = f"load_balancer/{__version__}"
    server: ProxyServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = socket_reader(self.connection, READ_BUFFER)
        self.sendall = self.connection.sendall
        self.config = self.server.config
        self.client_ip = self.client_address[0].encode("ascii")
        self.busy = False             # between the first byte of a request and the end of its answer
        self.linger = False           # close gently: the client may still be sending
        self.timeout_now = 0.0
        self.requests_seen = 0
        self.gated = False            # holds a place in the server's FairGate
        self.server.track(self, True)

    def finish(self) -> None:
        self.server.track(self, False)
        if self.linger:
            linger_close(self.connection)
        super().finish()

    def set_timeout(self, seconds: float) -> None:
        if seconds != self.timeout_now:
            set_timeout(self.connection, seconds)
            self.timeout_now = seconds

    # -- one request ----------------------------------------------------------------------------

    def handle_one_request(self) -> None:
        config = self.config
        self.close_connection = True
        self.requestline = self.command = self.path = self.request_version = ""
        self.set_timeout(config.idle_timeout if self.requests_seen else config.header_timeout)
        try:
            if not self.rfile.peek(1):
                return
        except OSError:  # including the timeout: an idle connection is closed without a word
            return
        self.busy = True
        self.requests_seen += 1
        self.started = time.monotonic()
        try:
            try:
                head = read_head(self.rfile, config.max_request_line + config.max_header_size + 4,
                                 config.max_request_line, self.started + config.header_timeout,
                                 self.set_timeout)
                if head is None:
                    return
                self.server.gate.enter(new_request=True)
                self.gated = True
                request = parse_request_head(head, config)
            except HTTPError as error:
                self.reject(error.status, error.detail)
                return
            self.set_timeout(config.idle_timeout)
            self.command = request.method.decode("ascii")
            self.path = request.target.decode("ascii")
            self.request_version = request.version.decode("ascii")
            self.headers = Headers(request.fields)
            self.close_connection = not request.keep_alive
            self.proxy(request)
        except ClientError:
            self.close_connection = True
        except OSError:
            self.close_connection = True
        except Exception:
            log.exception("unexpected error proxying %s %s", self.command, self.path)
            self.close_connection = True
        finally:
            if self.gated:
                self.gated = False
                self.server.gate.leave(request_done=True)
            self.busy = False
            if self.server.draining:
                self.close_connection = True
                self.server.wake_drainer()

    def proxy(self, request: Request) -> None:
        """Forward one request to the next upstream and relay its answer; on failure try the next
        one while that is safe; else answer 502, 503 or 504 through reject()."""
        self.continue_sent = False
        body = self.arrived_body(request) if request.framing == LENGTH else None
        balancer = self.server.balancer
        tried: list[Backend] = []
        failure = None
        while True:
            backend = balancer.pick(tried)
            if backend is None:
                break
            tried.append(backend)
            backend.start_request()
            try:
                conn, response = self.exchange(backend, request, body)
            except UpstreamError as error:
                backend.end_request()
                failure = error
                self.upstream_failed(backend, error.detail)
                if self.may_retry(request, error):
                    continue
                break
            except BaseException:
                backend.end_request()
                raise
            try:
                backend.record_success()
                self.relay_response(backend, conn, response, request)
            finally:
                backend.end_request()
            return
        unread = request.framing != NO_BODY and body is None
        if failure is None:
            self.reject(503, "no upstream is available", close=unread,
                        extra=b"Retry-After: %d\r\n" % balancer.retry_after())
        else:
            self.reject(failure.status, failure.detail, close=unread)

    def upstream_failed(self, backend: Backend, detail: str) -> None:
        log.warning("%s %s -> %s: %s", self.command, self.path, backend.url, detail)
        # nginx ignores max_fails when a group has a single server: with nowhere else to go,
        # taking it out would only turn its failures into 503s.
        if backend.record_failure(detail, may_eject=len(self.server.balancer.backends) > 1):
            self.server.balancer.refresh()

    def may_retry(self, request: Request, error: UpstreamError) -> bool:
        """nginx's ``proxy_next_upstream error timeout``, kept safe: a request whose connection was
        never established can go elsewhere; after that, only an idempotent one without a body (a
        body that reached an upstream may have been acted on). An invalid response is not retried
        (nginx: invalid_header is opt-in)."""
        if error.kind == UpstreamError.CONNECT:
            return True
        return error.kind != UpstreamError.INVALID and replayable(request)

    def exchange(self, backend: Backend, request: Request, body: bytes | None):
        """Send the request on a pooled connection and read the response head. A reused connection
        that the upstream had closed meanwhile is replaced by a fresh one, once, if replay is safe."""
        head = headers_for_upstream(request, self.client_ip, backend.host_header)
        if body is not None:
            head += body
        for attempt in (1, 2):
            conn = backend.pool.take_idle()
            reused = conn is not None
            if not reused:
                conn = self.outside_gate(backend.pool.connect)
            try:
                if request.framing == NO_BODY or body is not None:
                    self.send(conn.sock, head)
                else:
                    self.stream_request_body(conn, head, request)
                if not unread(conn.reader):
                    self.outside_gate(conn.reader.peek, 1)  # the upstream's think time
                response = conn.response_class(conn, request.method)
                response.begin()
                return conn, response
            except (OSError, EOFError, HTTPError) as error:
                conn.close()
                stale = reused and not isinstance(error, (socket.timeout, BlockingIOError, HTTPError))
                if stale and attempt == 1 and replayable(request):
                    continue
                raise self.upstream_error(error) from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def upstream_error(self, error: BaseException) -> UpstreamError:
        if isinstance(error, (socket.timeout, BlockingIOError)) or (
                isinstance(error, HTTPError) and error.status == 408):
            return UpstreamError(504, UpstreamError.TIMEOUT,
                                 f"the upstream did not answer within {self.config.timeout:g}s")
        if isinstance(error, HTTPError):
            return UpstreamError(502, UpstreamError.INVALID, f"the upstream sent an invalid response: {error.detail}")
        if isinstance(error, EOFError):
            return UpstreamError(502, UpstreamError.CLOSED, f"the upstream {error}")
        return UpstreamError(502, UpstreamError.CLOSED, f"the upstream connection failed: {describe_os_error(error)}")

    def arrived_body(self, request: Request) -> bytes | None:
        """A small body that arrived whole with (or right after) its head, else None: the body is
        then streamed, its bytes passed on as they come."""
        if not request.length:
            return b""
        self.send_continue(request)
        try:
            arrived = unread(self.rfile) or len(self.outside_gate(self.rfile.peek, 1))
        except socket.timeout:
            self.reject(408, f"no request body data for {self.config.idle_timeout:g}s")
            raise ClientError() from None
        except OSError:
            raise ClientError() from None
        if not arrived:
            raise ClientError()  # the client went away before its body: nobody to answer
        if arrived < request.length or request.length > SMALL_BODY:
            return None
        return self.rfile.read(request.length)

    def send_continue(self, request: Request) -> None:
        """RFC 9110 section 10.1.1: the client waits for 100 Continue before sending the body."""
        if request.expect_continue and not self.continue_sent and request.version == b"HTTP/1.1":
            self.continue_sent = True
            self.client_write(CONTINUE)

    def stream_request_body(self, conn: UpstreamConnection, head: bytes, request: Request) -> None:
        self.send(conn.sock, head)
        self.send_continue(request)
        buffer = copy_buffers.get()
        try:
            self.outside_gate(copy_body, self.rfile, conn.sock.sendall, request.framing, request.length,
                              buffer, chunked_out=request.framing == CHUNKED, max_size=self.config.max_body_size)
        except WriteError as error:
            raise error.__cause__ from None  # the upstream's side: an UpstreamError follows
        except ReadError as error:
            cause = error.__cause__
            if isinstance(cause, HTTPError):
                self.reject(cause.status, cause.detail)
            elif isinstance(cause, socket.timeout):
                self.reject(408, f"no request body data for {self.config.idle_timeout:g}s")
            raise ClientError() from None
        finally:
            copy_buffers.put(buffer)

    def relay_response(self, backend: Backend, conn: UpstreamConnection, response: UpstreamResponse,
                       request: Request) -> None:
        head = response.head
        framing = head.framing
        keep_alive = request.keep_alive and not self.server.draining
        chunked = False
        if framing == CHUNKED or framing == UNTIL_CLOSE:
            if request.version == b"HTTP/1.1":
                chunked = True
            else:
                keep_alive = False  # an HTTP/1.0 client reads such a body until the close
        out = headers_for_client(head, chunked=chunked, keep_alive=keep_alive,
                                 http10=request.version == b"HTTP/1.0")
        done = False
        try:
            if framing == NO_BODY or (framing == LENGTH and not head.length):
                self.client_write(out)
            else:
                self.relay_body(conn, head, out, chunked)
            done = True
        except ReadError as error:
            self.upstream_failed(backend, f"the upstream broke off the response body: {describe_os_error(error.__cause__)}")
        except (WriteError, ClientError):
            pass  # the client went away
        finally:
            # Bytes after a complete response (a body on a 204, a second response nobody asked
            # for) mean the connection is out of step: never reuse it, or the next client would
            # get them as its answer (response queue poisoning).
            if done and head.keep_alive and not unread(conn.reader):
                backend.pool.release(conn)
            else:
                conn.close()
            response.close()
        if not done or not keep_alive:
            self.close_connection = True
        if access_log.isEnabledFor(logging.INFO):
            self.log_request(head.status, backend.url)

    def relay_body(self, conn: UpstreamConnection, head: ResponseHead, out: bytes, chunked: bool) -> None:
        reader = conn.reader
        if head.framing == LENGTH and unread(reader) >= head.length:
            self.client_write(out + reader.read(head.length))  # the body is here: one send
            return
        self.client_write(out)
        buffer = copy_buffers.get()
        try:
            self.outside_gate(copy_body, reader, self.sendall, head.framing, head.length, buffer,
                              chunked_out=chunked)
        finally:
            copy_buffers.put(buffer)

    def outside_gate(self, call, *args, **kwargs):
        """Make a call that may block without holding a place in the gate, then queue again."""
        if not self.gated:
            return call(*args, **kwargs)
        gate = self.server.gate
        self.gated = False
        gate.leave()
        try:
            return call(*args, **kwargs)
        finally:
            gate.enter()
            self.gated = True

    def send(self, sock: socket.socket, data) -> None:
        """sendall, except that what the kernel does not take at once is sent outside the gate."""
        sent = send_now(sock, data, keep_gil=self.server.gate.keep_gil)
        if sent < len(data):
            self.outside_gate(sock.sendall, memoryview(data)[sent:])

    def client_write(self, data: bytes) -> None:
        try:
            self.send(self.connection, data)
        except OSError:
            raise ClientError() from None

    # -- the one error path -----------------------------------------------------------------------

    def reject(self, status: int, detail: str, *, close: bool = True, extra: bytes = b"") -> None:
        """Answer with a response of the balancer's own. `close` when the request (or its body) was
        not read whole: the connection cannot be reused, and is closed gently (see linger_close)."""
        self.server.count_error()
        if close:
            self.close_connection = True
            self.linger = True
        log.log(logging.WARNING if status >= 500 else logging.DEBUG, "%s %s from %s answered %d: %s",
                self.command or "-", self.path or "-", self.client_address[0], status, detail)
        try:
            self.send(self.connection, error_response(status, detail, close=close, extra=extra,
                                                      head_only=self.command == "HEAD"))
        except OSError:
            self.close_connection = True
            self.linger = False
        if access_log.isEnabledFor(logging.INFO):
            self.log_request(status, "-")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's error hook, routed to the one error path."""
        self.reject(code, message or HTTPStatus(code).phrase)

    # -- logging hooks (http.server's names) ------------------------------------------------------

    def log_request(self, code="-", upstream="-") -> None:
        access_log.info('%s "%s %s %s" %s %s %.1fms', self.client_address[0], self.command or "-",
                        self.path or "-", self.request_version or "-", code, upstream,
                        (time.monotonic() - self.started) * 1000)

    def log_message(self, format: str, *args) -> None:
        log.info("%s " + format, self.client_address[0], *args)


def linger_close(sock: socket.socket, seconds: float = 2.0, limit: int = 1 << 20) -> None:
    """Close after a response sent before the request was read whole: stop writing, then read and
    drop what the client still sends for a moment, so the close does not turn into a reset that
    destroys the response in flight (nginx's lingering_close)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            set_timeout(sock, min(remaining, 0.5))
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass


# ===================================================================================================
# Servers
# ===================================================================================================

class ProxyServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with what a proxy needs: a deep listen backlog accepted in bursts,
    connection threads kept as spares for the next connections, a cap on connections (503 above it,
    without starting a thread), SO_REUSEPORT for workers, and graceful draining."""

    daemon_threads = True
    request_queue_size = 1024      # socketserver's 5 drops SYNs under load: 1 s client stalls
    allow_reuse_address = True

    def __init__(self, config: Config, balancer: RoundRobin, *, reuse_port: bool = False):
        self.config = config
        self.balancer = balancer
        self.reuse_port = reuse_port
        self.draining = False
        self.connections = 0          # counted at accept, so that the cap holds under a burst
        self.errors = 0
        self.finished_requests = 0
        self.handlers: set = set()
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.closer = LingeringCloser()
        self.gate = FairGate()
        self.spare_threads = 0        # connection threads waiting in handoff for a connection
        self.handoff: queue.SimpleQueue = queue.SimpleQueue()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), ProxyHandler)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Not HTTPServer.server_bind: its socket.getfqdn() is a reverse DNS query, slow offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self) -> None:
        super().server_activate()
        # See service_actions. Accepted sockets stay blocking on Linux (accept4 does not inherit
        # O_NONBLOCK); elsewhere set_timeout() puts them in Python's timeout mode before any read.
        self.socket.setblocking(False)

    def service_actions(self) -> None:
        """serve_forever() accepts one connection per wake-up of its poll(); under a burst of
        connects, take the rest of the backlog now instead of one poll() each (at most one
        backlog's worth, so that a connect flood cannot keep shutdown() waiting)."""
        for _ in range(self.request_queue_size):
            try:
                request, client_address = self.socket.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            self.process_request(request, client_address)

    def process_request(self, request: socket.socket, client_address) -> None:
        with self.lock:
            refused = "too many connections" if self.connections >= self.config.max_connections else (
                "shutting down" if self.draining else None)
            if not refused:
                self.connections += 1
                spare = self.spare_threads > 0
                self.spare_threads -= spare
        if refused:
            self.count_error()
            log.debug("connection from %s refused: %s", client_address[0], refused)
            self.closer.reject(request, error_response(503, refused, close=True, extra=b"Retry-After: 1\r\n"))
        elif spare:
            self.handoff.put((request, client_address))
        else:
            # _thread rather than threading.Thread: Thread.start() waits until the new thread runs,
            # which under load means until it gets the GIL; the accept loop should not wait.
            _thread.start_new_thread(self.connection_thread, (request, client_address))

    def connection_thread(self, request: socket.socket, client_address) -> None:
        """Serves one connection, then waits as a spare thread for the next one handed over by
        process_request(); leaves after SPARE_THREAD_SECONDS idle or when the server closes."""
        while request is not None:
            try:
                self.process_request_thread(request, client_address)
            finally:
                with self.lock:
                    self.connections -= 1
                    spare = not self.draining and self.spare_threads < SPARE_THREADS
                    self.spare_threads += spare
            if not spare:
                return
            try:
                request, client_address = self.handoff.get(timeout=SPARE_THREAD_SECONDS)
            except queue.Empty:
                with self.lock:
                    if self.spare_threads > 0:  # no connection is on its way to this thread
                        self.spare_threads -= 1
                        return
                # process_request() counted this thread out and is putting a connection: take it
                request, client_address = self.handoff.get()

    def track(self, handler: ProxyHandler, active: bool) -> None:
        with self.lock:
            if active:
                self.handlers.add(handler)
            else:
                self.handlers.discard(handler)
                self.finished_requests += handler.requests_seen
                self.drained.notify_all()

    def requests_total(self) -> int:
        """Client requests so far: each connection counts its own, without a lock per request."""
        with self.lock:
            return self.finished_requests + sum(h.requests_seen for h in self.handlers)

    def wake_drainer(self) -> None:
        with self.lock:
            self.drained.notify_all()

    def count_error(self) -> None:
        with self.lock:
            self.errors += 1

    def in_flight(self) -> int:
        with self.lock:
            return sum(1 for h in self.handlers if h.busy)

    def handle_error(self, request, client_address) -> None:
        log.exception("unexpected error on the connection from %s", client_address[0])

    def drain(self, timeout: float) -> None:
        """Let requests in flight finish (up to `timeout` seconds); close idle connections now."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.draining = True
            for _ in range(self.spare_threads):  # each spare thread takes one and leaves
                self.handoff.put((None, None))
            self.spare_threads = 0
            while True:
                for handler in self.handlers:
                    if not handler.busy:  # waiting for a next request: end that wait
                        shutdown_socket(handler.connection, socket.SHUT_RD)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(h.busy for h in self.handlers):
                    break
                self.drained.wait(remaining)
            cut = sum(1 for h in self.handlers if h.busy)
            for handler in self.handlers:
                shutdown_socket(handler.connection, socket.SHUT_RDWR)
        if cut:
            log.warning("drain timeout: %d request(s) in flight were cut off", cut)
        self.closer.stop()


def shutdown_socket(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class LingeringCloser:
    """Answers and closes connections refused at accept, from one thread for all of them: after
    the response, reads and drops what the client still sends for a moment before closing, so the
    close does not turn into a reset that destroys the response (nginx's lingering_close)."""

    def __init__(self, seconds: float = 2.0, most: int = 512):
        self.seconds, self.most = seconds, most
        self.pending: dict = {}       # fd -> (socket, deadline)
        self.lock = threading.Lock()
        self.thread = None
        self.stopped = False

    def reject(self, sock: socket.socket, response: bytes) -> None:
        try:
            sock.setblocking(False)
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self.lock:
            if self.stopped or len(self.pending) >= self.most:
                sock.close()
                return
            self.pending[sock.fileno()] = (sock, time.monotonic() + self.seconds)
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, daemon=True, name="lingering close")
                self.thread.start()

    def run(self) -> None:
        poller = select.poll()
        registered: set = set()
        while not self.stopped:
            with self.lock:
                for fd in self.pending.keys() - registered:
                    poller.register(fd, select.POLLIN)
                    registered.add(fd)
            ready = {fd for fd, _ in poller.poll(100)}
            now = time.monotonic()
            with self.lock:
                for fd in list(self.pending):
                    sock, deadline = self.pending[fd]
                    if fd in ready:
                        try:
                            if sock.recv(65536):
                                continue
                        except BlockingIOError:
                            continue
                        except OSError:
                            pass
                    elif now < deadline:
                        continue
                    poller.unregister(fd)
                    registered.discard(fd)
                    del self.pending[fd]
                    sock.close()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for sock, _ in self.pending.values():
                sock.close()
            self.pending.clear()


class AdminHandler(BaseHTTPRequestHandler):
    """``GET /status``: the balancer's state as JSON, for people and monitoring."""

    protocol_version = "HTTP/1.1"
    server_version = f"load_balancer/{__version__}"

    def do_GET(self) -> None:
        if self.path.split("?")[0] in ("/status", "/status/"):
            body = (json.dumps(self.server.status(), indent=2) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            body = b"404 Not Found: try /status\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("admin: %s " + format, self.client_address[0], *args)


class AdminServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, status, *, reuse_port: bool = False):
        self.status = status
        self.reuse_port = reuse_port
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, AdminHandler)

    server_bind = ProxyServer.server_bind


# ===================================================================================================
# The load balancer: servers, balancer and checker together
# ===================================================================================================

class ListenError(OSError):
    """A listening socket could not be opened; says which address and why, in one line."""

    def __init__(self, host: str, port: int, error: OSError):
        reason = "address already in use" if error.errno == errno.EADDRINUSE else describe_os_error(error)
        super().__init__(error.errno, f"cannot listen on {host}:{port}: {reason}")


def listen(host: str, port: int, make):
    try:
        return make()
    except OSError as error:
        raise ListenError(host, port, error) from None


class LoadBalancer:
    """Everything one process runs: the proxy server, round robin over the backends, the health
    checker and the optional admin server. ``start()`` serves from background threads."""

    def __init__(self, config: Config, *, reuse_port: bool = False):
        self.config = config
        self.backends = [Backend(url, config) for url in config.backends]
        self.balancer = RoundRobin(self.backends)
        self.checker = HealthChecker(self.balancer, config)
        self.server = listen(config.host, config.port,
                             lambda: ProxyServer(config, self.balancer, reuse_port=reuse_port))
        self.admin = None
        if config.admin_port is not None:
            try:
                self.admin = listen(config.admin_host, config.admin_port, lambda: AdminServer(
                    (config.admin_host, config.admin_port), self.status, reuse_port=reuse_port))
            except OSError:
                self.server.server_close()
                raise
        self.started = time.time()
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def admin_port(self) -> int | None:
        return self.admin.server_address[1] if self.admin else None

    def start(self) -> None:
        for server in filter(None, (self.server, self.admin)):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      daemon=True, name=f"serve {server.server_address[1]}")
            thread.start()
            self._threads.append(thread)
        if self.config.health_interval:
            self.checker.start()

    def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._threads:
            self.server.shutdown()
        self.server.server_close()
        self.server.drain(self.config.drain_timeout if drain_timeout is None else drain_timeout)
        self.checker.stop()
        if self.admin:
            if self._threads:
                self.admin.shutdown()
            self.admin.server_close()
        for backend in self.backends:
            backend.pool.close()

    def status(self) -> dict:
        backends = [backend.status() for backend in self.backends]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "requests_total": self.server.requests_total(),
            "errors_total": self.server.errors,
            "in_flight": self.server.in_flight(),
            "connections": len(self.server.handlers),
            "backends": backends,
        }


# ===================================================================================================
# Worker processes
# ===================================================================================================

def serve(config: Config, *, reuse_port: bool = False, ready=None) -> int:
    """Run one balancer in this process until SIGTERM or SIGINT, then drain. Returns 0."""
    threading.stack_size(THREAD_STACK_SIZE)
    if hasattr(signal, "sigwait"):
        # The stop signals are blocked before any thread starts (threads inherit the mask) and
        # taken with sigwait() here. A handler would not do: the kernel hands a process-wide
        # signal to any thread that does not block it, Python runs handlers in the main thread
        # only, and a main thread asleep in a lock never notices (seen here: a worker that
        # ignored SIGTERM while a request was in flight).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        wait = lambda: signal.sigwait(STOP_SIGNALS)
    else:
        stop = threading.Event()
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: stop.set())
        wait = lambda: stop.wait()
    balancer = LoadBalancer(config, reuse_port=reuse_port)
    balancer.start()
    if ready:
        ready(balancer)
    wait()
    log.info("shutting down: draining requests in flight (up to %gs)", config.drain_timeout)
    balancer.close()
    return 0


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def reserve(host: str, port: int) -> socket.socket:
    """A bound socket that never listens: it holds the port for the workers' SO_REUSEPORT sockets
    (a busy port is reported once, by the parent) and resolves port 0 to a real one."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listen(host, port, lambda: sock.bind((host, port)))
    except OSError:
        sock.close()
        raise
    return sock


def supervise(config: Config, reserved: list[socket.socket], ready=None) -> int:
    """The parent of `config.workers` processes that each listen on the same port with
    SO_REUSEPORT, the kernel spreading connections across them; each has its own RoundRobin, so
    the strict rotation holds per worker. Calls `ready()` once every worker listens. Restarts a
    worker that dies; on SIGTERM or SIGINT passes the signal on and returns 0 once every worker
    has drained."""
    children: dict[int, int] = {}
    started: dict[int, float] = {}
    stopping = False
    ready_in, ready_out = os.pipe()  # each first-generation worker writes a byte once it listens

    def spawn(index: int, report: bool = False) -> None:
        # The stop signals wait while the worker is born: otherwise one arriving just then would
        # run this process's handler in the child, or reach the parent before it knows the pid.
        started[index] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if stopping:  # a stop arrived since the last fork: no new worker that nobody will stop
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            return
        pid = os.fork()
        if pid == 0:  # the worker; serve() takes the stop signals with sigwait()
            code = 1
            try:
                if report:
                    os.close(ready_in)
                for sock in reserved:
                    sock.close()
                code = serve(config, reuse_port=True, ready=report_ready if report else None)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def report_ready(balancer: LoadBalancer) -> None:
        try:
            os.write(ready_out, b".")
        except OSError:
            pass  # the parent stopped waiting: it is stopping
        finally:
            os.close(ready_out)

    def forward(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(config.workers):
        spawn(index, report=True)
    os.close(ready_out)
    while os.read(ready_in, 64):  # empty once every worker has reported, or exited without
        pass
    os.close(ready_in)
    if ready and not stopping:
        ready()
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        log.warning("worker %d (pid %d) exited with %s; starting a new one", index, pid,
                    f"signal {-code}" if code < 0 else f"code {code}")
        if time.monotonic() - started[index] < 1:
            time.sleep(1)  # a worker that dies at once would otherwise restart in a tight loop
        spawn(index)
    for sock in reserved:
        sock.close()
    return 0


# ===================================================================================================
# Command line
# ===================================================================================================

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage block: a wrong flag should be easy to read."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def worker_count(text: str) -> int:
    return (os.cpu_count() or 1) if text == "auto" else int(text)


def build_parser() -> ArgumentParser:
    d = Config()
    p = ArgumentParser(prog="load_balancer", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Round-robin HTTP/1.1 load balancer (one file, standard library only).")
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="port to listen on (0: any free port)")
    p.add_argument("--backend", dest="backends", action="append", metavar="URL", default=argparse.SUPPRESS,
                   help="upstream http://host:port, repeatable; replaces SERVER_URLS "
                        f"({', '.join(SERVER_URLS)})")
    p.add_argument("--workers", type=worker_count, default=d.workers,
                   help="processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU")
    g = p.add_argument_group("upstream side")
    g.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds to wait for an upstream's response head, and between its body reads")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   help="seconds to wait for an upstream to accept a connection")
    g.add_argument("--pool-size", type=int, default=d.pool_size,
                   help="idle keep-alive connections kept per upstream")
    g = p.add_argument_group("client side")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds for a new connection's first byte, and for a whole request head (408 after)")
    g.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="seconds a keep-alive connection may idle, or a body stall")
    g.add_argument("--max-request-line", type=int, default=d.max_request_line,
                   help="bytes (414 above)")
    g.add_argument("--max-header-size", type=int, default=d.max_header_size,
                   help="bytes of header fields (431 above)")
    g.add_argument("--max-headers", type=int, default=d.max_headers,
                   help="header fields (431 above)")
    g.add_argument("--max-body-size", type=int, default=d.max_body_size,
                   help="bytes of request body (413 above); 0 = unlimited")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="concurrent client connections per worker (503 above)")
    g = p.add_argument_group("health")
    g.add_argument("--health-path", default=d.health_path, help="path of the active check")
    g.add_argument("--health-interval", type=float, default=d.health_interval,
                   help="seconds between active checks; 0 = off")
    g.add_argument("--health-timeout", type=float, default=d.health_timeout,
                   help="seconds an active check may take")
    g.add_argument("--rise", type=int, default=d.rise, help="passed checks to come back up")
    g.add_argument("--fall", type=int, default=d.fall, help="failed checks to go down")
    g.add_argument("--max-fails", type=int, default=d.max_fails,
                   help="failed requests within --fail-timeout that take an upstream out")
    g.add_argument("--fail-timeout", type=float, default=d.fail_timeout,
                   help="window for --max-fails, and how long the upstream stays out")
    g = p.add_argument_group("operations")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="seconds in-flight requests may take after SIGTERM/SIGINT")
    g.add_argument("--admin-host", default=d.admin_host, help="address of the status listener")
    g.add_argument("--admin-port", type=int, default=argparse.SUPPRESS,
                   help="port for GET /status (JSON); off unless given")
    g.add_argument("--access-log", action="store_true", help="log every request")
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"],
                   type=str.lower, help="logging level")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    options["backends"] = tuple(options.get("backends") or SERVER_URLS)
    try:
        config = Config(**options)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(process)d] %(message)s")
    access_log.setLevel(logging.INFO if config.access_log else logging.WARNING)
    if config.workers > 1 and not (hasattr(socket, "SO_REUSEPORT") and hasattr(os, "fork")):
        log.warning("--workers needs SO_REUSEPORT and fork(), which this system lacks: one worker")
        config = replace(config, workers=1)
    try:
        if config.workers == 1:
            return serve(config, ready=lambda balancer: announce(config, balancer.port, balancer.admin_port))
        reserved = [reserve(config.host, config.port)]
        if config.admin_port is not None:
            reserved.append(reserve(config.admin_host, config.admin_port))
        config = replace(config, port=reserved[0].getsockname()[1],
                         admin_port=reserved[1].getsockname()[1] if config.admin_port is not None else None)
        return supervise(config, reserved, ready=lambda: announce(config, config.port, config.admin_port))
    except ListenError as error:
        print(f"load_balancer: error: {error.strerror}", file=sys.stderr)
        return 1


def announce(config: Config, port: int, admin_port: int | None) -> None:
    host = f"[{config.host}]" if ":" in config.host else config.host
    log.info("load_balancer %s listening on http://%s:%d with %d worker%s, balancing over %s",
             __version__, host, port, config.workers, "" if config.workers == 1 else "s",
             ", ".join(config.backends))
    if admin_port is not None:
        log.info("admin on http://%s:%d/status", config.admin_host, admin_port)


if __name__ == "__main__":
    sys.exit(main())
