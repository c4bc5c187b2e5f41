"""Per-upstream caps (backend option maxconn=N) and the queue (--queue-timeout, --queue-size).

- cap reached: the next request waits, and goes to whichever upstream frees a slot first (not the
  one round robin would have named);
- --queue-timeout: 503 with Retry-After, naming the queue, within the timeout;
- a client that leaves while queued: nothing reaches any upstream;
- --queue-size exceeded: 503 at once;
- --workers 2, maxconn=2 on each of 2 upstreams, 12 concurrent slow requests: no upstream ever
  sees more than 2 at once, and all 12 complete;
- a reload that raises a cap serves the queued request (not dropped), under the new cap;
- the option's parsing and its export (HAProxy maxconn and timeout queue, nginx max_conns), which
  haproxy -c and nginx -t accept.
The queue's counters are checked on /status and /metrics along the way.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import (PEERS, SLACK, SOCKET_TIMEOUT, RawClient, admin_status, check_file, default_handler, get,
                      lb, require_program, wait_until)

REQUEST = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"


class HeldUpstreams:
    """Upstream handler: /slow is held until its upstream's `release` event (SOCKET_TIMEOUT at
    most); counts the requests each upstream has at once, and the most it had."""

    def __init__(self, hold_seconds: float | None = None):
        self.lock = threading.Lock()
        self.now: dict = {}
        self.most: dict = {}
        self.release: dict = {}
        self.hold_seconds = hold_seconds   # instead of an event: hold each /slow this long

    def event(self, port: int) -> threading.Event:
        with self.lock:
            return self.release.setdefault(port, threading.Event())

    def __call__(self, h, req) -> None:
        port = h.server.server_port
        with self.lock:
            self.now[port] = self.now.get(port, 0) + 1
            self.most[port] = max(self.most.get(port, 0), self.now[port])
        try:
            if req.target == "/slow":
                if self.hold_seconds is not None:
                    time.sleep(self.hold_seconds)
                else:
                    self.event(port).wait(SOCKET_TIMEOUT)
        finally:
            with self.lock:
                self.now[port] -= 1
        default_handler(h, req)

    def release_all(self) -> None:
        with self.lock:
            events = list(self.release.values())
        for event in events:
            event.set()


def held(held_ups: HeldUpstreams, port: int) -> int:
    with held_ups.lock:
        return held_ups.now.get(port, 0)


def queue_length(b) -> int:
    return b.status()["queue"]["length"]


def test_cap_reached_the_next_request_waits_and_goes_to_the_first_upstream_that_frees(upstreams, balancer):
    hold = HeldUpstreams()
    a, c = upstreams(2, hold)
    b = balancer([f"{a.url},maxconn=1", f"{c.url},maxconn=1"])
    clients = [RawClient(b.port) for _ in range(3)]
    try:
        clients[0].send(REQUEST)
        clients[1].send(REQUEST)
        assert wait_until(lambda: held(hold, a.port) == 1 and held(hold, c.port) == 1)
        clients[2].send(REQUEST)   # round robin's turn is a's again: both are at their cap
        assert wait_until(lambda: queue_length(b) == 1)
        assert len(a.requests) == len(c.requests) == 1
        hold.event(c.port).set()   # c frees first
        third = clients[2].response()
        assert third.status == 200
        assert third.header("X-Upstream-Port") == str(c.port)
        hold.event(a.port).set()
        assert {client.response().header("X-Upstream-Port") for client in clients[:2]} == {
            str(a.port), str(c.port)}
        status = b.status()
        assert status["queue"]["length"] == 0
        assert status["queue"]["queued_total"] == 1
        assert status["queue"]["timeouts_total"] == 0
        assert [backend["maxconn"] for backend in status["backends"]] == [1, 1]
        metrics = b.control.metrics()
        assert "lb_queue_wait_seconds_count 1\n" in metrics
        assert "lb_queue_length 0\n" in metrics
    finally:
        hold.release_all()
        for client in clients:
            client.close()


def test_queue_timeout_answers_503_with_retry_after_in_time(upstreams, balancer):
    hold = HeldUpstreams()
    up, = upstreams(1, hold)
    b = balancer([f"{up.url},maxconn=1"], queue_timeout=0.3)
    first = RawClient(b.port)
    try:
        first.send(REQUEST)
        assert wait_until(lambda: held(hold, up.port) == 1)
        with RawClient(b.port) as second:
            started = time.monotonic()
            r = second.request(REQUEST)
            waited = time.monotonic() - started
        assert r.status == 503
        assert r.header("Retry-After") == "1"
        assert b"queue" in r.body and b"--queue-timeout" in r.body
        assert 0.3 <= waited < 0.3 + SLACK
        assert len(up.requests) == 1
        status = b.status()
        assert status["queue"]["timeouts_total"] == 1
        assert status["queue"]["length"] == 0
        assert "lb_queue_timeouts_total 1\n" in b.control.metrics()
    finally:
        hold.release_all()
        first.close()


def test_a_client_that_leaves_the_queue_sends_nothing_upstream(upstreams, balancer):
    hold = HeldUpstreams()
    a, c = upstreams(2, hold)
    b = balancer([f"{a.url},maxconn=1", f"{c.url},maxconn=1"])
    holders = [RawClient(b.port) for _ in range(2)]
    try:
        for client in holders:
            client.send(REQUEST)
        assert wait_until(lambda: held(hold, a.port) == 1 and held(hold, c.port) == 1)
        leaving = RawClient(b.port)
        leaving.send(b"GET /queued HTTP/1.1\r\nHost: t\r\n\r\n")
        assert wait_until(lambda: queue_length(b) == 1)
        leaving.close()
        assert wait_until(lambda: queue_length(b) == 0, timeout=1.0)
        hold.release_all()
        for client in holders:
            assert client.response().status == 200
        assert get(b.port, "/after").status == 200  # the slots are free again
        targets = [r.target for r in a.requests + c.requests]
        assert "/queued" not in targets and targets.count("/slow") == 2
        assert b.status()["queue"]["timeouts_total"] == 0
    finally:
        hold.release_all()
        for client in holders:
            client.close()


def test_queue_size_exceeded_answers_503_at_once(upstreams, balancer):
    hold = HeldUpstreams()
    up, = upstreams(1, hold)
    b = balancer([f"{up.url},maxconn=1"], queue_size=1, queue_timeout=30)
    clients = [RawClient(b.port) for _ in range(2)]
    try:
        clients[0].send(REQUEST)
        assert wait_until(lambda: held(hold, up.port) == 1)
        clients[1].send(REQUEST)
        assert wait_until(lambda: queue_length(b) == 1)
        with RawClient(b.port) as third:
            started = time.monotonic()
            r = third.request(REQUEST)
            assert time.monotonic() - started < SLACK
        assert r.status == 503
        assert r.header("Retry-After") == "1"
        assert b"--queue-size" in r.body
        assert b.status()["queue"]["full_total"] == 1
        hold.release_all()
        assert clients[0].response().status == 200
        assert clients[1].response().status == 200  # the queued one still goes
        assert len(up.requests) == 2
    finally:
        hold.release_all()
        for client in clients:
            client.close()


def test_two_workers_never_exceed_the_cap_and_all_complete(upstreams, cli, tmp_path):
    hold = HeldUpstreams(hold_seconds=0.15)
    a, c = upstreams(2, hold)
    backends = tmp_path / "backends.txt"
    backends.write_text(f"{a.url},maxconn=2\n{c.url},maxconn=2\n")
    p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--admin-port", "0",
             "--health-interval", "0", "--backends-file", str(backends)]).wait_ready()
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: get(p.port, "/slow").status, range(12)))
    assert statuses == [200] * 12
    assert hold.most == {a.port: 2, c.port: 2}
    assert len(a.requests) + len(c.requests) == 12
    status = admin_status(p.admin_port)
    # 12 connections on two SO_REUSEPORT listeners: both workers served (all on one: 2 in 4096)
    assert all(worker["requests"] for worker in status["workers"]), status["workers"]
    assert status["queue"]["queued_total"] >= 12 - 4


def test_maxconn_option_parsing_and_export():
    spec = lb.parse_backend("http://127.0.0.1:9000,maxconn=3,weight=2")
    assert (spec.maxconn, spec.weight) == (3, 2)
    assert lb.parse_backend("http://127.0.0.1:9000").maxconn == 0
    for bad in ("0", "-1", "x", "100001", ""):
        with pytest.raises(ValueError, match="maxconn must be 1-100000"):
            lb.parse_backend(f"http://127.0.0.1:9000,maxconn={bad}")
    config = lb.Config(backends=("http://127.0.0.1:9000,maxconn=3", "http://127.0.0.1:9001"),
                       queue_timeout=7)
    haproxy = lb.export_config(config, "haproxy")
    assert "    timeout queue 7s\n" in haproxy
    assert "server 127.0.0.1:9000 127.0.0.1:9000 maxconn 3\n" in haproxy
    assert "maxconn" not in haproxy.split("127.0.0.1:9001 127.0.0.1:9001", 1)[1].split("\n", 1)[0]
    nginx = lb.export_config(config, "nginx")
    assert "server 127.0.0.1:9000 max_conns=3 " in nginx
    assert "nginx Plus" in nginx


def test_a_reload_keeps_the_queue_and_applies_the_new_cap(upstreams, balancer, tmp_path):
    hold = HeldUpstreams()
    up, = upstreams(1, hold)
    backends = tmp_path / "backends.txt"
    backends.write_text(f"{up.url},maxconn=1\n")
    b = balancer([], backends_file=str(backends))
    clients = [RawClient(b.port) for _ in range(3)]
    try:
        clients[0].send(REQUEST)
        assert wait_until(lambda: held(hold, up.port) == 1)
        clients[1].send(REQUEST)
        clients[2].send(REQUEST)
        assert wait_until(lambda: queue_length(b) == 2)
        backends.write_text(f"{up.url},maxconn=2\n")
        b.reload()
        # The new cap lets one more in (the head of the queue), not two.
        assert wait_until(lambda: held(hold, up.port) == 2 and queue_length(b) == 1)
        assert b.status()["backends"][0]["maxconn"] == 2
        hold.release_all()
        assert [client.response().status for client in clients] == [200, 200, 200]
        assert hold.most == {up.port: 2}
    finally:
        hold.release_all()
        for client in clients:
            client.close()


@pytest.mark.parametrize("target", PEERS)
def test_peer_accepts_the_exported_caps(target, tmp_path):
    require_program(target)
    config = lb.Config(backends=("http://127.0.0.1:9000,maxconn=3", "http://127.0.0.1:9001,maxconn=1,backup"),
                       queue_timeout=2.5, balance="leastconn")
    result = check_file(target, lb.export_config(config, target), tmp_path)
    output = result.stderr + result.stdout
    assert result.returncode == 0 and not (target == "haproxy" and "WARNING" in output), output
