"""Unit tests of the HTTP/1.1 message rules in load_balancer.py: pure functions, bytes in, bytes out.

No sockets and no threads: heads are parsed from byte strings, bodies are copied between in-memory
readers (io.BytesIO, io.BufferedReader over one, or a raw stream that hands out a few bytes per
read, to emulate TCP segments) and a writer that appends to a list. Rejections are tables, one row
per rule, with readable ids; each row names the status and a fragment of the detail, so that the
row fails if another rule (with the same status) fires instead.
"""

from __future__ import annotations

import io
import re
import socket
import time

import pytest

import load_balancer as lb

CONFIG = lb.Config()
FIXED_DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"
IMF_FIXDATE = re.compile(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")


def H(*lines: bytes) -> bytes:
    """A head from its lines: CRLF after each, then the empty line."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def req(*fields: bytes, line: bytes = b"GET / HTTP/1.1", config: lb.Config = CONFIG) -> lb.Request:
    return lb.parse_request_head(H(line, *fields), config)


def resp(*fields: bytes, line: bytes = b"HTTP/1.1 200 OK", method: bytes = b"GET",
         config: lb.Config = CONFIG) -> lb.ResponseHead:
    return lb.parse_response_head(H(line, *fields), method, config)


def lines_of(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n"), head
    return head[:-4].split(b"\r\n")


def named(head: bytes, name: bytes) -> list[bytes]:
    """Values of the fields called `name` (any case) in a head, in order."""
    found = []
    for line in lines_of(head)[1:]:
        field, _, value = line.partition(b":")
        if field.lower() == name.lower():
            found.append(value.strip())
    return found


# ===================================================================================================
# parse_request_head
# ===================================================================================================

def test_request_valid_head_fields():
    head = H(b"POST /submit?x=1 HTTP/1.1",
             b"Host: example.com:8080",
             b"Connection: keep-alive, X-Trace",
             b"Content-Length: 11",
             b"X-Forwarded-For: 192.0.2.1",
             b"Accept: a",
             b"x-forwarded-for: 198.51.100.2, 203.0.113.3",
             b"Accept: b")
    r = lb.parse_request_head(head, CONFIG)
    assert r.method == b"POST"
    assert r.target == b"/submit?x=1"
    assert r.version == b"HTTP/1.1"
    assert r.host == b"example.com:8080"
    assert (r.framing, r.length) == (lb.LENGTH, 11)
    assert r.keep_alive is True
    assert r.connection_tokens == frozenset({b"keep-alive", b"x-trace"})
    assert r.forwarded_for == [b"192.0.2.1", b"198.51.100.2, 203.0.113.3"]
    assert r.expect_continue is False
    assert [name for name, _ in r.fields] == [b"host", b"connection", b"content-length",
                                              b"x-forwarded-for", b"accept", b"x-forwarded-for", b"accept"]
    assert r.fields[0] == (b"host", b"Host: example.com:8080")


def test_request_without_body_or_optional_fields():
    r = req(b"Host: a")
    assert (r.framing, r.length) == (lb.NO_BODY, 0)
    assert r.connection_tokens == frozenset()
    assert r.forwarded_for is None
    assert r.expect_continue is False


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED"])
def test_request_chunked_framing(value):
    r = req(b"Host: a", b"Transfer-Encoding: " + value, line=b"POST / HTTP/1.1")
    assert (r.framing, r.length) == (lb.CHUNKED, 0)


@pytest.mark.parametrize("version, connection, keep_alive", [
    pytest.param(b"HTTP/1.1", None, True, id="1.1-default-persistent"),
    pytest.param(b"HTTP/1.1", b"close", False, id="1.1-close"),
    pytest.param(b"HTTP/1.1", b"Keep-Alive, CLOSE", False, id="1.1-close-wins"),
    pytest.param(b"HTTP/1.0", None, False, id="1.0-default-close"),
    pytest.param(b"HTTP/1.0", b"Keep-Alive", True, id="1.0-keep-alive"),
    pytest.param(b"HTTP/1.0", b"keep-alive, close", False, id="1.0-close-wins"),
])
def test_request_keep_alive(version, connection, keep_alive):
    fields = [b"Host: a"] + ([b"Connection: " + connection] if connection else [])
    assert req(*fields, line=b"GET / " + version).keep_alive is keep_alive


def test_request_http10_without_host_is_accepted():
    r = req(line=b"GET /old HTTP/1.0")
    assert r.host is None and r.version == b"HTTP/1.0"


@pytest.mark.parametrize("target, host, path", [
    pytest.param(b"http://origin.example:8080/p?q=1", b"origin.example:8080", b"/p?q=1", id="with-port-path-query"),
    pytest.param(b"http://origin.example", b"origin.example", b"/", id="no-path"),
    pytest.param(b"http://origin.example?q", b"origin.example", b"/?q", id="query-no-path"),
    pytest.param(b"HTTPS://origin.example/x", b"origin.example", b"/x", id="https-any-case"),
    pytest.param(b"http://[2001:db8::1]:81/x", b"[2001:db8::1]:81", b"/x", id="ipv6"),
])
def test_request_absolute_form_rewritten(target, host, path):
    # RFC 9112 section 3.2.2: the authority of the target replaces Host.
    r = req(b"Host: other.example", line=b"GET " + target + b" HTTP/1.1")
    assert (r.host, r.target) == (host, path)


def test_request_asterisk_form_for_options():
    r = req(b"Host: a", line=b"OPTIONS * HTTP/1.1")
    assert (r.method, r.target) == (b"OPTIONS", b"*")


@pytest.mark.parametrize("fields, expect_continue", [
    pytest.param([b"Content-Length: 5", b"Expect: 100-continue"], True, id="with-length"),
    pytest.param([b"Transfer-Encoding: chunked", b"Expect: 100-Continue"], True, id="chunked-any-case"),
    pytest.param([b"Expect: 100-continue"], False, id="no-body"),
])
def test_request_expect_continue(fields, expect_continue):
    r = req(b"Host: a", *fields, line=b"PUT /x HTTP/1.1")
    assert r.expect_continue is expect_continue


def test_request_content_length_limits_accepted():
    assert req(b"Host: a", b"Content-Length: 0").length == 0
    unlimited = lb.Config(max_body_size=0)
    assert req(b"Host: a", b"Content-Length: 9223372036854775807", config=unlimited).length == 2 ** 63 - 1
    small = lb.Config(max_body_size=10)
    assert req(b"Host: a", b"Content-Length: 10", config=small).length == 10


def test_request_limits_accepted_at_the_boundary():
    line = b"GET /" + b"a" * 11 + b" HTTP/1.1"
    assert req(b"Host: a", line=line, config=lb.Config(max_request_line=len(line))).target == b"/" + b"a" * 11
    # Header section size: each field line counts with its CRLF. "Host: a" is 9, the pad 7 + n + 2.
    pad = b"X-Pad: " + b"p" * 22
    assert req(b"Host: a", pad, config=lb.Config(max_header_size=40)).host == b"a"
    assert len(req(b"Host: a", b"X-A: 1", config=lb.Config(max_headers=2)).fields) == 2


def rejection(id_, status, match, *lines, config=None, marks=()):
    """One row: the head from its lines (or one complete head as is), the config, status, detail."""
    head = lines[0] if len(lines) == 1 and lines[0].endswith(b"\r\n\r\n") else H(*lines)
    return pytest.param(head, config or CONFIG, status, match, id=id_, marks=marks)


GET = b"GET / HTTP/1.1"
POST = b"POST / HTTP/1.1"
HOST = b"Host: a"

REQUEST_REJECTIONS = [
    # Framing: RFC 9112 sections 6.1-6.3, the request smuggling defences.
    rejection("cl-and-te", 400, "both Content-Length and Transfer-Encoding",
              POST, HOST, b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    rejection("te-and-cl", 400, "both Content-Length and Transfer-Encoding",
              POST, HOST, b"Transfer-Encoding: chunked", b"Content-Length: 5"),
    rejection("duplicate-cl-same-value", 400, "several Content-Length",
              POST, HOST, b"Content-Length: 5", b"Content-Length: 5"),
    rejection("duplicate-cl-list", 400, "several Content-Length", POST, HOST, b"Content-Length: 5, 5"),
    rejection("duplicate-cl-differing", 400, "several Content-Length",
              POST, HOST, b"Content-Length: 5", b"Content-Length: 6"),
    rejection("cl-plus-sign", 400, "invalid Content-Length", POST, HOST, b"Content-Length: +5"),
    rejection("cl-minus-sign", 400, "invalid Content-Length", POST, HOST, b"Content-Length: -1"),
    rejection("cl-hex", 400, "invalid Content-Length", POST, HOST, b"Content-Length: 0x5"),
    rejection("cl-empty", 400, "invalid Content-Length", POST, HOST, b"Content-Length:"),
    rejection("cl-inner-space", 400, "invalid Content-Length", POST, HOST, b"Content-Length: 5 5"),
    rejection("cl-decimal-point", 400, "invalid Content-Length", POST, HOST, b"Content-Length: 5.0"),
    rejection("cl-2**63", 400, "invalid Content-Length", POST, HOST, b"Content-Length: 9223372036854775808"),
    rejection("cl-20-digits", 400, "invalid Content-Length", POST, HOST, b"Content-Length: 00000000000000000005"),
    rejection("cl-non-ascii-digit", 400, "invalid Content-Length", POST, HOST, "Content-Length: \u0665".encode()),
    rejection("te-not-final-chunked", 400, "must end with chunked",
              POST, HOST, b"Transfer-Encoding: chunked, gzip"),
    rejection("te-gzip-only", 400, "must end with chunked", POST, HOST, b"Transfer-Encoding: gzip"),
    rejection("te-trailing-comma", 400, "must end with chunked", POST, HOST, b"Transfer-Encoding: chunked,"),
    rejection("te-chunked-twice", 400, "invalid Transfer-Encoding",
              POST, HOST, b"Transfer-Encoding: chunked, chunked"),
    rejection("te-chunked-two-lines", 400, "invalid Transfer-Encoding",
              POST, HOST, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
    rejection("te-empty-element", 400, "invalid Transfer-Encoding", POST, HOST, b"Transfer-Encoding: , chunked"),
    rejection("te-gzip-chunked-501", 501, "only the chunked transfer coding",
              POST, HOST, b"Transfer-Encoding: gzip, chunked"),
    rejection("te-in-http10", 400, "HTTP/1.0", b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"),
    # Field syntax: RFC 9112 sections 2.2, 5.1, 5.2.
    rejection("obs-fold-space", 400, "line folding", GET, HOST, b"X-A: 1", b" continued"),
    rejection("obs-fold-tab", 400, "line folding", GET, HOST, b"X-A: 1", b"\tcontinued"),
    rejection("space-before-colon", 400, "between header name and colon", GET, HOST, b"X-A : 1"),
    rejection("tab-before-colon", 400, "between header name and colon", GET, HOST, b"X-A\t: 1"),
    rejection("field-without-colon", 400, "without a colon", GET, HOST, b"X-A"),
    rejection("empty-field-name", 400, "invalid header name", GET, HOST, b": x"),
    rejection("non-token-field-name", 400, "invalid header name", GET, HOST, b"X(A): x"),
    rejection("nul-in-value", 400, "control character", GET, HOST, b"X-A: a\x00b"),
    rejection("del-in-value", 400, "control character", GET, HOST, b"X-A: a\x7fb"),
    rejection("control-in-target", 400, "control character", b"GET /\x01 HTTP/1.1", HOST),
    rejection("bare-cr-in-value", 400, "bare CR or LF", GET, HOST, b"X-A: a\rb"),
    rejection("bare-lf-in-value", 400, "bare CR or LF", GET, HOST, b"X-A: a\nb"),
    rejection("bare-lf-line-end", 400, "bare CR or LF", b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
    # Host: RFC 9112 section 3.2.
    rejection("missing-host-http11", 400, "missing Host", GET, b"X-A: 1"),
    rejection("two-hosts", 400, "several Host", GET, HOST, b"Host: a"),
    rejection("host-userinfo", 400, "invalid Host", GET, b"Host: user@a"),
    rejection("host-space", 400, "invalid Host", GET, b"Host: a b"),
    rejection("host-bad-port", 400, "invalid Host", GET, b"Host: a:8x"),
    rejection("host-slash", 400, "invalid Host", GET, b"Host: a/b"),
    # Request target: RFC 9112 section 3.2.
    rejection("absolute-form-ftp", 400, "neither origin-form nor absolute-form", b"GET ftp://a/ HTTP/1.1", HOST),
    rejection("absolute-form-userinfo", 400, "invalid authority", b"GET http://u@a/ HTTP/1.1", HOST),
    rejection("absolute-form-empty-authority", 400, "invalid authority", b"GET http:///p HTTP/1.1", HOST),
    rejection("no-scheme-separator-http", 400, "neither origin-form nor absolute-form", b"GET http:/a HTTP/1.1", HOST),
    rejection("no-scheme-separator-httpX", 400, "neither origin-form nor absolute-form",
              b"GET httpX HTTP/1.1", HOST),  # found once with host b"tpX": find() == -1 sliced
    rejection("asterisk-for-get", 400, "OPTIONS only", b"GET * HTTP/1.1", HOST),
    rejection("target-with-fragment", 400, "invalid request target", b"GET /a#b HTTP/1.1", HOST),
    rejection("target-non-ascii", 400, "invalid request target", b"GET /caf\xe9 HTTP/1.1", HOST),
    # Request line and method.
    rejection("connect-501", 501, "CONNECT", b"CONNECT a:443 HTTP/1.1", b"Host: a:443"),
    rejection("http-2.0-505", 505, "only HTTP/1.0 and HTTP/1.1", b"GET / HTTP/2.0", HOST),
    rejection("http-0.9-505", 505, "only HTTP/1.0 and HTTP/1.1", b"GET / HTTP/0.9", HOST),
    rejection("lowercase-http-version", 400, "malformed request line", b"GET / http/1.1", HOST),
    rejection("version-trailing-garbage", 400, "malformed request line", b"GET / HTTP/1.1x", HOST),
    rejection("two-spaces", 400, "malformed request line", b"GET  / HTTP/1.1", HOST),
    rejection("missing-version", 400, "malformed request line", b"GET /", HOST),
    rejection("tab-separator", 400, "malformed request line", b"GET\t/ HTTP/1.1", HOST),
    rejection("invalid-method", 400, "invalid method", b"G(T / HTTP/1.1", HOST),
    # Expect: RFC 9110 section 10.1.1.
    rejection("expect-unknown-417", 417, "100-continue", GET, HOST, b"Expect: something"),
    rejection("expect-extra-element-417", 417, "100-continue", POST, HOST, b"Content-Length: 1",
              b"Expect: 100-continue, x"),
    # Limits.
    rejection("request-line-414", 414, "request line longer than 26",  # 27 bytes: one over
              b"GET /" + b"a" * 13 + b" HTTP/1.1", HOST, config=lb.Config(max_request_line=26)),
    rejection("header-bytes-431", 431, "header fields larger than 40",
              GET, HOST, b"X-Pad: " + b"p" * 23, config=lb.Config(max_header_size=40)),
    rejection("header-count-431", 431, "more than 2 header fields",
              GET, HOST, b"X-A: 1", b"X-B: 2", config=lb.Config(max_headers=2)),
    rejection("body-413", 413, "larger than 10", POST, HOST, b"Content-Length: 11", config=lb.Config(max_body_size=10)),
]


@pytest.mark.parametrize("head, config, status, match", REQUEST_REJECTIONS)
def test_request_rejected(head, config, status, match):
    with pytest.raises(lb.HTTPError) as caught:
        lb.parse_request_head(head, config)
    assert caught.value.status == status, caught.value.detail
    assert match.lower() in caught.value.detail.lower()


@pytest.mark.parametrize("values, allow_repeats, expected", [
    pytest.param([b"0"], False, 0, id="zero"),
    pytest.param([b"42"], False, 42, id="plain"),
    pytest.param([b"5", b"5"], True, 5, id="repeated-lines-response"),
    pytest.param([b"5, 5 ,5"], True, 5, id="repeated-list-response"),
    pytest.param([b"9223372036854775807"], False, 2 ** 63 - 1, id="2**63-1"),
])
def test_parse_content_length_valid(values, allow_repeats, expected):
    assert lb.parse_content_length(values, allow_repeats=allow_repeats) == expected


@pytest.mark.parametrize("values, allow_repeats", [
    pytest.param([b"5", b"5"], False, id="repeated-request"),
    pytest.param([b"5", b"6"], True, id="differing-response"),
    pytest.param([b"5,"], True, id="trailing-comma"),
    pytest.param([b""], False, id="empty"),
    pytest.param([b"1e3"], False, id="exponent"),
])
def test_parse_content_length_invalid(values, allow_repeats):
    with pytest.raises(lb.HTTPError) as caught:
        lb.parse_content_length(values, allow_repeats=allow_repeats)
    assert caught.value.status == 400


# ===================================================================================================
# parse_response_head
# ===================================================================================================

@pytest.mark.parametrize("status_line, version, status, reason", [
    pytest.param(b"HTTP/1.1 200 OK", 11, 200, b"OK", id="1.1-ok"),
    pytest.param(b"HTTP/1.1 200", 11, 200, b"", id="no-reason-no-space"),
    pytest.param(b"HTTP/1.1 200 ", 11, 200, b"", id="empty-reason"),
    pytest.param(b"HTTP/1.0 404 Not Found", 10, 404, b"Not Found", id="1.0-reason-with-space"),
    pytest.param(b"HTTP/1.1 599 Caf\xe9", 11, 599, b"Caf\xe9", id="obs-text-reason"),
])
def test_response_status_line(status_line, version, status, reason):
    r = resp(b"Content-Length: 0", line=status_line)
    assert (r.version, r.status, r.reason) == (version, status, reason)


@pytest.mark.parametrize("status_line", [
    pytest.param(b"HTTP/1.1 20 OK", id="two-digits"),
    pytest.param(b"HTTP/1.1 2000 OK", id="four-digits"),
    pytest.param(b"HTTP/1.1 099 Low", id="leading-zero"),
    pytest.param(b"HTTP/1.2 200 OK", id="1.2"),
    pytest.param(b"HTTP/2 200 OK", id="http2"),
    pytest.param(b"http/1.1 200 OK", id="lowercase"),
    pytest.param(b"HTTP/1.1  200 OK", id="two-spaces"),
    pytest.param(b"ICY 200 OK", id="icy"),
    pytest.param(b"", id="empty"),
])
def test_response_malformed_status_line_502(status_line):
    with pytest.raises(lb.HTTPError) as caught:
        resp(b"Content-Length: 0", line=status_line)
    assert caught.value.status == 502 and "status line" in caught.value.detail


@pytest.mark.parametrize("method, status_line, fields, framing, length, content_length, keep_alive", [
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 5"], lb.LENGTH, 5, 5, True, id="content-length"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked"], lb.CHUNKED, 0, None, True, id="chunked"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Transfer-Encoding: Chunked"], lb.CHUNKED, 0, None, True, id="chunked-any-case"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [], lb.UNTIL_CLOSE, 0, None, False, id="until-close"),
    pytest.param(b"HEAD", b"HTTP/1.1 200 OK", [b"Content-Length: 100"], lb.NO_BODY, 0, 100, True, id="head-with-length"),
    pytest.param(b"HEAD", b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked"], lb.NO_BODY, 0, None, True, id="head-chunked"),
    pytest.param(b"HEAD", b"HTTP/1.1 200 OK", [], lb.NO_BODY, 0, None, True, id="head-unframed"),
    pytest.param(b"GET", b"HTTP/1.1 204 No Content", [], lb.NO_BODY, 0, None, True, id="204"),
    pytest.param(b"GET", b"HTTP/1.1 304 Not Modified", [b"Content-Length: 100"], lb.NO_BODY, 0, 100, True, id="304-with-length"),
    pytest.param(b"GET", b"HTTP/1.1 100 Continue", [], lb.NO_BODY, 0, None, True, id="100"),
    pytest.param(b"GET", b"HTTP/1.1 103 Early Hints", [b"Link: </s.css>"], lb.NO_BODY, 0, None, True, id="103"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 5", b"Connection: close"], lb.LENGTH, 5, 5, False, id="1.1-close"),
    pytest.param(b"GET", b"HTTP/1.0 200 OK", [b"Content-Length: 5"], lb.LENGTH, 5, 5, False, id="1.0-default-close"),
    pytest.param(b"GET", b"HTTP/1.0 200 OK", [b"Content-Length: 5", b"Connection: keep-alive"], lb.LENGTH, 5, 5, True, id="1.0-keep-alive"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 5", b"Content-Length: 5"], lb.LENGTH, 5, 5, True, id="identical-cl-lines"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 5, 5"], lb.LENGTH, 5, 5, True, id="identical-cl-list"),
])
def test_response_framing(method, status_line, fields, framing, length, content_length, keep_alive):
    r = resp(*fields, line=status_line, method=method)
    assert (r.framing, r.length) == (framing, length)
    assert r.content_length == content_length
    assert r.keep_alive is keep_alive


def test_response_fields_and_date_flag():
    r = resp(b"Date: " + FIXED_DATE, b"Connection: X-Internal", b"Set-Cookie: a=1", b"Content-Length: 0")
    assert r.has_date is True
    assert r.connection_tokens == frozenset({b"x-internal"})
    assert [name for name, _ in r.fields] == [b"date", b"connection", b"set-cookie", b"content-length"]
    assert resp(b"Content-Length: 0").has_date is False


@pytest.mark.parametrize("status_line, fields, match", [
    pytest.param(b"HTTP/1.1 200 OK", [b"Content-Length: 5", b"Content-Length: 6"], "several Content-Length", id="differing-cl"),
    pytest.param(b"HTTP/1.1 200 OK", [b"Content-Length: 5, 6"], "several Content-Length", id="differing-cl-list"),
    pytest.param(b"HTTP/1.1 200 OK", [b"Content-Length: -1"], "invalid Content-Length", id="negative-cl"),
    pytest.param(b"HTTP/1.1 200 OK", [b"Content-Length: 5", b"Transfer-Encoding: chunked"], "both", id="cl-and-te"),
    pytest.param(b"HTTP/1.1 204 No Content", [b"Content-Length: 0", b"Transfer-Encoding: chunked"], "both", id="cl-and-te-on-204"),
    pytest.param(b"HTTP/1.1 200 OK", [b"Transfer-Encoding: gzip"], "unsupported Transfer-Encoding", id="te-gzip"),
    pytest.param(b"HTTP/1.1 200 OK", [b"Transfer-Encoding: gzip, chunked"], "unsupported Transfer-Encoding", id="te-gzip-chunked"),
    pytest.param(b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked, chunked"], "unsupported Transfer-Encoding", id="te-chunked-twice"),
    pytest.param(b"HTTP/1.0 200 OK", [b"Transfer-Encoding: chunked"], "unsupported Transfer-Encoding", id="http10-te"),
    pytest.param(b"HTTP/1.1 200 OK", [b"X-A: 1", b" folded"], "line folding", id="obs-fold"),
    pytest.param(b"HTTP/1.1 200 OK", [b"X-A : 1"], "between header name and colon", id="space-before-colon"),
    pytest.param(b"HTTP/1.1 200 OK", [b"X-A: a\x00"], "control character", id="nul"),
    pytest.param(b"HTTP/1.1 200 OK", [b"X-A: a\rb"], "bare CR or LF", id="bare-cr"),
])
def test_response_rejected_as_502(status_line, fields, match):
    with pytest.raises(lb.HTTPError) as caught:
        resp(*fields, line=status_line)
    assert caught.value.status == 502
    assert match.lower() in caught.value.detail.lower()


def test_response_limits_502():
    with pytest.raises(lb.HTTPError) as caught:
        resp(b"X-A: 1", b"X-B: 2", b"X-C: 3", config=lb.Config(max_headers=2))
    assert caught.value.status == 502
    big = lb.Config(max_header_size=20, max_request_line=20)
    resp(b"X-Pad: " + b"p" * 5, config=big)  # status line 15 + field 12 + 2 CRLFs = 31 <= 20 + 20
    with pytest.raises(lb.HTTPError) as caught:
        resp(b"X-Pad: " + b"p" * 20, config=big)
    assert caught.value.status == 502 and "larger" in caught.value.detail


# ===================================================================================================
# headers_for_upstream
# ===================================================================================================

CLIENT_IP = b"10.1.2.3"


def upstream_head(*fields: bytes, line: bytes = b"GET / HTTP/1.1", default_host: bytes = b"backend:8001") -> bytes:
    return lb.headers_for_upstream(req(*fields, line=line), CLIENT_IP, default_host)


def test_upstream_head_exact_bytes():
    request = req(
        b"Host: shop.example:8080",
        b"User-Agent: t/1",
        b"Connection: keep-alive, X-Hop",
        b"Keep-Alive: timeout=5",
        b"X-Hop: secret",
        b"TE: trailers",
        b"Upgrade: websocket",
        b"Proxy-Connection: keep-alive",
        b"Proxy-Authorization: Basic eA==",
        b"Accept: text/html",
        b"Expect: 100-continue",
        b"X-Forwarded-For: 203.0.113.7",
        b"X-Forwarded-Host: evil.example",
        b"X-Forwarded-Proto: https",
        b"Accept: application/json",
        b"Content-Length: 11",
        b"Cookie: a=1",
        line=b"POST /api/items?id=7 HTTP/1.1")
    assert lb.headers_for_upstream(request, CLIENT_IP, b"backend:8001") == (
        b"POST /api/items?id=7 HTTP/1.1\r\n"
        b"Host: shop.example:8080\r\n"
        b"User-Agent: t/1\r\n"
        b"Accept: text/html\r\n"
        b"X-Forwarded-For: 10.1.2.3\r\n"
        b"Accept: application/json\r\n"
        b"Content-Length: 11\r\n"
        b"Cookie: a=1\r\n"
        b"X-Forwarded-Host: shop.example:8080\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"\r\n")


@pytest.mark.parametrize("name", [
    b"Connection", b"Proxy-Connection", b"Keep-Alive", b"Proxy-Authenticate", b"Proxy-Authorization",
    b"TE", b"Trailer", b"Upgrade", b"Expect",
])
def test_upstream_drops_hop_by_hop(name):
    value = b"100-continue" if name == b"Expect" else b"x"
    out = upstream_head(HOST, name + b": " + value, b"X-Keep: 1")
    assert named(out, name) == []
    assert named(out, b"X-Keep") == [b"1"]


def test_upstream_drops_fields_named_in_connection():
    out = upstream_head(HOST, b"Connection: X-One, x-two", b"X-One: 1", b"X-Two: 2", b"X-Three: 3",
                        b"Connection: X-Four", b"X-Four: 4")
    assert [line.split(b":")[0] for line in lines_of(out)[1:]] == [
        b"Host", b"X-Three", b"X-Forwarded-For", b"X-Forwarded-Host", b"X-Forwarded-Proto"]


def test_upstream_host_first_and_single():
    out = upstream_head(b"Accept: */*", b"Host: site.example", b"X-A: 1")
    assert lines_of(out)[:2] == [b"GET / HTTP/1.1", b"Host: site.example"]
    assert named(out, b"Host") == [b"site.example"]


def test_upstream_host_from_absolute_form():
    out = upstream_head(b"Host: ignored.example", line=b"GET http://real.example:81/p?q HTTP/1.1")
    assert lines_of(out)[:2] == [b"GET /p?q HTTP/1.1", b"Host: real.example:81"]
    assert named(out, b"X-Forwarded-Host") == [b"real.example:81"]


def test_upstream_http10_without_host_gets_default_host_and_no_forwarded_host():
    out = upstream_head(b"Accept: */*", line=b"GET /old HTTP/1.0")
    assert lines_of(out)[:2] == [b"GET /old HTTP/1.1", b"Host: backend:8001"]
    assert named(out, b"X-Forwarded-Host") == []
    assert named(out, b"X-Forwarded-Proto") == [b"http"]


@pytest.mark.parametrize("prior", [
    pytest.param([], id="none"),
    pytest.param([b"X-Forwarded-For: 192.0.2.1"], id="one"),
    pytest.param([b"X-Forwarded-For: 192.0.2.1, 192.0.2.2", b"x-forwarded-for: 192.0.2.3"],
                 id="several-lines"),
])
def test_upstream_x_forwarded_for_of_an_untrusted_client_replaced(prior):
    # Issue 20: a client that is not a --trusted-proxies peer cannot forge the chain (the trusted
    # case, where it is extended, is in test_trusted_proxies.py).
    out = upstream_head(HOST, *prior)
    assert named(out, b"X-Forwarded-For") == [b"10.1.2.3"]


def test_upstream_client_forwarded_host_proto_replaced_even_if_named_in_connection():
    out = upstream_head(HOST, b"Connection: X-Forwarded-Host, X-Forwarded-Proto, X-Forwarded-For, Host, Content-Length",
                        b"X-Forwarded-Host: evil.example", b"X-Forwarded-Proto: https",
                        b"X-Forwarded-For: 192.0.2.9", b"Content-Length: 3", line=b"POST / HTTP/1.1")
    assert named(out, b"Host") == [b"a"]
    assert named(out, b"X-Forwarded-Host") == [b"a"]
    assert named(out, b"X-Forwarded-Proto") == [b"http"]
    assert named(out, b"X-Forwarded-For") == [b"10.1.2.3"]
    assert named(out, b"Content-Length") == [b"3"]


@pytest.mark.parametrize("fields, content_length, transfer_encoding, framing", [
    pytest.param([b"Content-Length: 42"], [b"42"], [], b"Content-Length: 42", id="length"),
    pytest.param([b"content-length:0"], [b"0"], [], b"Content-Length: 0", id="length-zero"),
    pytest.param([b"Transfer-Encoding: Chunked"], [], [b"chunked"], b"Transfer-Encoding: chunked", id="chunked"),
    pytest.param([], [], [], None, id="no-body"),
])
def test_upstream_framing_header_rewritten_in_place(fields, content_length, transfer_encoding, framing):
    out = upstream_head(HOST, b"X-Before: 1", *fields, b"X-After: 2", line=b"POST / HTTP/1.1")
    assert named(out, b"Content-Length") == content_length
    assert named(out, b"Transfer-Encoding") == transfer_encoding
    # The framing header is the balancer's own, normalised, but where the client had it: field
    # order is kept (urllib3's tests notice a Content-Length that moves).
    expected = [b"X-Before: 1"] + ([framing] if framing else []) + [b"X-After: 2"]
    assert lines_of(out)[2:2 + len(expected)] == expected
    assert lines_of(out)[-1] == b"X-Forwarded-Proto: http"


def test_upstream_forwarded_for_stays_in_place_and_expect_is_forwarded_when_asked():
    request = req(HOST, b"X-Forwarded-For: 192.0.2.1", b"Expect: 100-continue", b"X-Z: 1",
                  b"Content-Length: 5", line=b"PUT /x HTTP/1.1")
    out = lb.headers_for_upstream(request, CLIENT_IP, b"d", proto=b"https", expect=True)
    assert lines_of(out)[1:] == [b"Host: a", b"X-Forwarded-For: 10.1.2.3",
                                 b"Expect: 100-continue", b"X-Z: 1", b"Content-Length: 5",
                                 b"X-Forwarded-Host: a", b"X-Forwarded-Proto: https"]
    assert named(lb.headers_for_upstream(request, CLIENT_IP, b"d"), b"Expect") == []


def test_upstream_repeated_fields_kept_in_order():
    out = upstream_head(b"Accept: a", HOST, b"X-A: 1", b"accept: b", b"X-A: 2", b"ACCEPT: c")
    assert lines_of(out)[2:7] == [b"Accept: a", b"X-A: 1", b"accept: b", b"X-A: 2", b"ACCEPT: c"]


# ===================================================================================================
# headers_for_client
# ===================================================================================================

@pytest.fixture
def fixed_date(monkeypatch):
    monkeypatch.setattr(lb, "http_date", lambda: FIXED_DATE)


def client_head(*fields: bytes, line: bytes = b"HTTP/1.1 200 OK", method: bytes = b"GET",
                chunked: bool = False, keep_alive: bool = True, http10: bool = False) -> bytes:
    return lb.headers_for_client(resp(*fields, line=line, method=method),
                                 chunked=chunked, keep_alive=keep_alive, http10=http10)


def test_client_head_exact_bytes(fixed_date):
    out = client_head(b"Server: up/1",
                      b"Connection: keep-alive, X-Internal",
                      b"Keep-Alive: timeout=5",
                      b"X-Internal: 1",
                      b"Transfer-Encoding: chunked",
                      b"Set-Cookie: a=1",
                      b"Content-Type: text/plain",
                      b"Set-Cookie: b=2",
                      b"Proxy-Authenticate: Basic",
                      b"Trailer: X-Sum",
                      b"Upgrade: h2c",
                      b"Set-Cookie: c=3",
                      chunked=True)
    assert out == (b"HTTP/1.1 200 OK\r\n"
                   b"Server: up/1\r\n"
                   b"Set-Cookie: a=1\r\n"
                   b"Content-Type: text/plain\r\n"
                   b"Set-Cookie: b=2\r\n"
                   b"Set-Cookie: c=3\r\n"
                   b"Transfer-Encoding: chunked\r\n"
                   b"Date: " + FIXED_DATE + b"\r\n"
                   b"\r\n")


@pytest.mark.parametrize("name", [
    b"Connection", b"Proxy-Connection", b"Keep-Alive", b"Proxy-Authenticate", b"Proxy-Authorization",
    b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade",
])
def test_client_drops_hop_by_hop(name):
    value = b"chunked" if name == b"Transfer-Encoding" else b"x"
    out = client_head(name + b": " + value, b"X-Keep: 1", chunked=False)
    assert named(out, name) == []
    assert named(out, b"X-Keep") == [b"1"]


def test_client_drops_fields_named_in_connection():
    out = client_head(b"Connection: X-A, x-b", b"X-A: 1", b"X-B: 2", b"X-C: 3", b"Content-Length: 0")
    assert named(out, b"X-A") == [] and named(out, b"X-B") == [] and named(out, b"X-C") == [b"3"]
    assert named(out, b"Connection") == []


def test_client_status_line_is_http11():
    out = client_head(b"Content-Length: 0", line=b"HTTP/1.0 404 Not Found", keep_alive=False)
    assert lines_of(out)[0] == b"HTTP/1.1 404 Not Found"


@pytest.mark.parametrize("method, status_line, fields, chunked, content_length", [
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 7"], False, [b"7"], id="length"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 7", b"Content-Length: 7"], False, [b"7"], id="repeated-length-once"),
    pytest.param(b"HEAD", b"HTTP/1.1 200 OK", [b"Content-Length: 100"], False, [b"100"], id="head"),
    pytest.param(b"GET", b"HTTP/1.1 304 Not Modified", [b"Content-Length: 100"], False, [b"100"], id="304"),
    pytest.param(b"GET", b"HTTP/1.1 204 No Content", [b"Content-Length: 0"], False, [], id="204-never"),
    pytest.param(b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 7"], True, [b"7"], id="length-wins-over-chunked"),
])
def test_client_content_length(method, status_line, fields, chunked, content_length):
    out = client_head(*fields, line=status_line, method=method, chunked=chunked)
    assert named(out, b"Content-Length") == content_length
    if content_length:
        assert named(out, b"Transfer-Encoding") == []


@pytest.mark.parametrize("fields", [
    pytest.param([b"Transfer-Encoding: chunked"], id="from-chunked"),
    pytest.param([], id="from-until-close"),
])
def test_client_transfer_encoding_when_chunked(fields):
    assert named(client_head(*fields, chunked=True), b"Transfer-Encoding") == [b"chunked"]
    assert named(client_head(*fields, chunked=False, keep_alive=False), b"Transfer-Encoding") == []


def test_client_date_added_only_when_missing():
    added = named(client_head(b"Content-Length: 0"), b"Date")
    assert len(added) == 1 and IMF_FIXDATE.fullmatch(added[0]), added
    kept = client_head(b"date: Tue, 01 Jan 2030 00:00:00 GMT", b"Content-Length: 0")
    assert named(kept, b"Date") == [b"Tue, 01 Jan 2030 00:00:00 GMT"]


def test_headers_for_client_replaces_a_date_named_in_connection():
    """A Date the upstream marks hop-by-hop is dropped; the balancer still sends one (RFC 9110
    section 6.6.1)."""
    head = client_head(b"Date: " + FIXED_DATE, b"Connection: Date", b"Content-Length: 0")
    dates = named(head, b"Date")
    assert len(dates) == 1 and dates != [FIXED_DATE]


@pytest.mark.parametrize("keep_alive, http10, connection", [
    pytest.param(False, False, [b"close"], id="close-1.1"),
    pytest.param(False, True, [b"close"], id="close-1.0"),
    pytest.param(True, True, [b"keep-alive"], id="keep-alive-1.0"),
    pytest.param(True, False, [], id="persistent-1.1-implicit"),
])
def test_client_connection_header(keep_alive, http10, connection):
    out = client_head(b"Content-Length: 0", b"Connection: keep-alive", keep_alive=keep_alive, http10=http10)
    assert named(out, b"Connection") == connection


def test_client_set_cookie_kept_separate():
    out = client_head(b"Set-Cookie: a=1; Path=/", b"Content-Length: 0", b"Set-Cookie: b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT",
                      b"Set-Cookie: c=3")
    assert named(out, b"Set-Cookie") == [b"a=1; Path=/", b"b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT", b"c=3"]


# ===================================================================================================
# read_head
# ===================================================================================================

REQUEST = b"GET /path HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n\r\n"


class Trickle(io.RawIOBase):
    """A raw stream handing out at most `step` bytes per read, like small TCP segments; `fail_after`
    reads it raises socket.timeout, like a kernel receive timeout."""

    def __init__(self, data: bytes, step: int, fail_after: int | None = None):
        self.data, self.step, self.fail_after = memoryview(data), step, fail_after
        self.pos = self.reads = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise socket.timeout("timed out")
        self.reads += 1
        n = min(self.step, len(buffer), len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def read(data, size=8, max_size=1000, max_line=200, deadline=None, response=False, set_timeout=None, raw=None):
    reader = io.BufferedReader(raw if raw is not None else io.BytesIO(data), size)
    head = lb.read_head(reader, max_size, max_line, time.monotonic() + 10 if deadline is None else deadline,
                        set_timeout or (lambda seconds: None), response=response)
    return head, reader


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 47, 4096])
def test_read_head_whole_head_and_body_left(size):
    head, reader = read(REQUEST + b"BODY", size=size)
    assert head == REQUEST
    assert reader.read() == b"BODY"


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_read_head_split_across_many_reads(step):
    raw = Trickle(REQUEST + b"NEXT", step)
    head, reader = read(None, size=8, raw=raw)
    assert head == REQUEST
    assert raw.reads >= len(REQUEST) // step
    assert reader.read() == b"NEXT"


def test_read_head_response_slow_path():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    got, reader = read(head + b"ok", size=8, response=True)
    assert got == head and reader.read() == b"ok"


def test_read_head_set_timeout_gets_remaining_time():
    calls = []
    read(REQUEST, size=8, set_timeout=calls.append)
    assert calls and all(0 < seconds <= 10 for seconds in calls)


@pytest.mark.parametrize("size", [8, 4096])
@pytest.mark.parametrize("crlfs", [1, 2, 8])
def test_read_head_skips_leading_crlfs(size, crlfs):
    head, reader = read(b"\r\n" * crlfs + REQUEST + b"BODY", size=size)
    assert head == REQUEST and reader.read() == b"BODY"


def test_read_head_skips_leading_crlf_split_between_reads():
    head, reader = read(b"\r\n\r\n" + REQUEST + b"BODY", size=3)
    assert head == REQUEST and reader.read() == b"BODY"


@pytest.mark.parametrize("data", [pytest.param(b"", id="empty"), pytest.param(b"\r\n\r\n", id="crlfs-only")])
@pytest.mark.parametrize("size", [8, 4096])
def test_read_head_eof_before_any_byte_is_none(data, size):
    head, _ = read(data, size=size)
    assert head is None


@pytest.mark.parametrize("size", [8, 4096])
def test_read_head_max_size(size):
    head, _ = read(REQUEST, size=size, max_size=len(REQUEST))
    assert head == REQUEST
    with pytest.raises(lb.HTTPError) as caught:
        read(REQUEST, size=size, max_size=len(REQUEST) - 1)
    assert caught.value.status == 431


def test_read_head_431_without_end_of_head():
    with pytest.raises(lb.HTTPError) as caught:
        read(b"GET / HTTP/1.1\r\n" + b"X-A: aaaaaaaa\r\n" * 100, size=8, max_size=64)
    assert caught.value.status == 431


def test_read_head_414_long_first_line():
    with pytest.raises(lb.HTTPError) as caught:
        read(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n", size=8, max_line=50)
    assert caught.value.status == 414


@pytest.mark.parametrize("size", [8, 25, 27, 4096])
def test_read_head_first_line_of_exactly_max_line(size):
    line = b"GET /" + b"a" * 11 + b" HTTP/1.1"
    assert len(line) == 25
    head, _ = read(line + b"\r\nHost: a\r\n\r\n", size=size, max_line=25)
    assert head == line + b"\r\nHost: a\r\n\r\n"


def test_read_head_first_line_of_exactly_max_line_cr_lf_split():
    line = b"GET /" + b"a" * 11 + b" HTTP/1.1"
    head, _ = read(line + b"\r\nHost: a\r\n\r\n", size=26, max_line=25)
    assert head == line + b"\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("data, size, response, match", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n", 8, False, "closed in the middle", id="eof-mid-head"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n", 4096, False, "closed in the middle", id="eof-mid-head-one-read"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 8, False, "bare LF", id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 4096, False, "bare LF", id="bare-lf-one-read"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 8, False, "not an HTTP message", id="tls-handshake"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", 8, True, "not an HTTP message", id="response-not-http"),
    pytest.param(b"HTTX/1.1 200 OK\r\n\r\n", 4, True, "not an HTTP message", id="response-bad-prefix"),
])
def test_read_head_400(data, size, response, match):
    with pytest.raises(lb.HTTPError) as caught:
        read(data, size=size, response=response)
    assert caught.value.status == 400
    assert match.lower() in caught.value.detail.lower()


def test_read_head_408_deadline_passed():
    with pytest.raises(lb.HTTPError) as caught:
        read(REQUEST, size=8, deadline=time.monotonic() - 1)
    assert caught.value.status == 408


def test_read_head_408_socket_timeout():
    with pytest.raises(lb.HTTPError) as caught:
        read(None, size=8, raw=Trickle(REQUEST, step=8, fail_after=2))
    assert caught.value.status == 408


def test_read_head_one_read_head_ignores_deadline():
    # The deadline is for heads that take several reads; a head that is there at once is returned.
    head, _ = read(REQUEST, size=4096, deadline=time.monotonic() - 1)
    assert head == REQUEST


# ===================================================================================================
# parse_chunk_size
# ===================================================================================================

@pytest.mark.parametrize("line, size", [
    pytest.param(b"0\r\n", 0, id="zero"),
    pytest.param(b"1a\r\n", 26, id="lower-hex"),
    pytest.param(b"1A;ext=v\r\n", 26, id="upper-hex-extension"),
    pytest.param(b"5 ;x\r\n", 5, id="space-before-extension"),
    pytest.param(b"5\t;x\r\n", 5, id="tab-before-extension"),
    pytest.param(b"5;a=1;b=\"q s\"\r\n", 5, id="several-extensions"),
    pytest.param(b"000000000000000a\r\n", 10, id="16-digits"),
    pytest.param(b"ffffffffffffffff\r\n", 2 ** 64 - 1, id="16-digits-max"),
])
def test_parse_chunk_size_valid(line, size):
    assert lb.parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [
    pytest.param(b"0x5\r\n", id="0x-prefix"),
    pytest.param(b"+5\r\n", id="plus"),
    pytest.param(b"-1\r\n", id="minus"),
    pytest.param(b" 5\r\n", id="leading-space"),
    pytest.param(b"5 \r\n", id="trailing-space-no-extension"),
    pytest.param(b"5 5\r\n", id="inner-space"),
    pytest.param(b"\r\n", id="empty"),
    pytest.param(b";ext\r\n", id="empty-with-extension"),
    pytest.param(b"1" * 17 + b"\r\n", id="17-digits"),
    pytest.param(b"5", id="missing-crlf"),
    pytest.param(b"", id="eof"),
    pytest.param(b"5\n", id="bare-lf"),
    pytest.param(b"5\r\r\n", id="extra-cr"),
    pytest.param(b"g\r\n", id="not-hex"),
    pytest.param(b"5;a\x00b\r\n", id="nul-in-extension"),
    pytest.param(b"5;a\rb\r\n", id="cr-in-extension"),
])
def test_parse_chunk_size_invalid(line):
    with pytest.raises(lb.HTTPError) as caught:
        lb.parse_chunk_size(line)
    assert caught.value.status == 400


# ===================================================================================================
# copy_body
# ===================================================================================================

class Sink:
    """A writer that keeps every piece it is given (a copy: the buffer behind it is reused)."""

    def __init__(self):
        self.pieces: list[bytes] = []

    def __call__(self, data) -> None:
        self.pieces.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


def failing_writer(after: int = 0):
    count = [0]

    def write(data):
        if count[0] >= after:
            raise BrokenPipeError(32, "Broken pipe")
        count[0] += 1
    return write


class FailingReader(io.BytesIO):
    def readinto1(self, buffer):
        raise TimeoutError("timed out")


def dechunk(pieces: list[bytes], limit: int) -> bytes:
    """Each piece must be exactly one chunk of at most `limit` bytes, the last one the 0 chunk."""
    assert pieces[-1] == b"0\r\n\r\n"
    payload = b""
    for piece in pieces[:-1]:
        size_line, _, rest = piece.partition(b"\r\n")
        size = int(size_line, 16)
        assert 0 < size <= limit, piece
        assert len(rest) == size + 2 and rest.endswith(b"\r\n"), piece
        payload += rest[:-2]
    return payload


BODY = bytes(range(33, 33 + 23))  # 23 bytes: not a multiple of the 4-byte buffer


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.parametrize("reader_size", [None, 3, 64])
def test_copy_length_exact(reader_size):
    source = io.BytesIO(BODY + b"NEXT REQUEST")
    reader = source if reader_size is None else io.BufferedReader(source, reader_size)
    sink = Sink()
    n = lb.copy_body(reader, sink, lb.LENGTH, len(BODY), bytearray(4), chunked_out=False)
    assert n == len(BODY)
    assert sink.data == BODY
    assert all(0 < len(p) <= 4 for p in sink.pieces)
    assert reader.read() == b"NEXT REQUEST"


def test_copy_length_zero_writes_nothing():
    sink = Sink()
    assert lb.copy_body(io.BytesIO(b"X"), sink, lb.LENGTH, 0, bytearray(4), chunked_out=False) == 0
    assert sink.pieces == []


def test_copy_length_eof_early_is_read_error():
    sink = Sink()
    with pytest.raises(lb.ReadError) as caught:
        lb.copy_body(io.BytesIO(BODY[:10]), sink, lb.LENGTH, len(BODY), bytearray(4), chunked_out=False)
    assert isinstance(caught.value.__cause__, EOFError)
    assert "13 bytes before the end" in str(caught.value.__cause__)
    assert sink.data == BODY[:10]


def test_copy_chunked_to_chunked():
    data = chunked(b"hello", b" wor", b"ld, and more") + b"NEXT"
    reader = io.BufferedReader(io.BytesIO(data), 8)
    sink = Sink()
    n = lb.copy_body(reader, sink, lb.CHUNKED, 0, bytearray(4), chunked_out=True)
    assert n == 21
    assert dechunk(sink.pieces, 4) == b"hello world, and more"
    assert reader.read() == b"NEXT"


def test_copy_chunked_to_raw():
    sink = Sink()
    n = lb.copy_body(io.BytesIO(chunked(b"hello", b" world")), sink, lb.CHUNKED, 0, bytearray(4), chunked_out=False)
    assert n == 11
    assert sink.data == b"hello world"
    assert all(0 < len(p) <= 4 for p in sink.pieces)


def test_copy_chunked_empty_body():
    sink = Sink()
    assert lb.copy_body(io.BytesIO(b"0\r\n\r\n"), sink, lb.CHUNKED, 0, bytearray(4), chunked_out=True) == 0
    assert sink.pieces == [b"0\r\n\r\n"]


def test_copy_chunked_extensions_and_trailers_dropped():
    data = (b"5;name=value\r\nhello\r\n6 ; a=\"b c\"\r\n world\r\n0;last\r\n"
            b"X-Checksum: abc\r\nX-Other: 1\r\n\r\nNEXT")
    reader = io.BytesIO(data)
    sink = Sink()
    assert lb.copy_body(reader, sink, lb.CHUNKED, 0, bytearray(16), chunked_out=True) == 11
    assert sink.pieces == [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]
    assert b"X-Checksum" not in sink.data
    assert reader.read() == b"NEXT"


@pytest.mark.parametrize("data, cause_type, match", [
    pytest.param(b"5\r\nhelloXX0\r\n\r\n", lb.HTTPError, "not followed by CRLF", id="no-crlf-after-data"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", lb.HTTPError, "invalid chunk size", id="bad-size"),
    pytest.param(b"5\nhello\r\n0\r\n\r\n", lb.HTTPError, "not ended by CRLF", id="bare-lf-size-line"),
    pytest.param(b"5\r\nhel", EOFError, "bytes before the end", id="eof-in-data"),
    pytest.param(b"5\r\nhello\r\n", lb.HTTPError, "not ended by CRLF", id="eof-before-last-chunk"),
    pytest.param(b"0\r\nbad trailer\r\n\r\n", lb.HTTPError, "without a colon", id="trailer-no-colon"),
    pytest.param(b"0\r\nX-A: a\x00\r\n\r\n", lb.HTTPError, "control character", id="trailer-nul"),
    pytest.param(b"0\r\nX-A: 1\n\r\n", lb.HTTPError, "trailer", id="trailer-bare-lf"),
    pytest.param(b"0\r\nX-A: 1\r\n", lb.HTTPError, "trailer", id="eof-in-trailer"),
    pytest.param(b"0\r\n" + b"X-A: aaaaaaaaaa\r\n" * 4 + b"\r\n", lb.HTTPError, "oversized trailer", id="trailer-too-large"),
])
def test_copy_chunked_read_errors(data, cause_type, match):
    with pytest.raises(lb.ReadError) as caught:
        lb.copy_body(io.BytesIO(data), Sink(), lb.CHUNKED, 0, bytearray(4), chunked_out=True, max_trailer=40)
    cause = caught.value.__cause__
    assert isinstance(cause, cause_type), repr(cause)
    assert match.lower() in str(cause).lower()
    if isinstance(cause, lb.HTTPError):
        assert cause.status == 400


def test_copy_chunked_max_size_413():
    sink = Sink()
    data = chunked(b"aaaa", b"bbbb", b"cccc")
    with pytest.raises(lb.ReadError) as caught:
        lb.copy_body(io.BytesIO(data), sink, lb.CHUNKED, 0, bytearray(4), chunked_out=False, max_size=10)
    assert isinstance(caught.value.__cause__, lb.HTTPError)
    assert caught.value.__cause__.status == 413
    assert sink.data == b"aaaabbbb"  # nothing of the chunk that goes over
    exact = Sink()
    assert lb.copy_body(io.BytesIO(data), exact, lb.CHUNKED, 0, bytearray(4), chunked_out=False, max_size=12) == 12


@pytest.mark.parametrize("chunked_out", [False, True])
def test_copy_until_close(chunked_out):
    sink = Sink()
    n = lb.copy_body(io.BufferedReader(io.BytesIO(BODY), 5), sink, lb.UNTIL_CLOSE, 0, bytearray(4), chunked_out=chunked_out)
    assert n == len(BODY)
    if chunked_out:
        assert dechunk(sink.pieces, 4) == BODY
    else:
        assert sink.data == BODY and all(0 < len(p) <= 4 for p in sink.pieces)


@pytest.mark.parametrize("framing, data", [
    pytest.param(lb.LENGTH, BODY, id="length"),
    pytest.param(lb.CHUNKED, chunked(BODY), id="chunked"),
    pytest.param(lb.UNTIL_CLOSE, BODY, id="until-close"),
])
@pytest.mark.parametrize("after", [0, 2])
def test_copy_writer_oserror_is_write_error(framing, data, after):
    with pytest.raises(lb.WriteError) as caught:
        lb.copy_body(io.BytesIO(data), failing_writer(after), framing, len(BODY), bytearray(4), chunked_out=True)
    assert isinstance(caught.value.__cause__, BrokenPipeError)


def test_copy_terminator_write_error():
    with pytest.raises(lb.WriteError):
        lb.copy_body(io.BytesIO(b"0\r\n\r\n"), failing_writer(0), lb.CHUNKED, 0, bytearray(4), chunked_out=True)


@pytest.mark.parametrize("framing", [lb.LENGTH, lb.UNTIL_CLOSE])
def test_copy_reader_oserror_is_read_error(framing):
    with pytest.raises(lb.ReadError) as caught:
        lb.copy_body(FailingReader(BODY), Sink(), framing, len(BODY), bytearray(4), chunked_out=False)
    assert isinstance(caught.value.__cause__, TimeoutError)


# ===================================================================================================
# error_response
# ===================================================================================================

def split_response(data: bytes) -> tuple[list[bytes], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep
    return head.split(b"\r\n"), body


@pytest.mark.parametrize("status, phrase", [(400, b"Bad Request"), (502, b"Bad Gateway"), (503, b"Service Unavailable")])
@pytest.mark.parametrize("close", [False, True])
def test_error_response_format(status, phrase, close):
    lines, body = split_response(lb.error_response(status, "no upstream is available", close=close))
    assert lines[0] == b"HTTP/1.1 %d %s" % (status, phrase)
    fields = [line.partition(b": ") for line in lines[1:]]
    names = [name for name, _, _ in fields]
    values = {name: value for name, _, value in fields}
    assert values[b"Content-Type"] == b"text/plain; charset=utf-8"
    assert body == b"%d %s: no upstream is available\n" % (status, phrase)
    assert int(values[b"Content-Length"]) == len(body)
    assert IMF_FIXDATE.fullmatch(values[b"Date"])
    assert (b"Connection" in names) is close
    if close:
        assert values[b"Connection"] == b"close"
    assert len(names) == len(set(names))


def test_error_response_extra_and_utf8_length():
    data = lb.error_response(503, "caf\u00e9 \u2603", close=True, extra=b"Retry-After: 7\r\n")
    lines, body = split_response(data)
    assert b"Retry-After: 7" in lines
    assert body == "503 Service Unavailable: caf\u00e9 \u2603\n".encode()
    assert b"Content-Length: %d" % len(body) in lines


def test_error_response_head_only_has_no_body():
    full = lb.error_response(404, "not here", close=False)
    head = lb.error_response(404, "not here", close=False, head_only=True)
    assert head.endswith(b"\r\n\r\n")
    assert full.startswith(head) and full[len(head):] == b"404 Not Found: not here\n"
    assert b"Content-Length: %d" % len(b"404 Not Found: not here\n") in head


# ===================================================================================================
# Headers
# ===================================================================================================

@pytest.fixture
def headers() -> lb.Headers:
    return req(b"Host: example.com:80", b"Accept: a", b"X-Empty:", b"accept:  b ", b"ACCEPT:\tc",
               b"X-Time: 12:30:00").headers


def test_headers_get_first_value_any_case(headers):
    assert headers.get("accept") == "a"
    assert headers.get("ACCEPT") == "a"
    assert headers.get("Host") == "example.com:80"
    assert headers.get("x-time") == "12:30:00"
    assert headers.get("X-Empty") == ""
    assert headers.get("missing") is None
    assert headers.get("missing", "dflt") == "dflt"


def test_headers_get_all_in_order(headers):
    assert headers.get_all("Accept") == ["a", "b", "c"]
    assert headers.get_all("missing") is None
    assert headers.get_all("missing", []) == []


def test_headers_items_names_as_sent(headers):
    assert headers.items() == [("Host", "example.com:80"), ("Accept", "a"), ("X-Empty", ""),
                               ("accept", "b"), ("ACCEPT", "c"), ("X-Time", "12:30:00")]
    assert headers.keys() == ["Host", "Accept", "X-Empty", "accept", "ACCEPT", "X-Time"]
    assert list(headers) == headers.keys()
    assert len(headers) == 6


def test_headers_contains(headers):
    assert "accept" in headers and "Accept" in headers and "X-EMPTY" in headers
    assert "missing" not in headers
    assert "Accep" not in headers


# ===================================================================================================
# SocketReader / unread (over a stand-in socket: only recv_into is used)
# ===================================================================================================

class FakeSocket:
    def __init__(self, *segments: bytes):
        self.segments = list(segments)

    def fileno(self) -> int:
        return -1

    def recv_into(self, buffer):
        if not self.segments:
            return 0
        segment = self.segments.pop(0)
        if segment is None:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        buffer[:len(segment)] = segment
        return len(segment)


def fake_reader(sock: FakeSocket, size: int):
    return io.BufferedReader(lb.SocketReader(lb.Stream(sock)), size)


def test_unread_counts_buffered_bytes():
    reader = fake_reader(FakeSocket(b"GET / HTTP/1.1\r\n", b"\r\nbody"), 64)
    assert lb.unread(reader) == 0
    assert reader.peek(1) == b"GET / HTTP/1.1\r\n"
    assert lb.unread(reader) == 16
    reader.read(4)
    assert lb.unread(reader) == 12
    reader.read(12)
    assert lb.unread(reader) == 0
    assert reader.read1(64) == b"\r\nbody"
    assert lb.unread(reader) == 0


def test_socket_reader_would_block_is_timeout():
    reader = fake_reader(FakeSocket(b"ab", None), 8)
    assert reader.read1(8) == b"ab"
    with pytest.raises(socket.timeout):
        reader.read1(8)
