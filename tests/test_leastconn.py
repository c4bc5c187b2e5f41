"""Least connections (--balance leastconn) through real sockets.

- WebSocket tunnels (the `websockets` package on both ends) count while open: 12 tunnels opened
  through the balancer, two ordinary requests between each (round robin would then send every
  tunnel to the same upstream), land 4 per upstream; 6 more land 2 per upstream; close one
  upstream's tunnels and the next ones all go there. /status shows each upstream's exact count.
- A slow request holding one upstream: new short requests avoid it and alternate between the
  others.
- Weights: 10 tunnels over weights 3,1,1 land 6, 2, 2; when three of the first one's end, the
  next three go there.
- Exact under 8 threads and 2 workers (the CLI): 24 requests held at once land exactly 8 per
  upstream, /status says 8 each, and every count is back to 0 once they are answered; also after
  failed connects (a retry moves the count) and clients that went away.

Upstreams are conftest's (a held /slow endpoint) and `websockets` servers in the test's event loop;
balancers are in-process except for the --workers 2 case. Waits are on events or polled with
wait_until; every socket has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from types import SimpleNamespace

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from conftest import (SOCKET_TIMEOUT, RawClient, SlowUpstreamHandler, admin_status, get, refused_url,
                      request, wait_until)

TIMEOUT = 15.0
WS = dict(open_timeout=5, close_timeout=2, ping_interval=None, compression=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@contextlib.asynccontextmanager
async def whoami_servers(n: int):
    """n `websockets` servers in the running loop; a message "whoami" is answered with the
    server's port; GET /plain gets a plain 200."""
    def plain(connection, req):
        return connection.respond(200, "plain\n") if req.path == "/plain" else None

    async def handler(ws):
        port = ws.local_address[1]
        async for message in ws:
            await ws.send(str(port) if message == "whoami" else message)

    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serve(handler, "127.0.0.1", 0, process_request=plain, **WS))
                   for _ in range(n)]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        yield SimpleNamespace(ports=ports, urls=[f"http://127.0.0.1:{p}" for p in ports])


async def open_tunnel(port: int):
    """A WebSocket through the balancer and the upstream port it reached."""
    ws = await connect(f"ws://127.0.0.1:{port}/", **WS)
    await ws.send("whoami")
    return ws, int(await ws.recv())


async def plain_get(port: int) -> int:
    """An ordinary GET through the balancer (asyncio: the loop also serves the upstreams)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = await reader.read()
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1])


def in_flight(b) -> dict:
    return {backend["url"]: backend["in_flight"] for backend in b.status()["backends"]}


def settled(b, total: int) -> bool:
    """Wait until `total` requests are counted in flight in all: a response reaches its client a
    moment before its connection's thread has released the count."""
    return wait_until(lambda: sum(in_flight(b).values()) == total, interval=0.002)


def test_websocket_tunnels_count_while_open_and_new_ones_go_to_the_fewest(balancer):
    async def scenario():
        async with whoami_servers(3) as ups:
            b = balancer(ups.urls, balance="leastconn")
            tunnels = []
            for _ in range(12):
                tunnels.append(await open_tunnel(b.port))
                for _ in range(2):
                    assert await plain_get(b.port) == 200
                    assert await asyncio.to_thread(settled, b, len(tunnels))
            assert Counter(port for _, port in tunnels) == {port: 4 for port in ups.ports}
            assert in_flight(b) == {url: 4 for url in ups.urls}
            for _ in range(6):
                tunnels.append(await open_tunnel(b.port))
            assert Counter(port for _, port in tunnels) == {port: 6 for port in ups.ports}
            # One upstream's tunnels end: the next six go there, and nowhere else.
            first = ups.ports[0]
            for ws, port in [t for t in tunnels if t[1] == first]:
                await ws.close()
            tunnels = [t for t in tunnels if t[1] != first]
            await asyncio.to_thread(wait_until, lambda: in_flight(b)[ups.urls[0]] == 0)
            extra = [await open_tunnel(b.port) for _ in range(6)]
            assert [port for _, port in extra] == [first] * 6
            assert in_flight(b) == {url: 6 for url in ups.urls}
            for ws, _ in tunnels + extra:
                await ws.close()
            await asyncio.to_thread(wait_until, lambda: in_flight(b) == {url: 0 for url in ups.urls})
            assert in_flight(b) == {url: 0 for url in ups.urls}

    run(scenario())


def hold(port: int, count: int) -> list[RawClient]:
    """`count` GET /slow sent on connections of their own, not waited for."""
    clients = []
    for _ in range(count):
        client = RawClient(port, SOCKET_TIMEOUT + 5)
        client.send(request("/slow"))
        clients.append(client)
    return clients


def test_a_slow_request_holding_one_upstream_is_avoided_by_short_ones(upstreams, balancer):
    slow = SlowUpstreamHandler()
    ups = upstreams(3, slow)
    b = balancer([u.url for u in ups], balance="leastconn")
    try:
        held = hold(b.port, 1)
        assert slow.arrived.wait(SOCKET_TIMEOUT)
        busy = next(u for u in ups if u.requests)
        ports = []
        for i in range(10):
            ports.append(int(get(b.port, f"/short{i}").header("X-Upstream-Port")))
            assert settled(b, 1)
        assert busy.port not in ports
        assert Counter(ports) == {u.port: 5 for u in ups if u is not busy}
        assert ports[0::2] == [ports[0]] * 5 and ports[1::2] == [ports[1]] * 5  # they alternate
    finally:
        slow.release.set()
    assert held[0].response().status == 200
    held[0].close()


def test_weights_are_respected_tunnels_per_weight(balancer):
    """Weights 3,1,1: 10 tunnels land 6, 2, 2. Three of the first one's end: the next three all
    go there (its load per weight is then the lowest), where round robin would spread them."""
    async def scenario():
        async with whoami_servers(3) as ups:
            b = balancer([ups.urls[0] + ",weight=3", ups.urls[1], ups.urls[2]], balance="leastconn")
            tunnels = [await open_tunnel(b.port) for _ in range(10)]
            assert Counter(port for _, port in tunnels) == dict(zip(ups.ports, (6, 2, 2)))
            heavy = [t for t in tunnels if t[1] == ups.ports[0]]
            for ws, _ in heavy[:3]:
                await ws.close()
            await asyncio.to_thread(wait_until, lambda: in_flight(b)[ups.urls[0]] == 3)
            again = [await open_tunnel(b.port) for _ in range(3)]
            assert [port for _, port in again] == [ups.ports[0]] * 3
            more = [await open_tunnel(b.port) for _ in range(5)]
            assert Counter(port for _, port in more) == dict(zip(ups.ports, (3, 1, 1)))
            for ws, _ in [t for t in tunnels if t not in heavy[:3]] + again + more:
                await ws.close()

    run(scenario())


def eight_threads_three_each(port: int) -> list[RawClient]:
    """8 threads released together, each sending 3 GET /slow on connections of its own."""
    barrier = threading.Barrier(8, timeout=SOCKET_TIMEOUT)
    held: list = []
    lock = threading.Lock()

    def worker():
        barrier.wait()
        mine = hold(port, 3)
        with lock:
            held.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOCKET_TIMEOUT)
    return held


def check_exact(ups, slow, port: int, status) -> None:
    held = []
    try:
        held = eight_threads_three_each(port)
        assert len(held) == 24
        assert wait_until(lambda: sum(len(u.requests) for u in ups) == 24, timeout=SOCKET_TIMEOUT)
        assert [len(u.requests) for u in ups] == [8, 8, 8]
        backends = status()["backends"]
        assert [backend["in_flight"] for backend in backends] == [8, 8, 8]
    finally:
        slow.release.set()
        for client in held:
            assert client.response().status == 200
            client.close()
    assert wait_until(lambda: [b["in_flight"] for b in status()["backends"]] == [0, 0, 0])


def test_exact_under_8_threads_in_one_process(upstreams, balancer):
    slow = SlowUpstreamHandler()
    ups = upstreams(3, slow)
    b = balancer([u.url for u in ups], balance="leastconn")
    check_exact(ups, slow, b.port, b.status)


def test_exact_under_8_threads_and_2_workers(upstreams, cli):
    slow = SlowUpstreamHandler()
    ups = upstreams(3, slow)
    p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--admin-port", "0",
             "--health-interval", "0", "--balance", "leastconn",
             *[arg for u in ups for arg in ("--backend", u.url)]]).wait_ready()
    check_exact(ups, slow, p.port, lambda: admin_status(p.admin_port))
    # Both workers took part: the count is one count for both.
    assert all(worker["requests"] > 0 for worker in admin_status(p.admin_port)["workers"])


def test_counts_go_back_to_zero_after_retries_and_clients_that_left(upstreams, balancer):
    slow = SlowUpstreamHandler()
    ups = upstreams(2, slow)
    dead = refused_url()
    b = balancer([dead, ups[0].url, ups[1].url], balance="leastconn", max_fails=100)
    for i in range(9):  # the refused one is tried (count 0, so first), the count moves on
        assert get(b.port, f"/r{i}").status == 200
    gone = hold(b.port, 2)
    assert wait_until(lambda: sum(len(u.requests) for u in ups) == 11)
    for client in gone:
        client.close()  # the client leaves while its request is held upstream
    slow.release.set()
    assert wait_until(lambda: all(n == 0 for n in in_flight(b).values())), in_flight(b)
    errors = {backend["url"]: backend["errors"]["connect"] for backend in b.status()["backends"]}
    assert errors[dead] > 0
