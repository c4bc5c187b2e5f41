"""Server-Sent Events through load_balancer and through nginx and HAProxy started on its --export:
each event reaches the client as soon as the upstream sends it, in all three.

An event-stream upstream (a raw socket server: a chunked text/event-stream response, one event at
once, then one more each time the test asks) records when it sends each event; the client records
when the event has arrived whole; the delay is the difference on one monotonic clock. HAProxy,
without `option http-no-delay`, held every event about 200 ms (it sends with MSG_MORE, waiting for
more data to fill a packet). Peers are started as tests/test_export.py starts them, killed by PID
in a finally; every socket has a timeout; readiness is polled with a deadline.
"""

from __future__ import annotations

import queue
import socket
import statistics
import time

import pytest

from conftest import (SOCKET_TIMEOUT, free_ports, lb, require_program, running_peer)

EVENTS = 5
MOST_DELAY = 0.05  # seconds; HAProxy's MSG_MORE wait is 200 ms


class EventSource:
    """The upstream's side: for each connection, the response head and event 0, then event n each
    time `next_event` gets n (None ends the response), with its send time put on `sent`."""

    def __init__(self):
        self.next_event: queue.Queue = queue.Queue()
        self.sent: queue.Queue = queue.Queue()

    @staticmethod
    def chunk(n: int) -> bytes:
        event = b"data: event %d\n\n" % n
        return b"%x\r\n%s\r\n" % (len(event), event)

    def __call__(self, conn: socket.socket, upstream) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + self.chunk(0))
        while True:
            n = self.next_event.get(timeout=SOCKET_TIMEOUT)
            if n is None:
                conn.sendall(b"0\r\n\r\n")
                return
            self.sent.put(time.monotonic())
            conn.sendall(self.chunk(n))


def event_delays(port: int, source: EventSource) -> list[float]:
    """Open the stream through `port`, then time EVENTS events from the upstream's send to their
    arrival at the client."""
    delays = []
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: test.local\r\nAccept: text/event-stream\r\n\r\n")
        received = b""

        def until(needle: bytes) -> None:
            nonlocal received
            while needle not in received:
                data = sock.recv(65536)
                assert data, f"the stream ended before {needle!r}: {received!r}"
                received += data

        until(b"data: event 0\n\n")
        for n in range(1, EVENTS + 1):
            source.next_event.put(n)
            until(b"data: event %d\n\n" % n)
            delays.append(time.monotonic() - source.sent.get(timeout=SOCKET_TIMEOUT))
        source.next_event.put(None)
    return delays


@pytest.mark.parametrize("target", ["load_balancer", "nginx", "haproxy"])
def test_each_event_arrives_without_delay(target, raw_upstream, balancer, tmp_path):
    if target != "load_balancer":
        require_program(target)
    source = EventSource()
    up = raw_upstream(source)
    if target == "load_balancer":
        delays = event_delays(balancer([up.url]).port, source)
    else:
        port, = free_ports(1)
        config = lb.Config(backends=(up.url,), host="127.0.0.1", port=port, workers=1, health_interval=0)
        with running_peer(target, lb.export_config(config, target), tmp_path / target, port, timeout=10):
            delays = event_delays(port, source)
    print(f"\n{target}: event delays (ms) {[round(d * 1000, 2) for d in delays]}")
    assert statistics.median(delays) < MOST_DELAY, [round(d * 1000, 1) for d in delays]
