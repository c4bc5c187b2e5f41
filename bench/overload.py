"""The overload scenario of "Protecting the applications" (README): three Flask apps under gunicorn,
2 sync workers each, a 100 ms endpoint; 48 concurrent clients for 10 s (wrk -c48 -d10s --latency)
through load_balancer without caps, with maxconn=2 on each, and through HAProxy on the exported
configuration. Prints one table row per run. Needs gunicorn, Flask, wrk and haproxy.

    python3 bench/overload.py [--seconds 10] [--connections 48]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import load_balancer  # noqa: E402

APP = """
import time
from flask import Flask
app = Flask(__name__)

@app.get("/")
def slow():
    time.sleep(0.1)
    return "ok\\n"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def wrk(port: int, seconds: int, connections: int) -> dict:
    out = subprocess.run(["wrk", f"-c{connections}", "-t4", f"-d{seconds}s", "--timeout", "60s",
                          "--latency", f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 90).stdout
    completed = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)

    def quantile(label: str) -> str:
        found = re.search(rf"^\s+{label}%\s+(\S+)", out, re.M)
        return found.group(1) if found else "?"

    return {"completed": completed, "errors": errors, "p50": quantile("50"), "p99": quantile("99"), "raw": out}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=48)
    args = parser.parse_args()
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or shutil.which("gunicorn")
    work = Path(tempfile.mkdtemp(prefix="overload-"))
    (work / "slowapp.py").write_text(APP)
    apps, ports = [], [free_port() for _ in range(3)]
    control = ["--no-control-socket"] if "--no-control-socket" in subprocess.run(
        [gunicorn, "--help"], capture_output=True, text=True).stdout else []
    try:
        for port in ports:
            apps.append(subprocess.Popen([gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", *control,
                                          "slowapp:app"], cwd=work, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True))
        for port in ports:
            wait_port(port)
        rows = []
        for label, cap in (("load_balancer, no caps", ""), ("load_balancer, maxconn=2", ",maxconn=2")):
            port = free_port()
            lb = subprocess.Popen([sys.executable, str(ROOT / "load_balancer.py"), "--host", "127.0.0.1",
                                   "--port", str(port), "--health-interval", "0",
                                   *[a for p in ports for a in ("--backend", f"http://127.0.0.1:{p}{cap}")]],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_port(port)
                rows.append((label, wrk(port, args.seconds, args.connections)))
            finally:
                stop(lb)
        if shutil.which("haproxy"):
            port = free_port()
            config = load_balancer.Config(host="127.0.0.1", port=port, health_interval=0,
                                          backends=tuple(f"http://127.0.0.1:{p},maxconn=2" for p in ports))
            (work / "haproxy.cfg").write_text(load_balancer.export_config(config, "haproxy"))
            peer = subprocess.Popen(["haproxy", "-db", "-f", str(work / "haproxy.cfg")], cwd=work,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_port(port)
                rows.append(("HAProxy, exported (maxconn 2)", wrk(port, args.seconds, args.connections)))
            finally:
                stop(peer)
        print(f"| {args.connections} clients, {args.seconds} s | completed | errors | p50 | p99 |")
        print("|---|---|---|---|---|")
        for label, result in rows:
            print(f"| {label} | {result['completed']} | {result['errors']} | {result['p50']} | {result['p99']} |")
    finally:
        for app in apps:
            stop(app)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
