"""Observability: /status, /metrics, the admin listener's HTTP manners and the access log.

What is proved, and how:

* Counting is exact across processes. With ``--workers 2`` (the CLI as a process) and with one
  worker (in-process), N requests on fresh connections (so that the kernel spreads them over both
  workers' sockets) make every one of several /status and /metrics scrapes in a row say exactly N:
  no scrape is answered from one worker's share. A response is counted before its head is sent, so
  a client that has its answer finds it counted: no polling for the totals. A worker killed with
  SIGKILL is replaced (a new pid in /status, ``restarts`` 1) and nothing it counted is lost: N
  right after the kill, N+M after M more requests.
* Health checks run once per balancer, not once per worker: an upstream behind ``--workers 2`` gets
  about one probe per interval (counted by the upstream itself, timestamped as they arrive).
* /metrics is valid Prometheus text 0.0.4: prometheus_client's own parser reads it; every family
  has HELP and TYPE; names follow the conventions; the histogram is cumulative and ends at +Inf;
  label values are escaped. After a workload whose every step is known (a 404 from the app, a 400
  from the balancer, a refused upstream that is retried and ejected, a held slow request), each
  family has exactly the values that workload implies.
* /status has every field Control.status documents, with its type; latency percentiles are null
  before traffic and numbers after; ``?history=1`` adds aligned per-upstream series.
* The admin listener: HEAD is GET without the body (checked on a keep-alive connection, where a
  stray body would corrupt the next response), other methods get 405 with Allow and a JSON body,
  unknown paths 404, and nothing is cacheable.
* The access log formats (short, common, combined, json), read through caplog.

Everything runs over real sockets on 127.0.0.1 with ephemeral ports and socket timeouts (conftest's
clients and upstreams). Where a number is updated just after the client got its answer (bytes,
gauges, log lines: recorded when the request's handler finishes), the test polls with
conftest.wait_until; nothing sleeps to wait. Processes started here are killed by PID in
`finally` (conftest's `cli` fixture also kills their group). The cost of counting is measured in
the benchmark, not here: no assertion here is about time, except the probe rate, which is counted
in probes over a window defined by probe timestamps.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import re
import signal
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import load_balancer as lb
from conftest import (RawClient, SlowUpstreamHandler, alive, default_handler, free_port, get, proc_children,
                      proc_cmdline, refused_url, wait_until, worker_pids)

N = 60
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SAMPLE_LINE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? '
                         r'(\S+)')


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def status(admin_port: int, query: str = "") -> dict:
    r = get(admin_port, "/status" + query)
    assert r.status == 200, r
    assert r.header("Content-Type") == "application/json", r
    return json.loads(r.body)


def scrape(admin_port: int) -> str:
    r = get(admin_port, "/metrics")
    assert r.status == 200, r
    assert r.header("Content-Type") == METRICS_CONTENT_TYPE, r
    return r.body.decode("utf-8")


def parse(text: str) -> dict:
    """{(sample name, frozenset of labels): value}, read by prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in found, f"sample {key} twice"
            found[key] = s.value
    return found


def value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, (key, sorted(k for k in samples if k[0] == name))
    return samples[key]


def labelled(samples: dict, name: str) -> dict:
    """{frozenset of labels: value} of every sample called `name`."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def metrics(admin_port: int) -> dict:
    return parse(scrape(admin_port))


def requests_total(samples: dict) -> float:
    return sum(labelled(samples, "lb_requests_total").values())


def app_handler(h, req):
    """default_handler, except /missing -> 404 and /unavailable -> 503 (answers of the app, which
    the balancer relays and counts under the upstream)."""
    codes = {"/missing": 404, "/unavailable": 503}
    if req.target not in codes:
        return default_handler(h, req)
    body = b"app says no\n"
    h.send_response(codes[req.target])
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def exchange(port: int, data: bytes) -> bytes:
    """Send one request that ends with Connection: close and return every byte of the answer."""
    with RawClient(port) as client:
        client.send(data)
        return client.read_until_close()


def start_cli(cli, ups, *extra: str):
    args = ["--host", "127.0.0.1", "--port", "0", "--admin-port", str(free_port()),
            "--drain-timeout", "3", *extra]
    for u in ups:
        args += ["--backend", u.url]
    p = cli(args).wait_ready()
    assert p.admin_port, p.stderr_text()
    return p


def stop_cli(p, seen_workers: set[int]) -> None:
    """In `finally`: stop the CLI process and any worker of it still alive, each by its PID."""
    if p.proc.poll() is None:
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait(5)
    for pid in seen_workers:
        if alive(pid) and "--worker-process" in proc_cmdline(pid):
            os.kill(pid, signal.SIGKILL)


def assert_exact(admin_port: int, n: int, workers: int, scrapes: int = 4) -> dict:
    """Several /status and /metrics scrapes in a row, each exactly n; the last status."""
    for _ in range(scrapes):
        st = status(admin_port)
        assert st["requests_total"] == n, st
        assert sum(b["requests"] for b in st["backends"]) == n, st["backends"]
        assert sum(w["requests"] for w in st["workers"]) == n, st["workers"]
        assert len(st["workers"]) == workers, st["workers"]
        assert requests_total(metrics(admin_port)) == n
    return st


# ---------------------------------------------------------------------------------------------------
# Exact counts, one process or several
# ---------------------------------------------------------------------------------------------------

def test_two_workers_every_scrape_is_exact(cli, upstreams):
    ups = upstreams(3)
    p = start_cli(cli, ups, "--workers", "2", "--health-interval", "0")
    seen = worker_pids(p.proc.pid)
    try:
        for i in range(N):
            assert get(p.port, f"/n{i}").status == 200
        st = assert_exact(p.admin_port, N, workers=2)
        served = [w["requests"] for w in st["workers"]]
        assert all(s > 0 for s in served), f"one worker served all {N} connections: {st['workers']}"
        seen |= worker_pids(p.proc.pid)
        assert {w["pid"] for w in st["workers"]} == seen, (st["workers"], seen)
        assert st["pid"] == p.proc.pid  # the supervisor answers, for every worker
        samples = metrics(p.admin_port)
        assert value(samples, "lb_workers") == 2
        assert sum(labelled(samples, "lb_upstream_requests_total").values()) == N
    finally:
        stop_cli(p, seen)


def test_killed_worker_is_replaced_and_totals_stay_exact(cli, upstreams):
    ups = upstreams(2)
    p = start_cli(cli, ups, "--workers", "2", "--health-interval", "0")
    seen = worker_pids(p.proc.pid)
    try:
        assert len(seen) == 2, seen
        for i in range(N):
            assert get(p.port, f"/before{i}").status == 200
        st = assert_exact(p.admin_port, N, workers=2, scrapes=2)
        assert all(w["requests"] > 0 for w in st["workers"]), st["workers"]
        victim = st["workers"][0]
        assert victim["pid"] in proc_children(p.proc.pid), (victim, proc_children(p.proc.pid))
        served_by_victim = victim["requests"]
        os.kill(victim["pid"], signal.SIGKILL)
        assert wait_until(lambda: not alive(victim["pid"]), timeout=5)

        def replaced() -> bool:
            w = status(p.admin_port)["workers"][0]
            return w["pid"] not in (0, victim["pid"]) and w["restarts"] == 1 and alive(w["pid"])

        assert wait_until(replaced, timeout=10, interval=0.05), (status(p.admin_port)["workers"],
                                                                 p.stderr_text())
        seen |= worker_pids(p.proc.pid)
        st = assert_exact(p.admin_port, N, workers=2)
        new = st["workers"][0]
        assert new["pid"] in seen, (new, seen)
        assert new["pid"] in proc_children(p.proc.pid)
        assert new["requests"] == served_by_victim, "the dead worker's count was lost"
        assert [w["restarts"] for w in st["workers"]] == [1, 0], st["workers"]
        assert new["connections"] == 0, new  # its gauges were cleared, its counters kept

        m = 20
        for i in range(m):
            assert get(p.port, f"/after{i}").status == 200
        st = assert_exact(p.admin_port, N + m, workers=2)
        assert [w["restarts"] for w in st["workers"]] == [1, 0], st["workers"]
        samples = metrics(p.admin_port)
        assert value(samples, "lb_worker_restarts_total") == 1
        assert sum(labelled(samples, "lb_upstream_requests_total").values()) == N + m
    finally:
        stop_cli(p, seen)


def test_one_worker_every_scrape_is_exact(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url for u in ups], admin_port=free_port())
    for i in range(N):
        assert get(b.port, f"/n{i}").status == 200
    st = assert_exact(b.admin_port, N, workers=1)
    assert [x["requests"] for x in st["backends"]] == [N // 3] * 3, st["backends"]  # strict rotation
    worker, = st["workers"]
    assert (worker["index"], worker["pid"], worker["requests"], worker["restarts"]) == (0, os.getpid(), N, 0), worker


class ProbeRecorder:
    """Upstream handler: /health answers 200 and its arrival time is recorded (others: default)."""

    def __init__(self):
        self.times: list[float] = []
        self.cond = threading.Condition()

    def __call__(self, h, req):
        if req.target == "/health":
            assert "health-check" in (req.header("User-Agent") or "")
            with self.cond:
                self.times.append(time.monotonic())
                self.cond.notify_all()
            h.send_response(200)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        default_handler(h, req)

    def wait_past(self, t: float, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.times and self.times[-1] >= t, timeout)

    def between(self, t0: float, t1: float) -> int:
        with self.cond:
            return sum(1 for t in self.times if t0 <= t < t1)


def test_health_probes_once_per_interval_however_many_workers(cli, upstreams):
    """The checker lives in the supervisor only. Each probe loop is "probe, then wait 0.2 s", so a
    1.2 s window holds 6 probes of one checker (5 to 7 by where the window's edges fall). The lower
    bound 4 allows a loaded machine to stretch two periods by half; the upper bound 8 allows one
    period to be cut short by jitter. A checker per worker would put about 12 in the window: more
    than 8 is the failure this test is for."""
    recorders = [ProbeRecorder(), ProbeRecorder()]
    ups = [upstreams(1, r)[0] for r in recorders]
    p = start_cli(cli, ups, "--workers", "2", "--health-path", "/health", "--health-interval", "0.2")
    seen = worker_pids(p.proc.pid)
    try:
        assert len(seen) == 2, seen
        t0 = time.monotonic()  # both workers are serving from here on
        window = 1.2
        for r in recorders:
            assert r.wait_past(t0 + window, timeout=10), r.times
        counts = [r.between(t0, t0 + window) for r in recorders]
        assert all(4 <= c <= 8 for c in counts), f"probes per upstream in {window} s: {counts}"
        assert worker_pids(p.proc.pid) == seen  # the same two workers all along
    finally:
        stop_cli(p, seen)


# ---------------------------------------------------------------------------------------------------
# /metrics: the format
# ---------------------------------------------------------------------------------------------------

def test_metrics_text_format_and_naming_conventions(upstreams, balancer):
    ups = upstreams(2, app_handler)
    b = balancer([u.url for u in ups], admin_port=free_port())
    for path in ("/a", "/b", "/missing", "/c"):
        get(b.port, path)
    with RawClient(b.port) as client:
        assert client.request(b"GET /x y HTTP/1.1\r\nHost: t\r\n\r\n").status == 400

    r = get(b.admin_port, "/metrics")
    assert r.status == 200 and r.header("Content-Type") == METRICS_CONTENT_TYPE, r
    assert r.header("Cache-Control") == "no-store", r
    text = r.body.decode("utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n")

    # The parser of the Prometheus client library reads it, and every family has HELP and TYPE.
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)

    # The raw text: HELP then TYPE, once per family, right before its samples.
    lines = text.splitlines()
    declared: dict = {}
    current = None
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert METRIC_NAME.fullmatch(name) and help_text.strip(), line
            assert "\\" not in help_text.replace("\\\\", "").replace("\\n", ""), line
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert lines[i - 1].startswith(f"# HELP {name} "), (lines[i - 1], line)
            assert name not in declared, f"family {name} declared twice"
            declared[name] = kind
            current = (name, kind)
        else:
            assert not line.startswith("#"), line
            match = SAMPLE_LINE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            float(match.group(3))
            family, kind = current
            allowed = {family, family + "_bucket", family + "_sum", family + "_count"} \
                if kind == "histogram" else {family}
            assert name in allowed, f"sample {name} under family {family}"

    # Names: lb_ prefix, counters end in _total, only counters do, durations in _seconds, no
    # other units than seconds and bytes.
    assert declared and all(name.startswith("lb_") for name in declared), declared
    for name, kind in declared.items():
        assert name.endswith("_total") == (kind == "counter"), (name, kind)
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert not re.search(r"_(ms|milliseconds|micro\w*|kb|mb|minutes|hours)(_|$)", name), name
    assert declared["lb_request_duration_seconds"] == "histogram"

    # The histogram, per upstream: le ascending to +Inf, counts cumulative, _count == +Inf bucket.
    samples = parse(text)
    buckets: dict = {}
    for labels, v in labelled(samples, "lb_request_duration_seconds_bucket").items():
        labels = dict(labels)
        buckets.setdefault(labels.pop("upstream"), []).append((labels["le"], v))
    assert set(buckets) == {"-", *(f"127.0.0.1:{u.port}" for u in ups)}, buckets
    order = [le for le, _ in sorted(buckets["-"], key=lambda x: float(x[0]))]
    raw_order = re.findall(r'lb_request_duration_seconds_bucket\{upstream="-",le="([^"]+)"\}', text)
    assert raw_order == order and order[-1] == "+Inf", raw_order
    for upstream, pairs in buckets.items():
        pairs.sort(key=lambda x: float(x[0]))
        assert [le for le, _ in pairs] == order, upstream
        counts = [v for _, v in pairs]
        assert all(a <= b for a, b in zip(counts, counts[1:])), (upstream, counts)
        count = value(samples, "lb_request_duration_seconds_count", upstream=upstream)
        total = value(samples, "lb_request_duration_seconds_sum", upstream=upstream)
        assert count == counts[-1], upstream
        assert total > 0 and math.isfinite(total), (upstream, total)
        expected = {"-": 1}.get(upstream, 2)  # 4 requests over 2 upstreams, 1 refused by the balancer
        assert count == expected, (upstream, count)


def test_metrics_label_values_are_escaped(upstreams, balancer):
    """A backend name may hold [ ] ~ : . _ - (the odd characters BACKEND_NAME allows): the label
    reads back as written. The characters that need escaping in the text format (backslash, double
    quote, newline) cannot be in a name, so MetricsWriter is given them directly."""
    up, = upstreams(1)
    odd = "odd[0]~name.x_y-z:1"
    b = balancer([f"{up.url},name={odd}"], admin_port=free_port())
    assert get(b.port, "/").status == 200
    text = scrape(b.admin_port)
    assert f'lb_upstream_requests_total{{upstream="{odd}"}} 1' in text.splitlines(), text
    samples = parse(text)
    assert value(samples, "lb_upstream_requests_total", upstream=odd) == 1
    assert value(samples, "lb_requests_total", upstream=odd, method="GET", code="200") == 1

    writer = lb.MetricsWriter()
    writer.family("t_total", "counter", "A test family.")
    nasty = 'back\\slash "quoted"\nnew line'
    writer.sample("t_total", 1, label=nasty)
    text = writer.text()
    assert 'label="back\\\\slash \\"quoted\\"\\nnew line"' in text, text
    assert value(parse(text), "t_total", label=nasty) == 1


# ---------------------------------------------------------------------------------------------------
# /metrics: the values after a known workload
# ---------------------------------------------------------------------------------------------------

def test_metrics_families_after_known_workload(upstreams, balancer):
    """Backends [app, refused], max_fails=1. Step by step: /ok to the app (200); /retry picks the
    refused one (connect error), goes on to the app (200) and ejects the refused one; /missing is
    the app's 404; a POST to the app (200); a malformed request line, 400 from the balancer."""
    app, = upstreams(1, app_handler)
    dead = refused_url()
    b = balancer([app.url, dead], max_fails=1, fail_timeout=30, admin_port=free_port())
    a_name, r_name = f"127.0.0.1:{app.port}", dead.split("//")[1]
    started = time.time()

    before = metrics(b.admin_port)
    assert labelled(before, "lb_requests_total") == {}
    assert value(before, "lb_upstream_state", upstream=r_name, state="up") == 1

    assert get(b.port, "/ok").status == 200
    assert get(b.port, "/retry").status == 200
    assert get(b.port, "/missing").status == 404
    assert get(b.port, "/p", method="POST", body=b"hello").status == 200
    with RawClient(b.port) as client:
        assert client.request(b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n").status == 400
    assert len(app.requests) == 4

    samples = metrics(b.admin_port)
    assert labelled(samples, "lb_requests_total") == {
        frozenset({"upstream": a_name, "method": "GET", "code": "200"}.items()): 2,
        frozenset({"upstream": a_name, "method": "GET", "code": "404"}.items()): 1,
        frozenset({"upstream": a_name, "method": "POST", "code": "200"}.items()): 1,
        frozenset({"upstream": "-", "method": "other", "code": "400"}.items()): 1,
    }
    assert value(samples, "lb_upstream_requests_total", upstream=a_name) == 4
    assert value(samples, "lb_upstream_requests_total", upstream=r_name) == 1
    for kind in lb.ERROR_KINDS:
        assert value(samples, "lb_upstream_errors_total", upstream=r_name, kind=kind) == (kind == "connect")
        assert value(samples, "lb_upstream_errors_total", upstream=a_name, kind=kind) == 0
    assert value(samples, "lb_upstream_retries_total", upstream=r_name) == 1
    assert value(samples, "lb_upstream_retries_total", upstream=a_name) == 0
    assert value(samples, "lb_upstream_ejections_total", upstream=r_name) == 1
    assert value(samples, "lb_upstream_ejections_total", upstream=a_name) == 0
    for name, current in ((a_name, "up"), (r_name, "ejected")):
        states = {dict(k)["state"]: v for k, v in labelled(samples, "lb_upstream_state").items()
                  if dict(k)["upstream"] == name}
        assert states == {s: int(s == current) for s in ("up", "down", "ejected", "drain", "maint")}, \
            (name, states)
    for name in (a_name, r_name):
        for result in ("passed", "failed"):
            assert value(samples, "lb_health_checks_total", upstream=name, result=result) == 0
        assert value(samples, "lb_upstream_weight", upstream=name) == 1
    assert value(samples, "lb_request_duration_seconds_count", upstream=a_name) == 4
    assert value(samples, "lb_request_duration_seconds_count", upstream="-") == 1
    assert value(samples, "lb_request_duration_seconds_count", upstream=r_name) == 0
    assert value(samples, "lb_client_connections_accepted_total") == 5
    assert value(samples, "lb_tunnels_open") == 0
    assert value(samples, "lb_tunnels_total") == 0
    assert value(samples, "lb_tunnel_bytes_total", direction="client_to_upstream") == 0
    assert value(samples, "lb_tunnel_bytes_total", direction="upstream_to_client") == 0
    assert value(samples, "lb_panic_mode") == 0
    assert value(samples, "lb_workers") == 1
    assert value(samples, "lb_worker_restarts_total") == 0
    assert value(samples, "lb_build_info", version=lb.__version__) == 1
    assert started - 5 <= value(samples, "lb_start_time_seconds") <= started
    # Gauges settle once the handlers have finished their bookkeeping (after the answer).
    assert wait_until(lambda: all(value(metrics(b.admin_port), name, **labels) == 0 for name, labels in (
        ("lb_in_flight_requests", {}), ("lb_client_connections", {}),
        ("lb_upstream_in_flight", {"upstream": a_name}), ("lb_upstream_in_flight", {"upstream": r_name}))),
        timeout=5), scrape(b.admin_port)
    # /status says the same.
    st = status(b.admin_port)
    assert st["requests_total"] == 5
    assert (st["refused_total"], st["failed_total"]) == (1, 0), st
    assert st["responses"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 2, "5xx": 0}, st
    by_name = {x["name"]: x for x in st["backends"]}
    assert by_name[r_name]["errors"]["connect"] == 1 and by_name[r_name]["retries"] == 1
    assert (by_name[r_name]["state"], by_name[r_name]["ejected"], by_name[r_name]["ejections"]) == \
        ("down", True, 1), by_name[r_name]


def test_metrics_health_checks_by_result(upstreams, balancer):
    healthy = ProbeRecorder()

    def sick_handler(h, req):
        h.send_response(500 if req.target == "/health" else 200)
        h.send_header("Content-Length", "0")
        h.end_headers()

    good_up, = upstreams(1, healthy)
    bad_up, = upstreams(1, sick_handler)
    b = balancer([good_up.url, bad_up.url], admin_port=free_port(), health_path="/health",
                 health_interval=0.1, fall=1)
    good, bad = f"127.0.0.1:{good_up.port}", f"127.0.0.1:{bad_up.port}"
    bad_probes = lambda: sum(1 for r in bad_up.requests if r.target == "/health")  # noqa: E731

    def settled() -> bool:
        """A scrape between two probes: what the upstreams received is what was counted."""
        seen_good, seen_bad = len(healthy.times), bad_probes()
        s = metrics(b.admin_port)
        if (len(healthy.times), bad_probes()) != (seen_good, seen_bad) or seen_good < 3:
            return False
        return (value(s, "lb_health_checks_total", upstream=good, result="passed"),
                value(s, "lb_health_checks_total", upstream=bad, result="failed")) == (seen_good, seen_bad)

    assert wait_until(settled, timeout=5), scrape(b.admin_port)
    samples = metrics(b.admin_port)
    assert value(samples, "lb_health_checks_total", upstream=good, result="failed") == 0
    assert value(samples, "lb_health_checks_total", upstream=bad, result="passed") == 0
    assert value(samples, "lb_upstream_state", upstream=bad, state="down") == 1
    assert value(samples, "lb_upstream_state", upstream=bad, state="up") == 0
    assert value(samples, "lb_upstream_state", upstream=good, state="up") == 1
    checks = {x["name"]: x["checks"] for x in status(b.admin_port)["backends"]}
    assert checks[good]["passed"] >= 3 and checks[good]["failed"] == 0, checks
    assert checks[bad]["passed"] == 0 and checks[bad]["failed"] >= 1, checks


def test_metrics_in_flight_gauges_during_held_request(upstreams, balancer):
    slow = SlowUpstreamHandler()
    slow_up, = upstreams(1, slow)
    other, = upstreams(1)
    b = balancer([slow_up.url, other.url], admin_port=free_port())
    slow_name, other_name = f"127.0.0.1:{slow_up.port}", f"127.0.0.1:{other.port}"
    client = RawClient(b.port)
    try:
        client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        assert slow.arrived.wait(5)
        samples = metrics(b.admin_port)
        assert value(samples, "lb_in_flight_requests") == 1
        assert value(samples, "lb_upstream_in_flight", upstream=slow_name) == 1
        assert value(samples, "lb_upstream_in_flight", upstream=other_name) == 0
        assert value(samples, "lb_client_connections") == 1
        assert requests_total(samples) == 0  # not answered yet
        st = status(b.admin_port)
        assert (st["in_flight"], st["connections"]) == (1, 1), st
        slow.release.set()
        assert client.response().status == 200
        assert requests_total(metrics(b.admin_port)) == 1  # counted before its head was sent
        assert wait_until(lambda: value(metrics(b.admin_port), "lb_in_flight_requests") == 0, timeout=5)
        samples = metrics(b.admin_port)
        assert value(samples, "lb_upstream_in_flight", upstream=slow_name) == 0
        assert value(samples, "lb_client_connections") == 1  # keep-alive: still open
        assert value(samples, "lb_upstream_idle_connections", upstream=slow_name) == 1
    finally:
        slow.release.set()
        client.close()
    assert wait_until(lambda: value(metrics(b.admin_port), "lb_client_connections") == 0, timeout=5)


def test_metrics_byte_counters_count_every_byte(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    samples = metrics(b.admin_port)
    assert (value(samples, "lb_received_bytes_total"), value(samples, "lb_sent_bytes_total")) == (0, 0)
    received = sent = 0
    for i in range(3):
        request = f"GET /bytes{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        answer = exchange(b.port, request)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        received, sent = received + len(request), sent + len(answer)
        body = b"x" * 1000
        request = (f"POST /upload{i} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
                   "Connection: close\r\n\r\n").encode() + body
        answer = exchange(b.port, request)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        received, sent = received + len(request), sent + len(answer)

    def counted():
        s = metrics(b.admin_port)
        return value(s, "lb_received_bytes_total"), value(s, "lb_sent_bytes_total")

    assert wait_until(lambda: counted() == (received, sent), timeout=5), (counted(), (received, sent))
    st = status(b.admin_port)
    assert (st["bytes_received"], st["bytes_sent"]) == (received, sent), st


def test_refused_request_with_valid_request_line_is_counted_under_its_method(upstreams, balancer, caplog):
    """A GET without Host is refused (400) by the balancer itself: counted under upstream "-" and
    under its method, GET, which its well-formed request line names (as the access log should)."""
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port(), access_log=True, access_log_format="json")
    with RawClient(b.port) as client:
        assert client.request(b"GET /no-host HTTP/1.1\r\n\r\n").status == 400
    assert labelled(metrics(b.admin_port), "lb_requests_total") == {
        frozenset({"upstream": "-", "method": "GET", "code": "400"}.items()): 1}
    assert wait_until(lambda: access_records(caplog), timeout=5)
    line = json.loads(access_records(caplog)[0].getMessage())
    assert (line["method"], line["target"], line["status"], line["upstream"]) == ("GET", "/no-host", 400, None)


# ---------------------------------------------------------------------------------------------------
# /status
# ---------------------------------------------------------------------------------------------------

STATUS_FIELDS = {
    "version": str, "pid": int, "started": str, "uptime_seconds": float, "listen": str,
    "requests_total": int, "responses": dict, "refused_total": int, "failed_total": int,
    "in_flight": int, "connections": int, "tunnels": dict, "bytes_received": int, "bytes_sent": int,
    "panic": bool, "workers": list, "backends": list,
}
BACKEND_FIELDS = {
    "name": str, "url": str, "weight": int, "backup": bool, "state": str, "health": str,
    "admin": str, "ejected": bool, "reason": str, "since": str, "requests": int, "responses": dict,
    "errors": dict, "retries": int, "in_flight": int, "idle_connections": int,
    "consecutive_failures": int, "ejections": int, "latency_ms": dict, "checks": dict,
}
CLASSES = ["1xx", "2xx", "3xx", "4xx", "5xx"]


def check_types(doc: dict, schema: dict, where: str) -> None:
    missing = set(schema) - set(doc)
    assert not missing, f"{where}: missing {sorted(missing)}"
    for name, kind in schema.items():
        assert type(doc[name]) is kind, f"{where}.{name}: {doc[name]!r} is not {kind.__name__}"


def check_status(st: dict, n_backends: int) -> None:
    check_types(st, STATUS_FIELDS, "status")
    assert re.fullmatch(r"\d+\.\d+\.\d+", st["version"]) and st["version"] == lb.__version__
    started = email.utils.parsedate_to_datetime(st["started"]).timestamp()
    assert time.time() - 60 < started <= time.time()
    assert st["uptime_seconds"] >= 0
    assert list(st["responses"]) == CLASSES and all(type(v) is int for v in st["responses"].values())
    assert set(st["tunnels"]) == {"open", "total", "bytes_from_client", "bytes_from_upstream"}
    assert all(type(v) is int for v in st["tunnels"].values()), st["tunnels"]
    for w in st["workers"]:
        check_types(w, {"index": int, "pid": int, "connections": int, "requests": int, "restarts": int},
                    "worker")
    assert len(st["backends"]) == n_backends
    for x in st["backends"]:
        check_types(x, BACKEND_FIELDS, f"backend {x.get('name')}")
        assert x["state"] in ("up", "down", "drain", "maint"), x
        assert x["health"] in ("unchecked", "up", "down") and x["admin"] in ("ready", "drain", "maint"), x
        email.utils.parsedate_to_datetime(x["since"])
        assert list(x["responses"]) == CLASSES
        assert list(x["errors"]) == list(lb.ERROR_KINDS)
        assert all(type(v) is int for v in [*x["responses"].values(), *x["errors"].values()]), x
        assert set(x["latency_ms"]) == {"p50", "p99"} and set(x["checks"]) == {"passed", "failed"}, x


def test_status_fields_types_and_counts(upstreams, balancer, raw_upstream):
    """Backends [app1, garbage, app2]: the garbage one answers something that is not HTTP, which
    the balancer turns into its own 502 (never retried; one failure, so no summary log line
    outlives the test). Requests in rotation order: /a (app1 200), /b (garbage: 502), /missing
    (app2 404), a GET without Host (400 by the balancer, no upstream picked), /unavailable (app1
    503). refused_total and failed_total count only the balancer's own 4xx and 5xx."""
    app1, app2 = upstreams(2, app_handler)

    def garbage(conn, upstream):
        while upstream.read_request(conn):
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    bad = raw_upstream(garbage)
    b = balancer([app1.url, bad.url, app2.url], admin_port=free_port())
    st = status(b.admin_port)
    check_status(st, 3)
    assert st["pid"] == os.getpid()
    assert (st["requests_total"], st["refused_total"], st["failed_total"]) == (0, 0, 0)
    assert st["responses"] == dict.fromkeys(CLASSES, 0)
    assert (st["in_flight"], st["connections"], st["bytes_received"], st["bytes_sent"]) == (0, 0, 0, 0)
    assert st["tunnels"] == {"open": 0, "total": 0, "bytes_from_client": 0, "bytes_from_upstream": 0}
    assert st["panic"] is False
    for x in st["backends"]:
        assert x["latency_ms"] == {"p50": None, "p99": None}, x  # nothing measured yet
        assert (x["state"], x["health"], x["admin"], x["ejected"]) == ("up", "unchecked", "ready", False)
        assert (x["weight"], x["backup"], x["reason"]) == (1, False, "no active checks"), x

    statuses = [get(b.port, path).status for path in ("/a", "/b", "/missing")]
    with RawClient(b.port) as client:
        statuses.append(client.request(b"GET / HTTP/1.1\r\n\r\n").status)
    statuses.append(get(b.port, "/unavailable").status)
    assert statuses == [200, 502, 404, 400, 503]

    st = status(b.admin_port)
    check_status(st, 3)
    assert st["requests_total"] == 5
    assert st["responses"] == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 2, "5xx": 2}, st["responses"]
    assert (st["refused_total"], st["failed_total"]) == (1, 1), st  # the balancer's own 4xx and 5xx
    assert st["workers"][0]["requests"] == 5 and st["workers"][0]["pid"] == os.getpid()
    a1, g, a2 = st["backends"]
    assert (a1["url"], g["url"], a2["url"]) == (app1.url, bad.url, app2.url)
    assert a1["requests"] == 2 and a1["responses"] == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1}, a1
    assert a2["requests"] == 1 and a2["responses"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 0}, a2
    assert sum(a1["errors"].values()) == sum(a2["errors"].values()) == 0
    assert g["requests"] == 1 and sum(g["responses"].values()) == 0, g  # its 502 is the balancer's
    assert g["errors"] == {**dict.fromkeys(lb.ERROR_KINDS, 0), "invalid": 1}, g["errors"]
    assert (g["consecutive_failures"], g["retries"], g["ejections"], g["state"]) == (1, 0, 0, "up"), g
    for x in (a1, a2):
        p50, p99 = x["latency_ms"]["p50"], x["latency_ms"]["p99"]
        assert type(p50) is float and type(p99) is float and 0 < p50 <= p99, x["latency_ms"]
    assert g["latency_ms"] == {"p50": None, "p99": None}, g  # it never answered
    assert "history" not in st


def test_status_listen_names_the_port_listened_on(upstreams, balancer):
    """Started with port 0 (any free port), /status says which port it got, as the supervisor's
    /status does for --workers N (and the dashboard shows it in its header and title)."""
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    assert b.config.port == 0 and b.port != 0
    assert status(b.admin_port)["listen"] == f"http://127.0.0.1:{b.port}"


def test_status_history_series(upstreams, balancer):
    ups = upstreams(2)
    b = balancer([u.url for u in ups], admin_port=free_port())
    for i in range(4):
        assert get(b.port, f"/h{i}").status == 200
    answered = time.time()
    # The sampler takes one sample at start and then one a second (on the second: one may fall
    # between two of the requests): wait for one taken after the last of them.
    assert wait_until(lambda: status(b.admin_port, "?history=1")["history"]["t"][-1] >= answered, timeout=5)
    st = status(b.admin_port, "?history=1")
    check_status(st, 2)
    h = st["history"]
    assert h["interval_seconds"] == 1
    t = h["t"]
    assert all(isinstance(x, float) for x in t) and t == sorted(t) and len(set(t)) == len(t), t
    assert time.time() - 60 < t[0] and t[-1] <= time.time()
    assert set(h["backends"]) == {f"127.0.0.1:{u.port}" for u in ups}
    for name, series in h["backends"].items():
        assert set(series) == {"requests", "errors", "p99_ms"}, series
        assert all(len(v) == len(t) for v in series.values()), (name, series, t)
        assert series["requests"][0] == 0 and series["requests"][-1] == 2, (name, series)
        assert series["errors"] == [0] * len(t), series
        assert series["p99_ms"][0] is None
    assert "history" not in status(b.admin_port)
    assert "history" not in status(b.admin_port, "?history=0")


# ---------------------------------------------------------------------------------------------------
# The admin listener's HTTP manners
# ---------------------------------------------------------------------------------------------------

ADMIN_PAGES = ("/", "/status", "/metrics")


def test_admin_head_is_get_without_body(upstreams, balancer):
    ups = upstreams(1)
    b = balancer([u.url for u in ups], admin_port=free_port())
    for path in ADMIN_PAGES:
        with RawClient(b.admin_port) as client:
            head = client.request(f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode(), method="HEAD")
            # Same connection: a body after the HEAD response would be read as this one's head.
            full = client.request(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            assert client.read_until_close() == b"", path
        assert head.status == full.status == 200, (path, head, full)
        assert head.body == b""
        assert [n for n, _ in head.fields] == [n for n, _ in full.fields if n != "Connection"], (path, head, full)
        for name in ("Content-Type", "Cache-Control", "X-Content-Type-Options", "Server"):
            assert head.header(name) == full.header(name), (path, name)
        assert head.header("Cache-Control") == "no-store"
        assert int(head.header("Content-Length")) > 0
        if path == "/metrics":  # nothing changes between the two: the same length exactly
            assert int(head.header("Content-Length")) == len(full.body)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "POST", "OPTIONS"])
def test_admin_other_methods_get_405_with_allow(upstreams, balancer, method):
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    for path in ("/status", "/metrics"):
        r = get(b.admin_port, path, method=method, headers={"Content-Length": "0"})
        assert r.status == 405, (method, path, r)
        assert r.header("Allow") == "GET, HEAD", r
        assert r.header("Content-Type") == "application/json" and r.header("Cache-Control") == "no-store", r
        doc = json.loads(r.body)
        assert doc["status"] == 405 and method in doc["error"], doc
    r = get(b.admin_port, "/", method=method, headers={"Content-Length": "0"})
    assert r.status == 405 and r.header("Allow") == "GET, HEAD", r
    assert r.header("Content-Type") == "text/plain; charset=utf-8" and r.header("Cache-Control") == "no-store", r


def test_admin_unknown_path_404_and_no_store_everywhere(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    for path in ("/nope", "/status/extra", "/metrics/", "/favicon.ico"):
        r = get(b.admin_port, path)
        assert r.status == 404, (path, r)
        assert r.header("Cache-Control") == "no-store", r
    r = get(b.admin_port, "/backends/nope/explode", method="POST", headers={"Content-Length": "0"})
    assert r.status == 404 and r.header("Content-Type") == "application/json", r
    assert r.header("Cache-Control") == "no-store" and json.loads(r.body)["status"] == 404, r
    for path in (*ADMIN_PAGES, "/status?history=1", "/index.html"):
        r = get(b.admin_port, path)
        assert r.status == 200 and r.header("Cache-Control") == "no-store", (path, r)


# ---------------------------------------------------------------------------------------------------
# Access log formats
# ---------------------------------------------------------------------------------------------------

APACHE_COMMON = re.compile(r'(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}'
                           r':\d{2}:\d{2}:\d{2} [+-]\d{4})\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
                           r'(?P<bytes>\d+|-)')
APACHE_COMBINED = re.compile(APACHE_COMMON.pattern + r' "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"')


def access_records(caplog) -> list:
    return [r for r in caplog.records if r.name == "load_balancer.access"]


def logged_line(b, caplog, path: str, headers: dict | None = None):
    """One request through the balancer, and its access log line once written (after the answer)."""
    r = get(b.port, path, headers=headers)
    assert wait_until(lambda: any(path in rec.getMessage() for rec in access_records(caplog)), timeout=5)
    lines = [rec.getMessage() for rec in access_records(caplog) if path in rec.getMessage()]
    assert len(lines) == 1, lines
    return r, lines[0]


def test_access_log_json(upstreams, balancer, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([f"{up.url},name=app"], access_log=True, access_log_format="json")
    request = b"GET /json-line?q=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: probe/1\r\nConnection: close\r\n\r\n"
    answer = exchange(b.port, request)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert wait_until(lambda: access_records(caplog), timeout=5)
    records = access_records(caplog)
    assert len(records) == 1
    line = json.loads(records[0].getMessage())
    assert line["upstream"] == "app"
    assert line["upstream_address"] == f"127.0.0.1:{up.port}"
    assert line["upstream_status"] == 200 and line["status"] == 200
    assert (line["method"], line["target"], line["version"]) == ("GET", "/json-line?q=1", "HTTP/1.1")
    assert line["client"] == "127.0.0.1" and line["user_agent"] == "probe/1" and line["referer"] is None
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert line["bytes_sent"] == len(answer), (line, len(answer))
    assert line["bytes_received"] == len(request)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"]), line["time"]
    assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"]), line
    assert up.requests[0].header("X-Request-ID") == line["request_id"]
    assert f"\r\nX-Request-ID: {line['request_id']}\r\n".encode() in answer, answer

    with RawClient(b.port) as client:
        assert client.request(b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n").status == 400
    assert wait_until(lambda: len(access_records(caplog)) == 2, timeout=5)
    refused = json.loads(access_records(caplog)[1].getMessage())
    assert (refused["status"], refused["upstream"], refused["upstream_address"],
            refused["upstream_status"], refused["request_id"]) == (400, None, None, None, None), refused


@pytest.mark.parametrize("request_ids", [True, False], ids=["with-request-id", "request-ids-off"])
@pytest.mark.parametrize("style", ["common", "combined"])
def test_access_log_common_and_combined_match_apache(upstreams, balancer, caplog, style, request_ids):
    # Rule: Apache's format, then the request ID (the one the response carries); with request IDs
    # off (--request-id-header ''), exactly Apache's format.
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True, access_log_format=style,
                 request_id_header="X-Request-ID" if request_ids else "")
    r, line = logged_line(b, caplog, f"/{style}-line", headers={"User-Agent": "probe/2",
                                                                "Referer": "http://ref.example/"})
    pattern = (APACHE_COMBINED if style == "combined" else APACHE_COMMON).pattern
    match = re.fullmatch(pattern + (r" (?P<request_id>[0-9a-f]{32})" if request_ids else ""), line)
    assert match, line
    if request_ids:
        assert match["request_id"] == r.header("X-Request-ID"), (line, r)
    else:
        assert r.header("X-Request-ID") is None, r
    assert match["host"] == "127.0.0.1" and match["request"] == f"GET /{style}-line HTTP/1.1"
    assert match["status"] == "200"
    # %b in Apache's common format and nginx's $body_bytes_sent: the body, without the head.
    assert match["bytes"] == str(len(r.body)), (line, len(r.body))
    if style == "combined":
        assert (match["referer"], match["agent"]) == ("http://ref.example/", "probe/2"), line


def test_access_log_short_is_the_old_line(upstreams, balancer, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True)
    assert b.config.access_log_format == "short"
    r, line = logged_line(b, caplog, "/short-line")
    assert re.fullmatch(rf'127\.0\.0\.1 "GET /short-line HTTP/1\.1" 200 {re.escape(up.url)} \d+\.\dms '
                        + re.escape(r.header("X-Request-ID")), line), line


def test_access_log_short_without_request_ids_is_the_old_line(upstreams, balancer, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], access_log=True, request_id_header="")
    _, line = logged_line(b, caplog, "/short-line")
    assert re.fullmatch(rf'127\.0\.0\.1 "GET /short-line HTTP/1\.1" 200 {re.escape(up.url)} \d+\.\dms', line), line


def test_access_log_off_writes_no_line(upstreams, balancer, caplog):
    """access_log=False (the default): no access line, even where the logger would take INFO."""
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    assert get(b.port, "/quiet").status == 200
    # The line would be written before the handler lets go of its connection.
    assert wait_until(lambda: status(b.admin_port)["connections"] == 0, timeout=5)
    assert access_records(caplog) == [], [r.getMessage() for r in access_records(caplog)]
