#!/usr/bin/env python3
"""Benchmark load_balancer.py against direct access to one fast upstream, in one run.

Starts three bench/upstream.py processes and the balancer (1 worker, plus each --workers N), then
drives them with wrk (keep-alive, -t1 --latency --timeout 5s), interleaving targets in each round and
reporting medians:
  * small requests (GET /, 13-byte body) at each --conc: req/s, p50/p99, errors, ratio to direct.
    Two more targets here: lb-1w-admin, the balancer with --admin-port while a thread scrapes its
    /metrics and /status once a second during its runs (the cost of the admin listener, its sampler
    and the counting, against lb-1w in the same run); and with --baseline FILE, that other
    load_balancer.py as base-1w and base-Nw (given only --host --port --backend --log-level
    --workers, which every version has). Each --variant NAME=ARGS is the balancer with more flags
    (a balancing policy, say) as lb-1w-NAME and lb-Nw-NAME; one that answers with a Set-Cookie
    (--sticky-cookie) gets it back on every request, as a pinned client sends it. The last column is
    a same-run ratio: lb-Nw to base-Nw, lb-1w-admin to lb-1w, lb-Nw-NAME to lb-Nw;
  * large bodies (--big): 8 MiB GET responses and 8 MiB POST uploads at conc 1 and 8: MB/s, plus
    each balancer's peak RSS during that series (VmHWM summed over the process and its children);
  * idle connections (--idle N): N keep-alive connections parked on the balancer, its RSS, then one
    more request on every one of them;
  * WebSocket (--ws): an asyncio client in this process opens sockets on GET /ws (the balancer
    tunnels them after the upstream's 101) and runs send/receive echo loops for --secs on each:
    64-byte text messages over 1 and 32 sockets (round trips/s), 1 MiB binary messages over 1 and
    8 sockets (MB/s of echoed payload); p50/p99 round trip; ratio to direct. The baseline joins
    when it answers a WebSocket handshake. The 1 MiB frames are masked once per run with a few
    keys and reused, so the client's own XOR is not what is measured;
  * HTTPS (--tls, on when `openssl` exists): a self-signed EC P-256 certificate for 127.0.0.1 and
    localhost, the balancer with --tls-cert/--tls-key (1 worker and each --workers N) and, where
    nginx is installed, nginx terminating TLS with the same certificate in front of the same
    upstreams (worker_processes 1 and N, upstream keepalive 64): keep-alive req/s at 1 and 32
    connections, and new TLS connections/s (wrk with Connection: close at 32 connections: one
    handshake per request, which wrk resumes with the previous connection's session ticket when
    the server takes it back; wrk's latency there starts after the handshake); ratio to nginx
    with the same number of workers.
After the WebSocket and HTTPS series, each balancer's open descriptors and its sockets in
CLOSE-WAIT (connections the client ended that the balancer never closed).
Everything listens on 127.0.0.1 on ports picked at run time; every process is started in a session
of its own (so autogroup scheduling treats each alike), waited for with a deadline, and stopped
(with what is left in its session) by the end of the run.
"""
import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from upstream import OP_BINARY, OP_CLOSE, OP_TEXT, websocket_accept, xor_mask

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
ADMIN_PATHS = ("/metrics", "/status")
SCRAPE_INTERVAL = 1.0      # seconds between two scrapes of ADMIN_PATHS
ADMIN_TIMEOUT = 5.0        # seconds per scrape
WS_SERIES = (("WS 64B", 64, (1, 32)), ("WS 1MiB", 1 << 20, (1, 8)))   # (series, message size, sockets)
WS_BIG_MESSAGE = 65536     # messages from this size on are masked ahead of time
WS_PREMASKED_KEYS = 4      # ... with this many keys, used in turn
WS_IO_TIMEOUT = 5.0        # seconds a handshake, a round trip or a close may take (wrk's --timeout)
WS_READ_LIMIT = 4 << 20    # StreamReader buffer limit: a 1 MiB echo never pauses reading
TLS_CONC = (1, 32)         # keep-alive HTTPS connections
TLS_NEW_CONC = 32          # connections for the new-connection (handshake) series
OPENSSL_TIMEOUT = 30.0


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

    def start(self, name, argv, port, *more_ports):
        """Start `argv` and wait until it listens on `port` (and `more_ports`); the Popen, or None
        (reason printed)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + START_DEADLINE
        if all(wait_for_port(p, proc, deadline) for p in (port, *more_ports)):
            return proc
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not listen in time"
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        ports = ", ".join(map(str, (port, *more_ports)))
        print(f"# {name} {state} on port {ports}; skipped. Last log lines:", *("#   " + t for t in tail),
              sep="\n", file=sys.stderr)
        self.stop(proc)
        return None

    def stop(self, proc):
        """Stop a started process, then kill what is left in its own session (orphaned workers)."""
        stop_process(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
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


TCP_CLOSE_WAIT = "08"       # st in /proc/net/tcp: the peer closed, this end has not


def tree_descriptors(pid):
    """(open file descriptors, TCP sockets in CLOSE-WAIT) of the process tree: a connection the
    peer ended that the process never closed shows in the second."""
    close_wait = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_CLOSE_WAIT:
                close_wait.add(fields[9])
    fds = stuck = 0
    for p in process_tree(pid):
        try:
            names = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        fds += len(names)
        for name in names:
            try:
                target = os.readlink(f"/proc/{p}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in close_wait:
                stuck += 1
    return fds, stuck


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


def first_cookie(port):
    """The name=value of the Set-Cookie in the answer to GET / (None without one)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ADMIN_TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie")
    finally:
        conn.close()
    return cookie.split(";", 1)[0] if cookie else None


def run_wrk(port, conc, secs, path="/", script=None, scheme="http", headers=()):
    argv = ["wrk", "-t1", f"-c{conc}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if script:
        argv += ["-s", str(script)]
    for header in headers:
        argv += ["-H", header]
    with subprocess.Popen(argv + [f"{scheme}://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            out, _ = proc.communicate()
        except BaseException:
            stop_process(proc)
            raise
    return parse_wrk(out)


def median_of(runs):
    """Median of each metric over rounds; errors (and their kinds, where counted) are summed."""
    merged = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99")}
    merged["errors"] = sum(r["errors"] for r in runs)
    if any("error_kinds" in r for r in runs):
        kinds = {}
        for r in runs:
            for kind, n in r.get("error_kinds", {}).items():
                kinds[kind] = kinds.get(kind, 0) + n
        merged["error_kinds"] = kinds
    return merged


def measure(targets, points, rounds, run, around=None):
    """Run every (series, conc, *args) point on every target, rounds interleaved across targets:
    run(port, conc, *args) -> metrics. `around`: {target: context manager factory} entered around
    each of that target's runs.

    Returns {series: {conc: {target: median metrics}}}.
    """
    around = around or {}
    results = {}
    for series, conc, *extra in points:
        runs = {name: [] for name in targets}
        for _ in range(rounds):
            for name, port in targets.items():
                with around.get(name, contextlib.nullcontext)():
                    runs[name].append(run(port, conc, *extra))
        results.setdefault(series, {})[conc] = {name: median_of(r) for name, r in runs.items()}
    return results


# ---------------------------------------------------------------------------------------------------
# Admin scrapes
# ---------------------------------------------------------------------------------------------------

class AdminScraper:
    """GET /metrics and /status on the admin port once a second, from a thread, while running()."""

    def __init__(self, port):
        self.port = port
        self.ok = {path: 0 for path in ADMIN_PATHS}
        self.failed = 0
        self.errors = []
        self.slowest_ms = 0.0

    @contextlib.contextmanager
    def running(self):
        stop = threading.Event()
        thread = threading.Thread(target=self.loop, args=(stop,), name="admin-scraper", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(2 * ADMIN_TIMEOUT * len(ADMIN_PATHS))

    def loop(self, stop):
        conn = None
        try:
            while True:
                started = time.monotonic()
                for path in ADMIN_PATHS:
                    conn = self.scrape(conn, path)
                if stop.wait(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - started))):
                    return
        finally:
            if conn is not None:
                conn.close()

    def scrape(self, conn, path):
        """One GET on a keep-alive connection (opened again after a failure); the connection."""
        started = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=ADMIN_TIMEOUT)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            if path == "/status":
                json.loads(body)
            elif b"# TYPE" not in body:
                raise ValueError(f"no metric families in {len(body)} bytes")
            self.ok[path] += 1
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.failed += 1
            self.errors.append(f"{path}: {exc!r}")
            if conn is not None:
                conn.close()
            conn = None
        self.slowest_ms = max(self.slowest_ms, (time.monotonic() - started) * 1e3)
        return conn

    def summary(self):
        return {"ok": dict(self.ok), "failed": self.failed, "slowest_ms": self.slowest_ms,
                "errors": self.errors[:10]}


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
# WebSocket echo client (RFC 6455, client side: masked frames, no fragmentation)
# ---------------------------------------------------------------------------------------------------

class WsError(Exception):
    """A handshake or frame that is not what an echo server answers."""


WS_ERRORS = (OSError, EOFError, WsError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
             asyncio.TimeoutError)


def ws_client_frame(opcode, payload, key=None):
    """A final, masked client frame: (head with mask key, masked payload)."""
    key = key or os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key, xor_mask(payload, key)


async def ws_read_frame(reader):
    """(opcode, payload) of one unmasked server frame."""
    first, second = await reader.readexactly(2)
    if second & 0x80:
        raise WsError("masked frame from the server")
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, (await reader.readexactly(n) if n else b"")


async def ws_open(port):
    """Open a WebSocket on GET /ws: (reader, writer) after a 101 with the right accept value."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=WS_READ_LIMIT), WS_IO_TIMEOUT)
    try:
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                     b"User-Agent: bench-ws\r\n\r\n" % (port, key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WS_IO_TIMEOUT)
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 101"):
            raise WsError(f"handshake answered {status.decode('latin-1')!r}")
        accept = re.search(rb"\r\nsec-websocket-accept:[ \t]*(\S+)", head, re.IGNORECASE)
        if not accept or accept.group(1) != websocket_accept(key):
            raise WsError("wrong or missing Sec-WebSocket-Accept")
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def ws_close(reader, writer):
    """Close handshake: send close 1000, read up to the server's close, then close the socket."""
    try:
        head, body = ws_client_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
        writer.write(head + body)
        await writer.drain()

        async def until_close():
            while (await ws_read_frame(reader))[0] != OP_CLOSE:
                pass
        await asyncio.wait_for(until_close(), WS_IO_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(*WS_ERRORS):
            await asyncio.wait_for(writer.wait_closed(), WS_IO_TIMEOUT)


class WsSocket:
    """One echo loop's socket, its progress (for the stall watchdog) and its counts."""

    def __init__(self):
        self.conn = None
        self.progress = time.perf_counter()
        self.stalled = False
        self.task = None


async def ws_probe(port):
    """None when a WebSocket opens and closes on `port`, else what went wrong."""
    try:
        reader, writer = await ws_open(port)
        await ws_close(reader, writer)
        return None
    except WS_ERRORS as exc:
        return repr(exc)


async def ws_point(port, conc, size, secs):
    """`conc` sockets each sending a `size`-byte message and waiting for its echo, in a loop for
    `secs`; round trips/s, p50/p99 round trip in ms, and errors by kind."""
    opcode = OP_TEXT if size < WS_BIG_MESSAGE else OP_BINARY
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size] if opcode == OP_TEXT else os.urandom(size)
    premasked = [ws_client_frame(opcode, payload) for _ in range(WS_PREMASKED_KEYS)] \
        if size >= WS_BIG_MESSAGE else None
    errors = {}
    samples = []

    def count(kind):
        errors[kind] = errors.get(kind, 0) + 1

    async def connect(sock):
        try:
            sock.conn = await ws_open(port)
        except WS_ERRORS as exc:
            count("handshake" if isinstance(exc, WsError) else "connect")
            sock.conn = None
        sock.progress = time.perf_counter()

    async def echo_loop(sock, deadline):
        sent = 0
        while time.perf_counter() < deadline:
            if sock.conn is None:
                await connect(sock)
                if sock.conn is None:
                    await asyncio.sleep(0.1)
                    continue
            reader, writer = sock.conn
            if premasked:
                head, body = premasked[sent % len(premasked)]
            else:
                head, body = ws_client_frame(opcode, payload)
            sent += 1
            started = time.perf_counter()
            try:
                if premasked:
                    writer.write(head)
                    writer.write(body)
                else:
                    writer.write(head + body)
                await writer.drain()
                got, data = await ws_read_frame(reader)
                if got != opcode or data != payload:
                    raise WsError(f"echo differs (opcode {got}, {len(data)} bytes)")
            except asyncio.CancelledError:
                if not sock.stalled:
                    raise
                getattr(asyncio.current_task(), "uncancel", lambda: None)()   # Python 3.11+
                count("timeout")
            except WS_ERRORS as exc:
                count("mismatch" if isinstance(exc, WsError) else "io")
            else:
                now = time.perf_counter()
                samples.append(now - started)
                sock.progress = now
                continue
            sock.stalled = False
            writer.close()
            sock.conn = None

    async def watchdog(socks):
        """Cancel the round trip of a socket that made no progress for WS_IO_TIMEOUT."""
        while not all(s.task.done() for s in socks):
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            for s in socks:
                if not s.task.done() and s.conn is not None and not s.stalled \
                        and now - s.progress > WS_IO_TIMEOUT:
                    s.stalled = True
                    s.task.cancel()

    socks = [WsSocket() for _ in range(conc)]
    await asyncio.gather(*(connect(s) for s in socks))
    started = time.perf_counter()
    deadline = started + secs
    for s in socks:
        s.progress = started
        s.task = asyncio.ensure_future(echo_loop(s, deadline))
    guard = asyncio.ensure_future(watchdog(socks))
    try:
        await asyncio.gather(*(s.task for s in socks), return_exceptions=True)
    finally:
        guard.cancel()
    elapsed = time.perf_counter() - started

    async def close(sock):
        if sock.conn is None:
            return
        try:
            await ws_close(*sock.conn)
        except WS_ERRORS:
            count("close")

    await asyncio.gather(*(close(s) for s in socks))
    samples.sort()

    def percentile(q):
        return samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3 if samples else float("nan")

    return {"rps": len(samples) / elapsed, "p50": percentile(0.50), "p99": percentile(0.99),
            "errors": sum(errors.values()), "error_kinds": errors}


def run_ws(port, conc, size, secs):
    return asyncio.run(ws_point(port, conc, size, secs))


# ---------------------------------------------------------------------------------------------------
# HTTPS: certificate, nginx
# ---------------------------------------------------------------------------------------------------

def make_certificate(directory):
    """A self-signed EC P-256 certificate for 127.0.0.1 and localhost: (cert, key) paths, or None."""
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=OPENSSL_TIMEOUT, start_new_session=True)
    except subprocess.TimeoutExpired:
        print("# openssl did not finish in time; HTTPS series skipped", file=sys.stderr)
        return None
    if done.returncode != 0 or not cert.is_file() or not key.is_file():
        print(f"# openssl failed ({done.stderr.strip()[-300:]}); HTTPS series skipped", file=sys.stderr)
        return None
    return cert, key


def find_nginx():
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def program_version(argv, pattern):
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
                              start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, done.stdout + done.stderr)
    return m.group(1) if m else None


def nginx_conf(port, upstream_ports, workers, cert, key):
    """nginx terminating TLS on 127.0.0.1:port in front of the upstreams; paths relative to -p."""
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in upstream_ports)
    return f"""# Written by bench/bench.py for its HTTPS series.
worker_processes {workers};
pid nginx.pid;
lock_file nginx.lock;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    access_log off;
    # The balancer serves any number of requests on a keep-alive connection: so does nginx here.
    keepalive_requests 1000000;

    upstream backends {{
{servers}        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def print_table(title, results, value_name, value_of, refs=None, ratio_name="vs direct"):
    """One row per series, conc and target. `ratio_name` column: the value over direct's (or, with
    `refs`, over refs[target]'s, when ratio_name is not "vs direct"). With `refs` and the direct
    column, a last "same run" column: the value over refs[target]'s, that target named."""
    rows = [(s, c, n) for s, by_conc in results.items() for c, by_target in by_conc.items() for n in by_target]
    if not rows:
        return
    sw = max([10] + [len(s) for s, _, _ in rows])
    tw = max([8] + [len(n) for _, _, n in rows])
    direct = ratio_name == "vs direct"
    same_run = bool(refs) and direct
    print(f"\n{title}")
    print(f"{'series':{sw}} {'target':{tw}} {'conc':>5} {value_name:>9} {'p50 ms':>8} {'p99 ms':>9} {'errors':>7}  "
          f"{ratio_name:>9}" + ("  same run" if same_run else ""))

    def ratio(m, ref):
        base = value_of(ref) if ref else 0
        return f"{value_of(m) / base:.2f}" if base else "-"

    for series, by_conc in results.items():
        for conc, by_target in by_conc.items():
            for name, m in by_target.items():
                first_ref = by_target.get("direct") if direct else by_target.get((refs or {}).get(name))
                line = (f"{series:{sw}} {name:{tw}} {conc:>5} {value_of(m):>9.1f} {m['p50']:>8.2f} {m['p99']:>9.2f} "
                        f"{m['errors']:>7}  {ratio(m, first_ref):>9}")
                ref_name = (refs or {}).get(name)
                if same_run and ref_name in by_target:
                    line += f"  {ratio(m, by_target[ref_name])} of {ref_name}"
                print(line)


def print_descriptors(after, pids):
    """One line: each balancer's open descriptors and CLOSE-WAIT sockets; returns them."""
    fds = {name: tree_descriptors(pid) for name, pid in pids.items()}
    print(f"balancer descriptors after {after} (CLOSE-WAIT: a connection the client closed and the "
          "balancer did not): " + "; ".join(f"{name} {n} open, {stuck} in CLOSE-WAIT"
                                            for name, (n, stuck) in fds.items()))
    return {name: {"open": n, "close_wait": stuck} for name, (n, stuck) in fds.items()}


def print_error_kinds(results):
    for series, by_conc in results.items():
        for conc, by_target in by_conc.items():
            for name, m in by_target.items():
                kinds = {k: v for k, v in m.get("error_kinds", {}).items() if v}
                if kinds:
                    print(f"# errors {series} {name} conc {conc}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))


def machine_facts(args):
    facts = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
             "kernel": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
             "wrk": wrk_version(), "lb": str(args.lb)}
    if args.baseline:
        facts["baseline"] = str(args.baseline)
    if args.tls:
        facts["openssl"] = program_version(["openssl", "version"], r"OpenSSL\s+(\S+)")
        nginx = find_nginx()
        facts["nginx"] = program_version([nginx, "-v"], r"nginx/(\S+)") if nginx else None
    return facts


def print_machine_facts(facts):
    extra = ""
    if "openssl" in facts:
        extra += f", OpenSSL {facts['openssl'] or 'missing'}, nginx {facts['nginx'] or 'missing'}"
    print(f"# {facts['cpus']} CPUs ({facts['usable_cpus']} usable), {facts['kernel']}, Python {facts['python']}, "
          f"wrk {facts['wrk']}{extra}; lb: {facts['lb']}" + (f"; baseline: {facts['baseline']}" if "baseline" in facts else ""))


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
    ap.add_argument("--baseline", type=Path, metavar="FILE",
                    help="another load_balancer.py measured in the same rounds as base-1w and base-Nw "
                         "(e.g. `git show REV:load_balancer.py > /tmp/lb_base.py`)")
    ap.add_argument("--lb-args", default="", metavar="ARGS",
                    help="extra flags for every balancer measured from --lb, not for the baseline (e.g. "
                         "--lb-args='--rate-limit 1000000/s' with --baseline the same file: what a "
                         "setting costs, in one run)")
    ap.add_argument("--secs", type=int, default=3, help="wrk duration per point, seconds")
    ap.add_argument("--conc", type=positive_ints, default="1,32,256", help="comma-separated wrk connection counts (small requests)")
    ap.add_argument("--workers", default="2",
                    help="comma-separated --workers values measured besides 1 worker (e.g. 2,4 or auto)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per point; medians reported")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                    help=f"8 MiB GET/POST series at conc {','.join(map(str, BIG_CONC))}")
    ap.add_argument("--idle", type=int, default=1000, metavar="N", help="idle keep-alive connections (0 skips)")
    ap.add_argument("--ws", action=argparse.BooleanOptionalAction, default=True,
                    help="WebSocket echo series: 64-byte messages over 1 and 32 sockets, 1 MiB over 1 and 8")
    ap.add_argument("--tls", action=argparse.BooleanOptionalAction, default=shutil.which("openssl") is not None,
                    help="HTTPS series, against nginx where installed; the default is on where `openssl` is on PATH")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="the balancer with more flags, in the small-request series beside lb-1w and "
                         "lb-Nw (repeatable), e.g. 'leastconn=--balance leastconn'")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    variants = []
    for text in args.variant:
        name, equals, flags = text.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            ap.error(f"--variant takes NAME=ARGS with a NAME of letters, digits, '_', '.' or '-', got {text!r}")
        variants.append((name, shlex.split(flags)))
    args.variant = variants
    args.lb_args = shlex.split(args.lb_args)
    args.workers = list(dict.fromkeys(w.strip() for w in args.workers.split(",") if w.strip() not in ("", "1")))
    if args.secs < 1 or args.rounds < 1:
        ap.error("--secs and --rounds must be positive")
    return args


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def balancer_argv(lb_path, port, upstream_ports, extra=()):
    backends = [a for p in upstream_ports for a in ("--backend", f"http://127.0.0.1:{p}")]
    return [sys.executable, str(lb_path), "--host", "127.0.0.1", "--port", str(port), *backends,
            "--log-level", "warning", *extra]


class Targets:
    """What start_targets started: ports by target, balancer PIDs, same-run references, admin."""

    def __init__(self):
        self.upstream_ports = []
        self.ports = {}        # target -> port, in table order
        self.pids = {}         # balancer target -> pid
        self.refs = {}         # target -> the target it is compared with in the same run
        self.admin_port = None
        self.small_only = {"lb-1w-admin"}  # targets of the small-request series only
        self.headers = {}      # port -> headers wrk sends there (a variant's sticky cookie)


def start_targets(fleet, args):
    """Start the upstreams and balancers: direct, [base-1w,] lb-1w, lb-1w-admin, then per --workers N
    [base-Nw,] lb-Nw."""
    t = Targets()
    ports = free_ports(UPSTREAM_COUNT)
    for i, port in enumerate(ports):
        if not fleet.start(f"upstream{i + 1}", [sys.executable, str(UPSTREAM), "--port", str(port)], port):
            raise SystemExit("bench: an upstream did not start")
    t.upstream_ports = ports
    t.ports["direct"] = ports[0]
    for w in ["1"] + args.workers:
        workers = ["--workers", w] if w != "1" else []
        if args.baseline:
            port, = free_ports(1)
            proc = fleet.start(f"base-{w}w", balancer_argv(args.baseline, port, ports, workers), port)
            if proc:
                t.ports[f"base-{w}w"], t.pids[f"base-{w}w"] = port, proc.pid
                t.refs[f"lb-{w}w"] = f"base-{w}w"
        port, = free_ports(1)
        proc = fleet.start(f"lb-{w}w", balancer_argv(args.lb, port, ports, [*workers, *args.lb_args]), port)
        if proc:
            t.ports[f"lb-{w}w"], t.pids[f"lb-{w}w"] = port, proc.pid
        for name, flags in args.variant:
            target = f"lb-{w}w-{name}"
            port, = free_ports(1)
            proc = fleet.start(target, balancer_argv(args.lb, port, ports, [*workers, *flags]), port)
            if proc:
                t.ports[target], t.pids[target] = port, proc.pid
                t.refs[target] = f"lb-{w}w"
                t.small_only.add(target)
                cookie = first_cookie(port)
                if cookie:
                    t.headers[port] = [f"Cookie: {cookie}"]
        if w == "1":
            port, admin_port = free_ports(2)
            proc = fleet.start("lb-1w-admin", balancer_argv(args.lb, port, ports, ["--admin-port", str(admin_port), *args.lb_args]),
                               port, admin_port)
            if proc:
                t.ports["lb-1w-admin"], t.pids["lb-1w-admin"] = port, proc.pid
                t.refs["lb-1w-admin"] = "lb-1w"
                t.admin_port = admin_port
    return t


def run_ws_series(args, t):
    """The WebSocket echo series: direct, lb-1w, lb-Nw (and the baseline where it tunnels)."""
    names = ["direct"] + [n for n in t.ports if n.startswith("lb-") and n not in t.small_only]
    for name in [n for n in t.ports if n.startswith("base-")]:
        problem = asyncio.run(ws_probe(t.ports[name]))
        if problem:
            print(f"# {name} does not tunnel WebSocket ({problem}); left out of the WebSocket series")
        else:
            names.append(name)
    targets = {n: p for n, p in t.ports.items() if n in names}
    results = {}
    for series, size, concs in WS_SERIES:
        points = [(series, c, size, args.secs) for c in concs]
        results.update(measure(targets, points, args.rounds, run_ws))
    for series, size, _ in WS_SERIES:
        for by_target in results[series].values():
            for m in by_target.values():
                m["mbps"] = m["rps"] * size / 1e6
    small, big = ({s: results[s]} for s, _, _ in WS_SERIES)
    print_table("WebSocket echo, 64-byte text messages (round trips/s per run, all sockets)", small, "rt/s",
                lambda m: m["rps"], t.refs)
    print_table("WebSocket echo, 1 MiB binary messages (MB/s of echoed payload)", big, "MB/s",
                lambda m: m["mbps"], t.refs)
    print_error_kinds(results)
    fds = print_descriptors("the WebSocket series", {n: pid for n, pid in t.pids.items() if n in targets})
    return results, fds


def run_tls_series(args, t, fleet, tmp):
    """HTTPS: the balancer with --tls-cert (1 worker and each N) and nginx (1 and N workers)."""
    pair = make_certificate(tmp)
    if not pair:
        return None
    cert, key = pair
    nginx = find_nginx()
    if not nginx:
        print("# nginx not found (PATH, /usr/sbin/nginx): HTTPS series without the nginx reference")
    started, ports, refs, pids = [], {}, {}, {}
    try:
        for w in ["1"] + args.workers:
            workers = ["--workers", w] if w != "1" else []
            port, = free_ports(1)
            proc = fleet.start(f"lb-{w}w-tls", balancer_argv(args.lb, port, t.upstream_ports,
                                                              [*workers, "--tls-cert", str(cert), "--tls-key", str(key), *args.lb_args]),
                               port)
            if proc:
                started.append(proc)
                ports[f"lb-{w}w"], pids[f"lb-{w}w"] = port, proc.pid
            if nginx:
                port, = free_ports(1)
                prefix = Path(tmp) / f"nginx-{w}w"
                prefix.mkdir()
                conf = prefix / "nginx.conf"
                conf.write_text(nginx_conf(port, t.upstream_ports, w, cert, key))
                proc = fleet.start(f"nginx-{w}w", [nginx, "-e", "stderr", "-p", str(prefix), "-c", str(conf),
                                                   "-g", "daemon off;"], port)
                if proc:
                    started.append(proc)
                    ports[f"nginx-{w}w"] = port
                    refs[f"lb-{w}w"] = refs[f"nginx-{w}w"] = f"nginx-{w}w"
        if not ports:
            print("# HTTPS series: nothing started")
            return None

        def https(port, conc, close):
            return run_wrk(port, conc, args.secs, scheme="https",
                           headers=["Connection: close"] if close else ())

        keep = measure(ports, [("HTTPS GET /", c, False) for c in TLS_CONC], args.rounds, https)
        new = measure(ports, [("new TLS", TLS_NEW_CONC, True)], args.rounds, https)
        print_table("HTTPS keep-alive (13-byte body; self-signed EC P-256 certificate)", keep, "req/s",
                    lambda m: m["rps"], refs, "vs nginx")
        print_table("HTTPS new connections (Connection: close: a TLS handshake per request, resumed by "
                    "wrk with the last session ticket; latency after the handshake)", new, "conn/s",
                    lambda m: m["rps"], refs, "vs nginx")
        return {"keep_alive": keep, "new_connections": new, "nginx": bool(nginx),
                "descriptors_after": print_descriptors("the HTTPS series", pids)}
    finally:
        for proc in started:
            fleet.stop(proc)


def run_benchmark(args, fleet, tmp):
    report = {"machine": machine_facts(args)}
    print_machine_facts(report["machine"])
    t = start_targets(fleet, args)
    report["targets"] = list(t.ports)
    if not t.pids:
        print("# no balancer started; measuring direct only", file=sys.stderr)

    def wrk_point(port, conc, path, script):
        return run_wrk(port, conc, args.secs, path, script, headers=t.headers.get(port, ()))

    scraper = AdminScraper(t.admin_port) if t.admin_port else None
    around = {"lb-1w-admin": scraper.running} if scraper else {}
    small = measure(t.ports, [("GET /", c, "/", None) for c in args.conc], args.rounds, wrk_point, around)
    print_table("small requests (13-byte body)", small, "req/s", lambda m: m["rps"], t.refs)
    report["small"] = small
    if scraper:
        s = scraper.summary()
        print("admin scrapes during lb-1w-admin: " + ", ".join(f"{p} {n} ok" for p, n in s["ok"].items())
              + f", {s['failed']} failed, slowest {s['slowest_ms']:.1f} ms")
        for error in s["errors"]:
            print(f"#   {error}")
        for conc, by_target in small["GET /"].items():
            if by_target.get("lb-1w", {}).get("rps") and "lb-1w-admin" in by_target:
                cost = 1 - by_target["lb-1w-admin"]["rps"] / by_target["lb-1w"]["rps"]
                print(f"admin cost at {conc} connections: {cost * 100:+.1f}% of lb-1w's req/s "
                      "(the project's limit at 32: about 3%)")
        report["admin_scrapes"] = s

    for name, _ in args.variant:
        for conc, by_target in small["GET /"].items():
            for w in ["1"] + args.workers:
                ref, variant = by_target.get(f"lb-{w}w", {}), by_target.get(f"lb-{w}w-{name}", {})
                if ref.get("rps") and variant.get("rps"):
                    print(f"variant {name} at {conc} connections, {w} worker(s): {variant['rps'] / ref['rps']:.3f}x "
                          f"of lb-{w}w's req/s in the same rounds")

    # The other series leave lb-1w-admin and the variants out: they measure the small requests.
    ports = {n: p for n, p in t.ports.items() if n not in t.small_only}
    pids = {n: p for n, p in t.pids.items() if n not in t.small_only}

    if args.big:
        upload_lua = Path(tmp) / "upload.lua"
        upload_lua.write_text(UPLOAD_LUA)
        peaks_are_series_only = all([reset_peak_rss(pid) for pid in pids.values()])
        points = [(series, c, path, script) for series, path, script in
                  (("GET /big", "/big", None), ("POST 8MiB", "/upload", upload_lua)) for c in BIG_CONC]
        big = measure(ports, points, args.rounds, wrk_point)
        for by_conc in big.values():
            for by_target in by_conc.values():
                for m in by_target.values():
                    m["mbps"] = m["rps"] * BIG_SIZE / 1e6
        peak = {label: tree_memory_mb(pid, "VmHWM") for label, pid in pids.items()}
        print_table("large bodies (8 MiB per request)", big, "MB/s", lambda m: m["mbps"], t.refs)
        scope = "during the series" if peaks_are_series_only else "since start (clear_refs refused)"
        print(f"balancer peak RSS {scope}: " + ", ".join(f"{k} {v:.1f} MB" for k, v in peak.items()))
        report["big"], report["big_peak_rss_mb"] = big, peak

    if args.idle > 0:
        print()
        report["idle"] = {}
        for label, pid in pids.items():
            r = asyncio.run(idle_connections(ports[label], pid, args.idle))
            print(f"idle {args.idle} {label}: served {r['served']}/{args.idle}, RSS {r['rss_mb']:.1f} MB "
                  f"(opened {r['opened']}, RSS before {r['rss_before_mb']:.1f} MB)")
            report["idle"][label] = r

    if args.ws:
        report["ws"], report["ws_descriptors_after"] = run_ws_series(args, t)

    if args.tls:
        if not shutil.which("openssl"):
            print("\n# HTTPS series skipped: openssl not found on PATH")
        else:
            report["tls"] = run_tls_series(args, t, fleet, tmp)
    return report


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk not found on PATH; install it with `apt-get install wrk`", file=sys.stderr)
        return 2
    for option, path in (("--lb", args.lb), ("--baseline", args.baseline)):
        if path is not None and not path.is_file():
            print(f"bench: {path} not found ({option} PATH)", file=sys.stderr)
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
