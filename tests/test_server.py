"""The server section: how connections are accepted and given threads.

A finished connection's thread stays as a spare for the next connection (Apache's spare threads),
and a burst of connects is accepted in one pass over the backlog. Everything through real sockets:
real upstreams, real client connections, the balancer in-process.
"""

from __future__ import annotations

import queue
import threading

import load_balancer as lb
from conftest import RawClient, wait_until

REQUEST = b"GET /s HTTP/1.1\r\nHost: test.local\r\n\r\n"
CLOSE_REQUEST = b"GET /s HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n"


def serve_one_connection(port: int) -> None:
    with RawClient(port) as client:
        assert client.request(CLOSE_REQUEST).status == 200
        assert client.is_closed()


def test_finished_connection_thread_serves_the_next_connection(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    server = b.server
    serve_one_connection(b.port)
    assert wait_until(lambda: server.spare_threads == 1), server.spare_threads
    with RawClient(b.port) as client:
        assert client.request(REQUEST).status == 200
        assert server.spare_threads == 0  # the spare thread took this connection
    assert wait_until(lambda: server.spare_threads == 1 and server.connections == 0)
    serve_one_connection(b.port)
    # One thread served all three connections: a thread started per connection would leave two.
    assert wait_until(lambda: server.connections == 0)
    assert server.spare_threads == 1


class TimesOutAsConnectionArrives:
    """A handoff queue whose timed wait ends in queue.Empty at the moment a connection is put:
    the race between a spare thread giving up and process_request() handing it a connection."""

    def __init__(self):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.arrived = threading.Event()

    def put(self, item) -> None:
        self.items.put(item)
        self.arrived.set()

    def get(self, timeout: float | None = None):
        if timeout is None:
            return self.items.get(timeout=5)
        self.arrived.wait(5)
        self.arrived.clear()
        raise queue.Empty

    def empty(self) -> bool:
        return self.items.empty()


def test_connection_handed_to_a_spare_thread_as_it_times_out_is_served(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    b.server.handoff = TimesOutAsConnectionArrives()
    serve_one_connection(b.port)
    assert wait_until(lambda: b.server.spare_threads == 1)
    serve_one_connection(b.port)  # lost, and the client times out, if the thread just left
    assert len(up.requests) == 2


def test_spare_threads_leave_after_idle_time(upstreams, balancer, monkeypatch):
    monkeypatch.setattr(lb, "SPARE_THREAD_SECONDS", 0.001)
    up, = upstreams(1)
    b = balancer([up.url])
    for _ in range(100):  # hand-over and time-out race on many of these
        serve_one_connection(b.port)
    assert len(up.requests) == 100
    server = b.server
    assert wait_until(lambda: server.spare_threads == 0 and server.connections == 0), (
        server.spare_threads, server.connections, [h.client_address for h in server.handlers])
    assert server.handoff.empty()


def test_close_releases_spare_threads(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    clients = [RawClient(b.port) for _ in range(5)]
    try:
        for client in clients:
            assert client.request(REQUEST).status == 200
    finally:
        for client in clients:
            client.close()
    assert wait_until(lambda: b.server.spare_threads == 5), b.server.spare_threads
    b.close(drain_timeout=2)
    assert b.server.spare_threads == 0
    assert wait_until(b.server.handoff.empty), "spare threads did not take their release"


def test_connect_burst_all_served(upstreams, balancer):
    # 200 connects before any request: serve_forever wakes once and takes the whole backlog.
    up, = upstreams(1)
    b = balancer([up.url])
    clients = []
    try:
        for _ in range(200):
            clients.append(RawClient(b.port))
        for client in clients:
            client.send(REQUEST)
        for client in clients:
            assert client.response().status == 200
    finally:
        for client in clients:
            client.close()
    assert len(up.requests) == 200
