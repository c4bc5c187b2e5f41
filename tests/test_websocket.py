"""WebSocket (and any HTTP/1.1 Upgrade) through the balancer: the upgrade handshake, the byte
tunnel after a 101, and how such a tunnel ends.

What it proves:
- real clients and servers talk through it: the `websockets` library on both ends echoes text and
  binary messages of 1 B, 64 KiB + 1 (one byte past the tunnel's read buffer) and 4 MiB intact;
  pings get pongs both ways; close codes pass both ways (4001 from the client, 4002 from the server);
  100 concurrent WebSockets through the CLI with --workers 2 all work and /status and /metrics count
  them; uvicorn (an ASGI server) behind it echoes; a page served through it in headless Chromium
  gets its WebSocket and its EventSource (text/event-stream) messages;
- how a tunnel ends: an upstream killed mid-tunnel ends the client's connection at once (1006)
  and leaves no tunnel, connection or thread behind; an idle one is closed after --tunnel-timeout,
  a busy one is not; close() cuts an open tunnel when its drain timeout passes, and returns;
- rotation: WebSockets go round robin; a connect failure goes on to the next upstream; an upgrade
  request that an upstream saw is not sent to another;
- the protocol rules, at the byte level with raw sockets: a 101 nobody asked for, or for another
  protocol, is a 502; a 200 or 426 answer to an upgrade request is an ordinary response on a
  keep-alive connection (and its upstream connection is not reused); h2c and an Upgrade without
  Connection: upgrade go through as plain requests, no Upgrade reaching the upstream; the upstream
  gets exactly `Connection: upgrade` and `Upgrade: websocket` with the client's Sec-WebSocket-*
  fields; bytes right behind the upgrade request and right behind the 101 are delivered; a
  half-close passes through and the other side can still answer.

How: everything on 127.0.0.1 with ephemeral ports, in-process balancers from conftest's `balancer`
fixture unless the CLI is the subject. The asyncio part of a test runs under one overall timeout
(`run`), inside which waits that have a deadline of their own carry it; every socket has a
timeout. Child processes (a WebSocket server to kill, uvicorn) are killed by PID in `finally`.
Waits are on events (a message, a close, a log line) or polled with conftest.wait_until where
there is none (counters, thread counts). Connection threads are started with _thread and so are
not in threading.enumerate(): the threads compared before and after a tunnel are the kernel's
(/proc/self/task) together with threading.enumerate()'s. Byte counters are checked exactly: the
frames on the wire are known (no compression, one frame per message).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import socket
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosedError

from conftest import (WEBSOCKET_CLIENT, WEBSOCKET_SERVER, ChildProcess, RawClient,
                      free_port, get, parse_head, read_head, refused_url, require_program, wait_until)

TIMEOUT = 10.0                  # the whole asyncio part of one test
# No compression: the frames on the wire are then as large as the messages (64 KiB + 1 really
# crosses the tunnel's 64 KiB read buffer); no keepalive pings: an idle connection really idles.

# RFC 6455 section 1.2/1.3's handshake, and section 5.7's frames: a masked "Hello" from a client,
# an unmasked "Hello" from a server.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
WS_REQUEST = (b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
WS_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n\r\n")
CLIENT_FRAME = bytes.fromhex("818537fa213d7f9f4d5158")
SERVER_FRAME = bytes.fromhex("810548656c6c6f")


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def run(coro, timeout: float = TIMEOUT):
    """Run a test's asyncio part with one deadline over all its awaits."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ws_url(port: int, path: str = "/") -> str:
    return f"ws://127.0.0.1:{port}{path}"


@contextlib.asynccontextmanager
async def echo_server():
    """A `websockets` server in the running loop. Every message comes back as it was, except
    "whoami" (answered with the server's port). On /close4002 it closes with 4002 at once; on
    /ping-client it first pings the client and says "pong came back" when the pong did. A plain
    GET /plain gets a plain 200. `closes` gets the (code, reason) it received, once per
    connection that ended."""
    closes: asyncio.Queue = asyncio.Queue()

    def plain(connection, request):
        return connection.respond(200, "plain answer\n") if request.path == "/plain" else None

    async def handler(ws):
        try:
            if ws.request.path == "/close4002":
                await ws.close(4002, "server bye")
                return
            if ws.request.path == "/ping-client":
                await (await ws.ping(b"from the server"))
                await ws.send("pong came back")
            async for message in ws:
                await ws.send(str(port) if message == "whoami" else message)
        finally:
            await ws.wait_closed()
            closes.put_nowait((ws.close_code, ws.close_reason))

    async with serve(handler, "127.0.0.1", 0, backlog=512, process_request=plain, **WEBSOCKET_SERVER) as server:
        port = server.sockets[0].getsockname()[1]
        yield SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}", closes=closes)


def tunnels(b) -> dict:
    return b.status()["tunnels"]


def tunnels_closed(b) -> bool:
    return tunnels(b)["open"] == 0


def python_threads() -> set:
    return {t.native_id for t in threading.enumerate()}


def unlisted_threads() -> set:
    """Threads the kernel lists for this process (/proc/self/task) that threading.enumerate()
    does not: those started with _thread, as the balancer starts its connection threads."""
    return {int(tid) for tid in os.listdir("/proc/self/task")} - python_threads()


def frame_size(payload: int, masked: bool) -> int:
    """Bytes of one unfragmented WebSocket frame on the wire (RFC 6455 section 5.2)."""
    length = 0 if payload < 126 else 2 if payload < 1 << 16 else 8
    return 2 + length + (4 if masked else 0) + payload


def text_of(size: int) -> str:
    """`size` bytes of varied ASCII text."""
    return base64.b64encode(os.urandom(size))[:size].decode("ascii")


def raw_answer(response: bytes):
    """Raw upstream: read the request, send `response`, then read until the balancer closes."""
    def serve_conn(conn, up):
        up.read_request(conn)
        conn.sendall(response)
        while up.recv(conn):
            pass
    return serve_conn


# ---------------------------------------------------------------------------------------------------
# Real clients and servers: messages, pings, close codes
# ---------------------------------------------------------------------------------------------------

def test_text_and_binary_messages_of_1B_64KiB_plus_1_and_4MiB_are_echoed_intact(balancer):
    sizes = (1, 64 * 1024 + 1, 4 << 20)

    async def scenario():
        async with echo_server() as up:
            b = balancer([up.url])
            async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                for size in sizes:
                    text, data = text_of(size), os.urandom(size)
                    await ws.send(text)
                    assert await ws.recv() == text, f"text message of {size} bytes"
                    await ws.send(data)
                    assert await ws.recv() == data, f"binary message of {size} bytes"
            return b

    b = run(scenario())
    assert wait_until(lambda: tunnels_closed(b))
    # Each message one frame each way, then the client's close (1000) and the server's answer.
    assert tunnels(b) == {
        "open": 0, "total": 1,
        "bytes_from_client": sum(2 * frame_size(n, masked=True) for n in sizes) + frame_size(2, masked=True),
        "bytes_from_upstream": sum(2 * frame_size(n, masked=False) for n in sizes) + frame_size(2, masked=False)}


def test_pings_get_pongs_through_the_tunnel_both_ways(balancer):
    async def scenario():
        async with echo_server() as up:
            b = balancer([up.url])
            async with connect(ws_url(b.port, "/ping-client"), **WEBSOCKET_CLIENT) as ws:
                # The server's ping was answered by this client's pong, through the tunnel.
                assert await ws.recv() == "pong came back"
                # This client's ping is answered by the server's pong, with the same payload.
                pong = await ws.ping(b"from the client")
                await asyncio.wait_for(pong, 2)
                await ws.send("still here")
                assert await ws.recv() == "still here"

    run(scenario())


def test_client_close_code_4001_reaches_the_server(balancer):
    async def scenario():
        async with echo_server() as up:
            b = balancer([up.url])
            async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
                await ws.close(4001, "bye")
                assert ws.close_code == 4001  # the server's close frame echoed the code back
            assert await up.closes.get() == (4001, "bye")

    run(scenario())


def test_server_close_code_4002_reaches_the_client(balancer):
    async def scenario():
        async with echo_server() as up:
            b = balancer([up.url])
            async with connect(ws_url(b.port, "/close4002"), **WEBSOCKET_CLIENT) as ws:
                # websockets reports codes other than 1000 and 1001 as ConnectionClosedError.
                with pytest.raises(ConnectionClosedError) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == 4002 and closed.value.rcvd.reason == "server bye"
                assert ws.close_code == 4002
            assert await up.closes.get() == (4002, "server bye")

    run(scenario())


def test_100_concurrent_websockets_through_the_cli_with_2_workers(cli):
    """All 100 are open at once (each waits for the others before it closes): 100 tunnels, more
    than the fair gate lets run request code at once, and an ordinary request still gets through,
    because tunnels run outside the gate. Then /status and /metrics count every tunnel and byte."""
    n = 100
    sent = [[f"client {i} message {j}" for j in range(3)] for i in range(n)]

    def status(p) -> dict:
        return json.loads(get(p.admin_port, "/status").body)["tunnels"]

    async def scenario():
        opened, all_open, release = [], asyncio.Event(), asyncio.Event()

        async def client(port: int, messages: list) -> list:
            async with connect(ws_url(port), **WEBSOCKET_CLIENT) as ws:
                got = []
                for message in messages:
                    await ws.send(message)
                    got.append(await ws.recv())
                opened.append(ws)
                if len(opened) == n:
                    all_open.set()
                await release.wait()
                return got

        async with echo_server() as up:
            p = cli(["--host", "127.0.0.1", "--port", "0", "--admin-port", str(free_port()),
                     "--health-interval", "0", "--drain-timeout", "1", "--workers", "2",
                     "--backend", up.url]).wait_ready()
            clients = asyncio.gather(*(client(p.port, messages) for messages in sent), return_exceptions=True)
            waiting = asyncio.ensure_future(all_open.wait())
            try:
                # All open, or every client ended (one failed: the others wait for `release`).
                await asyncio.wait({waiting, clients}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
                assert all_open.is_set(), (len(opened), clients.done() and clients.result(), p.stderr_text())
                now = await asyncio.to_thread(status, p)
                assert (now["open"], now["total"]) == (n, n), now
                plain = await asyncio.to_thread(get, p.port, "/plain")
                assert (plain.status, plain.body) == (200, b"plain answer\n"), plain
            finally:
                release.set()
                waiting.cancel()
            results = await clients
            failed = {i: r for i, r in enumerate(results) if r != sent[i]}
            assert not failed, (f"{len(failed)} of {n} failed, e.g. {list(failed.items())[:3]}; "
                                f"balancer stderr:\n{p.stderr_text()}")
            assert [await up.closes.get() for _ in range(n)] == [(1000, "")] * n
            return p

    p = run(scenario(), timeout=20)
    assert wait_until(lambda: status(p)["open"] == 0), status(p)
    # Every frame whole: the messages, and each side's close frame (code 1000, no reason).
    up_bytes = sum(frame_size(len(m), masked=True) for ms in sent for m in ms) + n * frame_size(2, masked=True)
    down_bytes = sum(frame_size(len(m), masked=False) for ms in sent for m in ms) + n * frame_size(2, masked=False)
    assert status(p) == {"open": 0, "total": n, "bytes_from_client": up_bytes,
                         "bytes_from_upstream": down_bytes}
    metrics = get(p.admin_port, "/metrics").body.decode().splitlines()
    for line in ("lb_tunnels_open 0", f"lb_tunnels_total {n}",
                 f'lb_tunnel_bytes_total{{direction="client_to_upstream"}} {up_bytes}',
                 f'lb_tunnel_bytes_total{{direction="upstream_to_client"}} {down_bytes}'):
        assert line in metrics, (line, [x for x in metrics if "tunnel" in x])


# ---------------------------------------------------------------------------------------------------
# How a tunnel ends
# ---------------------------------------------------------------------------------------------------

WS_SERVER_SCRIPT = """
import asyncio
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, ping_interval=None) as server:
        print("port", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""


def test_upstream_killed_mid_tunnel_ends_the_client_promptly_and_leaks_nothing(balancer, tmp_path):
    script = tmp_path / "ws_server.py"
    script.write_text(WS_SERVER_SCRIPT)
    server = ChildProcess([sys.executable, str(script)])
    try:
        line = server.wait_for_line("port ")
        assert line, server.output()
        port = int(line.split()[1])
        b = balancer([f"http://127.0.0.1:{port}"])

        async def scenario():
            # A first tunnel that ends normally: its connection thread is then a spare one, and
            # the counts taken after it are what a tunnel leaves behind when all goes well.
            async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                await ws.send("first")
                assert await ws.recv() == "first"
            assert wait_until(lambda: tunnels_closed(b) and b.server.spare_threads == 1)
            threads = unlisted_threads(), python_threads() - {r.native_id for r in server.readers}

            async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                await ws.send("second")
                assert await ws.recv() == "second"
                killed = time.monotonic()
                server.kill()
                with pytest.raises(ConnectionClosedError) as closed:
                    await asyncio.wait_for(ws.recv(), 2)
                assert time.monotonic() - killed < 2
                assert closed.value.rcvd is None and ws.close_code == 1006
            return threads

        threads = run(scenario())
        assert wait_until(lambda: tunnels_closed(b) and b.status()["connections"] == 0), b.status()
        assert tunnels(b)["total"] == 2
        # The connection thread left the tunnel and is a spare one again, and no other thread came
        # or stayed (the child's output reader has ended with the child).
        assert wait_until(lambda: b.server.spare_threads == 1
                          and (unlisted_threads(), python_threads()) == threads), \
            (b.server.spare_threads, unlisted_threads(), python_threads(), threads, threading.enumerate())
    finally:
        server.kill()


def test_idle_tunnel_closed_after_tunnel_timeout_while_a_busy_one_stays_open(balancer):
    async def idle(port: int) -> float:
        async with connect(ws_url(port), **WEBSOCKET_CLIENT) as ws:
            opened = time.monotonic()
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd is None and ws.close_code == 1006
            return time.monotonic() - opened

    async def busy(port: int) -> float:
        async with connect(ws_url(port), **WEBSOCKET_CLIENT) as ws:
            opened = time.monotonic()
            i = 0
            while time.monotonic() - opened < 1.6:
                await ws.send(f"tick {i}")
                assert await ws.recv() == f"tick {i}"
                i += 1
                await asyncio.sleep(0.2)  # the traffic pattern under test, not a wait for an event
            return time.monotonic() - opened

    async def scenario():
        async with echo_server() as up:
            b = balancer([up.url], tunnel_timeout=0.5)
            return await asyncio.gather(idle(b.port), busy(b.port))

    idle_for, busy_for = run(scenario())
    assert 0.4 <= idle_for < 1.2, f"the idle tunnel was closed after {idle_for:.2f}s"
    assert busy_for >= 1.6


def test_close_cuts_an_open_tunnel_when_the_drain_timeout_passes(balancer):
    async def scenario():
        async with echo_server() as up:
            b = balancer([up.url], drain_timeout=0.5)
            async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                started = time.monotonic()
                closing = asyncio.create_task(asyncio.to_thread(b.close))
                # The tunnel goes on working while the drain waits for it.
                assert await asyncio.to_thread(wait_until, lambda: b.server.draining, 2)
                await ws.send("during the drain")
                assert await ws.recv() == "during the drain"
                with pytest.raises(ConnectionClosedError):
                    await ws.recv()
                cut = time.monotonic() - started
                await asyncio.wait_for(closing, 2)
                returned = time.monotonic() - started
            assert await up.closes.get() == (1006, "")  # the upstream's side was ended too
            return cut, returned

    cut, returned = run(scenario())
    assert 0.45 <= cut < 1.5, f"the tunnel was cut {cut:.2f}s after close()"
    assert returned < 2.0, f"close() returned after {returned:.2f}s"


# ---------------------------------------------------------------------------------------------------
# Rotation and failures
# ---------------------------------------------------------------------------------------------------

def test_six_websockets_go_round_robin_over_three_upstreams(balancer):
    async def scenario():
        async with echo_server() as a, echo_server() as b_, echo_server() as c:
            ups = [a, b_, c]
            b = balancer([u.url for u in ups])
            served = []
            for _ in range(6):
                async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                    await ws.send("whoami")
                    served.append(int(await ws.recv()))
            assert served == [u.port for u in ups] * 2

    run(scenario())


def test_connect_failure_goes_on_to_the_next_upstream(balancer):
    async def scenario():
        async with echo_server() as up:
            b = balancer([refused_url(), up.url])
            async with connect(ws_url(b.port), **WEBSOCKET_CLIENT) as ws:
                await ws.send("made it")
                assert await ws.recv() == "made it"
            return b

    b = run(scenario())
    first, second = b.status()["backends"]
    assert first["errors"]["connect"] == 1 and first["retries"] == 1, first
    assert second["requests"] == 1, second


def test_upgrade_request_an_upstream_saw_is_not_sent_to_another(balancer, raw_upstream):
    """The first upstream reads the upgrade request and closes without a word: 502, and the second
    upstream, which would switch, never hears of it (nothing is retried once sent)."""
    def close_silently(conn, up):
        up.read_request(conn)

    first = raw_upstream(close_silently)
    second = raw_upstream(raw_answer(WS_101))
    b = balancer([first.url, second.url])
    with RawClient(b.port) as client:
        client.send(WS_REQUEST)
        status_line, _ = parse_head(read_head(client.file))  # a 101 too: RawClient.response skips 1xx
    assert status_line.startswith("HTTP/1.1 502 "), status_line
    assert first.connections == 1 and second.connections == 0


# ---------------------------------------------------------------------------------------------------
# Real servers: uvicorn (ASGI) and a page in Chromium
# ---------------------------------------------------------------------------------------------------

ASGI_APP = r'''
import asyncio

PAGE = b"""<!doctype html>
<title>WebSocket and EventSource through the balancer</title>
<p id="ws"></p><p id="sse"></p><p id="errors"></p>
<script>
const ws = new WebSocket(`ws://${location.host}/ws`);
ws.onopen = () => ws.send("hello from the page");
ws.onmessage = (e) => { document.getElementById("ws").textContent = e.data; };
ws.onerror = () => { document.getElementById("errors").textContent += "websocket error; "; };
const got = [];
const events = new EventSource("/events");
events.onmessage = (e) => { got.push(e.data); document.getElementById("sse").textContent = got.join(" "); };
events.onerror = () => { document.getElementById("errors").textContent += "eventsource error; "; };
</script>
"""


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
    if scope["path"] == "/events":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"retry: 60000\ndata: one\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
        while True:  # the stream stays open; a comment now and then finds out when the client left
            try:
                message = await asyncio.wait_for(receive(), 0.25)
            except asyncio.TimeoutError:
                await send({"type": "http.response.body", "body": b": still here\n\n", "more_body": True})
                continue
            if message["type"] == "http.disconnect":
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(PAGE)).encode())]})
    await send({"type": "http.response.body", "body": PAGE})
'''


@pytest.fixture(scope="module")
def uvicorn_app(tmp_path_factory):
    """uvicorn serving ASGI_APP on a free port (the page, /ws and /events); killed by PID after the
    module's tests."""
    folder = tmp_path_factory.mktemp("asgi")
    (folder / "app.py").write_text(ASGI_APP)
    port = free_port()
    server = ChildProcess([sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(folder),
                           "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off", "--no-access-log"],
                          cwd=folder)
    try:
        assert server.wait_for_line(f"Uvicorn running on http://127.0.0.1:{port}"), server.output()
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", process=server)
    finally:
        server.kill()
    errors = [x for x in server.lines if "Traceback" in x or x.startswith("ERROR")]
    assert not errors, server.lines  # the app saw nothing broken come through the balancer


def test_uvicorn_asgi_websocket_echoes_through_the_balancer(balancer, uvicorn_app):
    b = balancer([uvicorn_app.url])

    async def scenario():
        async with connect(ws_url(b.port, "/ws"), **WEBSOCKET_CLIENT) as ws:
            data = os.urandom(100_000)
            await ws.send("hello uvicorn")
            assert await ws.recv() == "hello uvicorn"
            await ws.send(data)
            assert await ws.recv() == data

    run(scenario())
    assert wait_until(lambda: tunnels_closed(b))
    assert tunnels(b)["total"] == 1


def test_browser_page_through_the_balancer_gets_websocket_and_event_stream(balancer, uvicorn_app):
    require_program("chromium")
    from browser import Chromium

    b = balancer([uvicorn_app.url], drain_timeout=0.5)
    with Chromium() as browser:
        browser.open(f"http://127.0.0.1:{b.port}/", timeout=10)
        browser.wait_for("document.getElementById('ws').textContent !== '' && "
                         "document.getElementById('sse').textContent.split(' ').length >= 2", timeout=10)
        dom = browser.evaluate("({ws: document.getElementById('ws').textContent, "
                               "sse: document.getElementById('sse').textContent, "
                               "errors: document.getElementById('errors').textContent})")
        assert dom == {"ws": "hello from the page", "sse": "one two", "errors": ""}
        now = tunnels(b)
        assert (now["open"], now["total"]) == (1, 1), now  # the page's WebSocket, in its tunnel
    assert wait_until(lambda: tunnels_closed(b)), tunnels(b)


# ---------------------------------------------------------------------------------------------------
# Protocol rules, byte by byte
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, answer", [
    pytest.param(b"GET /plain HTTP/1.1\r\nHost: ws.test\r\n\r\n", WS_101, id="plain-get"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                 b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                 b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", id="h2c"),
    pytest.param(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n",
                 WS_101, id="upgrade-without-connection-upgrade"),
])
def test_101_nobody_asked_for_is_502(balancer, raw_upstream, request_bytes, answer):
    up = raw_upstream(raw_answer(answer + SERVER_FRAME))
    b = balancer([up.url])
    with RawClient(b.port) as client:
        resp = client.request(request_bytes)
        assert resp.status == 502, resp
        assert SERVER_FRAME not in resp.body
    assert tunnels(b)["total"] == 0


def test_101_naming_another_protocol_is_502(balancer, raw_upstream):
    up = raw_upstream(raw_answer(WS_101.replace(b"Upgrade: websocket", b"Upgrade: foo/1") + SERVER_FRAME))
    b = balancer([up.url])
    with RawClient(b.port) as client:
        resp = client.request(WS_REQUEST)
        assert resp.status == 502, resp
        assert SERVER_FRAME not in resp.body
    assert tunnels(b)["total"] == 0


@pytest.mark.parametrize("status", [200, 426])
def test_non_101_answer_to_an_upgrade_is_an_ordinary_keep_alive_response(balancer, raw_upstream, status):
    """The answer is relayed as it is; the client's connection goes on with the next request; the
    upstream connection the upgrade was asked on is fresh and is not reused."""
    log = []
    accepted = itertools.count(1)  # the test's requests are sequential: so are its connections

    def keep_alive(conn, up):
        index = next(accepted)
        while True:
            data = up.read_request(conn)
            if not data:
                return
            line = data.split(b"\r\n", 1)[0].decode()
            log.append((index, line))
            if b"\r\nupgrade: websocket\r\n" in data.lower():
                body = b"no switching here"
                conn.sendall(b"HTTP/1.1 %d Whatever\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")

    up = raw_upstream(keep_alive)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        first = client.request(b"GET /a HTTP/1.1\r\nHost: ws.test\r\n\r\n")
        upgrade = client.request(WS_REQUEST)
        after = client.request(b"GET /b HTTP/1.1\r\nHost: ws.test\r\n\r\n")
    assert (first.status, first.body) == (200, b"plain")
    assert (upgrade.status, upgrade.body) == (status, b"no switching here"), upgrade
    assert upgrade.header("Connection") is None, upgrade  # keep-alive: no Connection: close
    assert (after.status, after.body) == (200, b"plain")
    assert log == [(1, "GET /a HTTP/1.1"), (2, "GET /chat HTTP/1.1"), (1, "GET /b HTTP/1.1")]
    assert tunnels(b)["total"] == 0


def test_h2c_upgrade_goes_through_as_a_plain_request(balancer, upstreams):
    up, = upstreams(1)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        resp = client.request(b"GET /h2 HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                              b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    assert resp.status == 200 and resp.body == f"upstream {up.port} GET /h2\n".encode(), resp
    assert resp.header("Upgrade") is None
    req, = up.requests
    assert req.header("Upgrade") is None and req.header("Connection") is None, req
    assert req.header("HTTP2-Settings") is None, req  # named in Connection: hop-by-hop
    assert tunnels(b)["total"] == 0


def test_upgrade_without_connection_upgrade_is_not_tunnelled(balancer, upstreams):
    up, = upstreams(1)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        resp = client.request(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
                              b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert resp.status == 200 and resp.body == f"upstream {up.port} GET /chat\n".encode(), resp
    req, = up.requests
    assert req.header("Upgrade") is None and req.header("Connection") is None, req
    assert tunnels(b)["total"] == 0


def test_upstream_gets_exactly_connection_upgrade_upgrade_websocket_and_the_sec_fields(balancer, raw_upstream):
    sec = [("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13"),
           ("Sec-WebSocket-Protocol", "chat, superchat"),
           ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]
    heads = []
    answer = WS_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n")

    def switch(conn, up):
        heads.append(up.read_request(conn))
        conn.sendall(answer)
        while up.recv(conn):
            pass

    up = raw_upstream(switch)
    b = balancer([up.url])
    request = ("GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: keep-alive, Upgrade\r\n"
               "Upgrade: websocket\r\nKeep-Alive: 300\r\nOrigin: http://ws.test\r\n"
               + "".join(f"{n}: {v}\r\n" for n, v in sec) + "\r\n").encode()
    with RawClient(b.port) as client:
        client.send(request)
        status_line, fields = parse_head(read_head(client.file))
    head, = heads
    _, up_fields = parse_head(head)
    assert [v for n, v in up_fields if n.lower() == "connection"] == ["upgrade"], head
    assert [v for n, v in up_fields if n.lower() == "upgrade"] == ["websocket"], head
    assert [(n, v) for n, v in up_fields if n.lower().startswith("sec-websocket-")] == sec, head
    assert not [n for n, _ in up_fields if n.lower() == "keep-alive"], head
    # The 101 as the client gets it: the protocol asked for, and the upstream's Sec-WebSocket-*.
    assert status_line == "HTTP/1.1 101 Switching Protocols"
    assert [v for n, v in fields if n.lower() == "connection"] == ["upgrade"], fields
    assert [v for n, v in fields if n.lower() == "upgrade"] == ["websocket"], fields
    assert ("Sec-WebSocket-Accept", ACCEPT) in fields and ("Sec-WebSocket-Protocol", "chat") in fields
    assert not [n for n, _ in fields if n.lower() in ("content-length", "transfer-encoding")], fields


def test_bytes_right_behind_the_request_and_right_behind_the_101_are_delivered(balancer, raw_upstream):
    """The client's first frame leaves in the same send as its upgrade request; the upstream's
    first frame in the same send as its 101. Neither may be lost, and the tunnel counts them."""
    def switch(conn, up):
        up.read_request(conn)
        conn.sendall(WS_101 + SERVER_FRAME)
        got = b""
        while len(got) < len(CLIENT_FRAME):
            got += up.recv(conn)
        conn.sendall(b"echo:" + got)
        while up.recv(conn):
            pass

    up = raw_upstream(switch)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        client.send(WS_REQUEST + CLIENT_FRAME)
        status_line, _ = parse_head(read_head(client.file))
        assert status_line.startswith("HTTP/1.1 101 ")
        expected = SERVER_FRAME + b"echo:" + CLIENT_FRAME
        assert client.file.read(len(expected)) == expected
    assert wait_until(lambda: tunnels_closed(b))
    assert tunnels(b) == {"open": 0, "total": 1, "bytes_from_client": len(CLIENT_FRAME),
                          "bytes_from_upstream": len(expected)}


def test_half_close_reaches_the_upstream_which_can_still_answer(balancer, raw_upstream):
    saw_eof = threading.Event()

    def answer_after_eof(conn, up):
        up.read_request(conn)
        conn.sendall(WS_101)
        got = b""
        while True:
            data = up.recv(conn)
            if not data:
                break
            got += data
        saw_eof.set()
        conn.sendall(b"after your end: " + got)

    up = raw_upstream(answer_after_eof)
    b = balancer([up.url])
    with RawClient(b.port) as client:
        client.send(WS_REQUEST)
        status_line, _ = parse_head(read_head(client.file))
        assert status_line.startswith("HTTP/1.1 101 ")
        client.send(CLIENT_FRAME)
        client.sock.shutdown(socket.SHUT_WR)
        assert saw_eof.wait(5), "the upstream never saw the client's end"
        assert client.read_until_close() == b"after your end: " + CLIENT_FRAME
    assert wait_until(lambda: tunnels_closed(b)), tunnels(b)
