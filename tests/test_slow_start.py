"""Slow start (--slow-start SECONDS) through real sockets.

- An upstream that rejoins (its health check fails, then passes again) gets well under its share
  of requests in its first 0.4 s, and exactly its share (one in three) once the window has
  passed; counted per time slice from the answers of requests sent one after the other, and
  checked against /status's slow_start factor and /metrics' lb_upstream_slow_start_factor.
- When a ramp starts: after a reload that adds an upstream, at the end of an ejection, out of
  maint; not at start-up, not out of drain, and not without --slow-start.
- The dashboard shows the policy and the ramping upstream's share, with and without its script.

In-process balancers over conftest's upstreams (no pooled connections where an upstream is stopped:
its handler threads would still answer on them); waits are polled with wait_until.
"""

from __future__ import annotations

import re
import time

from conftest import RawClient, get, port_of, refused_url, request, require_program, wait_until

WINDOW = 1.5


def factors(b) -> dict:
    return {backend["name"]: backend["slow_start"] for backend in b.status()["backends"]}


def test_a_rejoining_upstream_gets_well_under_its_share_first_and_all_of_it_after_the_window(
        upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url + f",name=s{i}" for i, u in enumerate(ups)], slow_start=WINDOW, health_path="/",
                 health_interval=0.05, rise=1, fall=1, pool_size=0)
    assert factors(b) == {"s0": None, "s1": None, "s2": None}  # not at start-up
    back = ups[2]
    back.stop()
    assert wait_until(lambda: b.status()["backends"][2]["state"] == "down")
    back.start()
    assert wait_until(lambda: b.status()["backends"][2]["state"] == "up", interval=0.005)
    began = time.monotonic()
    answers = []
    with RawClient(b.port) as client:
        while (elapsed := time.monotonic() - began) < WINDOW + 0.6:
            answers.append((elapsed, port_of(client.request(request("/s")))))
            if not 0.7 < elapsed < 0.8:
                continue
            ramp = factors(b)["s2"]
            assert ramp is not None and 0.1 < ramp < 1, ramp
    early = [port for elapsed, port in answers if elapsed < 0.4]
    late = [port for elapsed, port in answers if elapsed > WINDOW + 0.1]
    assert len(early) >= 30 and len(late) >= 30, (len(early), len(late))
    # A third of the requests is its full share; in its first 0.4 s its weight is 10-34%
    # of full: about 5-15% of the requests.
    assert early.count(back.port) / len(early) < 0.2, early.count(back.port) / len(early)
    assert early.count(back.port) > 0
    share = late.count(back.port) / len(late)
    assert 0.3 <= share <= 0.37, share
    assert factors(b) == {"s0": None, "s1": None, "s2": None}
    metrics = b.control.metrics()
    assert re.findall(r'lb_upstream_slow_start_factor\{upstream="s2"\} (\S+)', metrics) == ["1"]


def test_a_reload_that_adds_an_upstream_ramps_it_and_only_it(upstreams, balancer, tmp_path):
    ups = upstreams(3)
    backends = tmp_path / "backends.txt"
    backends.write_text("".join(f"{u.url},name=r{i}\n" for i, u in enumerate(ups[:2])))
    b = balancer([], backends_file=str(backends), slow_start=30)
    backends.write_text("".join(f"{u.url},name=r{i}\n" for i, u in enumerate(ups)))
    b.reload()
    ramp = factors(b)
    assert ramp["r0"] is None and ramp["r1"] is None and 0.1 <= ramp["r2"] < 0.2, ramp
    # Its cycle share: weights 10, 10, 1 (a tenth of its weight), so 1 request in 21.
    with RawClient(b.port) as client:
        ports = [port_of(client.request(request(f"/{i}"))) for i in range(42)]
    assert ports.count(ups[2].port) == 2, ports


def test_out_of_maint_ramps_out_of_drain_does_not(upstreams, balancer):
    ups = upstreams(2)
    b = balancer([u.url + f",name=m{i}" for i, u in enumerate(ups)], slow_start=30)
    b.control.set_state("m0", "drain")
    b.control.set_state("m0", "ready")
    assert factors(b) == {"m0": None, "m1": None}
    b.control.set_state("m1", "maint")
    assert factors(b) == {"m0": None, "m1": None}  # not up: no factor
    b.control.set_state("m1", "ready")
    assert 0.1 <= factors(b)["m1"] < 0.2


def test_the_end_of_an_ejection_starts_a_ramp(upstreams, balancer):
    up, = upstreams(1)
    dead = refused_url()
    b = balancer([dead + ",name=e0", up.url + ",name=e1"], slow_start=30, max_fails=1, fail_timeout=0.3)
    with RawClient(b.port) as client:
        for i in range(2):
            assert client.request(request(f"/{i}")).status == 200  # one of them retried off e0
    assert b.status()["backends"][0]["ejected"]
    assert wait_until(lambda: b.status()["backends"][0]["state"] == "up")
    assert 0.1 <= factors(b)["e0"] < 0.2


def test_without_slow_start_nothing_ramps(upstreams, balancer, tmp_path):
    ups = upstreams(2)
    b = balancer([u.url + f",name=z{i}" for i, u in enumerate(ups)])
    b.control.set_state("z1", "maint")
    b.control.set_state("z1", "ready")
    assert factors(b) == {"z0": None, "z1": None}
    assert b.status()["slow_start_seconds"] == 0


def test_the_dashboard_shows_the_policy_and_the_ramp(upstreams, balancer):
    """Live in Chromium (the page script fills both), and in the page as served (no script)."""
    require_program("chromium")
    from browser import Chromium

    ups = upstreams(2)
    b = balancer([u.url + f",name=d{i}" for i, u in enumerate(ups)], slow_start=30, balance="leastconn",
                 sticky_cookie="lb", admin_port=0)
    b.control.set_state("d1", "maint")
    b.control.set_state("d1", "ready")
    served = get(b.admin_port, "/").body.decode()
    assert '<b id="policy" title="sticky cookie lb: 0 hits, 0 re-picks">leastconn \u00b7 sticky lb \u00b7 slow start 30s</b>' in served
    assert re.search(r'<span class="ss tag">slow start 1\d%</span>', served), served
    with Chromium() as browser:
        browser.open(f"http://127.0.0.1:{b.admin_port}/", timeout=10)
        browser.wait_for("document.documentElement.className === 'js' && "
                         "document.getElementById('live').classList.contains('ok')", timeout=10)
        shown = browser.evaluate(
            "({policy: document.getElementById('policy').textContent,"
            " ramp: [...document.querySelectorAll('tr[data-backend]')].map((tr) =>"
            " [tr.dataset.backend, tr.querySelector('.ss').hidden, tr.querySelector('.ss').textContent])})")
        errors = browser.console_errors()
    assert shown["policy"] == "leastconn \u00b7 sticky lb \u00b7 slow start 30s"
    (name0, hidden0, _), (name1, hidden1, text1) = shown["ramp"]
    assert (name0, hidden0, name1, hidden1) == ("d0", True, "d1", False), shown
    assert re.fullmatch(r"slow start 1\d%", text1), text1
    assert errors == [], errors
