"""examples/demo.py (`make demo`): starts three upstreams and the balancer, stops them all on Ctrl-C.

Each test runs the demo on free ports (DEMO_* environment variables) in a new session, as a
terminal would run it in its own process group, and checks that no process of that session
outlives it. The `make demo` Ctrl-C tests also run it in a pseudo-terminal and type Ctrl-C into it,
so that the terminal driver itself signals the foreground process group. Tests that need a working
load_balancer.py FAIL (not skip) while it is missing.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ChildProcess, alive, free_ports, live_processes, proc_stat, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"
BALANCER = Path(os.environ.get("DEMO_BALANCER") or ROOT / "load_balancer.py")
TIMEOUT = 10.0          # every socket
READY_TIMEOUT = 30.0    # until the demo prints its hints
EXIT_TIMEOUT = 30.0     # until the demo exits after Ctrl-C (it allows its children 15 s)
GONE_TIMEOUT = 5.0      # until every process of the demo's session is gone after it exited
HEALTH_TIMEOUT = 15.0   # health interval 1 s, fall 3, rise 2 (defaults)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def require_balancer() -> None:
    if not BALANCER.is_file():
        pytest.fail(f"{BALANCER} is missing: the demo cannot run without the load balancer")


def kill_session(proc: subprocess.Popen, sid: int) -> None:
    """Safety net: SIGKILL whatever of a run is still there (its process group, then by PID)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(TIMEOUT)
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session_members(sid: int) -> list[int]:
    """Live processes (not zombies) in session sid: everything the demo run started, however deep,
    unless it made a session of its own."""
    return sorted(live_processes(lambda stat: stat.session == sid))


def demo_env(lb_port: int, admin_port: int, upstream_ports: list[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env.update({
        "DEMO_LB_PORT": str(lb_port),
        "DEMO_ADMIN_PORT": str(admin_port),
        "DEMO_UPSTREAM_PORTS": ",".join(map(str, upstream_ports)),
        "DEMO_BALANCER": str(BALANCER),
        "PYTHON": sys.executable,  # for `make demo`
        "PYTHONUNBUFFERED": "1",
    })
    return env


def child_pids(out: str) -> list[int]:
    for line in out.splitlines():
        if line.startswith("pids: "):
            return [int(p) for p in line.split()[1:]]
    raise AssertionError(f"no 'pids:' line in\n{out}")


class Demo(ChildProcess):
    """The demo (or `make demo`) as the leader of a new session; output collected line by line."""

    def __init__(self, argv: list[str], extra_env: dict | None = None, ports=None):
        self.lb_port, self.admin_port, *self.upstream_ports = ports or free_ports(5)
        env = demo_env(self.lb_port, self.admin_port, self.upstream_ports)
        env.update(extra_env or {})
        super().__init__(argv, cwd=ROOT, env=env)
        self.sid = self.proc.pid

    def wait_ready(self) -> "Demo":
        """Wait for the hints (the demo prints them once every port accepts connections)."""
        self.wait_for_line("Press Ctrl-C", READY_TIMEOUT)
        out = self.output()
        assert "Press Ctrl-C" in out, f"demo not ready (exit code {self.proc.poll()}):\n{out}"
        return self

    def child_pids(self) -> list[int]:
        return child_pids(self.output())

    def ctrl_c(self) -> None:
        """SIGINT to the foreground process group, as a terminal's Ctrl-C sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self.wait_ended(GONE_TIMEOUT)  # EOF once no process holds the pipe any more
        return rc

    def assert_nothing_left(self, pids=()) -> None:
        assert wait_until(lambda: not session_members(self.sid)
                          and not any(alive(p) for p in pids), GONE_TIMEOUT), (
            f"left running: session {session_members(self.sid)}, "
            f"children {[p for p in pids if alive(p)]}")

    def cleanup(self) -> None:
        """Safety net: SIGKILL whatever of this run is still there (by PID / its own group)."""
        kill_session(self.proc, self.sid)
        self.wait_ended(TIMEOUT)
        self.proc.stdout.close()


@pytest.fixture
def demo():
    """Factory: demo(argv=None, extra_env=None, ports=None) -> Demo; cleaned up after the test."""
    made: list[Demo] = []

    def start(argv=None, extra_env=None, ports=None) -> Demo:
        d = Demo(argv or [sys.executable, str(DEMO)], extra_env, ports)
        made.append(d)
        return d

    yield start
    for d in made:
        d.cleanup()


class PtyRun:
    """A command as the leader of a new session whose controlling terminal (and stdin, stdout,
    stderr) is a new pseudo-terminal, as a terminal emulator runs a shell. The test plays the
    terminal: it reads the master side and types into it (b"\\x03" is Ctrl-C, which the terminal
    driver turns into SIGINT for the terminal's foreground process group)."""

    def __init__(self, argv: list[str], ports: list[int]):
        self.lb_port, self.admin_port, *self.upstream_ports = ports
        self.master, slave = os.openpty()
        try:
            # Popen calls setsid() (start_new_session) before preexec_fn: the new session has no
            # terminal yet, and TIOCSCTTY makes the pty (fd 0 by then) its controlling terminal,
            # with the session leader's group in the foreground.
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=demo_env(*ports[:2], ports[2:]),
                stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        finally:
            os.close(slave)
        self.sid = self.proc.pid
        self.data = b""
        self.eof = False

    def output(self) -> str:
        return self.data.decode("utf-8", "replace").replace("\r\n", "\n")

    def read_until(self, predicate, timeout: float) -> bool:
        """Read the master side until predicate(output) holds, EOF (no process holds the pty any
        more) or timeout seconds pass. Never blocks longer than the time left."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output()):
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return predicate(self.output())
            if select.select([self.master], [], [], min(left, 0.1))[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError as exc:  # Linux: EIO once every slave fd is closed
                    if exc.errno != errno.EIO:
                        raise
                    chunk = b""
                self.data += chunk
                self.eof = not chunk
        return True

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_exit(self, timeout: float) -> int:
        """Exit code of the session leader; the pty is read meanwhile, so that nobody blocks on a
        full terminal."""
        self.read_until(lambda _: self.proc.poll() is not None, timeout)
        return self.proc.wait(TIMEOUT)

    def cleanup(self) -> None:
        """SIGKILL whatever of this session is still there (by PID / its own group)."""
        kill_session(self.proc, self.sid)
        os.close(self.master)


@pytest.fixture
def pty_run():
    """Factory: pty_run(argv) -> PtyRun on free ports; cleaned up after the test."""
    made: list[PtyRun] = []

    def start(argv: list[str]) -> PtyRun:
        r = PtyRun(argv, free_ports(5))
        made.append(r)
        return r

    yield start
    for r in made:
        r.cleanup()


def get(port: int, path: str = "/", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


def answering_port(port: int) -> int:
    status, _, body = get(port)
    assert status == 200 and body.startswith("Hello from upstream on port "), (status, body)
    return int(body.split()[-1])


def backend_states(admin_port: int) -> dict[str, str]:
    status, ctype, body = get(admin_port, "/status")
    assert status == 200, (status, body)
    assert ctype.split(";")[0].strip() == "application/json", ctype
    return {b["url"]: b["state"] for b in json.loads(body)["backends"]}


def assert_hints(d: Demo) -> None:
    out = d.output()
    second = d.upstream_ports[1]
    for hint in (f"curl http://localhost:{d.lb_port}/",
                 f"curl http://127.0.0.1:{d.admin_port}/status",
                 f"curl -X POST http://localhost:{second}/health/fail",
                 f"curl -X POST http://localhost:{second}/health/recover"):
        assert hint in out, f"missing hint {hint!r} in\n{out}"


# ---------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: exit 0, no traceback, nothing left running
# ---------------------------------------------------------------------------------------------------

def test_demo_ctrl_c_stops_everything(demo):
    require_balancer()
    d = demo().wait_ready()
    assert_hints(d)
    pids = d.child_pids()
    assert len(pids) == 4 and all(alive(p) for p in pids), pids
    assert answering_port(d.lb_port) in d.upstream_ports
    d.ctrl_c()
    rc = d.wait_exit()
    out = d.output()
    assert rc == 0, out
    assert "Traceback" not in out, out
    assert "demo: stopped" in out, out
    d.assert_nothing_left(pids)


def test_make_demo_ctrl_c_stops_everything(demo):
    """Without a terminal (CI, pipes) the demo cannot take Ctrl-C for itself: the SIGINT sent here
    to the whole group reaches make too. The terminal case is test_make_demo_ctrl_c_in_a_terminal."""
    require_balancer()
    d = demo(["make", "--no-print-directory", "demo"]).wait_ready()
    assert_hints(d)
    pids = d.child_pids()
    assert answering_port(d.lb_port) in d.upstream_ports
    d.ctrl_c()
    rc = d.wait_exit()
    out = d.output()
    # GNU make, itself interrupted, re-raises SIGINT once its recipe ended (a shell shows 130);
    # had the demo exited non-zero, make would print "make: *** [...] Error N".
    assert rc in (0, -signal.SIGINT), (rc, out)
    assert "make: ***" not in out, out
    assert "Traceback" not in out, out
    assert "demo: stopped" in out, out
    d.assert_nothing_left(pids)


# make as the terminal's session leader (a terminal running make directly), and make run by a
# shell that stays (sh -c does no job control: make runs in the shell's own, foreground, group).
MAKE_DEMO = ["make", "--no-print-directory", "demo"]
MAKE_IN_SH = ["sh", "-c", 'make --no-print-directory demo; echo "make exited with $?"; '
              'exec sleep 30']


@pytest.mark.parametrize("argv", [MAKE_DEMO, MAKE_IN_SH], ids=["make", "sh-make"])
def test_make_demo_ctrl_c_in_a_terminal(pty_run, argv):
    """Ctrl-C typed into the terminal: only the demo is interrupted, so make exits 0 (not 130),
    and the terminal's foreground is handed back to the group that had it."""
    require_balancer()
    r = pty_run(argv)
    assert r.read_until(lambda out: "Press Ctrl-C" in out, READY_TIMEOUT), (
        f"demo not ready (exit code {r.proc.poll()}):\n{r.output()}")
    pids = child_pids(r.output())
    assert len(pids) == 4 and all(alive(p) for p in pids), pids
    assert answering_port(r.lb_port) in r.upstream_ports
    # Ctrl-Z must not stop the demo: in a group of its own nobody would ever continue it.
    r.type(b"\x1a")
    assert r.read_until(lambda out: "^Z" in out, TIMEOUT), r.output()  # echoed after the signal
    time.sleep(0.3)
    stopped = [p for p in session_members(r.sid) if proc_stat(p).state in ("T", "t")]
    assert not stopped, (stopped, r.output())
    r.type(b"\x03")
    if argv is MAKE_DEMO:
        rc = r.wait_exit(EXIT_TIMEOUT)
        r.read_until(lambda _: False, GONE_TIMEOUT)  # the rest of the output, up to EOF
    else:
        r.read_until(lambda out: "make exited with" in out, EXIT_TIMEOUT)
        assert r.proc.poll() is None, (r.proc.returncode, r.output())  # sh was not interrupted
        rc = int(r.output().rpartition("make exited with ")[2].split()[0])
        assert os.tcgetpgrp(r.master) == r.sid, (os.tcgetpgrp(r.master), r.sid, r.output())
    out = r.output()
    assert rc == 0, (rc, out)
    assert "make: ***" not in out, out
    assert "Traceback" not in out, out
    assert "demo: stopped" in out, out
    assert wait_until(lambda: not any(alive(p) for p in pids), GONE_TIMEOUT), (
        f"left running: {[p for p in pids if alive(p)]}")


def test_demo_sigterm_stops_everything(demo):
    require_balancer()
    d = demo().wait_ready()
    pids = d.child_pids()
    os.kill(d.proc.pid, signal.SIGTERM)  # the demo only, not its group
    rc = d.wait_exit()
    assert rc == 0, d.output()
    assert "Traceback" not in d.output()
    d.assert_nothing_left(pids)


# ---------------------------------------------------------------------------------------------------
# What the hints promise
# ---------------------------------------------------------------------------------------------------

def test_demo_round_robin_and_status(demo):
    require_balancer()
    d = demo().wait_ready()
    ups = d.upstream_ports
    answers = [answering_port(d.lb_port) for _ in range(6)]
    assert sorted(answers[:3]) == sorted(ups), answers
    start = ups.index(answers[0])
    assert answers == [ups[(start + i) % 3] for i in range(6)], (answers, ups)

    states = backend_states(d.admin_port)
    assert states == {f"http://127.0.0.1:{p}": "up" for p in ups}, states
    d.ctrl_c()
    assert d.wait_exit() == 0, d.output()


def test_demo_health_fail_and_recover(demo):
    require_balancer()
    d = demo().wait_ready()
    second = d.upstream_ports[1]
    url = f"http://127.0.0.1:{second}"
    status, _, body = get(second, "/health/fail", method="POST")
    assert status == 200, body
    assert wait_until(lambda: backend_states(d.admin_port)[url] == "down", HEALTH_TIMEOUT, 0.2), \
        backend_states(d.admin_port)
    answers = {answering_port(d.lb_port) for _ in range(6)}
    assert answers == set(d.upstream_ports) - {second}, answers

    status, _, body = get(second, "/health/recover", method="POST")
    assert status == 200, body
    assert wait_until(lambda: backend_states(d.admin_port)[url] == "up", HEALTH_TIMEOUT, 0.2), \
        backend_states(d.admin_port)
    d.ctrl_c()
    assert d.wait_exit() == 0, d.output()


# ---------------------------------------------------------------------------------------------------
# Failures: exit 1 with one clear line, nothing left running (no load balancer needed)
# ---------------------------------------------------------------------------------------------------

def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("demo: error:")]


def test_demo_busy_port_exits_1(demo):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        busy.settimeout(TIMEOUT)
        ports = free_ports(4)
        ports.insert(3, busy.getsockname()[1])  # the second upstream port
        d = demo(ports=ports)
        rc = d.wait_exit()
    out = d.output()
    assert rc == 1, out
    assert "Traceback" not in out, out
    errors = error_lines(out)
    assert len(errors) == 1 and str(ports[3]) in errors[0] and "in use" in errors[0], out
    d.assert_nothing_left()


def test_demo_flags_override_environment(demo):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        busy.settimeout(TIMEOUT)
        busy_port = busy.getsockname()[1]
        lb_env, *rest = free_ports(5)  # the environment's choice is free; the flag's is busy
        d = demo([sys.executable, str(DEMO), "--lb-port", str(busy_port)],
                 ports=[lb_env, *rest])
        rc = d.wait_exit()
    assert rc == 1, d.output()
    errors = error_lines(d.output())
    assert len(errors) == 1 and str(busy_port) in errors[0], d.output()


def test_demo_child_dying_early_stops_the_others(demo, tmp_path):
    broken = tmp_path / "broken_balancer.py"
    broken.write_text("import sys\nsys.exit(3)\n")
    d = demo(extra_env={"DEMO_BALANCER": str(broken)})
    rc = d.wait_exit()
    out = d.output()
    assert rc == 1, out
    assert "Traceback" not in out, out
    errors = error_lines(out)
    assert len(errors) == 1 and "load balancer" in errors[0] and "exit code 3" in errors[0], out
    d.assert_nothing_left()


def test_demo_bad_port_in_environment_exits_2(demo):
    d = demo(extra_env={"DEMO_LB_PORT": "not-a-port"})
    rc = d.wait_exit()
    assert rc == 2, d.output()
    assert "DEMO_LB_PORT" in d.output() and "Traceback" not in d.output()
