"""The socket helpers under the HTTP rules: Stream.send_now(), the send that never blocks (libc's
send through ctypes, which keeps the GIL, or socket.send where that is not available).

Real TCP connections on 127.0.0.1, each socket with a timeout; a call that should not block runs in
a thread that must finish within a deadline.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

import load_balancer as lb

TIMEOUT = 5.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["libc", "socket"])
def send_now(request, monkeypatch):
    """send_now(sock, data) of a plain Stream, through libc's send and through the socket.send
    fallback."""
    if request.param == "socket":
        monkeypatch.setattr(lb, "LIBC_SEND", None)
    elif lb.LIBC_SEND is None:
        pytest.skip("no libc send through ctypes here")
    return lambda sock, data: lb.Stream(sock).send_now(data)


@pytest.fixture
def connection():
    """(sender, receiver): a connected TCP pair; the sender is blocking, as the balancer's are."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        sender = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        receiver, _ = listener.accept()
    receiver.settimeout(TIMEOUT)
    sender.settimeout(None)  # the subject: a call that would block runs under finishes()' deadline
    yield sender, receiver
    sender.close()
    receiver.close()


def finishes(call, *args):
    """Run call(*args) in a thread; its result, or a failure if it is still running after TIMEOUT."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call(*args)), daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{call.__name__} blocked"
    return result[0]


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more, "closed early"
        data += more
    return data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fast path is checked on Linux")
def test_libc_send_is_used_on_linux():
    assert lb.LIBC_SEND is not None


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_send_now_sends_at_once(send_now, connection, kind):
    sender, receiver = connection
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert send_now(sender, kind(data)) == len(data)
    assert receive(receiver, len(data)) == data


FILL = """
import socket, sys
import load_balancer as lb
if sys.argv[1] == "socket":
    lb.LIBC_SEND = None
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(5)
sender = socket.create_connection(listener.getsockname(), timeout=5)
receiver, _ = listener.accept()
receiver.settimeout(5)
sender.settimeout(None)  # blocking, as the balancer's sockets are (the child runs under a timeout)
block = b"x" * 65536
stream = lb.Stream(sender)
total = 0
while True:
    sent = stream.send_now(block)
    total += sent
    if sent < len(block):
        break
assert stream.send_now(block) == 0
received = 0
while received < total:
    data = receiver.recv(1 << 20)
    assert data == b"x" * len(data)
    received += len(data)
print(total)
"""


def test_send_now_never_blocks_on_a_full_connection(send_now, request):
    # In a child process: a libc send() that blocked would hold the GIL, and nothing in this
    # process (not even pytest-timeout) could end the test.
    kind = request.node.callspec.params["send_now"]
    done = subprocess.run([sys.executable, "-c", FILL, kind], capture_output=True, text=True,
                          timeout=TIMEOUT * 2, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


def test_send_now_on_a_reset_connection_returns_0_and_sendall_raises(send_now, connection):
    sender, receiver = connection
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    receiver.close()  # an RST, not a FIN
    sender.settimeout(TIMEOUT)
    for _ in range(3):  # the first send may still be taken before the reset is seen
        if finishes(send_now, sender, b"data") == 0:
            break
    assert finishes(send_now, sender, b"data") == 0  # no exception, and no SIGPIPE
    with pytest.raises(OSError):
        sender.sendall(b"data")


def test_send_now_on_a_closed_socket_returns_0(send_now, connection):
    sender, _ = connection
    sender.close()
    assert send_now(sender, b"data") == 0
