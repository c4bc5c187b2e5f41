"""--workers N|auto: several worker processes behind one listening address.

Worker processes are found as the live children of the CLI process (/proc/<pid>/task/*/children,
or the ppid field of /proc/*/stat where the kernel has no children file). Processes are only ever
signalled by PID; conftest's `cli` fixture kills the process group at teardown.
"""

from __future__ import annotations

import os
import signal

from conftest import (RawClient, SlowUpstreamHandler, all_workers_listening, alive, free_port, get,
                      listening_inodes, live_processes, must_get, port_of, proc_children, refuses,
                      socket_inodes, wait_until, worker_pids)


# ---------------------------------------------------------------------------------------------------
# Helpers (the generic /proc readers are conftest's)
# ---------------------------------------------------------------------------------------------------

def listeners_of(pid: int, port: int) -> set[str]:
    """Inodes of the sockets listening on `port` that process `pid` holds."""
    return listening_inodes(port) & socket_inodes(pid)


def start(cli, ups, *extra):
    """Start the CLI and wait for its start-up line. Whether the port already accepts at that
    moment is the subject of test_workers_accept_as_soon_as_startup_line_is_logged; the other
    tests also wait for the port so that they test only their own subject."""
    args = ["--host", "127.0.0.1", "--port", str(free_port()), "--health-interval", "0",
            "--drain-timeout", "3", *extra]
    for u in ups:
        args += ["--backend", u.url]
    p = cli(args).wait_ready()
    assert wait_until(lambda: not refuses(p.port), timeout=5), p.stderr_text()
    return p


def stop_and_check_all_gone(p, kids: set[int]) -> None:
    assert p.stop(signal.SIGTERM) == 0, p.stderr_text()
    assert wait_until(lambda: not any(alive(k) for k in kids), timeout=5), \
        [k for k in kids if alive(k)]
    assert p.wait_for_line("Traceback", timeout=5) is None, p.stderr_text()


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

def test_workers_accept_as_soon_as_startup_line_is_logged(cli, upstreams):
    """The start-up line says `listening on`: a client that connects right after it must not be
    refused (conftest's wait_ready and any supervisor rely on that line as the ready signal)."""
    up, = upstreams(1)
    p = cli(["--host", "127.0.0.1", "--port", "0", "--health-interval", "0", "--workers", "2",
             "--backend", up.url]).wait_ready()
    assert not refuses(p.port), "connection refused right after the start-up line"
    assert get(p.port).status == 200


def test_two_workers_serve_and_sigterm_exits_0_with_workers_gone(cli, upstreams):
    ups = upstreams(3)
    p = start(cli, ups, "--workers", "2")
    assert wait_until(lambda: all_workers_listening(p, 2), timeout=5), proc_children(p.proc.pid)
    responses = [must_get(p, f"/w{i}") for i in range(12)]
    assert all(r.status == 200 for r in responses), responses
    assert sum(len(u.requests) for u in ups) == 12
    kids = worker_pids(p.proc.pid)
    assert len(kids) == 2
    stop_and_check_all_gone(p, kids)


def test_killed_worker_is_restarted_and_requests_keep_succeeding(cli, upstreams):
    ups = upstreams(3)
    p = start(cli, ups, "--workers", "2")
    assert wait_until(lambda: all_workers_listening(p, 2), timeout=5), proc_children(p.proc.pid)
    before = worker_pids(p.proc.pid)
    victim = min(before)
    victim_sockets = listeners_of(victim, p.port)
    assert victim_sockets
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: not alive(victim), timeout=5)
    # The supervisor holds every worker's listening socket: connections the kernel queues on the
    # dead worker's socket wait there for its replacement instead of being reset. So every request
    # succeeds, also those that land on that socket while no worker accepts from it.
    for i in range(10):
        must_get(p, f"/during{i}")
    assert wait_until(lambda: all_workers_listening(p, 2) and worker_pids(p.proc.pid) != before,
                      timeout=5), worker_pids(p.proc.pid)
    after = worker_pids(p.proc.pid)
    assert victim not in after and (after - before), (before, after)
    replacement, = after - before
    assert listeners_of(replacement, p.port) == victim_sockets, "not the same socket handed over"
    for i in range(10):
        must_get(p, f"/after{i}")
    assert p.proc.poll() is None
    stop_and_check_all_gone(p, before | after)


def test_rotation_per_worker_is_strict(cli, upstreams):
    ups = upstreams(3)
    p = start(cli, ups, "--workers", "2")
    assert wait_until(lambda: all_workers_listening(p, 2), timeout=5), proc_children(p.proc.pid)
    # one keep-alive connection is served by one worker: strictly cyclic
    with RawClient(p.port) as client:
        seq = [port_of(client.request(b"GET /ka%d HTTP/1.1\r\nHost: t\r\n\r\n" % i))
               for i in range(12)]
    assert len(set(seq[:3])) == 3, seq
    assert all(seq[i] == seq[i % 3] for i in range(12)), seq
    # separate connections spread over the 2 workers: each worker is strictly cyclic, so each
    # upstream's count is within 2 * (2/3) of its share, i.e. off by at most 1
    k = 20
    counts = {u.port: 0 for u in ups}
    for i in range(3 * k):
        r = must_get(p, f"/sep{i}")
        counts[port_of(r)] += 1
    assert all(abs(c - k) <= 1 for c in counts.values()), counts
    stop_and_check_all_gone(p, worker_pids(p.proc.pid))


def test_workers_auto_with_port_0(cli, upstreams):
    ups = upstreams(2)
    args = ["--host", "127.0.0.1", "--port", "0", "--workers", "auto", "--health-interval", "0",
            "--drain-timeout", "3"]
    for u in ups:
        args += ["--backend", u.url]
    p = cli(args).wait_ready()
    assert wait_until(lambda: not refuses(p.port), timeout=5), p.stderr_text()
    expected = {len(os.sched_getaffinity(0)), os.cpu_count()}
    assert wait_until(lambda: len(worker_pids(p.proc.pid)) in expected
                      and all_workers_listening(p, len(worker_pids(p.proc.pid))), timeout=5), \
        (worker_pids(p.proc.pid), expected)
    for i in range(10):
        must_get(p, f"/auto{i}")
    assert sum(len(u.requests) for u in ups) == 10
    stop_and_check_all_gone(p, worker_pids(p.proc.pid))


def test_workers_sigterm_drains_in_flight_request(cli, upstreams):
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        p = start(cli, [up], "--workers", "2")
        assert wait_until(lambda: all_workers_listening(p, 2), timeout=5), proc_children(p.proc.pid)
        kids = worker_pids(p.proc.pid)
        with RawClient(p.port) as busy:
            busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            assert slow.arrived.wait(5)
            os.kill(p.proc.pid, signal.SIGTERM)
            # refused once the drain started, while the request is still in flight
            assert wait_until(lambda: refuses(p.port), timeout=3), (
                f"still accepting 3 s after SIGTERM; workers {worker_pids(p.proc.pid)}; "
                f"stderr:\n{p.stderr_text()}")
            slow.release.set()
            r = busy.response()
            assert r.status == 200, r
        stop_and_check_all_gone(p, kids)
    finally:
        slow.release.set()


def _in_group(pgid: int) -> set[int]:
    """Live processes whose process group is `pgid` (the CLI process started a new session)."""
    return live_processes(lambda stat: stat.pgrp == pgid)


def test_sigterm_while_workers_are_forked_leaves_no_process(cli, upstreams):
    """SIGTERM while the supervisor is still forking workers (16 of them make that last long
    enough to aim at: the signal goes as soon as the first one exists). Every worker must be
    stopped and the supervisor exit 0; a signal handled between two forks used to leave the later
    workers running with nobody to stop them, and the supervisor waiting for them forever."""
    up, = upstreams(1)
    for attempt in range(3):
        p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "16", "--health-interval", "0",
                 "--drain-timeout", "1", "--backend", up.url])
        assert wait_until(lambda: proc_children(p.proc.pid), timeout=10, interval=0.001), p.stderr_text()
        code = p.stop(signal.SIGTERM, timeout=15)
        assert code == 0, (attempt, code, p.stderr_text())
        assert wait_until(lambda: not _in_group(p.proc.pid), timeout=5), (attempt, _in_group(p.proc.pid))
        assert "Traceback" not in p.stderr_text(), p.stderr_text()
