"""Issue 20, request IDs: every request forwarded carries X-Request-ID (the client's value when it
is 1-200 visible ASCII characters, else 32 new lowercase hex digits), the response to the client
carries the same one, and so does the access log line (every format; the formats themselves are
pinned in test_metrics.py). --request-id-header NAME renames the field, '' turns it off.
traceparent and tracestate (W3C Trace Context) pass through untouched.

How: the rules as pure functions (parse_request_head, headers_for_upstream, headers_for_client);
the rest through real sockets, the balancer in-process (conftest `balancer`), and once as the CLI
with --workers 2.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

import load_balancer as lb
from conftest import RawClient, get, refused_url, wait_until

HEX32 = re.compile(r"[0-9a-f]{32}")


def parsed(*fields: bytes, config: lb.Config = lb.Config()) -> lb.Request:
    return lb.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in fields)
                                 + b"\r\n", config)


def upstream_lines(request: lb.Request) -> list[bytes]:
    return lb.headers_for_upstream(request, b"10.0.0.1", b"d")[:-4].split(b"\r\n")


# ---------------------------------------------------------------------------------------------------
# The rules, as pure functions
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, valid", [
    pytest.param(b"a", True, id="one-char"),
    pytest.param(b"x" * 200, True, id="200-chars"),
    pytest.param(b"!~\"#,;=", True, id="punctuation"),
    pytest.param(b"x" * 201, False, id="201-chars"),
    pytest.param(b"", False, id="empty"),
    pytest.param(b"a b", False, id="space"),
    pytest.param(b"a\tb", False, id="tab"),
    pytest.param(b"caf\xc3\xa9", False, id="utf-8"),
    pytest.param(b"a\x7f", False, id="del"),
])
def test_valid_request_id(value, valid):
    assert lb.valid_request_id(value) is valid


def test_new_request_ids_are_32_hex_digits_and_differ():
    ids = {lb.new_request_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(HEX32.fullmatch(i.decode()) for i in ids)


@pytest.mark.parametrize("fields, kept, dropped", [
    pytest.param([], None, None, id="none"),
    pytest.param([b"X-Request-ID: abc-123"], b"abc-123", None, id="valid"),
    pytest.param([b"x-request-id:   abc  "], b"abc", None, id="ows-around"),
    pytest.param([b"X-Request-ID: " + b"x" * 201], None, b"x-request-id", id="too-long"),
    pytest.param([b"X-Request-ID: a\tb"], None, b"x-request-id", id="tab"),
    pytest.param([b"X-Request-ID:"], None, b"x-request-id", id="empty"),
    pytest.param([b"X-Request-ID: a", b"X-Request-ID: b"], None, b"x-request-id", id="two-fields"),
    pytest.param([b"Connection: X-Request-ID", b"X-Request-ID: a"], None, b"x-request-id",
                 id="named-in-connection"),
])
def test_parse_keeps_only_a_valid_client_id(fields, kept, dropped):
    request = parsed(*fields)
    assert (request.request_id, request.id_drop, request.id_line) == (kept, dropped, None)


def test_parse_ignores_the_field_when_request_ids_are_off():
    request = parsed(b"X-Request-ID: a b", config=lb.Config(request_id_header=""))
    assert (request.request_id, request.id_drop) == (None, None)


def test_upstream_head_keeps_a_valid_client_id_in_place():
    request = parsed(b"X-A: 1", b"X-Request-ID: keep-me", b"X-B: 2")
    assert upstream_lines(request)[1:] == [b"Host: a", b"X-A: 1", b"X-Request-ID: keep-me", b"X-B: 2",
                                           b"X-Forwarded-For: 10.0.0.1", b"X-Forwarded-Host: a",
                                           b"X-Forwarded-Proto: http"]


def test_upstream_head_replaces_invalid_client_ids_with_one_new_line():
    request = parsed(b"X-Request-ID: a b", b"X-A: 1", b"x-request-id: second")
    request.id_line = b"X-Request-ID: " + b"f" * 32  # as ProxyHandler.identify sets it
    assert upstream_lines(request)[1:] == [b"Host: a", b"X-A: 1", b"X-Forwarded-For: 10.0.0.1",
                                           b"X-Forwarded-Host: a", b"X-Forwarded-Proto: http",
                                           b"X-Request-ID: " + b"f" * 32]


def test_client_head_carries_the_id_in_place_of_the_upstreams():
    head = lb.parse_response_head(b"HTTP/1.1 200 OK\r\nX-Request-ID: from-app\r\nContent-Length: 0\r\n\r\n",
                                  b"GET", lb.Config())
    out = lb.headers_for_client(head, chunked=False, keep_alive=True, http10=False,
                                request_id=b"X-Request-ID: mine")
    lines = out[:-4].split(b"\r\n")
    assert [line for line in lines if line.lower().startswith(b"x-request-id")] == [b"X-Request-ID: mine"]


@pytest.mark.parametrize("name, problem", [
    ("X Request", "must be a header field name"),
    ("X-Réquest", "must be a header field name"),
    ("Host", "must not be a field the balancer sets or reads itself"),
    ("x-forwarded-for", "must not be a field the balancer sets or reads itself"),
    ("Connection", "must not be a field the balancer sets or reads itself"),
])
def test_request_id_header_refuses_names_it_cannot_own(name, problem):
    with pytest.raises(ValueError, match=f"--request-id-header {problem}"):
        lb.Config(request_id_header=name)


def test_cli_refuses_a_bad_request_id_header_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lb.main(["--request-id-header", "Bad Name", "--backend", "http://127.0.0.1:1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--request-id-header must be a header field name" in err[0], err


# ---------------------------------------------------------------------------------------------------
# Through the balancer
# ---------------------------------------------------------------------------------------------------

def test_generated_id_goes_upstream_and_back(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    ids = []
    for _ in range(3):
        r = get(b.port, "/")
        assert r.status == 200
        assert HEX32.fullmatch(r.header("X-Request-ID") or ""), r
        ids.append(r.header("X-Request-ID"))
    assert [req.header("X-Request-ID") for req in up.requests] == ids
    assert len(set(ids)) == 3


def test_client_id_kept_or_replaced(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    cases = [("trace-42", True), ("x" * 200, True), ("x" * 201, False), ("a\tb", False), ("a b", False)]
    for number, (given, kept) in enumerate(cases):
        r = get(b.port, "/", headers={"X-Request-ID": given})
        assert r.status == 200
        upstream_saw = [v for n, v in up.requests[number].fields if n.lower() == "x-request-id"]
        assert len(upstream_saw) == 1, (given, up.requests[number])
        if kept:
            assert upstream_saw == [given] and r.header("X-Request-ID") == given
        else:
            assert HEX32.fullmatch(upstream_saw[0]) and r.header("X-Request-ID") == upstream_saw[0], given


def test_trace_context_passes_untouched(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    r = get(b.port, "/", headers={"traceparent": parent, "tracestate": state})
    assert r.status == 200
    assert up.requests[0].header("traceparent") == parent
    assert up.requests[0].header("tracestate") == state
    assert HEX32.fullmatch(up.requests[0].header("X-Request-ID"))


def test_upstream_id_in_the_response_is_replaced_by_the_requests(upstreams, balancer):
    def handler(h, req):
        h.send_response(200)
        h.send_header("X-Request-ID", "the-apps-own")
        h.send_header("Content-Length", "0")
        h.end_headers()

    up, = upstreams(1, handler)
    b = balancer([up.url])
    r = get(b.port, "/")
    assert r.headers_named("X-Request-ID") == [up.requests[0].header("X-Request-ID")], r


def test_custom_header_name(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], request_id_header="X-Correlation-ID")
    r = get(b.port, "/", headers={"X-Request-ID": "not mine", "X-Correlation-ID": "corr-1"})
    assert r.header("X-Correlation-ID") == "corr-1" and r.header("X-Request-ID") is None
    assert up.requests[0].header("X-Correlation-ID") == "corr-1"
    assert up.requests[0].header("X-Request-ID") == "not mine"  # someone else's field: untouched


def test_off_adds_nothing_and_passes_the_clients_field(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], request_id_header="")
    r = get(b.port, "/", headers={"X-Request-ID": "a b"})
    assert r.status == 200 and r.header("X-Request-ID") is None
    assert up.requests[0].header("X-Request-ID") == "a b"
    get(b.port, "/")
    assert up.requests[1].header("X-Request-ID") is None


def test_balancers_own_error_carries_the_id_and_the_log_has_it(balancer, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    b = balancer([refused_url()], access_log=True, access_log_format="json")
    r = get(b.port, "/down", headers={"X-Request-ID": "req-502"})
    assert r.status == 502 and r.header("X-Request-ID") == "req-502", r
    assert wait_until(lambda: any(rec.name == "load_balancer.access" for rec in caplog.records))
    line = json.loads(next(rec.getMessage() for rec in caplog.records if rec.name == "load_balancer.access"))
    assert (line["status"], line["request_id"]) == (502, "req-502")


def test_each_request_on_a_keep_alive_connection_gets_its_own_id(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        first = client.request(b"GET /1 HTTP/1.1\r\nHost: t\r\nX-Request-ID: one\r\n\r\n")
        second = client.request(b"GET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
        bad = client.request(b"GET /3 HTTP/1.1\r\nHost: a b\r\n\r\n")
    assert first.header("X-Request-ID") == "one"
    assert HEX32.fullmatch(second.header("X-Request-ID"))
    assert bad.status == 400 and bad.header("X-Request-ID") is None  # refused before it had one


def test_websocket_101_carries_the_id(raw_upstream, balancer):
    def serve(conn, up):
        up.read_request(conn)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        up.recv(conn)

    up = raw_upstream(serve)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                    b"X-Request-ID: ws-1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101 ") and b"\r\nX-Request-ID: ws-1\r\n" in head, head
    assert b"\r\nX-Request-ID: ws-1\r\n" in bytes(up.received)


def test_ids_through_two_workers_in_the_json_log(cli, upstreams):
    up, = upstreams(1)
    p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--health-interval", "0",
             "--access-log", "--access-log-format", "json", "--backend", up.url]).wait_ready()
    answers = [get(p.port, f"/w{i}", headers={"X-Request-ID": "x" * 201} if i % 2 else None)
               for i in range(12)]
    ids = [r.header("X-Request-ID") for r in answers]
    assert all(r.status == 200 for r in answers) and all(HEX32.fullmatch(i) for i in ids), answers
    assert len(set(ids)) == 12
    assert wait_until(lambda: len(p.stdout_lines) >= 12), p.stdout_lines  # the access log: stdout
    logged = {}
    for line in p.stdout_lines:
        entry = json.loads(line)
        logged[entry["target"]] = entry["request_id"]
    assert [logged[f"/w{i}"] for i in range(12)] == ids
    assert [req.header("X-Request-ID") for req in up.requests] == ids
    assert p.stop() == 0
