"""The real CLI process: flags and their defaults, argument errors, busy ports, the start-up line,
round robin through the process, logging flags, and SIGTERM/SIGINT graceful drain.

Processes are started by conftest's `cli` fixture (killed by PID at teardown) or by
subprocess.run with a timeout; every socket has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import (ROOT, SLACK, SOCKET_TIMEOUT, RawClient, SlowUpstreamHandler, default_handler, free_port,
                      get, port_of, refuses, wait_until)

LB = str(ROOT / "load_balancer.py")
ERROR_PREFIX = "load_balancer.py: error:"  # the name it was run as


def run_cli(args: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LB, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def backend_args(ups) -> list[str]:
    args = []
    for u in ups:
        args += ["--backend", u.url]
    return args


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Help, version, argument errors
# ---------------------------------------------------------------------------------------------------

DEFAULTS = [
    ("--host", "0.0.0.0"), ("--port", "8080"), ("--timeout", "30"), ("--connect-timeout", "5"),
    ("--header-timeout", "10"), ("--idle-timeout", "60"), ("--max-request-line", "8190"),
    ("--max-header-size", "32768"), ("--max-headers", "100"),
    ("--max-body-size", "1073741824"), ("--max-connections", "1024"), ("--pool-size", "64"),
    ("--health-interval", "5"), ("--health-timeout", "2"),
    ("--rise", "2"), ("--fall", "3"), ("--max-fails", "5"), ("--fail-timeout", "10"),
    ("--tunnel-timeout", "3600"), ("--max-field-size", "8192"),
    ("--retry-on", "conn-failure,empty-response"), ("--access-log-format", "short"),
    ("--drain-timeout", "10"), ("--admin-host", "127.0.0.1"),
    ("--backend", "http://localhost:8001"),
]
OTHER_FLAGS = ["--admin-port", "--workers", "--access-log", "--log-level", "--version", "--health-path",
               "--backends-file", "--admin-token", "--tls-cert", "--tls-key", "--backend-ca",
               "--redirect-http-port", "--export"]


def help_blocks(text: str) -> list[str]:
    """argparse help split into one block per option (its line plus continuation lines)."""
    blocks, current = [], None
    for line in text.splitlines():
        if re.match(r"^\s{1,4}-", line):
            current = [line]
            blocks.append(current)
        elif current is not None and line.startswith("   ") and line.strip():
            current.append(line)
        else:
            current = None
    return ["\n".join(b) for b in blocks]


def test_help_lists_every_flag_with_its_default():
    proc = run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr
    blocks = help_blocks(proc.stdout)
    for flag, default in DEFAULTS:
        mine = [b for b in blocks
                if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", b.splitlines()[0])]
        assert mine, f"{flag} not in --help:\n{proc.stdout}"
        assert default in mine[0], f"default {default!r} not shown for {flag}: {mine[0]!r}"
    for flag in OTHER_FLAGS:
        assert flag in proc.stdout, flag
    assert "8002" in proc.stdout and "8003" in proc.stdout


def test_version():
    proc = run_cli(["--version"])
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"load_balancer \d+\.\d+\.\d+\n", proc.stdout), repr(proc.stdout)
    assert "Traceback" not in proc.stderr


BAD_ARGS = [
    ["--no-such-flag"],
    ["unexpected-positional"],
    ["--backend", "ftp://x"],
    ["--backend", "http://"],
    ["--backend", "localhost:8001"],
    ["--backend", "http://127.0.0.1:99999"],
    ["--backend", "http://127.0.0.1:abc"],
    ["--backend", "http://a b:80"],
    ["--port", "99999"],
    ["--port", "-1"],
    ["--port", "abc"],
    ["--port", "1.5"],
    ["--admin-port", "70000"],
    ["--timeout", "-1"],
    ["--timeout", "abc"],
    ["--timeout", "nan"],
    ["--connect-timeout", "-2"],
    ["--health-interval", "-1"],
    ["--rise", "0"],
    ["--fall", "0"],
    ["--max-fails", "-1"],
    ["--fail-timeout", "-1"],
    ["--drain-timeout", "-1"],
    ["--max-headers", "-5"],
    ["--workers", "-1"],
    ["--workers", "many"],
    ["--log-level", "loud"],
    ["--timeout"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a))
def test_bad_arguments_exit_2_with_one_error_line(args):
    proc = run_cli(["--host", "127.0.0.1", "--port", "0", *args])
    assert_one_error_line(proc, 2)


def test_busy_port_exits_1_with_in_use_line(upstreams):
    up, = upstreams(1)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        busy.settimeout(SOCKET_TIMEOUT)
        port = busy.getsockname()[1]
        proc = run_cli(["--host", "127.0.0.1", "--port", str(port), "--backend", up.url])
    line = assert_one_error_line(proc, 1)
    assert "in use" in line and f"127.0.0.1:{port}" in line, line
    assert len([x for x in proc.stderr.splitlines() if "in use" in x]) == 1, proc.stderr


def test_busy_admin_port_exits_1_with_in_use_line(upstreams):
    up, = upstreams(1)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        busy.settimeout(SOCKET_TIMEOUT)
        port = busy.getsockname()[1]
        proc = run_cli(["--host", "127.0.0.1", "--port", "0", "--admin-port", str(port),
                        "--backend", up.url])
    line = assert_one_error_line(proc, 1)
    assert "in use" in line and f"127.0.0.1:{port}" in line, line


# ---------------------------------------------------------------------------------------------------
# Start-up and proxying through the process
# ---------------------------------------------------------------------------------------------------

def test_startup_line_names_address_and_upstreams(cli, upstreams):
    ups = upstreams(3)
    p = cli(["--host", "127.0.0.1", "--port", "0", *backend_args(ups)]).wait_ready()
    line = p.wait_for_line("listening on http://")
    assert f"listening on http://127.0.0.1:{p.port}" in line, line
    assert p.port != 0
    for u in ups:
        assert u.url in line, line
    assert get(p.port).status == 200
    assert p.stop() == 0


def test_default_upstreams_in_startup_line(cli):
    p = cli(["--host", "127.0.0.1", "--port", "0", "--health-interval", "0"]).wait_ready()
    line = p.wait_for_line("listening on http://")
    for port in (8001, 8002, 8003):
        assert f"http://localhost:{port}" in line, line
    assert p.stop() == 0


def test_round_robin_through_the_process(cli, upstreams):
    ups = upstreams(3)
    p = cli(["--host", "127.0.0.1", "--port", "0", *backend_args(ups)]).wait_ready()
    expected = [u.port for u in ups]
    with RawClient(p.port) as client:  # one keep-alive connection
        seen = [port_of(client.request(b"GET /rr%d HTTP/1.1\r\nHost: t\r\n\r\n" % i))
                for i in range(9)]
    assert seen == expected * 3, seen
    seen = [port_of(get(p.port, f"/sep{i}")) for i in range(6)]  # separate connections
    assert seen == expected * 2, seen
    for u in ups:
        assert [r.target for r in u.requests if r.target.startswith(("/rr", "/sep"))]
    assert p.stop() == 0


def test_admin_status_through_the_process(cli, upstreams):
    ups = upstreams(2)
    version = run_cli(["--version"]).stdout.split()[-1]
    p = cli(["--host", "127.0.0.1", "--port", "0", "--admin-port", str(free_port()),
             *backend_args(ups)]).wait_ready()
    line = p.wait_for_line("admin on http://")
    assert f"admin on http://127.0.0.1:{p.admin_port}/status" in line, line
    for i in range(4):
        assert get(p.port, f"/{i}").status == 200
    r = get(p.admin_port, "/status")
    assert r.status == 200 and r.header("Content-Type").startswith("application/json")
    st = json.loads(r.body)
    assert st["pid"] == p.proc.pid
    assert st["version"] == version
    assert st["requests_total"] == 4
    assert [b["url"] for b in st["backends"]] == [u.url for u in ups]
    assert [b["requests"] for b in st["backends"]] == [2, 2]
    assert p.stop() == 0


def test_access_log_flag(cli, upstreams):
    up, = upstreams(1)
    p = cli(["--host", "127.0.0.1", "--port", "0", "--access-log", "--backend", up.url])
    p.wait_ready()
    assert get(p.port, "/access-log-probe-xyz").status == 200
    assert p.stop() == 0
    # The flag alone: standard output, the error log (stderr) has no access line.
    assert p.wait_ended(5)
    assert any("/access-log-probe-xyz" in line for line in p.stdout_lines), p.stdout_lines
    assert "/access-log-probe-xyz" not in p.stderr_text(), p.stderr_text()

    q = cli(["--host", "127.0.0.1", "--port", "0", "--backend", up.url]).wait_ready()
    assert get(q.port, "/no-access-log-xyz").status == 200
    assert q.stop() == 0  # exit flushes stderr: now absence can be asserted
    assert q.wait_for_line("/no-access-log-xyz", timeout=2) is None, q.stderr_text()


def test_log_level_warning_hides_info_startup_line(cli, upstreams):
    up, = upstreams(1)
    port = free_port()
    p = cli(["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--backend", up.url])
    assert wait_until(lambda: not refuses(port) or p.proc.poll() is not None, timeout=10)
    assert get(port).status == 200
    assert p.stop() == 0
    assert p.wait_for_line("listening on", timeout=5) is None, p.stderr_text()


def test_state_changes_logged_once_on_stderr(cli, upstreams):
    state = {"healthy": False}
    probes = []

    def handler(h, req):
        if req.target == "/health":
            probes.append(time.monotonic())
            code = 200 if state["healthy"] else 500
            h.send_response(code)
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            default_handler(h, req)

    up, = upstreams(1, handler)
    p = cli(["--host", "127.0.0.1", "--port", "0", "--health-interval", "0.2", "--fall", "1",
             "--rise", "1", "--health-path", "/health", "--log-level", "info",
             "--backend", up.url]).wait_ready()

    def state_lines():
        return [line for line in p.stderr_text().splitlines()
                if str(up.port) in line and "listening on" not in line
                and not re.search(r"\b(GET|HEAD) /", line)]

    assert wait_until(lambda: len(state_lines()) >= 1, timeout=5), p.stderr_text()
    n = len(probes)
    assert wait_until(lambda: len(probes) >= n + 3, timeout=5)  # more failing probes
    assert len(state_lines()) == 1, state_lines()
    assert "down" in state_lines()[0].lower(), state_lines()
    state["healthy"] = True
    assert wait_until(lambda: len(state_lines()) >= 2, timeout=5), p.stderr_text()
    n = len(probes)
    assert wait_until(lambda: len(probes) >= n + 3, timeout=5)
    assert len(state_lines()) == 2, state_lines()
    assert re.search(r"\bup\b", state_lines()[1].lower()), state_lines()
    assert p.stop() == 0


# ---------------------------------------------------------------------------------------------------
# Signals and graceful drain
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_closes_idle_refuses_new_and_exits_0(sig, cli, upstreams):
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        p = cli(["--host", "127.0.0.1", "--port", "0", "--drain-timeout", "10",
                 "--health-interval", "0.2", "--backend", up.url]).wait_ready()
        idle = RawClient(p.port)
        busy = RawClient(p.port)
        try:
            assert idle.request(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
            busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            assert slow.arrived.wait(5)

            os.kill(p.proc.pid, sig)
            # the idle keep-alive connection is closed while the slow one is still in flight
            assert idle.is_closed(timeout=3), "idle keep-alive connection not closed at shutdown"
            # no new connections once the drain started
            assert wait_until(lambda: refuses(p.port), timeout=3), "still accepting during drain"
            assert p.proc.poll() is None, "exited before the in-flight request finished"

            slow.release.set()
            t_release = time.monotonic()
            r = busy.response()
            assert r.status == 200, r
            assert r.body == f"upstream {up.port} GET /slow\n".encode()
            assert busy.is_closed(timeout=3)
            assert p.proc.wait(5) == 0, p.stderr_text()
            assert time.monotonic() - t_release < 3, "waited for the drain timeout needlessly"
            assert p.wait_for_line("Traceback", timeout=5) is None, p.stderr_text()
        finally:
            idle.close()
            busy.close()
    finally:
        slow.release.set()


def test_sigterm_with_no_traffic_exits_0_quickly(cli, upstreams):
    up, = upstreams(1)
    p = cli(["--host", "127.0.0.1", "--port", "0", "--admin-port", str(free_port()),
             "--health-interval", "0.2", "--drain-timeout", "10", "--backend", up.url])
    p.wait_ready()
    t0 = time.monotonic()
    assert p.stop(signal.SIGTERM) == 0, p.stderr_text()
    assert time.monotonic() - t0 < 3
    assert p.wait_for_line("Traceback", timeout=5) is None, p.stderr_text()
    assert refuses(p.port) and refuses(p.admin_port)


def test_drain_timeout_bounds_shutdown(cli, upstreams):
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        p = cli(["--host", "127.0.0.1", "--port", "0", "--drain-timeout", "1",
                 "--backend", up.url]).wait_ready()
        with RawClient(p.port) as busy:
            busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            assert slow.arrived.wait(5)
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            assert p.proc.wait(6) == 0, p.stderr_text()
            elapsed = time.monotonic() - t0
            assert 0.8 <= elapsed <= 1 + SLACK, elapsed  # waited for the drain timeout, not longer
            # the client connection is closed (whatever it got)
            try:
                busy.read_until_close()
            except ConnectionResetError:
                pass
    finally:
        slow.release.set()
