"""Operations: what an operator does to a running balancer, proved end to end through real sockets.

What is proved, and how:

* Weighted and backup rotation: over one keep-alive client connection, weights 3,1,1 give exactly
  ``a b a c a`` again and again, and a reload that changes the weights changes the cycle; a backup
  gets nothing while a primary is up, every request (200) once every primary refuses connects
  (before any ejection: a request goes on to the backup after its connects to every primary
  failed), and nothing again once the primaries listen again and their ejections ended.
* Reload under load (``--backends-file``, ``--workers 1`` and ``--workers 2``): four client threads
  (two opening a connection per request, two keep-alive) send requests without pause while the test
  rewrites the file and sends SIGHUP eleven times (ten good files that add, remove and re-weight
  upstreams, and one whose line 3 does not parse). Every request is answered 200, by an upstream
  that was in the set during the request (each request's target is unique; the upstream records
  when it arrived, the test when it sent it, when it sent each SIGHUP and when it saw the log line:
  a request that started after a removal was logged never reaches the removed upstream). Each
  reload's log line names exactly the added, removed and changed upstreams; after each one the
  test waits until a newly added upstream is reached. The broken file changes nothing, and the log
  names the file, line 3 and the reason. A slow request in flight at an upstream that a reload
  removes finishes with 200, and the balancer then closes its connections to that upstream
  (/proc/net/tcp shows none established).
* The admin API: drain (the slow request in flight finishes 200, no new request reaches the
  upstream, /status says state and admin "drain" and in_flight goes to 0), maint (out at once, idle
  upstream connections closed without waiting for other traffic, health checks go on), ready
  (traffic returns), 404 JSON for an unknown name; with ``--workers 2`` a drain holds in every
  worker (both workers serve requests, none reaches the drained upstream) and survives a SIGHUP
  that keeps the upstream. POSTs from another origin (Origin, Sec-Fetch-Site cross-site or
  same-site) get 403 and change nothing, a same-origin one is allowed; with a token a POST without
  it or with a wrong one gets 401, with it 200. A non-loopback --admin-host without a token is
  refused at start-up with one error line (exit 2); with a token, Config accepts it (nothing bound).
* Signals: SIGUSR1 is logged and changes nothing (one and two workers: same PIDs, requests
  succeed), SIGHUP without a file logs that the backends stay; a second SIGTERM during a drain
  (slow request in flight, --drain-timeout 10) ends the process within about a second and the
  slow request's client sees its connection end; SIGQUIT drains like SIGTERM and exits 0.
* Processes: after SIGKILL of the supervisor (--workers 2) every worker it had is gone within 2 s;
  a second balancer on the port of a running one exits 1 with one error line naming the holder's
  PID and lock file, and the first keeps serving with only its own listeners on the port.

Every socket is on 127.0.0.1 with a timeout; waiting is on events, log lines or wait_until polls,
never a fixed sleep. Processes are signalled by PID only; conftest's `cli` fixture kills what is
left by process group at teardown, and the SIGKILL test kills leftover workers by PID.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import load_balancer as lb
from conftest import (SLACK, SOCKET_TIMEOUT, RawClient, SlowUpstreamHandler, all_workers_listening, alive,
                      default_handler, free_port, get, listening_inodes, must_get, port_of, refuses,
                      socket_inodes, wait_until, worker_pids)

# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def keepalive_get(client: RawClient, target: str):
    return client.request(f"GET {target} HTTP/1.1\r\nHost: test.local\r\n\r\n".encode())


def admin_request(port: int, method: str, path: str, headers: dict | None = None):
    """One admin request with Host: 127.0.0.1:<port> (the listener's own origin)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if method == "POST":
        lines.append("Content-Length: 0")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with RawClient(port) as client:
        return client.request(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), method)


def admin_post(port: int, name: str, action: str, headers: dict | None = None):
    return admin_request(port, "POST", f"/backends/{name}/{action}", headers)


def status(admin_port: int) -> dict:
    r = admin_request(admin_port, "GET", "/status")
    assert r.status == 200, r
    return json.loads(r.body)


def backend_status(admin_port: int, name: str) -> dict:
    return next(b for b in status(admin_port)["backends"] if b["name"] == name)


def json_of(r) -> dict:
    assert r.header("Content-Type") == "application/json", r
    return json.loads(r.body)


def cli_args(*extra: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", "0", "--health-interval", "0", *extra]


def start_cli(cli, args: list[str], workers: int = 1):
    p = cli([*args, "--workers", str(workers)]).wait_ready()
    if workers > 1:
        assert wait_until(lambda: all_workers_listening(p, workers), timeout=5), p.stderr_text()
    return p


def lines_with(p, needle: str) -> list[str]:
    return [line for line in p.stderr_text().splitlines() if needle in line]


def wait_for_nth_line(p, needle: str, n: int, timeout: float = 5.0) -> str:
    """The n-th (1-based) stderr line containing `needle`, once it has been logged."""
    assert wait_until(lambda: len(lines_with(p, needle)) >= n, timeout=timeout), \
        f"no {n}th line with {needle!r}; stderr:\n{p.stderr_text()}"
    return lines_with(p, needle)[n - 1]


def established_to(port: int) -> int:
    """TCP connections (IPv4) established from any local socket to 127.0.0.1:port."""
    count = 0
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def write_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Timed:
    """Upstream handler wrapper: records (monotonic arrival time, target) of each request, then
    lets `inner` answer."""

    def __init__(self, inner=default_handler):
        self.inner = inner
        self.arrivals: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, h, req) -> None:
        with self.lock:
            self.arrivals.append((time.monotonic(), req.target))
        self.inner(h, req)

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.arrivals)

    def reached_after(self, t: float) -> bool:
        return any(when > t for when, _ in self.snapshot())


class KeepAliveUpstream:
    """A raw upstream that answers every request 200 (keep-alive, X-Upstream-Port) and sets
    `closed` when the balancer closes a connection that carried at least one request (a health
    check's bare connect does not count)."""

    def __init__(self, raw_upstream):
        self.closed = threading.Event()
        self.served = 0
        self.up = raw_upstream(self.serve)
        self.port, self.url = self.up.port, self.up.url

    def serve(self, conn: socket.socket, up) -> None:
        requests = 0
        try:
            while True:
                data = up.read_request(conn)
                if not data:
                    break
                requests += 1
                self.served += 1
                body = f"upstream {up.port}\n".encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Upstream-Port: %d\r\n\r\n"
                             % (len(body), up.port) + body)
        except socket.timeout:
            return  # still open after SOCKET_TIMEOUT: not closed by the balancer
        except ConnectionResetError:
            pass
        if requests:
            self.closed.set()


# ---------------------------------------------------------------------------------------------------
# Weighted and backup rotation, end to end
# ---------------------------------------------------------------------------------------------------

def test_weights_3_1_1_give_a_b_a_c_a_on_one_connection_and_a_reload_reweights(
        upstreams, balancer, tmp_path):
    a, b, c = upstreams(3)
    names = {a.port: "a", b.port: "b", c.port: "c"}
    path = tmp_path / "backends"
    path.write_text(f"{a.url},weight=3,name=a\n{b.url},name=b\n{c.url},name=c\n")
    lb_ = balancer([], backends_file=str(path))
    with RawClient(lb_.port) as client:
        seen = "".join(names[port_of(keepalive_get(client, f"/w{i}"))] for i in range(15))
        assert seen == "abaca" * 3
        # 15 picks: the counter is at a cycle boundary of the next cycle too (5 long)
        path.write_text(f"{a.url},name=a\n{b.url},name=b\n{c.url},weight=3,name=c\n")
        lb_.reload()
        seen = "".join(names[port_of(keepalive_get(client, f"/r{i}"))] for i in range(10))
        assert seen == "cacbc" * 2
    assert [len(u.requests) for u in (a, b, c)] == [3 * 3 + 2 * 1, 3 + 2, 3 + 2 * 3]


def test_backup_only_while_every_primary_refuses_and_not_after_they_are_back(upstreams, balancer):
    a, b, backup = upstreams(3)
    # pool_size 0: every request connects afresh, so a stopped upstream (no listener) refuses it
    # instead of answering over a pooled connection its server thread still serves.
    lb_ = balancer([f"{a.url},name=a", f"{b.url},name=b", f"{backup.url},backup,name=c"],
                   admin_port=0, pool_size=0, fail_timeout=0.5)
    with RawClient(lb_.port) as client:
        ports = [port_of(keepalive_get(client, f"/up{i}")) for i in range(6)]
        assert ports == [a.port, b.port] * 3
        assert backup.requests == []

        a.stop()
        b.stop()
        r = keepalive_get(client, "/first-after-stop")
        assert r.status == 200 and port_of(r) == backup.port, r
        # that request went on to the backup after one failed connect to each primary, with no
        # ejection yet (max_fails 5)
        for name in ("a", "b"):
            state = backend_status(lb_.admin_port, name)
            assert (state["ejected"], state["errors"]["connect"]) == (False, 1), state
        for i in range(12):
            r = keepalive_get(client, f"/down{i}")
            assert r.status == 200 and port_of(r) == backup.port, r
        assert len(backup.requests) == 13

        a.start()
        b.start()
        assert wait_until(lambda: all(backend_status(lb_.admin_port, n)["state"] == "up"
                                      for n in ("a", "b")), timeout=5), status(lb_.admin_port)
        ports = [port_of(keepalive_get(client, f"/back{i}")) for i in range(8)]
        assert sorted(ports) == sorted([a.port, b.port] * 4), ports
        assert len(backup.requests) == 13


# ---------------------------------------------------------------------------------------------------
# Reload under load
# ---------------------------------------------------------------------------------------------------

class Load:
    """Client threads sending GETs with unique targets until stopped: `fresh` of them open a
    connection per request, `keepalive` of them reuse one. Records (start, end, target, status,
    upstream port, error) per request."""

    def __init__(self, port: int, fresh: int = 2, keepalive: int = 2):
        self.port = port
        self.stop = threading.Event()
        self.records: list[tuple] = []
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(f"f{i}", False), daemon=True)
                        for i in range(fresh)]
        self.threads += [threading.Thread(target=self.run, args=(f"k{i}", True), daemon=True)
                         for i in range(keepalive)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(SOCKET_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self.threads)

    def note(self, target: str) -> float:
        t0 = time.monotonic()
        with self.lock:
            self.started[target] = t0
        return t0

    def record(self, *row) -> None:
        with self.lock:
            self.records.append(row)

    def completed_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for row in self.records if row[0] > t)

    def run(self, name: str, keepalive: bool) -> None:
        client = None
        seq = 0
        while not self.stop.is_set():
            seq += 1
            target = f"/{name}/{seq}"
            t0 = self.note(target)
            try:
                if keepalive:
                    if client is None:
                        client = RawClient(self.port)
                    r = keepalive_get(client, target)
                else:
                    r = get(self.port, target)
                port = int(r.header("X-Upstream-Port") or 0)
                self.record(t0, time.monotonic(), target, r.status, port, None)
            except Exception as error:  # noqa: BLE001 - every failure is a finding
                self.record(t0, time.monotonic(), target, None, None, repr(error))
                if client is not None:
                    client.close()
                    client = None
        if client is not None:
            client.close()


def backends_text(plan: dict, ups: dict) -> str:
    lines = ["# written by test_operations"]
    for name, weight in plan.items():
        lines.append(f"{ups[name].url},name={name}" + (f",weight={weight}" if weight != 1 else ""))
    return "\n".join(lines) + "\n"


# Each step: the backends {name: weight} of a good file, or None for a file whose line 3 is bad.
RELOAD_PLAN = [
    {"n0": 1, "n1": 1, "n2": 1},                       # add n2, remove s (slow request in flight)
    {"n0": 3, "n1": 1, "n2": 1},                       # re-weight n0
    {"n0": 3, "n2": 1, "n3": 1},                       # add n3, remove n1
    None,                                              # broken: nothing changes
    {"n2": 1, "n3": 1, "n4": 1},                       # add n4, remove n0
    {"n2": 2, "n3": 1, "n4": 1, "n0": 1},              # add n0 again, re-weight n2
    {"n3": 1, "n4": 1, "n0": 1, "n1": 1},              # add n1 again, remove n2
    {"n4": 2, "n0": 1, "n1": 1},                       # remove n3, re-weight n4
    {"n0": 1, "n1": 1, "n2": 1, "n4": 1},              # add n2 again, re-weight n4
    {"n1": 2, "n2": 1, "n3": 1},                       # add n3 again, remove n0 and n4, re-weight n1
    {"n1": 1, "n2": 1, "n3": 1, "n4": 3},              # add n4 again, re-weight n1 and n4
]
INITIAL = {"s": 1, "n0": 1, "n1": 1}  # s first: the first request of each worker goes to it


def parse_reload_line(line: str) -> tuple[int, set, set, set]:
    m = re.search(r"SIGHUP: .* read again: (\d+) backend\(s\); added: (.*); removed: (.*); "
                  r"changed: (.*)$", line)
    assert m, line

    def names(text: str) -> set:
        return set() if text == "none" else set(text.split(", "))

    return int(m.group(1)), names(m.group(2)), names(m.group(3)), names(m.group(4))


@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_reload_under_load_loses_nothing_and_serves_each_new_set(workers, cli, upstreams, tmp_path):
    slow = SlowUpstreamHandler()
    timed = {name: Timed() for name in ("n0", "n1", "n2", "n3", "n4")}
    timed["s"] = Timed(slow)
    ups = {name: upstreams(1, handler)[0] for name, handler in timed.items()}
    by_port = {u.port: name for name, u in ups.items()}
    path = tmp_path / "backends"
    write_file(path, backends_text(INITIAL, ups))
    load = busy = None
    try:
        p = start_cli(cli, cli_args("--backends-file", str(path), "--drain-timeout", "5"), workers)
        # the first pick of every worker is s: the slow request is held there
        busy = RawClient(p.port)
        load = Load(p.port)
        load.note("/slow")
        busy.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n\r\n")
        assert slow.arrived.wait(5), p.stderr_text()
        load.start()
        assert wait_until(lambda: load.completed_since(0) >= 8, timeout=5), load.records

        configs = [(INITIAL, -math.inf)]   # (backends, when the SIGHUP that made them was sent)
        seen = []                          # when each good reload's log line was seen
        for step, plan in enumerate(RELOAD_PLAN, 1):
            previous = configs[-1][0]
            if plan is None:
                broken = ups["n4"].url + ",weight=0"
                write_file(path, f"# broken on purpose\n{ups['n0'].url},name=n0\n{broken}\n")
            else:
                write_file(path, backends_text(plan, ups))
            sent = time.monotonic()
            os.kill(p.proc.pid, signal.SIGHUP)
            line = wait_for_nth_line(p, "SIGHUP:", step)
            logged = time.monotonic()
            if plan is None:
                assert " ERROR " in line, line
                assert line.endswith(
                    f"SIGHUP: {path}, line 3: invalid backend {broken!r}: weight must be 1-256, "
                    f"got '0'; the previous {len(previous)} backend(s) stay"), line
            else:
                count, added, removed, changed = parse_reload_line(line)
                assert (count, added, removed, changed) == (
                    len(plan), plan.keys() - previous.keys(), previous.keys() - plan.keys(),
                    {n for n in plan.keys() & previous.keys() if plan[n] != previous[n]}), line
                configs.append((plan, sent))
                seen.append(logged)
                for name in added:  # the new set is served
                    assert wait_until(lambda: timed[name].reached_after(logged), timeout=5), \
                        (step, name, p.stderr_text())
            # traffic that started after this reload was logged has gone through
            assert wait_until(lambda: load.completed_since(logged) >= 6, timeout=5), step
            if step == 1:
                # s was removed with its slow request in flight: the request finishes, 200 from s
                slow.release.set()
                r = busy.response()
                load.record(load.started["/slow"], time.monotonic(), "/slow", r.status, port_of(r), None)
                assert r.status == 200 and port_of(r) == ups["s"].port, r
                busy.close()
                # and its connections close once its request is over (idle ones in the other
                # worker at its next pick)
                assert wait_until(lambda: established_to(ups["s"].port) == 0, timeout=5), \
                    established_to(ups["s"].port)
        load.finish()

        failed = [row for row in load.records if row[3] != 200]
        assert failed == [], failed[:10]
        assert len(load.records) >= 100, len(load.records)
        # every request reached an upstream in the set at some moment during the request: config
        # i was possibly in force from the SIGHUP that made it to the log line of the next one
        windows = [(names, start, seen[i] if i < len(seen) else math.inf)
                   for i, (names, start) in enumerate(configs)]
        arrived_at = {}
        for name, t in timed.items():
            for when, target in t.snapshot():
                assert target not in arrived_at, target
                arrived_at[target] = (name, when)
                t0 = load.started[target]
                assert any(name in names and begin <= when and t0 <= end
                           for names, begin, end in windows), \
                    (f"{target} reached {name} at {when:.3f}, sent at {t0:.3f}, but {name} was not "
                     f"in the set then", [(sorted(n), b, e) for n, b, e in windows])
        for t0, t1, target, status_, port, _ in load.records:
            assert arrived_at[target][0] == by_port[port], (target, arrived_at[target], port)
        assert p.stop(signal.SIGTERM) == 0, p.stderr_text()
        assert "Traceback" not in p.stderr_text(), p.stderr_text()
    finally:
        slow.release.set()
        if load is not None:
            load.stop.set()
        if busy is not None:
            busy.close()


# ---------------------------------------------------------------------------------------------------
# The admin API: drain, maint, ready
# ---------------------------------------------------------------------------------------------------

def test_drain_lets_the_slow_request_finish_then_maint_then_ready(upstreams, balancer):
    slow = SlowUpstreamHandler()
    a, = upstreams(1, slow)
    b, = upstreams(1)
    lb_ = balancer([f"{a.url},name=a", f"{b.url},name=b"], admin_port=0)
    admin = lb_.admin_port
    try:
        with RawClient(lb_.port) as busy:
            busy.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n\r\n")
            assert slow.arrived.wait(5)

            r = admin_post(admin, "a", "drain")
            assert r.status == 200, r
            doc = json_of(r)
            assert (doc["name"], doc["state"], doc["admin"], doc["in_flight"]) == ("a", "drain", "drain", 1)

            for i in range(8):
                r = get(lb_.port, f"/while-draining{i}")
                assert r.status == 200 and port_of(r) == b.port, r
            assert [req.target for req in a.requests] == ["/slow"]
            doc = backend_status(admin, "a")
            assert (doc["state"], doc["admin"], doc["in_flight"]) == ("drain", "drain", 1), doc

            slow.release.set()
            r = busy.response()
            assert r.status == 200 and r.body == f"upstream {a.port} GET /slow\n".encode(), r
        assert wait_until(lambda: backend_status(admin, "a")["in_flight"] == 0, timeout=5), \
            backend_status(admin, "a")
        assert backend_status(admin, "a")["state"] == "drain"

        r = admin_post(admin, "a", "maint")
        assert r.status == 200, r
        assert (json_of(r)["state"], json_of(r)["admin"]) == ("maint", "maint"), r
        for i in range(4):
            r = get(lb_.port, f"/maint{i}")
            assert r.status == 200 and port_of(r) == b.port, r
        assert len(a.requests) == 1

        r = admin_post(admin, "a", "ready")
        assert r.status == 200, r
        assert (json_of(r)["state"], json_of(r)["admin"]) == ("up", "ready"), r
        ports = [port_of(get(lb_.port, f"/ready{i}")) for i in range(6)]
        assert sorted(ports) == sorted([a.port, b.port] * 3), ports

        r = admin_post(admin, "nope", "drain")
        assert r.status == 404, r
        assert json_of(r) == {"error": "no backend named 'nope'", "status": 404}
    finally:
        slow.release.set()


def test_maint_takes_an_upstream_out_at_once_and_health_checks_go_on(upstreams, balancer, raw_upstream):
    a = KeepAliveUpstream(raw_upstream)
    b, = upstreams(1)
    lb_ = balancer([f"{a.url},name=a", f"{b.url},name=b"], admin_port=0, health_interval=0.1)
    admin = lb_.admin_port
    with RawClient(lb_.port) as client:
        assert [port_of(keepalive_get(client, f"/{i}")) for i in range(2)] == [a.port, b.port]
        r = admin_post(admin, "a", "maint")
        assert r.status == 200 and json_of(r)["state"] == "maint", r
        checks = json_of(r)["checks"]["passed"]
        for i in range(6):
            r = keepalive_get(client, f"/maint{i}")
            assert r.status == 200 and port_of(r) == b.port, r
    assert a.served == 1
    assert wait_until(lambda: backend_status(admin, "a")["checks"]["passed"] >= checks + 2, timeout=5), \
        backend_status(admin, "a")
    doc = backend_status(admin, "a")
    assert (doc["state"], doc["admin"], doc["health"]) == ("maint", "maint", "up"), doc


def test_maint_closes_idle_upstream_connections_without_waiting_for_traffic(
        upstreams, balancer, raw_upstream):
    a = KeepAliveUpstream(raw_upstream)
    b, = upstreams(1)
    lb_ = balancer([f"{a.url},name=a", f"{b.url},name=b"], admin_port=0)
    with RawClient(lb_.port) as client:
        assert port_of(keepalive_get(client, "/to-a")) == a.port
    assert wait_until(lambda: backend_status(lb_.admin_port, "a")["idle_connections"] == 1, timeout=5)
    assert not a.closed.is_set()
    r = admin_post(lb_.admin_port, "a", "maint")
    assert r.status == 200 and json_of(r)["state"] == "maint", r
    # "maint: out at once, idle connections closed": no other request is needed for that
    assert a.closed.wait(2), "the idle connection to the upstream in maint stayed open"
    assert backend_status(lb_.admin_port, "a")["idle_connections"] == 0


def test_drain_holds_in_every_worker_and_survives_sighup(cli, upstreams, tmp_path):
    a, b, c = upstreams(3)
    path = tmp_path / "backends"
    write_file(path, f"{a.url},name=a\n{b.url},name=b\n")
    p = start_cli(cli, cli_args("--backends-file", str(path), "--admin-port", str(free_port()),
                                "--drain-timeout", "3"), workers=2)
    admin = p.admin_port

    def per_worker() -> list[int]:
        return [w["requests"] for w in status(admin)["workers"]]

    r = admin_post(admin, "a", "drain")
    assert r.status == 200 and json_of(r)["state"] == "drain", r
    before = per_worker()
    for i in range(30):
        assert port_of(must_get(p, f"/d{i}")) == b.port
    after = per_worker()
    assert all(x > y for x, y in zip(after, before)), (before, after)  # both workers served
    assert a.requests == []

    write_file(path, f"{a.url},name=a\n{b.url},name=b\n{c.url},name=c\n")
    os.kill(p.proc.pid, signal.SIGHUP)
    line = wait_for_nth_line(p, "SIGHUP:", 1)
    assert parse_reload_line(line) == (3, {"c"}, set(), set()), line
    doc = backend_status(admin, "a")
    assert (doc["state"], doc["admin"]) == ("drain", "drain"), doc
    before = per_worker()
    ports = [port_of(must_get(p, f"/h{i}")) for i in range(30)]
    after = per_worker()
    assert all(x > y for x, y in zip(after, before)), (before, after)
    assert set(ports) == {b.port, c.port}, ports
    assert a.requests == []

    assert admin_post(admin, "a", "ready").status == 200
    assert wait_until(lambda: port_of(must_get(p, "/again")) == a.port, timeout=5)
    assert p.stop(signal.SIGTERM) == 0, p.stderr_text()


# ---------------------------------------------------------------------------------------------------
# The admin API: who may POST
# ---------------------------------------------------------------------------------------------------

def test_cross_site_posts_are_refused_and_same_origin_is_allowed(upstreams, balancer):
    a, b = upstreams(2)
    lb_ = balancer([f"{a.url},name=a", f"{b.url},name=b"], admin_port=0)
    admin = lb_.admin_port
    for headers in ({"Origin": "http://evil.example"},
                    {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"},
                    {"Origin": f"http://127.0.0.1:{admin}", "Sec-Fetch-Site": "cross-site"}):
        r = admin_post(admin, "a", "drain", headers)
        assert r.status == 403, (headers, r)
        assert json_of(r) == {"error": "cross-origin requests to the admin API are refused", "status": 403}
    assert backend_status(admin, "a")["admin"] == "ready"

    own = {"Origin": f"http://127.0.0.1:{admin}", "Sec-Fetch-Site": "same-origin"}
    r = admin_post(admin, "a", "drain", own)
    assert r.status == 200 and json_of(r)["admin"] == "drain", r
    r = admin_post(admin, "a", "ready", {"Origin": f"http://127.0.0.1:{admin}"})
    assert r.status == 200 and json_of(r)["admin"] == "ready", r


def test_admin_token_is_required_on_every_post(upstreams, balancer):
    a, b = upstreams(2)
    lb_ = balancer([f"{a.url},name=a", f"{b.url},name=b"], admin_port=0, admin_token="s3cret-token")
    admin = lb_.admin_port
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Bearer s3cret-token-and-more"}):
        r = admin_post(admin, "a", "maint", headers)
        assert r.status == 401, (headers, r)
        assert r.header("WWW-Authenticate") == 'Bearer realm="load_balancer admin"', r
        assert json_of(r)["status"] == 401
    assert backend_status(admin, "a")["admin"] == "ready"  # GET needs no token
    r = admin_post(admin, "a", "maint", {"Authorization": "Bearer s3cret-token"})
    assert r.status == 200 and json_of(r)["admin"] == "maint", r


def test_non_loopback_admin_host_needs_a_token(cli, upstreams):
    up, = upstreams(1)
    admin_port = free_port()
    p = cli(cli_args("--admin-host", "0.0.0.0", "--admin-port", str(admin_port), "--backend", up.url))
    assert p.proc.wait(10) == 2
    assert p.wait_ended(5)
    assert p.stderr_text().splitlines() == [
        f"{p.prog}: error: --admin-host 0.0.0.0 is not a loopback address: give --admin-token "
        "too, or anyone who can reach it can drain your upstreams (see --help)"]
    assert p.stdout_lines == []
    assert refuses(admin_port)
    with pytest.raises(ValueError, match="is not a loopback address"):
        lb.Config(backends=(up.url,), admin_host="0.0.0.0", admin_port=admin_port)
    config = lb.Config(backends=(up.url,), admin_host="0.0.0.0", admin_port=admin_port,
                       admin_token="t0ken")
    assert (config.admin_host, config.admin_token) == ("0.0.0.0", "t0ken")


# ---------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_sigusr1_and_sighup_without_a_file_keep_serving(workers, cli, upstreams):
    a, b = upstreams(2)
    p = start_cli(cli, cli_args("--backend", a.url, "--backend", b.url), workers)
    kids = worker_pids(p.proc.pid)
    must_get(p, "/before")

    os.kill(p.proc.pid, signal.SIGUSR1)
    assert wait_for_nth_line(p, "SIGUSR1: nothing to do", 1)
    os.kill(p.proc.pid, signal.SIGHUP)
    line = wait_for_nth_line(p, "SIGHUP:", 1)
    assert line.endswith("SIGHUP: no --backends-file, so the 2 backend(s) stay; 0 host name(s) "
                         "looked up again"), line

    assert p.proc.poll() is None, p.stderr_text()
    assert worker_pids(p.proc.pid) == kids
    for i in range(4):
        must_get(p, f"/after{i}")
    assert p.stop(signal.SIGTERM) == 0, p.stderr_text()
    assert "Traceback" not in p.stderr_text(), p.stderr_text()


@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_second_sigterm_during_the_drain_stops_at_once(workers, cli, upstreams):
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        p = start_cli(cli, cli_args("--drain-timeout", "10", "--backend", up.url), workers)
        with RawClient(p.port) as busy:
            busy.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n\r\n")
            assert slow.arrived.wait(5)
            os.kill(p.proc.pid, signal.SIGTERM)
            wait_for_nth_line(p, "SIGTERM: draining requests in flight (up to 10s)", 1)
            assert p.proc.poll() is None, "exited with a request in flight"
            t0 = time.monotonic()
            os.kill(p.proc.pid, signal.SIGTERM)
            try:
                code = p.proc.wait(3)
            except subprocess.TimeoutExpired:
                raise AssertionError("still running 3 s after the second SIGTERM; stderr:\n"
                                     + p.stderr_text()) from None
            assert code == 0, p.stderr_text()
            elapsed = time.monotonic() - t0
            assert elapsed < SLACK, elapsed  # not the 10 s drain timeout
            assert busy.read_until_close() == b""  # the connection ends, with no answer
        assert wait_for_nth_line(p, "SIGTERM during the drain: stopping now", 1)
    finally:
        slow.release.set()


def test_sigquit_drains_like_sigterm(cli, upstreams):
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        p = start_cli(cli, cli_args("--drain-timeout", "10", "--backend", up.url))
        with RawClient(p.port) as busy:
            busy.send(b"GET /slow HTTP/1.1\r\nHost: test.local\r\n\r\n")
            assert slow.arrived.wait(5)
            os.kill(p.proc.pid, signal.SIGQUIT)
            wait_for_nth_line(p, "SIGQUIT: draining requests in flight (up to 10s)", 1)
            assert wait_until(lambda: refuses(p.port), timeout=3), "still accepting during the drain"
            assert p.proc.poll() is None, "exited with a request in flight"
            slow.release.set()
            r = busy.response()
            assert r.status == 200 and r.body == f"upstream {up.port} GET /slow\n".encode(), r
            assert busy.is_closed(timeout=3)
        assert p.proc.wait(5) == 0, p.stderr_text()
        assert "Traceback" not in p.stderr_text(), p.stderr_text()
    finally:
        slow.release.set()


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------

def test_sigkill_of_the_supervisor_leaves_no_worker(cli, upstreams):
    up, = upstreams(1)
    p = start_cli(cli, cli_args("--backend", up.url), workers=2)
    kids = worker_pids(p.proc.pid)
    assert len(kids) == 2, kids
    try:
        must_get(p)
        os.kill(p.proc.pid, signal.SIGKILL)
        assert p.proc.wait(5) == -signal.SIGKILL
        assert wait_until(lambda: not any(alive(k) for k in kids), timeout=2), \
            (sorted(k for k in kids if alive(k)), p.stderr_text())
    finally:
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)


def test_second_balancer_on_a_held_port_exits_1_and_the_first_keeps_serving(cli, upstreams):
    up, = upstreams(1)
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--health-interval", "0",
            "--backend", up.url, "--workers", "2"]
    first = cli(args).wait_ready()
    assert wait_until(lambda: all_workers_listening(first, 2), timeout=5), first.stderr_text()
    mine = socket_inodes(first.proc.pid)
    for k in worker_pids(first.proc.pid):
        mine |= socket_inodes(k)
    held = listening_inodes(port)
    assert len(held) == 2 and held <= mine, (held, mine)

    second = cli(args)
    assert second.proc.wait(10) == 1
    assert second.wait_ended(5)
    lock = os.path.join(tempfile.gettempdir(), f"load_balancer-port-{port}.lock")
    assert second.stderr_text().splitlines() == [
        f"{second.prog}: error: cannot listen on port {port}: another load_balancer "
        f"(pid {first.proc.pid}) is serving it (lock {lock})"]

    assert first.proc.poll() is None
    assert port_of(must_get(first)) == up.port
    assert listening_inodes(port) == held
    assert first.stop(signal.SIGTERM) == 0, first.stderr_text()
