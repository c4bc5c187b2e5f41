#!/usr/bin/env python3
"""Benchmark load_balancer.py against direct access to one fast upstream, in one run.

Starts three bench/upstream.py processes and the balancer (1 worker, plus each --workers N), then
drives them with wrk (keep-alive, -t1 --latency --timeout 5s), interleaving targets in each round and
reporting medians:
  * small requests (GET /, 13-byte body) at each --conc: req/s, p50/p99, errors, ratio to direct;
  * large bodies (--big): 8 MiB GET responses and 8 MiB POST uploads at conc 1 and 8: MB/s, plus
    each balancer's peak RSS during that series (VmHWM summed over the process and its children);
  * idle connections (--idle N): N keep-alive connections parked on the balancer, its RSS, then one
    more request on every one of them.
Everything listens on 127.0.0.1 on ports picked at run time; every process started is stopped at exit.
"""
import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_LB = HERE.parent / "load_balancer.py"
UPSTREAM = HERE / "upstream.py"
UPSTREAM_COUNT = 3
BIG_SIZE = 8 << 20
BIG_CONC = (1, 8)
START_DEADLINE = 15.0      # seconds for a started process to accept connections
STOP_TIMEOUT = 5.0         # seconds between SIGTERM and SIGKILL
IDLE_IO_TIMEOUT = 10.0     # seconds per request in the idle-connections series
IDLE_OPEN_PARALLEL = 64    # connection attempts in flight while opening idle connections
UPLOAD_LUA = f"""wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.body = string.rep("x", {BIG_SIZE})
"""


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------

def free_ports(count):
    """Ports that were free on 127.0.0.1 a moment ago (all bound at once so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port, proc, deadline):
    """True once 127.0.0.1:port accepts a connection; False if `proc` exits or the deadline passes."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def stop_process(proc):
    """SIGTERM the process by PID and reap it; SIGKILL it if it is still there after STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(STOP_TIMEOUT)
    except ProcessLookupError:
        proc.wait()
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class Fleet:
    """Processes started by the benchmark, each in its own session with its output in a log file."""

    def __init__(self, log_dir):
        self.log_dir = Path(log_dir)
        self.procs = []

    def start(self, name, argv, port):
        """Start `argv` and wait until it listens on `port`; the Popen, or None (reason printed)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        if wait_for_port(port, proc, time.monotonic() + START_DEADLINE):
            return proc
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not listen in time"
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        print(f"# {name} {state} on port {port}; skipped. Last log lines:", *("#   " + t for t in tail),
              sep="\n", file=sys.stderr)
        self.stop(proc)
        return None

    @staticmethod
    def stop(proc):
        """Stop a started process, then kill what is left in its own session (orphaned workers)."""
        stop_process(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self):
        for proc in reversed(self.procs):
            self.stop(proc)


# ---------------------------------------------------------------------------------------------------
# Memory of a process tree (/proc)
# ---------------------------------------------------------------------------------------------------

def child_pids(pid):
    """Direct children of `pid`: /proc/<pid>/task/*/children, or a /proc scan where that file is missing."""
    files = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if files:
        return [int(c) for f in files for c in f.read_text().split()]
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def process_tree(pid):
    """`pid` and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            todo.extend(child_pids(p))
        except OSError:
            pass
    return pids


def status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mb(pid, field):
    """Sum of a /proc/<pid>/status memory field (VmRSS, VmHWM) over the process tree, in MB."""
    return sum(status_kib(p, field) for p in process_tree(pid)) * 1024 / 1e6


def reset_peak_rss(pid):
    """Restart VmHWM accounting for the tree (clear_refs 5); False where the kernel refuses."""
    ok = True
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


# ---------------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------------

def wrk_version():
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"wrk\s+(\S+)", out)
    return m.group(1) if m else "?"


def parse_duration_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[m.group(2)]


def parse_wrk(out):
    """req/s, p50/p99 in ms and errors (socket errors + non-2xx/3xx) from wrk --latency output."""
    def number(pattern):
        m = re.search(pattern, out)
        return m.group(1) if m else None

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(number(r"Non-2xx or 3xx responses: (\d+)") or 0)
    return {
        "rps": float(number(r"Requests/sec:\s+([\d.]+)") or 0.0),
        "p50": parse_duration_ms(number(r"\s50%\s+(\S+)") or ""),
        "p99": parse_duration_ms(number(r"\s99%\s+(\S+)") or ""),
        "errors": errors,
    }


def run_wrk(port, conc, secs, path="/", script=None):
    argv = ["wrk", "-t1", f"-c{conc}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if script:
        argv += ["-s", str(script)]
    with subprocess.Popen(argv + [f"http://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            out, _ = proc.communicate()
        except BaseException:
            stop_process(proc)
            raise
    return parse_wrk(out)


def median_of(runs):
    """Median of each metric over rounds; errors are summed."""
    merged = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99")}
    merged["errors"] = sum(r["errors"] for r in runs)
    return merged


def measure(targets, points, rounds, secs):
    """Run every (series, conc, path, script) point on every target, rounds interleaved across targets.

    Returns {series: {conc: {target: median metrics}}}.
    """
    results = {}
    for series, conc, path, script in points:
        runs = {name: [] for name in targets}
        for _ in range(rounds):
            for name, port in targets.items():
                runs[name].append(run_wrk(port, conc, secs, path, script))
        results.setdefault(series, {})[conc] = {name: median_of(r) for name, r in runs.items()}
    return results


# ---------------------------------------------------------------------------------------------------
# Idle keep-alive connections
# ---------------------------------------------------------------------------------------------------

GET_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-idle\r\n\r\n"


async def get_once(reader, writer):
    """One GET / on an open keep-alive connection; True on a complete 200 response."""
    try:
        writer.write(GET_REQUEST)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_IO_TIMEOUT)
        status = head.split(b" ", 2)[1]
        length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        if not length:
            return False
        await asyncio.wait_for(reader.readexactly(int(length.group(1))), IDLE_IO_TIMEOUT)
        return status == b"200"
    except (OSError, EOFError, IndexError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        return False


async def open_served_connection(port, gate):
    """A connection that has completed one GET, or None."""
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                                    IDLE_IO_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return None
        if await get_once(reader, writer):
            return reader, writer
        writer.close()
        return None


async def idle_connections(port, pid, count):
    """Park `count` served keep-alive connections on the balancer, measure RSS, reuse each once."""
    rss_before = tree_memory_mb(pid, "VmRSS")
    gate = asyncio.Semaphore(IDLE_OPEN_PARALLEL)
    conns = [c for c in await asyncio.gather(*(open_served_connection(port, gate) for _ in range(count))) if c]
    await asyncio.sleep(0.5)
    rss = tree_memory_mb(pid, "VmRSS")
    served = sum(await asyncio.gather(*(get_once(r, w) for r, w in conns)))
    for _, writer in conns:
        writer.close()
    return {"count": count, "opened": len(conns), "served": served, "rss_mb": rss, "rss_before_mb": rss_before}


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def print_table(title, results, value_name, value_of):
    print(f"\n{title}")
    print(f"{'series':10} {'target':8} {'conc':>5} {value_name:>9} {'p50 ms':>8} {'p99 ms':>9} {'errors':>7}  {'vs direct':>9}")
    for series, by_conc in results.items():
        for conc, by_target in by_conc.items():
            base = value_of(by_target["direct"]) if "direct" in by_target else 0
            for name, m in by_target.items():
                ratio = f"{value_of(m) / base:.2f}" if base else "-"
                print(f"{series:10} {name:8} {conc:>5} {value_of(m):>9.1f} {m['p50']:>8.2f} {m['p99']:>9.2f} "
                      f"{m['errors']:>7}  {ratio:>9}")


def machine_facts(lb_path):
    return {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "kernel": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "wrk": wrk_version(), "lb": str(lb_path)}


def print_machine_facts(facts):
    print(f"# {facts['cpus']} CPUs ({facts['usable_cpus']} usable), {facts['kernel']}, Python {facts['python']}, "
          f"wrk {facts['wrk']}; lb: {facts['lb']}")


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

def positive_ints(text):
    """argparse type: '1,32,256' -> [1, 32, 256]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lb", type=Path, default=DEFAULT_LB, help="load_balancer.py to measure")
    ap.add_argument("--secs", type=int, default=3, help="wrk duration per point, seconds")
    ap.add_argument("--conc", type=positive_ints, default="1,32,256", help="comma-separated wrk connection counts (small requests)")
    ap.add_argument("--workers", default="2",
                    help="comma-separated --workers values measured besides 1 worker (e.g. 2,4 or auto)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per point; medians reported")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                    help=f"8 MiB GET/POST series at conc {','.join(map(str, BIG_CONC))}")
    ap.add_argument("--idle", type=int, default=1000, metavar="N", help="idle keep-alive connections (0 skips)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    args.workers = list(dict.fromkeys(w.strip() for w in args.workers.split(",") if w.strip() not in ("", "1")))
    if args.secs < 1 or args.rounds < 1:
        ap.error("--secs and --rounds must be positive")
    return args


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_targets(fleet, lb_path, workers):
    """Start the upstreams and balancers; returns ({target: port}, {lb target: pid})."""
    ports = free_ports(UPSTREAM_COUNT + 1 + len(workers))
    upstream_ports, lb_ports = ports[:UPSTREAM_COUNT], ports[UPSTREAM_COUNT:]
    for i, port in enumerate(upstream_ports):
        if not fleet.start(f"upstream{i + 1}", [sys.executable, str(UPSTREAM), "--port", str(port)], port):
            raise SystemExit("bench: an upstream did not start")
    targets, pids = {"direct": upstream_ports[0]}, {}
    backends = [a for p in upstream_ports for a in ("--backend", f"http://127.0.0.1:{p}")]
    for label, extra, port in [("lb-1w", [], lb_ports[0])] + [
            (f"lb-{w}w", ["--workers", w], p) for w, p in zip(workers, lb_ports[1:])]:
        argv = [sys.executable, str(lb_path), "--host", "127.0.0.1", "--port", str(port), *backends,
                "--log-level", "warning", *extra]
        proc = fleet.start(label, argv, port)
        if proc:
            targets[label], pids[label] = port, proc.pid
    return targets, pids


def run_benchmark(args, fleet, tmp):
    report = {"machine": machine_facts(args.lb)}
    print_machine_facts(report["machine"])
    targets, pids = start_targets(fleet, args.lb, args.workers)
    report["targets"] = list(targets)
    if not pids:
        print("# no balancer started; measuring direct only", file=sys.stderr)

    small = measure(targets, [("GET /", c, "/", None) for c in args.conc], args.rounds, args.secs)
    print_table("small requests (13-byte body)", small, "req/s", lambda m: m["rps"])
    report["small"] = small

    if args.big:
        upload_lua = Path(tmp) / "upload.lua"
        upload_lua.write_text(UPLOAD_LUA)
        peaks_are_series_only = all([reset_peak_rss(pid) for pid in pids.values()])
        points = [(series, c, path, script) for series, path, script in
                  (("GET /big", "/big", None), ("POST 8MiB", "/upload", upload_lua)) for c in BIG_CONC]
        big = measure(targets, points, args.rounds, args.secs)
        for by_conc in big.values():
            for by_target in by_conc.values():
                for m in by_target.values():
                    m["mbps"] = m["rps"] * BIG_SIZE / 1e6
        peak = {label: tree_memory_mb(pid, "VmHWM") for label, pid in pids.items()}
        print_table("large bodies (8 MiB per request)", big, "MB/s", lambda m: m["mbps"])
        scope = "during the series" if peaks_are_series_only else "since start (clear_refs refused)"
        print(f"balancer peak RSS {scope}: " + ", ".join(f"{k} {v:.1f} MB" for k, v in peak.items()))
        report["big"], report["big_peak_rss_mb"] = big, peak

    if args.idle > 0:
        print()
        report["idle"] = {}
        for label, pid in pids.items():
            r = asyncio.run(idle_connections(targets[label], pid, args.idle))
            print(f"idle {args.idle} {label}: served {r['served']}/{args.idle}, RSS {r['rss_mb']:.1f} MB "
                  f"(opened {r['opened']}, RSS before {r['rss_before_mb']:.1f} MB)")
            report["idle"][label] = r
    return report


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk not found on PATH; install it with `apt-get install wrk`", file=sys.stderr)
        return 2
    if not args.lb.is_file():
        print(f"bench: {args.lb} not found (use --lb PATH)", file=sys.stderr)
        return 2
    raise_fd_limit()
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    sys.stdout.reconfigure(line_buffering=True)
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmp:
        fleet = Fleet(tmp)
        try:
            report = run_benchmark(args, fleet, tmp)
        except KeyboardInterrupt:
            print("\nbench: interrupted", file=sys.stderr)
            return 130
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)   # let the clean-up finish
            fleet.stop_all()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
