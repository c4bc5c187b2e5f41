"""Health: active checks (rise/fall, timeouts, status codes), passive checks (max_fails /
fail_timeout), failover rules (what is retried where), 503 when nothing is available, and the admin
/status document.

Every upstream here is real (conftest `upstreams` / `raw_upstream`); every socket has a timeout.
Waiting is done on events or by polling a condition with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import threading
import time

import pytest

from conftest import (HEALTH, SOCKET_TIMEOUT, HealthSwitch, RawClient, SlowUpstreamHandler, default_handler,
                      free_port, get, port_of, refused_url, wait_until)



# ---------------------------------------------------------------------------------------------------
# Local helpers
# ---------------------------------------------------------------------------------------------------

def app_requests(upstream) -> list:
    """Requests that are not health probes."""
    return [r for r in upstream.requests if not r.target.startswith(HEALTH)]


def probes(upstream) -> list:
    return [r for r in upstream.requests if r.target.startswith(HEALTH)]


def admin_status(b) -> dict:
    r = get(b.admin_port, "/status")
    assert r.status == 200, r
    assert (r.header("Content-Type") or "").startswith("application/json"), r
    return json.loads(r.body)


def send_simple(h, code: int, body: bytes = b"") -> None:
    h.send_response(code)
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def assert_error_format(r, status: int) -> None:
    assert r.status == status, r
    assert r.header("Content-Type") == "text/plain; charset=utf-8", r
    assert r.body.startswith(str(status).encode() + b" "), r
    assert r.body.endswith(b"\n") and r.body.count(b"\n") == 1, r


def served_again(b, up, timeout: float = 4) -> bool:
    """Send requests through the balancer (each must succeed) until `up` gets one again."""
    before = len(up.requests)

    def served():
        assert get(b.port).status == 200
        return len(up.requests) > before

    return wait_until(served, timeout=timeout, interval=0.05)


def reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def serve_reset_after_request(conn, up) -> None:
    if up.read_request(conn):
        reset(conn)


def serve_close_after_request(conn, up) -> None:
    """Read the request, then close without answering (a broken response)."""
    up.read_request(conn)
    conn.close()


def serve_garbage(conn, up) -> None:
    if up.read_request(conn):
        conn.sendall(b"this is not HTTP\r\n\r\n")


class GatedHealth:
    """Upstream handler whose /health probes each wait for the test to let exactly one through
    (answered 200 or 500 as the test says). This makes the number of probes the balancer has seen
    answered exact, so rise/fall can be counted without timing guesses."""

    def __init__(self):
        self.cond = threading.Condition()
        self.arrived = 0
        self.answered = 0
        self.permits = 0
        self.healthy = True
        self.opened = False

    def __call__(self, h, req):
        if not req.target.startswith(HEALTH):
            default_handler(h, req)
            return
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.permits > 0 or self.opened, SOCKET_TIMEOUT)
            if self.permits > 0:
                self.permits -= 1
            healthy = self.healthy
        send_simple(h, 200 if healthy else 500, b"ok\n" if healthy else b"sick\n")
        h.wfile.flush()
        with self.cond:
            self.answered += 1
            self.cond.notify_all()

    def wait_arrived(self, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.arrived >= n, timeout)

    def answer_one(self, healthy: bool, timeout: float = 5.0) -> None:
        """Let one waiting probe through with the given verdict and wait until it was answered."""
        with self.cond:
            self.healthy = healthy
            target = self.answered + 1
            self.permits += 1
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.answered >= target, timeout), "probe not answered"

    def open(self) -> None:
        with self.cond:
            self.opened = True
            self.cond.notify_all()


def lb_records(caplog, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if (r.name == "load_balancer" or r.name.startswith("load_balancer."))
            and needle in r.getMessage()]


# ---------------------------------------------------------------------------------------------------
# Passive checks and failover
# ---------------------------------------------------------------------------------------------------

def test_one_of_three_refusing_30_gets_all_succeed_and_rotation_stays_fair(upstreams, balancer):
    a, c = upstreams(2)
    b = balancer([a.url, refused_url(), c.url])
    responses = [get(b.port, f"/r{i}") for i in range(30)]
    assert [r.status for r in responses] == [200] * 30, responses
    counts = {a.port: 0, c.port: 0}
    for r in responses:
        counts[port_of(r)] += 1
    assert abs(counts[a.port] - counts[c.port]) <= 2, counts
    assert len(app_requests(a)) + len(app_requests(c)) == 30


def test_refused_upstream_is_marked_down_after_max_fails_1(upstreams, balancer):
    a, = upstreams(1)
    dead = refused_url()
    b = balancer([dead, a.url], max_fails=1, fail_timeout=10)
    assert get(b.port).status == 200
    assert wait_until(lambda: b.backends[0].state == "down", timeout=2), b.backends[0].state
    assert b.backends[1].state == "up"
    # and it stays out: everything goes to the live one
    for _ in range(6):
        r = get(b.port)
        assert r.status == 200 and port_of(r) == a.port
    assert b.backends[0].state == "down"


def test_failed_upstream_gets_no_connect_attempts_until_fail_timeout(raw_upstream, upstreams,
                                                                      balancer):
    bad = raw_upstream(serve_close_after_request)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url], max_fails=1, fail_timeout=1.5)
    r = get(b.port)  # 1st request -> bad (broken response) -> retried on ok
    t_fail = time.monotonic()
    assert r.status == 200 and port_of(r) == ok.port, r
    assert bad.connections == 1
    # well inside fail_timeout: no new connection to the failed upstream
    n = 0
    while time.monotonic() - t_fail < 1.0:
        r = get(b.port, f"/inside{n}")
        assert r.status == 200 and port_of(r) == ok.port, r
        n += 1
        time.sleep(0.02)  # pacing, not waiting for anything
    assert bad.connections == 1, "upstream was tried again before fail_timeout passed"
    # after fail_timeout it is tried again (and fails again: still answered from ok)

    def retried():
        r = get(b.port)
        assert r.status == 200, r
        return bad.connections >= 2

    assert wait_until(retried, timeout=4.0, interval=0.05), "never tried again after fail_timeout"
    assert time.monotonic() - t_fail >= 1.4


def test_refused_upstream_not_tried_again_until_fail_timeout(upstreams, balancer):
    """Refused connects cannot be counted at the port, so count them as the backend's errors."""
    ok, = upstreams(1)
    dead = refused_url()
    b = balancer([dead, ok.url], max_fails=1, fail_timeout=1.5, admin_port=free_port())
    assert get(b.port).status == 200  # 1st -> dead (refused) -> ok
    t_fail = time.monotonic()

    def dead_errors():
        return sum(admin_status(b)["backends"][0]["errors"].values())

    assert dead_errors() == 1
    n = 0
    while time.monotonic() - t_fail < 1.0:
        r = get(b.port, f"/r{n}")
        assert r.status == 200 and port_of(r) == ok.port, r
        n += 1
        time.sleep(0.02)  # pacing
    assert dead_errors() == 1, "connect attempts to the refused upstream before fail_timeout"

    def tried_again():
        assert get(b.port).status == 200
        return dead_errors() >= 2

    assert wait_until(tried_again, timeout=4, interval=0.05), "not tried after fail_timeout"
    assert time.monotonic() - t_fail >= 1.4


def test_max_fails_2_needs_two_failures_before_taking_out(raw_upstream, upstreams, balancer):
    bad = raw_upstream(serve_close_after_request)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url], max_fails=2, fail_timeout=5)
    # the first failure does not take it out: it gets a second try within a few requests
    for i in range(8):
        assert get(b.port, f"/a{i}").status == 200
        if bad.connections >= 2:
            break
    assert bad.connections == 2, "with max_fails=2 one failure must not take the upstream out"
    for i in range(10):
        r = get(b.port, f"/b{i}")
        assert r.status == 200 and port_of(r) == ok.port, r
    assert bad.connections == 2, "after max_fails failures the upstream must be out"


@pytest.mark.parametrize("serve", [serve_reset_after_request, serve_close_after_request],
                         ids=["reset", "closed"])
def test_idempotent_get_fails_over_to_next_upstream(serve, raw_upstream, upstreams, balancer):
    bad = raw_upstream(serve)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url])
    r = get(b.port, "/idem?x=1")
    assert r.status == 200, r
    assert port_of(r) == ok.port
    assert b"GET /idem?x=1 HTTP/1.1" in bytes(bad.received)  # it really went to bad first
    assert [q.target for q in ok.requests] == ["/idem?x=1"]
    assert bad.connections == 1


def test_broken_response_counts_as_failure(raw_upstream, upstreams, balancer):
    """A response that is not HTTP: 502, never retried (nginx: invalid_header is opt-in), and it
    counts as a failure: with max_fails=1 the upstream is out."""
    bad = raw_upstream(serve_garbage)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url], max_fails=1, fail_timeout=10)
    r = get(b.port, "/broken")
    assert_error_format(r, 502)
    assert ok.requests == [], "an invalid response was retried"
    assert bad.connections == 1
    for i in range(6):
        r = get(b.port, f"/after{i}")
        assert r.status == 200 and port_of(r) == ok.port, r
    assert bad.connections == 1, "upstream with a broken response was not taken out"


@pytest.mark.parametrize("method", ["POST", "PATCH", "LOCK", "PUT"])
def test_request_with_body_sent_to_resetting_upstream_is_502_and_not_retried(
        method, raw_upstream, upstreams, balancer):
    bad = raw_upstream(serve_reset_after_request)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url])
    body = f"payload for {method} that must not be sent twice".encode()
    t0 = time.monotonic()
    r = get(b.port, "/submit", method=method, body=body)
    assert_error_format(r, 502)
    assert time.monotonic() - t0 < 3
    assert body in bytes(bad.received), "the request did not reach the first upstream"
    assert ok.requests == [], f"body reached a second upstream: {ok.requests}"


@pytest.mark.parametrize("method", ["POST", "PATCH", "LOCK"])
def test_non_idempotent_without_body_to_garbage_upstream_is_502_not_retried(
        method, raw_upstream, upstreams, balancer):
    bad = raw_upstream(serve_garbage)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url])
    r = get(b.port, "/nobody", method=method)
    assert_error_format(r, 502)
    assert f"{method} /nobody HTTP/1.1".encode() in bytes(bad.received)
    assert ok.requests == []


def test_post_to_refused_upstream_is_retried_on_next(upstreams, balancer):
    ok, = upstreams(1)
    b = balancer([refused_url(), ok.url])
    body = b"x" * 5000
    r = get(b.port, "/submit", method="POST", body=body)
    assert r.status == 200 and port_of(r) == ok.port, r
    assert len(ok.requests) == 1 and ok.requests[0].body == body
    assert ok.requests[0].method == "POST"


def test_all_upstreams_broken_gives_502_with_at_most_one_try_each(raw_upstream, balancer):
    bad = [raw_upstream(serve_reset_after_request) for _ in range(3)]
    b = balancer([u.url for u in bad])
    r = get(b.port, "/all-broken")
    assert_error_format(r, 502)
    tries = [u.connections for u in bad]
    assert all(t <= 1 for t in tries), f"an upstream was tried more than once: {tries}"
    assert sum(tries) >= 2, f"GET with nothing sent to the client was not retried: {tries}"


def test_no_retry_once_response_started(raw_upstream, upstreams, balancer):
    """Upstream dies mid-body after the head was relayed: the client connection is closed, the
    request is not sent to another upstream."""

    def serve(conn, up):
        if up.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
            reset(conn)

    bad = raw_upstream(serve)
    ok, = upstreams(1)
    b = balancer([bad.url, ok.url])
    with RawClient(b.port) as client:
        client.send(b"GET /mid HTTP/1.1\r\nHost: t\r\n\r\n")
        head = client.file.readline()
        assert head.startswith(b"HTTP/1.1 200"), head
        try:
            rest = client.read_until_close()
        except ConnectionResetError:
            rest = b""
        assert b"a" * 100 not in rest
    assert ok.requests == []


def test_stale_pooled_connection_is_retried_on_fresh_connection(raw_upstream, balancer):
    """The upstream answers keep-alive but closes each connection right after: every reuse of a
    pooled connection finds it closed; idempotent requests are retried on a fresh connection."""
    closed = []

    def serve(conn, up):
        if up.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seq: %d\r\n\r\nok"
                         % up.connections)
            time.sleep(0.05)  # let the balancer pool the connection first
        conn.close()
        closed.append(1)

    up = raw_upstream(serve)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        for i in range(5):
            r = client.request(b"GET /k%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            assert r.status == 200 and r.body == b"ok", (i, r)
            assert wait_until(lambda: len(closed) == i + 1, timeout=3)
    assert up.connections == 5
    # and the backend was not taken out for it
    assert get(b.port).status == 200


def test_upstream_stopped_and_restarted_during_200_keepalive_gets(upstreams, balancer):
    a, mid, c = upstreams(3)
    b = balancer([a.url, mid.url, c.url], fail_timeout=1)
    statuses = []
    with RawClient(b.port) as client:
        for i in range(200):
            if i == 50:
                mid.stop()
            if i == 120:
                mid.start()
            r = client.request(b"GET /ka%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            statuses.append(r.status)
    assert statuses == [200] * 200, [(i, s) for i, s in enumerate(statuses) if s != 200]
    assert served_again(b, mid), "restarted upstream never came back"


def test_upstream_that_closes_every_connection_stopped_and_restarted(upstreams, balancer):
    """Same as above, but the upstream closes after each response, so the stop really makes
    connects fail (refused) while it is down."""

    def closing(h, req):
        h.close_connection = True
        body = f"upstream {h.server.server_port}\n".encode()
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.send_header("X-Upstream-Port", str(h.server.server_port))
        h.end_headers()
        h.wfile.write(body)

    a, c = upstreams(2)
    mid, = upstreams(1, closing)
    b = balancer([a.url, mid.url, c.url], fail_timeout=1)
    statuses = []
    served_while_stopped = None
    with RawClient(b.port) as client:
        for i in range(200):
            if i == 50:
                mid.stop()
                served_while_stopped = len(mid.requests)
            if i == 120:
                assert len(mid.requests) == served_while_stopped
                mid.start()
            r = client.request(b"GET /kc%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            statuses.append(r.status)
    assert statuses == [200] * 200, [(i, s) for i, s in enumerate(statuses) if s != 200]
    assert served_again(b, mid)


def test_all_upstreams_out_by_failed_requests_panic_mode_still_tries_them(upstreams, balancer):
    """Envoy's panic threshold: with every upstream out only after failed requests, a 503 for the
    whole --fail-timeout would be an outage of its own. Requests are still tried on them, and the
    first request after an upstream is back succeeds."""
    first, second = upstreams(2)
    for up in (first, second):
        up.stop()
    b = balancer([first.url, second.url], max_fails=1, fail_timeout=30, admin_port=free_port())
    r = get(b.port)  # both refuse: each tried once, both out
    assert_error_format(r, 502)
    assert [x.state for x in b.backends] == ["down", "down"]
    assert admin_status(b)["panic"] is True
    for _ in range(3):
        t0 = time.monotonic()
        r = get(b.port, "/down")
        assert time.monotonic() - t0 < 1.0
        assert_error_format(r, 502)  # tried (and refused), not 503 without a try
    second.start()  # the same port again
    r = get(b.port, "/back")
    assert r.status == 200 and port_of(r) == second.port, r
    assert admin_status(b)["panic"] is False
    assert b.backends[1].state == "up"


def test_single_upstream_is_never_taken_out_by_failed_requests(upstreams, balancer):
    """As nginx: with a single server in the group, max_fails is ignored. Taking the only upstream
    out would turn its failures into 503s for fail_timeout, even after it is back; kept in, the
    next request after its recovery succeeds."""
    up, = upstreams(1)
    port = up.port
    up.stop()
    b = balancer([up.url], max_fails=1, fail_timeout=30)
    for _ in range(3):
        assert_error_format(get(b.port), 502)
    assert b.backends[0].state == "up"
    up.start()  # same port again
    r = get(b.port, "/back")
    assert r.status == 200 and port_of(r) == port, r


def test_all_upstreams_down_by_active_checks_503_fast_no_request_forwarded(upstreams, balancer):
    sw = [HealthSwitch(healthy=False) for _ in range(2)]
    ups = [upstreams(1, s)[0] for s in sw]
    b = balancer([u.url for u in ups], health_interval=0.2, health_timeout=1, fall=1,
                 health_path=HEALTH)
    assert wait_until(lambda: all(x.state == "down" for x in b.backends), timeout=3), \
        [x.state for x in b.backends]
    t0 = time.monotonic()
    r = get(b.port, "/nothing-up")
    assert time.monotonic() - t0 < 1.0
    assert_error_format(r, 503)
    assert int(r.header("Retry-After")) >= 1
    assert all(app_requests(u) == [] for u in ups)


# ---------------------------------------------------------------------------------------------------
# Active checks
# ---------------------------------------------------------------------------------------------------

def test_failing_health_no_traffic_within_2s_and_traffic_again_within_3s(upstreams, balancer):
    switches = [HealthSwitch() for _ in range(3)]
    ups = [upstreams(1, s)[0] for s in switches]
    b = balancer([u.url for u in ups], health_interval=0.5, health_timeout=1, health_path=HEALTH)
    first = [port_of(get(b.port)) for _ in range(3)]
    assert sorted(first) == sorted(u.port for u in ups)

    switches[1].healthy = False
    t_sick = time.monotonic()
    assert wait_until(lambda: b.backends[1].state == "down", timeout=2.0), \
        f"still {b.backends[1].state!r} 2 s after /health started failing"
    assert time.monotonic() - t_sick <= 2.1
    before = len(app_requests(ups[1]))
    responses = [get(b.port, f"/x{i}") for i in range(20)]
    assert all(r.status == 200 for r in responses)
    assert len(app_requests(ups[1])) == before, "a down upstream got traffic"
    # fair between the two healthy ones
    n_a = sum(port_of(r) == ups[0].port for r in responses)
    n_c = sum(port_of(r) == ups[2].port for r in responses)
    assert n_a + n_c == 20 and abs(n_a - n_c) <= 1, (n_a, n_c)

    switches[1].healthy = True
    t_ok = time.monotonic()

    def served_again():
        assert get(b.port).status == 200
        return len(app_requests(ups[1])) > before

    assert wait_until(served_again, timeout=3.0, interval=0.05), "no traffic 3 s after recovery"
    assert time.monotonic() - t_ok <= 3.1
    assert b.backends[1].state == "up"


def test_rotation_among_healthy_upstreams_is_strict_when_one_is_down(upstreams, balancer):
    switches = [HealthSwitch() for _ in range(3)]
    ups = [upstreams(1, s)[0] for s in switches]
    switches[1].healthy = False
    b = balancer([u.url for u in ups], health_interval=0.2, fall=1, health_path=HEALTH)
    assert wait_until(lambda: b.backends[1].state == "down", timeout=3)
    ports = [port_of(get(b.port)) for _ in range(20)]
    assert set(ports) == {ups[0].port, ups[2].port}
    assert ports.count(ups[0].port) == 10, ports
    assert all(p != q for p, q in zip(ports, ports[1:])), f"not alternating: {ports}"


def test_fall_2_rise_3_exact_counts_and_logged_once(upstreams, balancer, caplog):
    caplog.set_level(logging.DEBUG, logger="load_balancer")
    gate = GatedHealth()
    up, = upstreams(1, gate)
    try:
        b = balancer([up.url], health_interval=0.2, health_timeout=5, fall=2, rise=3,
                     admin_port=free_port(), health_path=HEALTH)
        port = str(up.port)
        assert gate.wait_arrived(1)
        assert b.backends[0].state == "up"

        gate.answer_one(healthy=False)           # failure 1
        assert gate.wait_arrived(2)              # the checker moved on to the next probe
        assert b.backends[0].state == "up", "down after 1 failure with fall=2"
        st = admin_status(b)["backends"][0]
        assert st["state"] == "up" and st["checks"] == {"passed": 0, "failed": 1}, st

        gate.answer_one(healthy=False)           # failure 2 -> down
        assert wait_until(lambda: b.backends[0].state == "down", timeout=2)
        assert gate.wait_arrived(3)
        gate.answer_one(healthy=False)           # failure 3: stays down, no new log line
        assert gate.wait_arrived(4)
        downs = [r for r in lb_records(caplog, port) if r.levelno == logging.WARNING]
        assert len(downs) == 1, [r.getMessage() for r in lb_records(caplog, port)]
        msg = downs[0].getMessage().lower()
        assert "500" in msg or "health" in msg or "status" in msg, msg  # the reason
        st = admin_status(b)["backends"][0]
        assert st["state"] == "down" and st["reason"], st

        gate.answer_one(healthy=True)            # pass 1
        assert gate.wait_arrived(5)
        assert b.backends[0].state == "down", "up after 1 pass with rise=3"
        gate.answer_one(healthy=True)            # pass 2
        assert gate.wait_arrived(6)
        assert b.backends[0].state == "down", "up after 2 passes with rise=3"
        gate.answer_one(healthy=True)            # pass 3 -> up
        assert wait_until(lambda: b.backends[0].state == "up", timeout=2)
        assert gate.wait_arrived(7)
        gate.answer_one(healthy=True)            # pass 4: stays up, no new log line
        assert gate.wait_arrived(8)

        records = lb_records(caplog, port)
        i_down = records.index(downs[0])
        ups_after = [r for r in records[i_down + 1:] if r.levelno == logging.INFO
                     and re.search(r"\bup\b", r.getMessage(), re.I)]
        assert len(ups_after) == 1, [r.getMessage() for r in records]
        assert [r for r in records if r.levelno == logging.WARNING] == downs
        assert admin_status(b)["backends"][0]["state"] == "up"
    finally:
        gate.open()


@pytest.mark.parametrize("code,expected", [(200, "up"), (204, "up"), (302, "up"),
                                           (404, "down"), (500, "down"), (503, "down")])
def test_health_status_code_verdict(code, expected, upstreams, balancer):
    def handler(h, req):
        if req.target == "/hc" and code == 204:
            h.send_response(204)
            h.end_headers()
        elif req.target == "/hc":
            send_simple(h, code)
        else:
            default_handler(h, req)

    up, = upstreams(1, handler)
    b = balancer([up.url], health_interval=0.2, health_path="/hc", fall=1, rise=1)
    if expected == "down":
        assert wait_until(lambda: b.backends[0].state == "down", timeout=3)
    else:
        # 3 probes answered (the 4th arrived) and never down
        assert wait_until(lambda: len(up.requests) >= 4, timeout=4)
        assert b.backends[0].state == "up"
    assert {r.target for r in up.requests} == {"/hc"}
    assert all(r.method == "GET" for r in up.requests)


def test_health_probe_timeout_counts_as_failure(upstreams, balancer):
    hang = threading.Event()

    def handler(h, req):
        if req.target.startswith(HEALTH):
            hang.wait(SOCKET_TIMEOUT)
            send_simple(h, 200)
        else:
            default_handler(h, req)

    up, = upstreams(1, handler)
    try:
        b = balancer([up.url], health_interval=0.2, health_timeout=0.3, fall=1,
                     admin_port=free_port(), health_path=HEALTH)
        t0 = time.monotonic()
        assert wait_until(lambda: b.backends[0].state == "down", timeout=3)
        assert time.monotonic() - t0 < 3
        reason = admin_status(b)["backends"][0]["reason"].lower()
        assert "no answer within 0.3s" in reason, reason  # says it was the timeout
    finally:
        hang.set()


def test_close_stops_health_checker(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], health_interval=0.1, health_path=HEALTH)
    assert wait_until(lambda: len(probes(up)) >= 2, timeout=3)
    b.close()
    n = len(probes(up))
    time.sleep(0.6)  # the subject is an absence: 6 intervals with no new probe
    assert len(probes(up)) <= n + 1, "health checks go on after close()"


def test_active_check_refused_marks_down_and_restart_brings_back(upstreams, balancer):
    a, other = upstreams(2)
    b = balancer([a.url, other.url], health_interval=0.2, fall=2, rise=2)
    a.stop()
    assert wait_until(lambda: b.backends[0].state == "down", timeout=3)
    assert b.backends[1].state == "up"
    a.start()
    assert wait_until(lambda: b.backends[0].state == "up", timeout=3)
    ports = {port_of(get(b.port)) for _ in range(4)}
    assert ports == {a.port, other.port}


def test_active_check_brings_passively_failed_upstream_back_before_fail_timeout(upstreams,
                                                                                balancer):
    def handler(h, req):
        if req.target == "/break":
            reset(h.connection)
            h.close_connection = True
            return
        default_handler(h, req)

    flaky, = upstreams(1, handler)
    ok, = upstreams(1)
    b = balancer([flaky.url, ok.url], max_fails=1, fail_timeout=30, health_interval=0.3,
                 rise=1, health_path=HEALTH)
    r = get(b.port, "/break")  # to flaky first: reset -> failover to ok
    assert r.status == 200 and port_of(r) == ok.port, r
    t0 = time.monotonic()
    before = len(app_requests(flaky))

    def flaky_served():
        assert get(b.port).status == 200
        return len(app_requests(flaky)) > before

    assert wait_until(flaky_served, timeout=4, interval=0.05), \
        "passing active checks did not bring the upstream back before fail_timeout"
    assert time.monotonic() - t0 < 5


def test_passive_down_state_reported_with_reason(upstreams, balancer):
    ok, = upstreams(1)
    dead = refused_url()
    b = balancer([ok.url, dead], max_fails=1, fail_timeout=10, admin_port=free_port())
    for i in range(4):
        assert get(b.port, f"/p{i}").status == 200
    st = admin_status(b)
    by_url = {x["url"]: x for x in st["backends"]}
    assert by_url[dead]["state"] == "down", by_url[dead]
    assert by_url[dead]["reason"], by_url[dead]
    assert by_url[dead]["errors"]["connect"] == 1, f"tried again while out: {by_url[dead]}"
    assert by_url[dead]["ejected"] is True and by_url[dead]["ejections"] == 1
    assert by_url[ok.url]["state"] == "up"
    assert by_url[ok.url]["requests"] == 4, by_url[ok.url]
    assert sum(by_url[ok.url]["errors"].values()) == 0


# ---------------------------------------------------------------------------------------------------
# Admin /status
# ---------------------------------------------------------------------------------------------------

def test_admin_status_fields_and_counters(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url for u in ups], admin_port=free_port())
    assert b.admin_port
    st0 = admin_status(b)
    for i in range(9):
        assert get(b.port, f"/s{i}").status == 200
    # A client has its response a moment before the handler has finished its bookkeeping: poll
    # the status (no event to wait on from outside) until nothing is in flight.
    assert wait_until(lambda: admin_status(b)["in_flight"] == 0 and
                      all(x["in_flight"] == 0 for x in admin_status(b)["backends"]), timeout=5)
    st = admin_status(b)
    assert set(st) >= {"version", "uptime_seconds", "pid", "requests_total", "refused_total",
                       "failed_total", "in_flight", "backends"}, st
    assert isinstance(st["version"], str) and re.fullmatch(r"\d+\.\d+\.\d+", st["version"])
    assert isinstance(st["uptime_seconds"], float) and st["uptime_seconds"] >= 0
    assert st["uptime_seconds"] >= st0["uptime_seconds"]
    assert st["pid"] == os.getpid()
    assert st["requests_total"] == 9, st
    assert st["refused_total"] == 0 and st["failed_total"] == 0
    assert st["in_flight"] == 0
    assert [x["url"] for x in st["backends"]] == [u.url for u in ups]
    for x in st["backends"]:
        assert set(x) >= {"url", "state", "reason", "consecutive_failures", "requests", "errors",
                          "in_flight"}, x
        assert x["state"] == "up" and isinstance(x["reason"], str)
        assert x["consecutive_failures"] == 0
        assert x["requests"] == 3, st["backends"]
        assert sum(x["errors"].values()) == 0 and x["in_flight"] == 0


def test_admin_status_counts_refused_and_failed_requests_apart(balancer):
    """refused_total: requests the balancer answered 4xx itself; failed_total: the 5xx it
    answered (upstream failures); each upstream's errors by kind."""
    b = balancer([refused_url(), refused_url()], max_fails=1, fail_timeout=10,
                 admin_port=free_port())
    for _ in range(3):
        assert get(b.port).status == 502
    with RawClient(b.port) as client:
        assert client.request(b"GET / HTTP/1.1\r\n\r\n").status == 400  # no Host
    st = admin_status(b)
    assert st["requests_total"] == 4, st
    assert (st["refused_total"], st["failed_total"]) == (1, 3), st
    assert st["responses"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 3}, st
    assert [x["state"] for x in st["backends"]] == ["down", "down"]
    assert [x["errors"]["connect"] for x in st["backends"]] == [3, 3], st["backends"]


def test_admin_status_in_flight(upstreams, balancer):
    slow = SlowUpstreamHandler()
    slow_up, = upstreams(1, slow)
    other, = upstreams(1)
    b = balancer([slow_up.url, other.url], admin_port=free_port())
    client = RawClient(b.port)
    try:
        client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        assert slow.arrived.wait(5)
        st = admin_status(b)
        assert st["in_flight"] == 1, st
        assert [x["in_flight"] for x in st["backends"]] == [1, 0], st
        slow.release.set()
        assert client.response().status == 200
        assert wait_until(lambda: admin_status(b)["in_flight"] == 0, timeout=3)
        st = admin_status(b)
        assert [x["in_flight"] for x in st["backends"]] == [0, 0], st
        assert st["backends"][0]["requests"] == 1
    finally:
        slow.release.set()
        client.close()
