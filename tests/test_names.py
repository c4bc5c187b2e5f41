"""Issue 20, names re-resolved: a backend URL with a host name is looked up at start and every
--resolve-interval (0: once), by one process (Control; the supervisor with workers) for every
worker; each address is an upstream of its own, NAME@ADDRESS, with the backend's weight, backup
flag and options. An address that leaves is drained, a new one joins; a failed or empty look-up
keeps the last known addresses (one log line); a name that does not resolve at start is no
start-up error (503 until it does). The admin API takes NAME@ADDRESS (one) and NAME (all).

How: the balancer in-process with load_balancer.lookup_addresses replaced by a table (monkeypatch)
and real upstreams on 127.0.0.2-4 (all loopback on Linux) sharing one port, as the replicas of a
service do; then the real resolver with localhost, in-process and with --workers 2. Not done: a
private /etc/hosts in a network namespace (needs root and unshare; the table stands in for it).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest

import load_balancer as lb
from conftest import AnswerHandler, RawClient, free_port, get, must_get, wait_until

INTERVAL = 0.2


class AddressHandler(AnswerHandler):
    def answer(self) -> bytes:
        return self.server.server_address[0].encode()


class AddressServer(ThreadingHTTPServer):
    """An upstream on one address: answers with that address."""

    daemon_threads = True

    def __init__(self, address: str, port: int):
        if ":" in address:
            self.address_family = socket.AF_INET6
        super().__init__((address, port), AddressHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def replicas():
    """Factory: replicas(*addresses) -> (port, servers): one upstream per address, one port."""
    made = []

    def make(*addresses: str):
        port = free_port()
        servers = [AddressServer(address, port) for address in addresses]
        made.extend(servers)
        return port, servers

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def names(monkeypatch):
    """The resolver, replaced: a dict host -> addresses (or an OSError to raise); every look-up
    is recorded."""
    table: dict = {}
    calls: list = []

    def lookup(host, port):
        calls.append(host)
        answer = table[host]
        if isinstance(answer, OSError):
            raise answer
        return tuple(answer)

    monkeypatch.setattr(lb, "lookup_addresses", lookup)
    table["calls"] = calls
    return table


def answered_by(port: int, n: int) -> list:
    answers = [get(port, "/") for _ in range(n)]
    assert all(r.status == 200 for r in answers), answers
    return [r.body.decode() for r in answers]


def test_every_address_is_an_upstream_in_rotation(balancer, replicas, names):
    port, _ = replicas("127.0.0.2", "127.0.0.3")
    names["app"] = ("127.0.0.2", "127.0.0.3")
    b = balancer([f"http://app:{port},weight=2"], resolve_interval=INTERVAL)
    assert answered_by(b.port, 4) == ["127.0.0.2", "127.0.0.3"] * 2
    status = b.status()
    assert [(u["name"], u["backend"], u["address"], u["weight"]) for u in status["backends"]] == [
        (f"app:{port}@127.0.0.2", f"app:{port}", "127.0.0.2", 2),
        (f"app:{port}@127.0.0.3", f"app:{port}", "127.0.0.3", 2)]
    assert all(u["resolved"] for u in status["backends"])
    [name] = status["names"]
    assert (name["backend"], name["host"], name["addresses"], name["error"]) == (
        f"app:{port}", "app", ["127.0.0.2", "127.0.0.3"], None)


def test_the_name_moves_and_traffic_follows_without_a_failure(balancer, replicas, names):
    port, _ = replicas("127.0.0.2", "127.0.0.3", "127.0.0.4")
    names["app"] = ("127.0.0.2", "127.0.0.3")
    b = balancer([f"http://app:{port}"], resolve_interval=INTERVAL)
    failures, seen, stop = [], [], threading.Event()

    def traffic():
        with RawClient(b.port) as client:  # one keep-alive client all along
            while not stop.is_set():
                r = client.request(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                (seen if r.status == 200 else failures).append(r.body.decode() if r.status == 200 else r)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        assert wait_until(lambda: {"127.0.0.2", "127.0.0.3"} <= set(seen))
        names["app"] = ("127.0.0.4",)
        moved = len(seen)
        assert wait_until(lambda: "127.0.0.4" in seen[moved:], timeout=INTERVAL * 5)
        settled = len(seen) + 1
        assert wait_until(lambda: len(seen) >= settled + 20)
    finally:
        stop.set()
        thread.join(10)
    assert failures == []
    assert set(seen[settled:]) == {"127.0.0.4"}
    assert [u["address"] for u in b.status()["backends"]] == ["127.0.0.4"]


def test_a_failed_look_up_keeps_the_addresses_and_logs_once(balancer, replicas, names, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer")
    port, _ = replicas("127.0.0.2", "127.0.0.3")
    names["app"] = ("127.0.0.2", "127.0.0.3")
    b = balancer([f"http://app:{port}"], resolve_interval=INTERVAL)
    names["app"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert wait_until(lambda: b.status()["names"][0]["failures"] >= 3, timeout=5)
    assert sorted(answered_by(b.port, 4)) == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
    warnings = [r.getMessage() for r in caplog.records if "look-up of app failed" in r.getMessage()]
    assert warnings == [f"backend app:{port}: look-up of app failed (cannot resolve host (Temporary "
                        "failure in name resolution)): keeping its 2 address(es)"]
    name = b.status()["names"][0]
    assert name["addresses"] == ["127.0.0.2", "127.0.0.3"] and "Temporary failure" in name["error"]
    names["app"] = ()  # an empty answer is a failure too
    failures = name["failures"]
    assert wait_until(lambda: b.status()["names"][0]["failures"] > failures)
    assert b.status()["names"][0]["addresses"] == ["127.0.0.2", "127.0.0.3"]


def test_a_name_that_does_not_resolve_at_start_is_503_until_it_does(balancer, replicas, names, caplog):
    port, _ = replicas("127.0.0.2")
    names["app"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    b = balancer([f"http://app:{port}"], resolve_interval=INTERVAL)
    assert any("cannot look app up" in r.getMessage() and "no address until it resolves" in r.getMessage()
               for r in caplog.records), caplog.text
    assert get(b.port, "/").status == 503
    assert b.status()["backends"] == [] and b.status()["names"][0]["addresses"] == []
    names["app"] = ("127.0.0.2",)
    assert wait_until(lambda: get(b.port, "/").status == 200, timeout=INTERVAL * 10)


def test_sighup_looks_names_up_again_with_interval_0(balancer, replicas, names):
    port, _ = replicas("127.0.0.2", "127.0.0.3")
    names["app"] = ("127.0.0.2",)
    b = balancer([f"http://app:{port}"], resolve_interval=0)
    assert answered_by(b.port, 2) == ["127.0.0.2"] * 2
    names["app"] = ("127.0.0.3",)
    b.reload()
    assert answered_by(b.port, 2) == ["127.0.0.3"] * 2
    assert names["calls"] == ["app", "app"]  # once at start, once on SIGHUP: no timer


def test_literal_addresses_and_unix_sockets_are_never_looked_up(balancer, names):
    b = balancer(["http://127.0.0.1:1", "http://[::1]:2", "unix:/tmp/none.sock"], resolve_interval=INTERVAL)
    b.reload()
    assert names["calls"] == [] and b.status()["names"] == []
    assert [u["address"] for u in b.status()["backends"]] == [None, None, None]


def test_admin_api_one_address_or_every_address(balancer, replicas, names):
    port, _ = replicas("127.0.0.2", "127.0.0.3")
    names["app"] = ("127.0.0.2", "127.0.0.3")
    b = balancer([f"http://app:{port}"], resolve_interval=INTERVAL, admin_port=0)

    def post(name: str, action: str):
        with RawClient(b.admin_port) as client:
            return client.request(f"POST /backends/{name}/{action} HTTP/1.1\r\nHost: a\r\n"
                                  "Content-Length: 0\r\n\r\n".encode())

    one = post(f"app:{port}@127.0.0.3", "drain")
    assert one.status == 200 and json.loads(one.body)["admin"] == "drain"
    assert answered_by(b.port, 2) == ["127.0.0.2"] * 2
    every = post(f"app:{port}", "maint")
    assert every.status == 200
    assert [u["admin"] for u in json.loads(every.body)["backends"]] == ["maint", "maint"]
    assert get(b.port, "/").status == 503
    assert post(f"app:{port}", "ready").status == 200
    assert sorted(answered_by(b.port, 2)) == ["127.0.0.2", "127.0.0.3"]
    assert post(f"app:{port}@127.0.0.9", "drain").status == 404


def test_metrics_and_dashboard_show_the_name(balancer, replicas, names):
    port, _ = replicas("127.0.0.2")
    names["app"] = ("127.0.0.2",)
    b = balancer([f"http://app:{port}"], resolve_interval=INTERVAL)
    metrics = b.control.metrics()
    assert f'lb_name_addresses{{backend="app:{port}"}} 1' in metrics
    assert f'lb_name_lookup_failures_total{{backend="app:{port}"}} 0' in metrics
    assert f'lb_upstream_requests_total{{upstream="app:{port}@127.0.0.2"}} 0' in metrics
    page = lb.render_dashboard(b.status())
    resolved = b.status()["backends"][0]["resolved"]
    assert f'title="app:{port}: looked up {resolved}">resolved {resolved[17:25]}</span>' in page


def test_localhost_every_address_it_has(balancer):
    """The real resolver: whatever localhost resolves to here (127.0.0.1, and ::1 where
    /etc/hosts says so), each address an upstream, each serving."""
    expected = lb.lookup_addresses("localhost", 80)
    port = free_port()
    servers = [AddressServer(address, port) for address in expected]
    try:
        b = balancer([f"http://localhost:{port}"])
        assert [u["address"] for u in b.status()["backends"]] == list(expected)
        assert sorted(answered_by(b.port, 2 * len(expected))) == sorted(list(expected) * 2)
    finally:
        for server in servers:
            server.stop()


def test_two_workers_route_over_what_the_supervisor_resolved(cli):
    expected = lb.lookup_addresses("localhost", 80)
    port = free_port()
    servers = [AddressServer(address, port) for address in expected]
    try:
        p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--admin-port", "0",
                 "--health-interval", "0", "--backend", f"http://localhost:{port}"]).wait_ready()
        assert {must_get(p).body.decode() for _ in range(4 * len(expected))} == set(expected)
        with RawClient(p.admin_port) as client:
            status = json.loads(client.request(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n").body)
        assert status["names"][0]["addresses"] == list(expected)
        assert [u["name"] for u in status["backends"]] == [f"localhost:{port}@{a}" for a in expected]
        assert p.stop() == 0
    finally:
        for server in servers:
            server.stop()
