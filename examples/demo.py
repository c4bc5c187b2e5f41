#!/usr/bin/env python3
"""`make demo`: three example upstreams and load_balancer.py in front of them, in the foreground.

Starts `examples/server.py` on ports 8001, 8002, 8003 and
`load_balancer.py --host 127.0.0.1 --port 8080 --backend ... --admin-port 8081 --health-path /health
--health-interval 1`,
waits until every port accepts connections, prints what to try, and runs until Ctrl-C (SIGINT) or
SIGTERM, which stops all four children (SIGTERM, then SIGKILL after a timeout) and exits 0.
If a port is busy or a child exits on its own, the others are stopped and the exit code is 1.

Ports can be changed with flags or environment variables (flags win):
    --lb-port PORT           DEMO_LB_PORT          (default 8080)
    --admin-port PORT        DEMO_ADMIN_PORT       (default 8081)
    --upstream-ports A,B,C   DEMO_UPSTREAM_PORTS   (default 8001,8002,8003)
    --balancer PATH          DEMO_BALANCER         (default load_balancer.py in the repo root)

Every process binds 127.0.0.1 only. The line `pids: ...` lists the child process ids.
In the foreground of a terminal the demo takes the terminal's foreground for its own process group,
so Ctrl-C reaches it alone and `make demo` exits 0 too (see take_terminal); Ctrl-Z is then ignored.
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROG = "demo"
ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "server.py"
HOST = "127.0.0.1"
START_TIMEOUT = 20.0   # seconds for all children to accept connections
STOP_TIMEOUT = 15.0    # seconds between SIGTERM and SIGKILL (the balancer drains up to 10 s)
HEALTH_INTERVAL = 1


class DemoError(Exception):
    """Ends the demo with exit code 1 and this message on one line."""


class Child:
    def __init__(self, name: str, port: int, argv: list[str]):
        self.name, self.port, self.argv = name, port, argv
        self.proc: subprocess.Popen | None = None

    def __str__(self):
        return f"{self.name} on port {self.port}"


# ---------------------------------------------------------------------------------------------------
# Signals: handlers only record the signal and wake the main loop through a pipe
# ---------------------------------------------------------------------------------------------------

class Signals:
    def __init__(self):
        self.received: list[int] = []
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGCHLD, self._handle_child)

    def _handle(self, signum, frame):
        self.received.append(signum)

    def _handle_child(self, signum, frame):
        pass  # only here so that a child's exit wakes wait() through the wakeup fd

    def wait(self, timeout: float) -> None:
        """Return after a signal arrives or timeout seconds pass."""
        try:
            readable, _, _ = select.select([self._rfd], [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover (PEP 475 retries select)
            return
        if readable:
            try:
                while os.read(self._rfd, 512):
                    pass
            except BlockingIOError:
                pass

    def count(self) -> int:
        return len(self.received)


# ---------------------------------------------------------------------------------------------------
# Terminal: Ctrl-C for the demo alone (job control, as a shell does it)
# ---------------------------------------------------------------------------------------------------

def take_terminal():
    """Ctrl-C makes the terminal send SIGINT to its whole foreground process group. Under `make demo`
    that group includes make, and GNU make, once interrupted, kills itself with SIGINT after its
    recipe ends: the shell would see 130 although the demo exited 0. So, when the demo runs in the
    foreground of a terminal, move it into a process group of its own and make that group the
    terminal's foreground (its children already have groups of their own). Returns a function that
    hands the terminal back to the original group, or None if nothing was changed (no terminal, as
    in CI or pipes; a background job; or the demo already leads its group, e.g. run by a shell)."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None  # no controlling terminal
    original = os.getpgrp()
    try:
        if original == os.getpid() or os.tcgetpgrp(tty) != original:
            os.close(tty)
            return None
        os.setpgid(0, 0)
        try:
            _set_foreground(tty, os.getpgrp())
        except OSError:
            os.setpgid(0, original)  # back where Ctrl-C reaches us, as before
            raise
    except OSError:
        os.close(tty)
        return None
    # Ctrl-Z would now stop the demo alone, which nothing (neither make nor the shell, which waits
    # for make) would ever notice or continue: the terminal would hang. A handler, unlike SIG_IGN,
    # is not inherited by the children.
    signal.signal(signal.SIGTSTP, lambda signum, frame: None)

    def give_back() -> None:
        try:
            if os.tcgetpgrp(tty) == os.getpgrp():  # still ours: nobody else took it meanwhile
                _set_foreground(tty, original)
        except OSError:
            pass  # the original group is gone (make was killed): nobody to hand it back to
        finally:
            os.close(tty)

    return give_back


def _set_foreground(tty: int, pgrp: int) -> None:
    # tcsetpgrp() from a background group (ours, right after setpgid) raises SIGTTOU, which would
    # stop the demo; shells ignore SIGTTOU for this call the same way.
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(tty, pgrp)
    finally:
        signal.signal(signal.SIGTTOU, previous)


# ---------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------

def _child_setup_factory():
    """Runs in each child between fork and exec: own process group (so a terminal's Ctrl-C reaches
    only the demo, which then stops every child exactly once) and, on Linux, SIGTERM when the demo
    dies without cleaning up, so no child outlives it."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None

    def setup():
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if prctl is not None:
            prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the demo died before prctl took effect
                os._exit(1)

    return setup


def start(child: Child, setup) -> None:
    child.proc = subprocess.Popen(child.argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                  preexec_fn=setup, close_fds=True)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def check_alive(children: list[Child]) -> None:
    for child in children:
        if child.proc is not None and child.proc.poll() is not None:
            raise DemoError(f"{child} (pid {child.proc.pid}) exited early with "
                            f"{describe_exit(child.proc.returncode)}")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def wait_accepting(children: list[Child], ports: list[int], signals: Signals) -> bool:
    """Poll until every port accepts a connection. False if a stop signal came first."""
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(ports)
    while pending:
        if signals.count():
            return False
        check_alive(children)
        pending = [p for p in pending if not accepts(p)]
        if not pending:
            return True
        if time.monotonic() >= deadline:
            raise DemoError(f"port(s) {', '.join(map(str, pending))} not accepting connections "
                            f"after {START_TIMEOUT:.0f} s")
        signals.wait(0.05)
    return True


def stop_all(children: list[Child], signals: Signals) -> None:
    """SIGTERM every running child (by PID), wait, SIGKILL its process group after STOP_TIMEOUT or
    at a further Ctrl-C, and reap them all."""
    running = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for child in running:
        try:
            os.kill(child.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    signals_before = signals.count()
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        running = [c for c in running if c.proc.poll() is None]
        if not running:
            break
        if time.monotonic() >= deadline or signals.count() > signals_before:
            for child in running:
                print(f"{PROG}: {child} (pid {child.proc.pid}) did not stop, killing it",
                      file=sys.stderr, flush=True)
                try:
                    os.killpg(child.proc.pid, signal.SIGKILL)  # its own group: it and its workers
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(child.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for child in running:
                child.proc.wait()
            break
        signals.wait(min(0.2, max(0.0, deadline - time.monotonic())))
    for child in children:  # reap whatever is left (already exited ones)
        if child.proc is not None:
            child.proc.wait()


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def _port(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {value}")
    return value


def _ports(text: str) -> list[int]:
    ports = [_port(p) for p in text.split(",") if p.strip()]
    if not ports:
        raise argparse.ArgumentTypeError(f"no ports in {text!r}")
    return ports


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default  # empty counts as unset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run three example upstreams and load_balancer.py in front of them "
        "until Ctrl-C.")
    parser.add_argument("--lb-port", type=_port, metavar="PORT",
                        help="balancer port (env DEMO_LB_PORT, default 8080)")
    parser.add_argument("--admin-port", type=_port, metavar="PORT",
                        help="admin/status port (env DEMO_ADMIN_PORT, default 8081)")
    parser.add_argument("--upstream-ports", type=_ports, metavar="A,B,C",
                        help="comma-separated upstream ports (env DEMO_UPSTREAM_PORTS, "
                        "default 8001,8002,8003)")
    parser.add_argument("--balancer", metavar="PATH",
                        help="load_balancer.py to run (env DEMO_BALANCER, default the repo's)")
    args = parser.parse_args(argv)
    for attr, var, default, convert in (
            ("lb_port", "DEMO_LB_PORT", "8080", _port),
            ("admin_port", "DEMO_ADMIN_PORT", "8081", _port),
            ("upstream_ports", "DEMO_UPSTREAM_PORTS", "8001,8002,8003", _ports)):
        if getattr(args, attr) is None:
            try:
                setattr(args, attr, convert(_env(var, default)))
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{var}: {exc}")
    if args.balancer is None:
        args.balancer = _env("DEMO_BALANCER", str(ROOT / "load_balancer.py"))
    all_ports = [args.lb_port, args.admin_port, *args.upstream_ports]
    if len(set(all_ports)) != len(all_ports):
        parser.error(f"ports must all differ: {', '.join(map(str, all_ports))}")
    return args


def print_hints(args, children: list[Child]) -> None:
    ups = args.upstream_ports
    second = ups[1] if len(ups) > 1 else ups[0]
    lb = f"http://localhost:{args.lb_port}"
    width = max(len(f"curl -X POST http://localhost:{second}/health/recover"), len(f"curl {lb}/"))
    lines = [
        "",
        f"{PROG}: load balancer on {lb}/ in front of upstreams "
        + ", ".join(str(p) for p in ups),
        "pids: " + " ".join(str(c.proc.pid) for c in children),
        "",
        "Try:",
        f"  {f'curl {lb}/':<{width}}  # three times: "
        + ", ".join(str(p) for p in ups[:3]) + " answer in turn",
        f"  {f'curl http://127.0.0.1:{args.admin_port}/status':<{width}}  # JSON status of the backends",
        f"  {f'http://127.0.0.1:{args.admin_port}/':<{width}}  # the dashboard, in a browser",
        f"  {f'curl -X POST http://localhost:{second}/health/fail':<{width}}  # {second} fails its "
        f"health checks: down after 3 (about 3 s)",
        f"  {f'curl {lb}/':<{width}}  # {second} is skipped now",
        f"  {f'curl -X POST http://localhost:{second}/health/recover':<{width}}  # up again after 2 "
        f"passing checks",
        f"  {f'curl -X POST http://127.0.0.1:{args.admin_port}/backends/{HOST}:{second}/drain':<{width}}"
        f"  # no new requests for {second}; /ready brings it back",
        "",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)


def run(args, signals: Signals) -> int:
    python = sys.executable or "python3"
    children = [
        Child("upstream", port, [python, str(SERVER), "--host", HOST, "--port", str(port)])
        for port in args.upstream_ports
    ]
    balancer_argv = [python, args.balancer, "--host", HOST, "--port", str(args.lb_port)]
    for port in args.upstream_ports:
        balancer_argv += ["--backend", f"http://{HOST}:{port}"]
    balancer_argv += ["--admin-port", str(args.admin_port), "--health-path", "/health",
                      "--health-interval", str(HEALTH_INTERVAL)]
    balancer = Child("load balancer", args.lb_port, balancer_argv)
    started: list[Child] = []
    try:
        busy = [p for p in [args.lb_port, args.admin_port, *args.upstream_ports] if not port_free(p)]
        if busy:
            raise DemoError(f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} "
                            f"already in use on {HOST} (choose others: make demo DEMO_LB_PORT=8090 "
                            f"DEMO_ADMIN_PORT=8091 DEMO_UPSTREAM_PORTS=9001,9002,9003)")
        if not Path(args.balancer).is_file():
            raise DemoError(f"{args.balancer} not found")
        setup = _child_setup_factory()
        for child in children:
            if signals.count():
                return 0
            start(child, setup)
            started.append(child)
        if not wait_accepting(started, args.upstream_ports, signals):
            return 0
        start(balancer, setup)
        started.append(balancer)
        if not wait_accepting(started, [args.lb_port, args.admin_port], signals):
            return 0
        print_hints(args, started)
        while not signals.count():
            check_alive(started)
            signals.wait(1.0)  # woken at once by SIGINT/SIGTERM/SIGCHLD
        print(f"{PROG}: stopping...", flush=True)
        return 0
    except DemoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop_all(started, signals)
        if started and signals.count():
            print(f"{PROG}: stopped", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    signals = Signals()
    give_back = take_terminal()
    try:
        return run(args, signals)
    except KeyboardInterrupt:  # pragma: no cover (SIGINT has its own handler)
        return 0
    finally:  # every way out, exceptions included, gives the terminal back
        if give_back is not None:
            give_back()


if __name__ == "__main__":
    sys.exit(main())
