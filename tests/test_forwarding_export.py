"""Issue 20's settings in --export: nginx and HAProxy started on the exported file do what
load_balancer does with request IDs (and the other forwarding settings as they are added), with
real upstreams behind them. `nginx -t` and `haproxy -c` on the same files are in test_export.py's
config_cases.

The peers run as in test_export.py (its start_peer/stop_peer: killed by PID in a finally), a
missing one skips (a failure under LB_REQUIRE_SYSTEM_PROGRAMS=1).
"""

from __future__ import annotations

import re
import socket

import pytest

from conftest import (PEERS, exchange, free_ports, lb, PortServer, ProxiedConnections, RawClient,
                      require_program, running_peer, wait_until)

export_config = lb.export_config

HEX32 = re.compile(rb"[0-9a-f]{32}")


def response_field(head: bytes, name: bytes) -> list[bytes]:
    return [line.partition(b":")[2].strip() for line in head.split(b"\r\n")[1:]
            if line.partition(b":")[0].lower() == name.lower()]


@pytest.mark.parametrize("target", PEERS)
def test_peer_request_ids_as_load_balancer(target, tmp_path):
    require_program(target)
    upstream = PortServer()
    try:
        port, = free_ports(1)
        config = lb.Config(backends=(f"http://127.0.0.1:{upstream.port}",), host="127.0.0.1", port=port,
                           health_interval=0)
        with running_peer(target, export_config(config, target), tmp_path / target, port):
            cases = [(None, None), ("trace-7", b"trace-7"), ("x" * 200, b"x" * 200), ("x" * 201, None),
                     ("a b", None)]
            for given, kept in cases:
                status, head, _ = exchange(port, "/", {"X-Request-ID": given} if given else None)
                assert status == 200, head
                _, headers = upstream.proxied()[-1]
                sent = headers.get_all("X-Request-ID")
                assert sent and len(sent) == 1, (given, headers)
                echoed = response_field(head, b"X-Request-ID")
                assert echoed == [sent[0].encode()], (given, head)
                if kept:
                    assert echoed == [kept]
                else:
                    assert HEX32.fullmatch(echoed[0]), (given, echoed)
    finally:
        upstream.stop()


FORGED = {"X-Forwarded-For": "203.0.113.5, 198.51.100.7", "X-Forwarded-Host": "evil.example",
          "X-Forwarded-Proto": "https", "Forwarded": "for=203.0.113.5"}


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
@pytest.mark.parametrize("target", PEERS)
def test_peer_trusted_proxies_as_load_balancer(target, trusted, tmp_path):
    """From a peer outside --trusted-proxies the forged fields are replaced or removed; from one
    inside, kept (X-Forwarded-For extended by the peer) and the logged client is the right-most
    untrusted address."""
    require_program(target)
    upstream = PortServer()
    try:
        port, = free_ports(1)
        config = lb.Config(backends=(f"http://127.0.0.1:{upstream.port}",), host="127.0.0.1", port=port,
                           health_interval=0, access_log=True,
                           trusted_proxies="127.0.0.1/32" if trusted else None)
        directory = tmp_path / target
        with running_peer(target, export_config(config, target), directory, port):
            status, head, _ = exchange(port, "/forged", FORGED)
            assert status == 200, head
            _, headers = upstream.proxied()[-1]
            seen = tuple(headers.get_all(name) for name in FORGED)
            if trusted:
                assert seen == (["203.0.113.5, 198.51.100.7, 127.0.0.1"], ["evil.example"], ["https"],
                                ["for=203.0.113.5"]), seen
            else:
                assert seen == (["127.0.0.1"], ["test.local"], ["http"], None), seen
            log = directory / ("access.log" if target == "nginx" else "peer.log")
            client = "198.51.100.7" if trusted else "127.0.0.1"
            assert wait_until(lambda: log.exists() and any(
                line.startswith(f'{client} "GET /forged ') for line in log.read_text().splitlines())), (
                log.read_text() if log.exists() else "no log")
    finally:
        upstream.stop()


@pytest.mark.parametrize("target", PEERS)
def test_peer_proxy_protocol_in_as_load_balancer(target, tmp_path):
    """--proxy-protocol-from: the address of a PROXY v1 or v2 header is the client's upstream."""
    require_program(target)
    upstream = PortServer()
    try:
        port, = free_ports(1)
        config = lb.Config(backends=(f"http://127.0.0.1:{upstream.port}",), host="127.0.0.1", port=port,
                           health_interval=0, proxy_protocol_from="127.0.0.1")
        directory = tmp_path / target
        with running_peer(target, export_config(config, target), directory, port):
            v2 = (lb.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 9, 192, 0, 2, 1])
                  + b"\x9c\x40\x1f\x90")
            for header, client in ((b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 80\r\n", "203.0.113.7"),
                                   (v2, "203.0.113.9")):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(header + b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 "), answer
                _, headers = upstream.proxied()[-1]
                assert headers.get_all("X-Forwarded-For") == [client], headers
    finally:
        upstream.stop()


def test_haproxy_send_proxy_as_load_balancer(tmp_path, raw_upstream):
    """send-proxy-v2 on a backend: HAProxy on the exported file sends the client's address too."""
    require_program("haproxy")
    recorder = ProxiedConnections()
    up = raw_upstream(recorder)
    port, = free_ports(1)
    config = lb.Config(backends=(f"{up.url},send-proxy-v2",), host="127.0.0.1", port=port, health_interval=0)
    with running_peer("haproxy", export_config(config, "haproxy"), tmp_path / "haproxy", port):
        with RawClient(port, 5, source="127.0.0.2") as client:
            answer = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (answer.status, answer.body) == (200, f"127.0.0.2 {client.sock.getsockname()[1]}".encode())
    assert recorder.connections[0]["header"].version == 2
