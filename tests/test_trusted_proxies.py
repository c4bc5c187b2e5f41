"""Issue 20, trusted proxies: from a peer in --trusted-proxies, X-Forwarded-For (extended by the
peer), X-Forwarded-Host, X-Forwarded-Proto and Forwarded are kept, and the client address (the
access log's, and every later use of ProxyHandler.client_ip) is the right-most address in
X-Forwarded-For that is not trusted (nginx's real_ip_recursive on). From anyone else the four are
replaced or removed: a client cannot forge them.

How: the rules as pure functions (parse_networks, address_in, client_behind_proxies,
headers_for_upstream); the rest through real sockets with the in-process balancer, and once with a
real nginx in front of it as the trusted proxy.
"""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

import load_balancer as lb
from conftest import (NGINX_PREAMBLE, free_ports, get, RawClient, require_program, running_peer, wait_until)

N = ipaddress.ip_network


# ---------------------------------------------------------------------------------------------------
# Address lists: one parser and one matcher for every *-from / trusted list
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, networks", [
    pytest.param("10.0.0.0/8", (N("10.0.0.0/8"),), id="one"),
    pytest.param(" 10.0.0.0/8 ,192.0.2.7, 2001:db8::/32", (N("10.0.0.0/8"), N("192.0.2.7/32"),
                                                           N("2001:db8::/32")), id="several-with-spaces"),
    pytest.param("10.1.2.3/8", (N("10.0.0.0/8"),), id="host-bits-ignored"),
    pytest.param("::1", (N("::1/128"),), id="ipv6-address"),
    pytest.param("::ffff:10.0.0.0/104", (N("10.0.0.0/8"),), id="ipv4-mapped-is-ipv4"),
])
def test_parse_networks(text, networks):
    assert lb.parse_networks(text) == networks


@pytest.mark.parametrize("text, wrong", [
    ("", "''"), ("10.0.0.0/8,", "''"), ("10.0.0.0/33", "'10.0.0.0/33'"), ("example.com", "'example.com'"),
    ("10.0.0.0/8;192.0.2.0/24", "'10.0.0.0/8;192.0.2.0/24'"),
])
def test_parse_networks_names_the_wrong_item(text, wrong):
    with pytest.raises(ValueError, match=f"^{wrong} is not an address or CIDR"):
        lb.parse_networks(text)


NETS = lb.parse_networks("10.0.0.0/8,2001:db8::/32")


@pytest.mark.parametrize("address, inside", [
    ("10.1.2.3", True), (b"10.1.2.3", True), ("11.0.0.1", False), ("::ffff:10.1.2.3", True),
    (ipaddress.ip_address("::ffff:10.1.2.3"), True), ("2001:db8::5", True), ("2001:db9::5", False),
    ("unknown", False), ("", False), ("10.1.2.3:8080", True), ("[2001:db8::5]:443", True),
])
def test_address_in(address, inside):
    assert lb.address_in(address, NETS) is inside


@pytest.mark.parametrize("chain, client", [
    pytest.param(None, b"10.0.0.1", id="no-chain: the peer"),
    pytest.param([b"203.0.113.5"], b"203.0.113.5", id="one-hop"),
    pytest.param([b"203.0.113.5, 10.0.0.2"], b"203.0.113.5", id="through-two-proxies"),
    pytest.param([b"198.51.100.1, 203.0.113.5, 10.0.0.2"], b"203.0.113.5", id="forged-left-part-ignored"),
    pytest.param([b"198.51.100.1", b"203.0.113.5,10.0.0.2"], b"203.0.113.5", id="several-lines"),
    pytest.param([b"10.0.0.3, 10.0.0.2"], b"10.0.0.3", id="all-trusted: the left-most"),
    pytest.param([b"unknown, 10.0.0.2"], b"10.0.0.2", id="garbage-ends-the-walk"),
    pytest.param([b"203.0.113.5, garbage"], b"10.0.0.1", id="garbage-next-to-the-peer"),
    pytest.param([b"203.0.113.5:4711"], b"203.0.113.5", id="with-port"),
    pytest.param([b"[2001:db9::1]:443, 2001:db8::7"], b"2001:db9::1", id="ipv6"),
    pytest.param([b"::ffff:203.0.113.5"], b"203.0.113.5", id="ipv4-mapped"),
])
def test_client_behind_proxies(chain, client):
    assert lb.client_behind_proxies(chain, b"10.0.0.1", NETS) == client


def test_trusted_proxies_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lb.main(["--trusted-proxies", "10.0.0.0/8,nope", "--backend", "http://127.0.0.1:1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{lb.program_name()}: error: --trusted-proxies must be a comma-separated list of addresses "
                   "or CIDRs: 'nope' is not an address or CIDR (such as 10.0.0.0/8), got 10.0.0.0/8,nope "
                   "(see --help)"], err


# ---------------------------------------------------------------------------------------------------
# The head sent upstream
# ---------------------------------------------------------------------------------------------------

FORGED = (b"X-Forwarded-For: 198.51.100.1", b"X-Forwarded-Host: evil.example",
          b"X-Forwarded-Proto: https", b"Forwarded: for=198.51.100.1;proto=https")


def request(*fields: bytes, via: bytes | None = None) -> lb.Request:
    r = lb.parse_request_head(b"GET / HTTP/1.1\r\nHost: shop.example\r\n" +
                              b"".join(f + b"\r\n" for f in fields) + b"\r\n", lb.Config())
    r.via_proxy = via
    return r


def upstream_lines(r: lb.Request, client: bytes) -> list[bytes]:
    return lb.headers_for_upstream(r, client, b"d")[:-4].split(b"\r\n")[1:]


def test_untrusted_peer_fields_replaced_or_removed():
    assert upstream_lines(request(b"X-A: 1", *FORGED), b"192.0.2.50") == [
        b"Host: shop.example", b"X-A: 1", b"X-Forwarded-For: 192.0.2.50",
        b"X-Forwarded-Host: shop.example", b"X-Forwarded-Proto: http"]


def test_trusted_peer_fields_kept_and_chain_extended_by_the_peer():
    r = request(b"X-A: 1", *FORGED, via=b"10.0.0.1")
    assert upstream_lines(r, b"198.51.100.1") == [
        b"Host: shop.example", b"X-A: 1", b"X-Forwarded-For: 198.51.100.1, 10.0.0.1",
        b"X-Forwarded-Host: evil.example", b"X-Forwarded-Proto: https",
        b"Forwarded: for=198.51.100.1;proto=https"]


def test_trusted_peer_without_the_fields_gets_them_set():
    assert upstream_lines(request(via=b"10.0.0.1"), b"10.0.0.1") == [
        b"Host: shop.example", b"X-Forwarded-For: 10.0.0.1", b"X-Forwarded-Host: shop.example",
        b"X-Forwarded-Proto: http"]


def test_trusted_peer_fields_named_in_connection_are_set_by_the_balancer():
    r = request(b"Connection: X-Forwarded-Host, X-Forwarded-Proto", *FORGED, via=b"10.0.0.1")
    lines = upstream_lines(r, b"198.51.100.1")
    assert b"X-Forwarded-Host: shop.example" in lines and b"X-Forwarded-Proto: http" in lines
    assert b"X-Forwarded-Host: evil.example" not in lines


# ---------------------------------------------------------------------------------------------------
# Through the balancer
# ---------------------------------------------------------------------------------------------------

def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "load_balancer.access"]


def forged_request(target: str) -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: shop.example\r\n".encode() + b"".join(f + b"\r\n" for f in FORGED)
            + b"\r\n")


def test_forged_fields_from_an_untrusted_client_do_not_reach_the_upstream(upstreams, balancer, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True, access_log_format="json", trusted_proxies="10.0.0.0/8")
    with RawClient(b.port) as client:
        assert client.request(forged_request("/forged")).status == 200
    seen = up.requests[0]
    assert (seen.header("X-Forwarded-For"), seen.header("X-Forwarded-Host"),
            seen.header("X-Forwarded-Proto"), seen.header("Forwarded")) == (
        "127.0.0.1", "shop.example", "http", None), seen
    assert wait_until(lambda: access_lines(caplog))
    assert access_lines(caplog)[0]["client"] == "127.0.0.1"


def test_chain_through_a_trusted_proxy_is_kept_and_logs_the_client(upstreams, balancer, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True, access_log_format="json", trusted_proxies="127.0.0.0/8,10.0.0.0/8")
    with RawClient(b.port) as client:  # one connection, three requests: the client is per request
        assert client.request(forged_request("/one")).status == 200
        assert client.request(b"GET /two HTTP/1.1\r\nHost: t\r\n"
                              b"X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n\r\n").status == 200
        assert client.request(b"GET /three HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    first, second, third = up.requests
    assert (first.header("X-Forwarded-For"), first.header("X-Forwarded-Host"),
            first.header("X-Forwarded-Proto"), first.header("Forwarded")) == (
        "198.51.100.1, 127.0.0.1", "evil.example", "https", "for=198.51.100.1;proto=https")
    assert second.header("X-Forwarded-For") == "203.0.113.9, 10.0.0.2, 127.0.0.1"
    assert third.header("X-Forwarded-For") == "127.0.0.1"
    assert wait_until(lambda: len(access_lines(caplog)) == 3)
    assert [line["client"] for line in access_lines(caplog)] == ["198.51.100.1", "203.0.113.9", "127.0.0.1"]


def test_nginx_in_front_as_the_trusted_proxy(upstreams, balancer, caplog, tmp_path):
    require_program("nginx")
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True, access_log_format="json", trusted_proxies="127.0.0.1")
    port, = free_ports(1)
    conf = NGINX_PREAMBLE + f"""    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_pass http://127.0.0.1:{b.port};
        }}
    }}
}}
"""
    with running_peer("nginx", conf, tmp_path / "nginx", port):
        r = get(port, "/via-nginx", headers={"X-Forwarded-For": "203.0.113.5"})
        assert r.status == 200, r
    # nginx appended its client (this test, 127.0.0.1); the balancer appended nginx (127.0.0.1).
    assert up.requests[0].header("X-Forwarded-For") == "203.0.113.5, 127.0.0.1, 127.0.0.1"
    assert wait_until(lambda: access_lines(caplog))
    assert access_lines(caplog)[0]["client"] == "203.0.113.5"
