"""Round-robin rotation and fairness through the balancer, with real upstreams and raw-socket clients.

Contract: rotation is per request (also several requests on one keep-alive client connection), the
1st request goes to the first backend, then the 2nd, ... and it is strictly cyclic under concurrency:
N*k requests from many threads => each upstream exactly k.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from conftest import RawClient, SlowUpstreamHandler, get, request

TIMEOUT = 5.0


def served_by(resp, upstreams_by_port, method="GET", target=None):
    """The Upstream that answered, checking the response is that upstream's genuine answer."""
    assert resp.status == 200, resp
    port = int(resp.header("X-Upstream-Port"))
    up = upstreams_by_port[port]
    if method != "HEAD" and target is not None:
        assert resp.body == f"upstream {port} {method} {target}\n".encode(), resp
    return up


@pytest.mark.parametrize("n", [2, 3, 5])
def test_rotation_on_one_keepalive_connection(upstreams, balancer, n):
    ups = upstreams(n)
    b = balancer([u.url for u in ups])
    by_port = {u.port: u for u in ups}
    order = []
    with RawClient(b.port, TIMEOUT) as c:
        for i in range(3 * n):
            resp = c.request(request(f"/r{i}"))
            order.append(served_by(resp, by_port, "GET", f"/r{i}"))
        assert not c.is_closed(0.05)  # really one connection throughout
    assert order == ups * 3
    for u in ups:
        assert [r.target for r in u.requests] == [f"/r{i}" for i in range(3 * n) if ups[i % n] is u]


def test_rotation_across_separate_connections(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url for u in ups])
    by_port = {u.port: u for u in ups}
    order = [served_by(get(b.port, f"/c{i}"), by_port, "GET", f"/c{i}") for i in range(9)]
    assert order == ups * 3


def test_rotation_is_global_across_interleaved_connections(upstreams, balancer):
    """One counter for the balancer, not one per client connection."""
    ups = upstreams(3)
    b = balancer([u.url for u in ups])
    by_port = {u.port: u for u in ups}
    clients = [RawClient(b.port, TIMEOUT) for _ in range(2)]
    try:
        order = []
        for i in range(12):
            c = clients[i % 2]  # 2 connections over 3 upstreams: per-connection rotation would differ
            order.append(served_by(c.request(request(f"/i{i}")), by_port, "GET", f"/i{i}"))
    finally:
        for c in clients:
            c.close()
    assert order == ups * 4


def test_rotation_counts_every_method(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url for u in ups])
    by_port = {u.port: u for u in ups}
    calls = [("GET", None), ("HEAD", None), ("POST", b"p"), ("PUT", b"put"), ("DELETE", None),
             ("OPTIONS", None), ("PATCH", b"x"), ("PURGE", None), ("GET", None)]
    order = []
    with RawClient(b.port, TIMEOUT) as c:
        for i, (method, body) in enumerate(calls):
            resp = c.request(request(f"/m{i}", method, body), method)
            order.append(served_by(resp, by_port, method, f"/m{i}"))
    assert order == ups * 3


def test_rotation_does_not_skip_a_busy_upstream(upstreams, balancer):
    """Strict rotation: an upstream still working on a request gets its next turn anyway."""
    slow = SlowUpstreamHandler()
    ups = upstreams(3, slow)
    b = balancer([u.url for u in ups])
    by_port = {u.port: u for u in ups}
    result = {}

    def slow_request():
        try:
            with RawClient(b.port, TIMEOUT + 5) as c:
                result["slow"] = c.request(request("/slow"))
        except Exception as exc:  # reported by the main thread
            result["error"] = exc

    t = threading.Thread(target=slow_request, daemon=True)
    try:
        t.start()
        assert slow.arrived.wait(TIMEOUT), "first request never reached the first upstream"
        order = [served_by(get(b.port, f"/q{i}"), by_port, "GET", f"/q{i}") for i in range(4)]
        assert order == [ups[1], ups[2], ups[0], ups[1]]  # A's turn comes while /slow is in flight
        assert "slow" not in result
    finally:
        slow.release.set()
        t.join(TIMEOUT)
    assert "error" not in result, result.get("error")
    assert served_by(result["slow"], by_port, "GET", "/slow") is ups[0]


def _concurrent(port, threads: int, per_thread: int, keepalive: bool = True):
    """`threads` clients released together, each sending `per_thread` requests (on its own keep-alive
    connection, or one fresh connection per request). Returns (ports seen per thread, errors)."""
    barrier = threading.Barrier(threads, timeout=TIMEOUT)
    seen: list[list[int]] = [[] for _ in range(threads)]
    errors: list = []

    def worker(index: int):
        try:
            barrier.wait()
            if keepalive:
                with RawClient(port, TIMEOUT) as c:
                    for i in range(per_thread):
                        target = f"/t{index}/{i}"
                        resp = c.request(request(target))
                        assert resp.status == 200, resp
                        assert resp.body.endswith(f" GET {target}\n".encode()), resp
                        seen[index].append(int(resp.header("X-Upstream-Port")))
            else:
                for i in range(per_thread):
                    target = f"/t{index}/{i}"
                    resp = get(port, target)
                    assert resp.status == 200, resp
                    assert resp.body.endswith(f" GET {target}\n".encode()), resp
                    seen[index].append(int(resp.header("X-Upstream-Port")))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append((index, repr(exc)))

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert not any(w.is_alive() for w in workers), "client threads hung"
    return seen, errors


@pytest.mark.parametrize("threads,per_thread,keepalive", [
    (8, 30, True),    # 240 requests, 8 keep-alive connections => 80 each
    (6, 6, False),    # 36 requests, one connection each      => 12 each
])
def test_fairness_under_concurrency(upstreams, balancer, threads, per_thread, keepalive):
    ups = upstreams(3)
    b = balancer([u.url for u in ups])
    seen, errors = _concurrent(b.port, threads, per_thread, keepalive)
    assert not errors, errors
    total = threads * per_thread
    counts = Counter(p for ports in seen for p in ports)
    assert sum(counts.values()) == total
    assert {u.port: counts[u.port] for u in ups} == {u.port: total // 3 for u in ups}
    assert [len(u.requests) for u in ups] == [total // 3] * 3  # what the upstreams really received


def test_strict_cycle_under_concurrency_uneven_total(upstreams, balancer):
    """70 requests over 3 upstreams from 7 threads: requests #1, #4, ..., #70 go to the first
    upstream => 24, 23, 23 exactly (no counter lost or doubled under contention)."""
    ups = upstreams(3)
    b = balancer([u.url for u in ups])
    seen, errors = _concurrent(b.port, 7, 10)
    assert not errors, errors
    assert [len(u.requests) for u in ups] == [24, 23, 23]
    counts = Counter(p for ports in seen for p in ports)
    assert [counts[u.port] for u in ups] == [24, 23, 23]
    # Afterwards the cycle continues where it stopped: #71 -> second, #72 -> third, #73 -> first.
    by_port = {u.port: u for u in ups}
    order = [served_by(get(b.port, f"/after{i}"), by_port, "GET", f"/after{i}") for i in range(3)]
    assert order == [ups[1], ups[2], ups[0]]
