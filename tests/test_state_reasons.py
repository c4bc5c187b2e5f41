"""The reason /status gives for an upstream's state is the one that decides that state.

An operator's drain or maint decides routing whatever health checks and requests find: passing
HTTP checks, a failed request that ejects, a request that succeeds must not write their reason
over it (they are still counted). An ejection is ended by state values (its deadline), not by
reading the reason's text. Through real sockets: upstreams with a /health route, the in-process
balancer, its admin API and /status; waiting is on /status with wait_until.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from conftest import HEALTH, SOCKET_TIMEOUT, HealthSwitch, free_port, get, wait_until

ADMIN_REASONS = {"drain": "drain: no new requests (admin API)",
                 "maint": "maint: out of rotation (admin API)"}


class Switchable(HealthSwitch):
    """HealthSwitch (503 when failing); with `hold`, /hold waits for `release` and then closes the
    connection without an answer (a failed request)."""

    def __init__(self, hold: bool = False):
        super().__init__(failing_code=503)
        self.hold = hold
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, h, req):
        if req.target == "/hold" and self.hold:
            self.held.set()
            self.release.wait(SOCKET_TIMEOUT)
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        super().__call__(h, req)


def entry(b, name: str) -> dict:
    r = get(b.admin_port, "/status")
    assert r.status == 200, r
    return next(x for x in json.loads(r.body)["backends"] if x["name"] == name)


def post(b, name: str, action: str) -> dict:
    r = get(b.admin_port, f"/backends/{name}/{action}", method="POST")
    assert r.status == 200, r
    return json.loads(r.body)


def start(upstreams, balancer, **options):
    switches = [Switchable(hold=True), Switchable()]
    ups = [upstreams(1, s)[0] for s in switches]
    options = {"admin_port": free_port(), "health_path": HEALTH, "health_interval": 0.05, "rise": 1,
               "fall": 1, **options}
    b = balancer([f"{u.url},name=u{i}" for i, u in enumerate(ups)], **options)
    return b, switches


def checks_after(b, name: str, n: int) -> None:
    """Wait until `n` more active checks of `name` have been recorded."""
    start = sum(entry(b, name)["checks"].values())
    assert wait_until(lambda: sum(entry(b, name)["checks"].values()) >= start + n, timeout=5)


@pytest.mark.parametrize("action", ["drain", "maint"])
def test_passing_http_checks_keep_the_operators_reason(action, upstreams, balancer):
    b, _ = start(upstreams, balancer)
    assert post(b, "u0", action)["reason"] == ADMIN_REASONS[action]
    checks_after(b, "u0", 4)
    x = entry(b, "u0")
    assert (x["state"], x["health"], x["reason"]) == (action, "up", ADMIN_REASONS[action]), x
    assert x["checks"]["passed"] >= 4, x

    assert post(b, "u0", "ready")["reason"] == "ready: back in rotation (admin API)"
    # Back under health's rule: the next check's reason is shown again.
    assert wait_until(lambda: entry(b, "u0")["reason"] == f"health check passed: HTTP 200 from {HEALTH}",
                      timeout=5), entry(b, "u0")


def test_health_going_down_and_up_during_a_drain_keeps_the_drain_reason(upstreams, balancer):
    b, switches = start(upstreams, balancer)
    post(b, "u0", "drain")
    switches[0].healthy = False
    assert wait_until(lambda: entry(b, "u0")["health"] == "down", timeout=5)
    x = entry(b, "u0")
    assert (x["state"], x["reason"]) == ("drain", ADMIN_REASONS["drain"]), x
    # Ready while its checks fail: the reason says what still keeps it out.
    x = post(b, "u0", "ready")
    assert (x["state"], x["reason"]) == (
        "down", "ready: back in rotation (admin API); still down: its health checks fail"), x
    switches[0].healthy = True
    assert wait_until(lambda: entry(b, "u0")["state"] == "up", timeout=5)
    assert entry(b, "u0")["reason"].startswith("up: 1 health check(s) passed"), entry(b, "u0")


def test_a_request_failing_during_a_drain_does_not_replace_the_drain_reason(upstreams, balancer):
    """A request in flight when the drain began fails and takes the upstream out (max_fails 1):
    counted as an ejection, but the reason stays the operator's."""
    b, switches = start(upstreams, balancer, max_fails=1, fail_timeout=30, health_interval=0)
    held = switches[0]
    result = []
    client = threading.Thread(target=lambda: result.append(get(b.port, "/hold")))
    client.start()
    try:
        assert held.held.wait(5)
        post(b, "u0", "drain")
    finally:
        held.release.set()
        client.join(SOCKET_TIMEOUT)
    assert result and result[0].status == 200, result  # retried on u1 (GET, nothing answered)
    assert wait_until(lambda: entry(b, "u0")["ejections"] == 1, timeout=5), entry(b, "u0")
    x = entry(b, "u0")
    assert (x["state"], x["ejected"], x["reason"]) == ("drain", False, ADMIN_REASONS["drain"]), x


def test_a_passing_http_check_ends_an_ejection_and_says_so(upstreams, balancer):
    """The ejection is ended because its deadline is still ahead (a state value) and an HTTP check
    passed; the reason then names what ended it."""
    b, switches = start(upstreams, balancer, max_fails=1, fail_timeout=30, health_interval=0.3)
    held = switches[0]
    held.release.set()
    assert get(b.port, "/hold").status == 200  # u0 resets -> out for 30 s; u1 answers
    x = entry(b, "u0")
    if x["ejected"]:  # unless a check already ended it
        assert x["reason"].startswith("out for 30s after 1 failed requests in a row"), x
    assert wait_until(lambda: entry(b, "u0")["state"] == "up", timeout=5), entry(b, "u0")
    x = entry(b, "u0")
    assert x["ejected"] is False and x["ejections"] == 1, x
    assert x["reason"] == f"back in rotation: health check passed: HTTP 200 from {HEALTH}", x


def test_an_ejection_that_ran_out_is_said_so_by_its_deadline(upstreams, balancer):
    """No active checks: the ejection ends when --fail-timeout passes. /status says so from the
    deadline, before anything clears it, and keeps saying so (with the same `since`) once the next
    request has cleared it."""
    b, switches = start(upstreams, balancer, max_fails=1, fail_timeout=0.3, health_interval=0)
    switches[0].release.set()
    assert get(b.port, "/hold").status == 200
    assert entry(b, "u0")["ejected"] is True
    assert wait_until(lambda: entry(b, "u0")["state"] == "up", timeout=3)
    lapsed = entry(b, "u0")
    assert lapsed["reason"] == "back in rotation: its fail timeout passed", lapsed
    for i in range(2):  # one of these goes to u0 and clears the ejection
        assert get(b.port, f"/after{i}").status == 200
    x = entry(b, "u0")
    assert x["consecutive_failures"] == 0, x
    assert (x["reason"], x["since"]) == (lapsed["reason"], lapsed["since"]), (x, lapsed)
