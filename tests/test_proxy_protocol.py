"""Issue 20, PROXY protocol in: a connection from --proxy-protocol-from begins with a PROXY v1 or
v2 header (read before TLS, within --header-timeout), and the address it carries is the client's
everywhere (access log, X-Forwarded-For). From a listed address without the header: 400 and a
close; a header from any other address: 400 and a close; a malformed header: closed as soon as it
is known to be malformed, a truncated v2 one at --header-timeout, never a traceback. v2 TLVs are
ignored; v2 LOCAL (a cloud balancer's health check) uses the connection's own address.

How: the parsers as pure functions, every malformed v1 field in turn; then raw sockets against the
in-process balancer, curl --haproxy-protocol, and HAProxy in front (send-proxy, send-proxy-v2 with
TLVs). 127.0.0.0/8 is all loopback on Linux: a client bound to 127.0.0.2 is "another address".
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import subprocess
import time

import pytest

import load_balancer as lb
from conftest import (NGINX_PREAMBLE, free_ports, make_certificate, ProxiedConnections, RawClient, read_head,
                      require_program, running_peer, wait_until)

SIG = lb.PROXY_V2_SIGNATURE
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


INET = socket.inet_aton("203.0.113.9") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 40000, 8080)
INET6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::9") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
         + struct.pack("!HH", 40001, 443))


# ---------------------------------------------------------------------------------------------------
# The parsers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, header, length", [
    pytest.param(V1 + b"GET /", lb.ProxyHeader(1, "PROXY", ("203.0.113.7", 56324), ("192.0.2.1", 443)),
                 len(V1), id="v1-tcp4"),
    pytest.param(b"PROXY TCP6 2001:db8::9 2001:db8::1 0 65535\r\n",
                 lb.ProxyHeader(1, "PROXY", ("2001:db8::9", 0), ("2001:db8::1", 65535)), 44, id="v1-tcp6"),
    pytest.param(b"PROXY UNKNOWN\r\n", lb.ProxyHeader(1, "UNKNOWN", None, None), 15, id="v1-unknown"),
    pytest.param(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", lb.ProxyHeader(1, "UNKNOWN", None, None), 39,
                 id="v1-unknown-with-addresses"),
    pytest.param(v2(addresses=INET) + b"\x16\x03", lb.ProxyHeader(2, "PROXY", ("203.0.113.9", 40000),
                                                                ("192.0.2.1", 8080)), 28, id="v2-inet"),
    pytest.param(v2(family=0x21, addresses=INET6), lb.ProxyHeader(2, "PROXY", ("2001:db8::9", 40001),
                                                                ("2001:db8::1", 443)), 52, id="v2-inet6"),
    pytest.param(v2(addresses=INET, tlvs=b"\x04\x00\x03abc" + b"\x05\x00\x08uniqueid"),
                 lb.ProxyHeader(2, "PROXY", ("203.0.113.9", 40000), ("192.0.2.1", 8080)), 28 + 17,
                 id="v2-tlvs-ignored"),
    pytest.param(v2(command=0, family=0x00), lb.ProxyHeader(2, "LOCAL", None, None), 16, id="v2-local"),
    pytest.param(v2(command=0, family=0x11, addresses=INET), lb.ProxyHeader(2, "LOCAL", None, None), 28,
                 id="v2-local-with-addresses"),
    pytest.param(v2(family=0x00), lb.ProxyHeader(2, "PROXY", None, None), 16, id="v2-unspec"),
    pytest.param(v2(family=0x31, addresses=bytes(216)), lb.ProxyHeader(2, "PROXY", None, None), 232,
                 id="v2-unix"),
])
def test_parse_complete_headers(data, header, length):
    assert lb.parse_proxy_header(data) == (header, length)


@pytest.mark.parametrize("data, most", [
    pytest.param(b"PROX", lb.PROXY_V1_MAX, id="v1-prefix"),
    pytest.param(V1[:-2], lb.PROXY_V1_MAX, id="v1-no-crlf-yet"),
    pytest.param(V1[:-1], lb.PROXY_V1_MAX, id="v1-cr-without-lf-yet"),
    pytest.param(SIG[:5], 16, id="v2-part-of-signature"),
    pytest.param(v2(addresses=INET)[:20], 28, id="v2-addresses-missing"),
    pytest.param(v2(addresses=INET, tlvs=bytes(100))[:40], 128, id="v2-tlvs-missing"),
])
def test_parse_incomplete_headers_say_how_long_they_may_be(data, most):
    assert lb.parse_proxy_header(data) == (None, most)


@pytest.mark.parametrize("line, reason", [
    pytest.param(b"proxy TCP4 203.0.113.7 192.0.2.1 1 2\r\n", "does not begin with a PROXY", id="prefix-lowercase"),
    pytest.param(b"PROXYTCP4 203.0.113.7 192.0.2.1 1 2\r\n", "does not begin with a PROXY", id="prefix-no-space"),
    pytest.param(b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n", "unknown protocol", id="protocol"),
    pytest.param(b"PROXY TCP4 203.0.113 192.0.2.1 1 2\r\n", "invalid source address", id="source-short"),
    pytest.param(b"PROXY TCP4 203.0.113.256 192.0.2.1 1 2\r\n", "invalid source address", id="source-256"),
    pytest.param(b"PROXY TCP4 203.0.113.07 192.0.2.1 1 2\r\n", "invalid source address", id="source-leading-0"),
    pytest.param(b"PROXY TCP4 2001:db8::9 192.0.2.1 1 2\r\n", "invalid source address", id="source-v6-in-tcp4"),
    pytest.param(b"PROXY TCP6 203.0.113.7 2001:db8::1 1 2\r\n", "invalid source address", id="source-v4-in-tcp6"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2 1 2\r\n", "invalid destination address", id="destination"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 2\r\n", "invalid source port", id="source-port-big"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 01 2\r\n", "invalid source port", id="source-port-leading-0"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 a1 2\r\n", "invalid source port", id="source-port-hex"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 99999\r\n", "invalid destination port",
                 id="destination-port"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1\r\n", "not 6 fields", id="field-missing"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2 3\r\n", "not 6 fields", id="field-extra"),
    pytest.param(b"PROXY TCP4  203.0.113.7 192.0.2.1 1 2\r\n", "not 6 fields", id="double-space"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2 \r\n", "not 6 fields", id="trailing-space"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\n", "line end other than CRLF", id="bare-lf"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\rX", "line end other than CRLF", id="bare-cr"),
    pytest.param(b"PROXY TCP4 203.0.113.7\t192.0.2.1 1 2\r\n", "not a PROXY line", id="tab"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2" + b"0" * 80, "no CRLF within 107 bytes",
                 id="too-long"),
    pytest.param(b"PROXY TCP4 203.0.113.7 \x00", "not a PROXY line", id="nul-before-crlf"),
])
def test_parse_v1_every_field_wrong_in_turn(line, reason):
    with pytest.raises(lb.ProxyProtocolError, match=reason):
        lb.parse_proxy_header(line)


@pytest.mark.parametrize("data, reason", [
    pytest.param(SIG + b"\x11\x11\x00\x0c", "version 1", id="version"),
    pytest.param(SIG + b"\x22\x11\x00\x0c", "unknown command 2", id="command"),
    pytest.param(SIG + b"\x21\x41\x00\x0c", "unsupported family", id="family"),
    pytest.param(SIG + b"\x21\x12\x00\x0c", "unsupported family", id="udp"),
    pytest.param(SIG + b"\x21\x11\x00\x04", "4 bytes of addresses, 12 needed", id="inet-too-short"),
    pytest.param(SIG + b"\x21\x21\x00\x0c", "12 bytes of addresses, 36 needed", id="inet6-too-short"),
])
def test_parse_v2_malformed(data, reason):
    with pytest.raises(lb.ProxyProtocolError, match=reason):
        lb.parse_proxy_header(data)


def test_parse_v2_wrong_signature():
    with pytest.raises(lb.ProxyProtocolError, match="wrong signature"):
        lb.parse_proxy_v2(SIG[:11] + b"X")
    with pytest.raises(lb.NoProxyHeader):  # from the first byte that differs, it is no header at all
        lb.parse_proxy_header(SIG[:11] + b"X")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"POST", b"PRX", b"\r\n\r\nX"])
def test_not_a_proxy_header(data):
    with pytest.raises(lb.NoProxyHeader):
        lb.parse_proxy_header(data)


# ---------------------------------------------------------------------------------------------------
# Through the balancer
# ---------------------------------------------------------------------------------------------------

def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "load_balancer.access"]


def exchange(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection from `source`, read until the balancer closes."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


GET = b"GET /pp HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


@pytest.fixture
def logged(caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    return caplog


def test_the_address_carried_is_the_client(upstreams, balancer, logged):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1/32", access_log=True, access_log_format="json")
    cases = [(V1, "203.0.113.7"), (v2(addresses=INET), "203.0.113.9"),
             (v2(family=0x21, addresses=INET6, tlvs=b"\x01\x00\x02h2"), "2001:db8::9"),
             (v2(command=0, family=0x00), "127.0.0.1"),  # LOCAL: the connection's own address
             (b"PROXY UNKNOWN\r\n", "127.0.0.1")]
    for number, (header, client) in enumerate(cases):
        answer = exchange(b.port, header + GET)
        assert answer.startswith(b"HTTP/1.1 200 "), (header, answer)
        assert up.requests[number].header("X-Forwarded-For") == client
        assert wait_until(lambda: len(access_lines(logged)) > number)
        assert access_lines(logged)[number]["client"] == client


def test_header_in_pieces_and_keep_alive(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.0/8")
    with RawClient(b.port) as client:
        for piece in (V1[:3], V1[3:20], V1[20:-1], V1[-1:]):
            client.send(piece)
            time.sleep(0.02)  # separate segments: each read of the header sees a part
        for target in ("/a", "/b"):
            assert client.request(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode()).status == 200
    assert [r.header("X-Forwarded-For") for r in up.requests] == ["203.0.113.7"] * 2


def test_trusted_proxies_apply_to_the_carried_address(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1", trusted_proxies="203.0.113.0/24")
    answer = exchange(b.port, V1 + GET.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 198.51.100.3\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert up.requests[0].header("X-Forwarded-For") == "198.51.100.3, 203.0.113.7"


def test_listed_address_without_a_header_gets_400(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1")
    answer = exchange(b.port, GET)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"PROXY protocol header is expected" in answer, answer
    assert up.requests == []


def test_header_from_an_unlisted_address_gets_400(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1")
    for header in (V1, v2(addresses=INET)):
        answer = exchange(b.port, header + GET, source="127.0.0.2")
        assert answer.startswith(b"HTTP/1.1 400 ") and b"not in --proxy-protocol-from" in answer, answer
    assert exchange(b.port, GET, source="127.0.0.2").startswith(b"HTTP/1.1 200 ")  # no header: served
    assert len(up.requests) == 1 and up.requests[0].header("X-Forwarded-For") == "127.0.0.2"


def test_malformed_header_closed_at_once_without_an_answer(upstreams, balancer, caplog):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1", header_timeout=5)
    for data in (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 65536\r\n" + GET,   # a port
                 b"PROXY TCP4 203.0.113.999 192.0.2.1 1 2\r\n" + GET,         # an address
                 b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\n" + GET,              # a bare LF
                 SIG + b"\x31\x11\x00\x0c" + INET + GET):                    # v2, version 3
        started = time.monotonic()
        assert exchange(b.port, data) == b"", data
        assert time.monotonic() - started < 2  # not at --header-timeout
    assert up.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_truncated_v2_closed_at_header_timeout(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1", header_timeout=0.5)
    started = time.monotonic()
    assert exchange(b.port, v2(addresses=INET)[:20]) == b""
    assert 0.4 <= time.monotonic() - started < 3
    assert up.requests == []


def test_through_tls(upstreams, balancer, tmp_path):
    cert, key = make_certificate(tmp_path)
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1", tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    for header, client in ((V1, "203.0.113.7"), (v2(addresses=INET), "203.0.113.9")):
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as raw:
            raw.sendall(header)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(GET)
                head = read_head(tls.makefile("rb"))
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert up.requests[-1].header("X-Forwarded-For") == client
        assert up.requests[-1].header("X-Forwarded-Proto") == "https"


def test_curl_haproxy_protocol(upstreams, balancer):
    curl = require_program("curl")
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1")
    url = f"http://127.0.0.1:{b.port}/curl"
    sent = subprocess.run([curl, "-sS", "--max-time", "5", "--haproxy-protocol", "-o", "/dev/null",
                           "-w", "%{http_code}", url], capture_output=True, text=True, timeout=10)
    assert sent.stdout == "200", sent
    plain = subprocess.run([curl, "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", url],
                           capture_output=True, text=True, timeout=10)
    assert plain.stdout == "400", plain
    assert [r.target for r in up.requests] == ["/curl"]
    assert up.requests[0].header("X-Forwarded-For") == "127.0.0.1"


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2 proxy-v2-options authority,unique-id"],
                         ids=["v1", "v2-with-tlvs"])
def test_haproxy_in_front(upstreams, balancer, logged, tmp_path, send):
    require_program("haproxy")
    up, = upstreams(1)
    b = balancer([up.url], proxy_protocol_from="127.0.0.1", access_log=True, access_log_format="json")
    port, = free_ports(1)
    config = f"""
global
    log stdout format raw local0 warning
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{port}
    unique-id-format %{{+X}}o%ci-%cp
    default_backend balancer
backend balancer
    server lb 127.0.0.1:{b.port} {send}
"""
    with running_peer("haproxy", config, tmp_path / "haproxy", port):
        # The client connects from 127.0.0.2: HAProxy's peer is 127.0.0.2, the balancer's is HAProxy.
        answer = exchange(port, GET.replace(b"/pp", b"/via-haproxy"), source="127.0.0.2")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert up.requests[-1].header("X-Forwarded-For") == "127.0.0.2"
    assert wait_until(lambda: access_lines(logged))
    assert [line["client"] for line in access_lines(logged) if line["target"] == "/via-haproxy"] == ["127.0.0.2"]


# ---------------------------------------------------------------------------------------------------
# PROXY protocol out: send-proxy, send-proxy-v2
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, source, destination, expected", [
    pytest.param(1, ("203.0.113.7", 5000), ("192.0.2.1", 80), b"PROXY TCP4 203.0.113.7 192.0.2.1 5000 80\r\n",
                 id="v1-tcp4"),
    pytest.param(1, ("2001:db8::7", 5000), ("2001:db8::1", 443),
                 b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n", id="v1-tcp6"),
    pytest.param(1, ("203.0.113.7", 5000), ("::ffff:192.0.2.1", 80),
                 b"PROXY TCP4 203.0.113.7 192.0.2.1 5000 80\r\n", id="v1-mapped-is-ipv4"),
    pytest.param(1, ("203.0.113.7", 5000), ("2001:db8::1", 80),
                 b"PROXY TCP6 ::ffff:cb00:7107 2001:db8::1 5000 80\r\n", id="v1-mixed-families-as-ipv6"),
    pytest.param(1, None, None, b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    pytest.param(2, ("203.0.113.9", 40000), ("192.0.2.1", 8080), v2(addresses=INET), id="v2-inet"),
    pytest.param(2, ("2001:db8::9", 40001), ("2001:db8::1", 443), v2(family=0x21, addresses=INET6), id="v2-inet6"),
    pytest.param(2, None, None, v2(command=0, family=0x00), id="v2-local"),
])
def test_header_bytes(version, source, destination, expected):
    assert lb.proxy_header_bytes(version, source, destination) == expected
    parsed, length = lb.parse_proxy_header(expected)
    assert length == len(expected) and parsed.version == version


def test_send_proxy_options():
    assert lb.parse_backend("http://127.0.0.1:1,send-proxy").send_proxy == 1
    assert lb.parse_backend("unix:/run/a.sock,send-proxy-v2,weight=2").send_proxy == 2
    assert lb.parse_backend("http://127.0.0.1:1").send_proxy == 0
    with pytest.raises(ValueError, match="exclude each other"):
        lb.parse_backend("http://127.0.0.1:1,send-proxy,send-proxy-v2")


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_connections_are_private_to_their_client(raw_upstream, balancer, option):
    recorder = ProxiedConnections()
    up = raw_upstream(recorder)
    b = balancer([f"{up.url},{option}"])
    one, two = RawClient(b.port, 5, source="127.0.0.2"), RawClient(b.port, 5, source="127.0.0.3")
    try:
        request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
        answers = [client.request(request).body for client in (one, two, one, two)]
        assert [a.split(b" ")[0] for a in answers] == [b"127.0.0.2", b"127.0.0.3"] * 2
        assert answers[0].split(b" ")[1] == str(one.sock.getsockname()[1]).encode()  # and its port
        assert sorted((c["header"].source[0], c["requests"]) for c in recorder.connections) == [
            ("127.0.0.2", 2), ("127.0.0.3", 2)]
        assert {c["header"].version for c in recorder.connections} == {2 if option.endswith("v2") else 1}
        assert recorder.connections[0]["header"].destination == ("127.0.0.1", b.port)
        one.close()
        assert wait_until(lambda: [c["ended"] for c in recorder.connections] == [True, False])
    finally:
        one.close()
        two.close()


def test_address_from_a_proxy_header_is_passed_on(raw_upstream, balancer):
    recorder = ProxiedConnections()
    up = raw_upstream(recorder)
    b = balancer([f"{up.url},send-proxy-v2"], proxy_protocol_from="127.0.0.1")
    answer = exchange(b.port, V1 + GET)
    assert answer.endswith(b"\r\n\r\n203.0.113.7 56324"), answer
    assert recorder.connections[0]["header"].destination == ("192.0.2.1", 443)


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_health_checks_send_local_or_unknown(raw_upstream, balancer, option):
    recorder = ProxiedConnections()
    up = raw_upstream(recorder)
    b = balancer([f"{up.url},{option}"], health_interval=0.1, health_path="/health", rise=1)
    assert wait_until(lambda: b.status()["backends"][0]["checks"]["passed"] >= 1), b.status()
    first = recorder.connections[0]["header"]
    assert (first.command, first.source) == ("LOCAL" if option.endswith("v2") else "UNKNOWN", None)


UPSTREAM_PEERS = {
    "haproxy": """
global
    log stdout format raw local0 warning
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend upstream
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port]"
""",
    "nginx": NGINX_PREAMBLE.replace("{", "{{").replace("}", "}}") + """    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            return 200 "$proxy_protocol_addr $proxy_protocol_port";
        }}
    }}
}}
""",
}


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
@pytest.mark.parametrize("target", ["haproxy", "nginx"])
def test_peer_as_the_upstream_receives_the_client_address(balancer, tmp_path, target, option):
    require_program(target)
    port, = free_ports(1)
    with running_peer(target, UPSTREAM_PEERS[target].format(port=port), tmp_path / target, port):
        b = balancer([f"http://127.0.0.1:{port},{option}"], health_interval=0.1, health_path="/", rise=1)
        with RawClient(b.port, 5, source="127.0.0.2") as client:
            answer = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (answer.status, answer.body) == (200, f"127.0.0.2 {client.sock.getsockname()[1]}".encode())
        # The peer refuses a connection without the header: a passing check sent one (LOCAL/UNKNOWN).
        assert wait_until(lambda: b.status()["backends"][0]["checks"]["passed"] >= 2), b.status()
        assert b.status()["backends"][0]["checks"]["failed"] == 0
