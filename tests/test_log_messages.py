"""What the balancer says about itself is what happened: the command names itself as it was run;
a drain cut short by a second stop signal says so (not "drain timeout"); an event stream cut by
--timeout says which timeout, and that the stream was idle.

In-process balancer and real upstreams where possible, the program as a child process for its
name; every socket has a timeout, waiting is on events or log records with wait_until.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, SOCKET_TIMEOUT, RawClient, SlowUpstreamHandler, wait_until


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------------
# The program's name
# ---------------------------------------------------------------------------------------------------

def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("how", ["command", "file", "module"])
def test_usage_and_errors_name_the_program_as_it_was_run(how, tmp_path):
    """The installed `load-balancer` command is a script of that name that calls main(); a link of
    that name to the file runs the same code with the same sys.argv[0]."""
    if how == "command":
        command = tmp_path / "load-balancer"
        command.symlink_to(ROOT / "load_balancer.py")
        args, name = [str(command)], "load-balancer"
    elif how == "file":
        args, name = [str(ROOT / "load_balancer.py")], "load_balancer.py"
    else:
        args, name = ["-m", "load_balancer"], f"{os.path.basename(sys.executable)} -m load_balancer"
    wrong = run([*args, "--bogus"])
    assert wrong.returncode == 2
    assert wrong.stderr == f"{name}: error: unrecognized arguments: --bogus (see --help)\n"
    usage = run([*args, "--help"])
    assert usage.returncode == 0 and usage.stdout.startswith(f"usage: {name} [-h]"), usage.stdout[:200]


# ---------------------------------------------------------------------------------------------------
# A drain cut short
# ---------------------------------------------------------------------------------------------------

def test_a_drain_cut_short_says_so_and_a_drain_timeout_says_when(upstreams, balancer, caplog):
    caplog.set_level(logging.WARNING, logger="load_balancer")
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        for timeout, cut in ((10, True), (0.2, False)):
            slow.arrived.clear()
            b = balancer([up.url])
            client = RawClient(b.port)
            client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            assert slow.arrived.wait(5)
            closing = threading.Thread(target=b.close, args=(timeout,))
            closing.start()
            assert wait_until(lambda: b.server.draining, timeout=5)
            if cut:
                b.cut()  # what a second TERM or INT does
            closing.join(SOCKET_TIMEOUT)
            assert not closing.is_alive()
            client.close()
    finally:
        slow.release.set()
    drains = [line for line in warnings(caplog) if "cut off" in line]
    assert drains == [
        "drain ended early by a second stop signal: 1 request(s) or tunnel(s) in flight were cut off",
        "drain timeout: 1 request(s) or tunnel(s) still in flight after 0.2s were cut off"], drains


# ---------------------------------------------------------------------------------------------------
# An idle event stream cut by --timeout
# ---------------------------------------------------------------------------------------------------

def test_an_event_stream_cut_by_the_timeout_says_which_timeout_and_that_it_was_idle(
        raw_upstream, balancer, caplog):
    caplog.set_level(logging.WARNING, logger="load_balancer")
    done = threading.Event()

    def events(conn, upstream):
        upstream.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (9, b"data: 1\n\n"))
        done.wait(SOCKET_TIMEOUT)  # and then nothing: an idle stream

    up = raw_upstream(events)
    other = raw_upstream(events)
    # max_fails=1: were an idle stream held against its upstream, one would take it out.
    b = balancer([up.url, other.url], timeout=0.3, max_fails=1)
    try:
        with RawClient(b.port) as client:
            client.send(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
            response_head = client.file.readline()
            assert response_head.startswith(b"HTTP/1.1 200 "), response_head
            assert client.read_until_close().endswith(b"data: 1\n\n\r\n")  # cut: no last chunk
    finally:
        done.set()
    expected = (f"GET /events -> {up.url}: the response body stalled: nothing from the upstream for "
                "0.3s (--timeout), so the idle stream was cut")
    assert wait_until(lambda: expected in warnings(caplog), timeout=3), warnings(caplog)
    entry = next(e for e in b.status()["backends"] if e["url"] == up.url)
    assert (entry["state"], entry["ejections"], entry["consecutive_failures"]) == ("up", 0, 0), entry
    assert entry["errors"]["idle"] == 1 and entry["errors"]["body"] == 0, entry["errors"]
