"""Issue 20, Unix-socket upstreams: ``unix:/path/to/app.sock[,options]`` is a backend (same options
as a URL); requests go over the socket with the client's Host (``localhost`` when the client sent
none), health checks connect to it, its name defaults to the path; a removed socket is a 502 and
the health check takes it out. --export writes nginx ``server unix:/path`` and HAProxy
``server NAME /path`` (checked by nginx -t / haproxy -c in test_export.py, and run here).

How: parse_backend as a pure function; an in-process HTTP server on a Unix socket for the rules;
gunicorn (--bind unix:) and uvicorn (--uds, with a WebSocket echo) as the real thing. Sockets live
in a short directory of their own (sun_path holds 107 bytes), removed after each test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socketserver
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

import load_balancer as lb
from conftest import (PEERS, WEBSOCKET_CLIENT, AnswerHandler, ChildProcess, free_ports, get, RawClient,
                      require_program, running_peer, wait_until)

export_config = lb.export_config

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="lb20-", dir="/tmp")
    os.chmod(path, 0o755)  # nginx's workers run as nobody when it starts as root
    yield path
    shutil.rmtree(path, ignore_errors=True)


class EchoHostHandler(AnswerHandler):
    """200 with the Host it got, and the connection's number on the server, as the body."""

    disable_nagle_algorithm = False  # a Unix socket has no Nagle (and no TCP_NODELAY to set)

    def answer(self) -> bytes:
        return f"{self.headers.get('Host')} {self.server.connection_numbers[self.connection]}".encode()


class UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str):
        super().__init__(path, EchoHostHandler)
        self.connection_numbers: dict = {}
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def get_request(self):
        sock, address = super().get_request()
        self.connection_numbers[sock] = len(self.connection_numbers) + 1
        return sock, ("unix", 0)

    def stop(self) -> None:
        """Stop listening and end the connections it holds (the balancer's pooled ones too)."""
        self.shutdown()
        self.server_close()
        for sock in list(self.connection_numbers):
            try:
                sock.shutdown(2)
            except OSError:
                pass


@pytest.fixture
def unix_server(socket_dir):
    made = []

    def make(name: str = "app.sock") -> UnixHTTPServer:
        server = UnixHTTPServer(os.path.join(socket_dir, name))
        os.chmod(server.server_address, 0o666)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


# ---------------------------------------------------------------------------------------------------
# The backend syntax
# ---------------------------------------------------------------------------------------------------

def test_parse_unix_backend():
    spec = lb.parse_backend("unix:/run/app.sock")
    assert (spec.url, spec.unix_path, spec.name, spec.netloc, spec.weight, spec.backup) == (
        "unix:/run/app.sock", "/run/app.sock", "/run/app.sock", "localhost", 1, False)
    spec = lb.parse_backend("unix:/run/app.sock, weight=3, backup, name=app")
    assert (spec.unix_path, spec.name, spec.weight, spec.backup) == ("/run/app.sock", "app", 3, True)


@pytest.mark.parametrize("text, reason", [
    ("unix:run/app.sock", "a Unix socket is unix:/absolute/path"),
    ("unix:", "a Unix socket is unix:/absolute/path"),
    ("unix:/run/my app.sock", "a Unix socket is unix:/absolute/path"),
    ("unix:/" + "a" * 107, "at most 107 bytes"),
    ("unix:/run/app.sock,weight=0", "weight must be 1-256"),
    ("unix:/run/app.sock,port=3", "unknown option 'port=3'"),
])
def test_parse_unix_backend_refuses(text, reason):
    with pytest.raises(ValueError, match=reason):
        lb.parse_backend(text)


# ---------------------------------------------------------------------------------------------------
# Through the balancer
# ---------------------------------------------------------------------------------------------------

def test_requests_go_over_the_socket_on_one_kept_alive_connection(balancer, unix_server):
    app = unix_server()
    b = balancer([f"unix:{app.server_address}"])
    with RawClient(b.port) as client:
        answers = [client.request(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n") for _ in range(3)]
        old = client.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert [(r.status, r.body) for r in answers] == [(200, b"shop.example 1")] * 3
    assert (old.status, old.body) == (200, b"localhost 1")  # no Host from the client: localhost
    status = b.status()["backends"][0]
    assert (status["name"], status["url"], status["state"]) == (app.server_address, f"unix:{app.server_address}", "up")


def test_round_robin_over_a_socket_and_tcp(balancer, unix_server, upstreams):
    app = unix_server()
    up, = upstreams(1)
    b = balancer([f"unix:{app.server_address},name=sock", up.url])
    bodies = [get(b.port, "/").body for _ in range(4)]
    assert [body.startswith(b"test.local ") for body in bodies] == [True, False, True, False]


def test_socket_removed_is_502_and_the_health_check_takes_it_out(balancer, unix_server, upstreams):
    app = unix_server()
    up, = upstreams(1)
    b = balancer([f"unix:{app.server_address},name=sock", f"{up.url},backup"], health_interval=0.1,
                 health_timeout=0.5, fall=1, rise=1, max_fails=100)
    assert get(b.port, "/").body.startswith(b"test.local")
    app.stop()
    os.unlink(app.server_address)
    assert wait_until(lambda: b.status()["backends"][0]["health"] == "down", timeout=5), b.status()
    assert "no such file or directory" in b.status()["backends"][0]["reason"]
    assert get(b.port, "/").body.startswith(b"upstream ")  # the backup


def test_socket_removed_single_upstream_502_says_why(balancer, unix_server):
    app = unix_server()
    b = balancer([f"unix:{app.server_address}"])
    assert get(b.port, "/").status == 200
    app.stop()
    os.unlink(app.server_address)
    answer = get(b.port, "/")
    assert answer.status == 502 and b"no such file or directory" in answer.body, answer


def test_gunicorn_on_a_unix_socket(balancer, socket_dir):
    path = os.path.join(socket_dir, "gunicorn.sock")
    (Path(socket_dir) / "wsgi_app.py").write_text(
        "def app(environ, start_response):\n"
        "    body = ('gunicorn ' + environ.get('HTTP_HOST', '-') + ' ' + environ['PATH_INFO']).encode()\n"
        "    start_response('200 OK', [('Content-Length', str(len(body)))])\n"
        "    return [body]\n")
    child = ChildProcess([str(VENV_BIN / "gunicorn"), "--bind", f"unix:{path}", "--workers", "1", "--no-control-socket",
                          "--chdir", socket_dir, "wsgi_app:app"])
    try:
        assert child.wait_for_line("Booting worker"), child.output()
        assert wait_until(lambda: os.path.exists(path), timeout=10)
        b = balancer([f"unix:{path}"], health_interval=0.2)
        answers = [get(b.port, f"/g{i}") for i in range(3)]
        assert [(r.status, r.body) for r in answers] == [(200, f"gunicorn test.local /g{i}".encode())
                                                        for i in range(3)]
        assert wait_until(lambda: b.status()["backends"][0]["checks"]["passed"] >= 1)
    finally:
        child.kill()


UVICORN_APP = '''
async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo " + message["text"]})
    body = ("uvicorn " + dict(scope["headers"]).get(b"host", b"-").decode()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


def test_uvicorn_on_a_unix_socket_with_a_websocket(balancer, socket_dir):
    path = os.path.join(socket_dir, "uvicorn.sock")
    (Path(socket_dir) / "asgi_app.py").write_text(UVICORN_APP)
    child = ChildProcess([sys.executable, "-m", "uvicorn", "asgi_app:app", "--app-dir", socket_dir, "--uds",
                          path, "--lifespan", "off", "--no-access-log"])
    try:
        assert child.wait_for_line("Uvicorn running on unix socket"), child.output()
        b = balancer([f"unix:{path}"])
        answer = get(b.port, "/")
        assert (answer.status, answer.body) == (200, b"uvicorn test.local")

        async def scenario():
            async with connect(f"ws://127.0.0.1:{b.port}/ws", **WEBSOCKET_CLIENT) as ws:
                for text in ("one", "two"):
                    await ws.send(text)
                    assert await ws.recv() == "echo " + text

        asyncio.run(scenario())
        assert wait_until(lambda: b.status()["tunnels"]["total"] == 1)
    finally:
        child.kill()
    errors = [x for x in child.lines if "Traceback" in x or x.startswith("ERROR")]
    assert not errors, child.lines


# ---------------------------------------------------------------------------------------------------
# --export
# ---------------------------------------------------------------------------------------------------

def test_export_lines():
    config = lb.Config(backends=("unix:/run/app.sock,weight=2", "unix:/run/other.sock,name=other"))
    nginx = export_config(config, "nginx")
    assert "    server unix:/run/app.sock weight=2 max_fails=5 fail_timeout=10s;" in nginx
    assert "    server unix:/run/other.sock max_fails=5 fail_timeout=10s;  # other" in nginx
    haproxy = export_config(config, "haproxy")
    assert "    server _run_app.sock /run/app.sock weight 2  # /run/app.sock" in haproxy
    assert "    server other /run/other.sock" in haproxy


@pytest.mark.parametrize("target", PEERS)
def test_peer_balances_over_unix_sockets(target, unix_server, tmp_path):
    require_program(target)
    one, two = unix_server("one.sock"), unix_server("two.sock")
    port, = free_ports(1)
    config = lb.Config(backends=(f"unix:{one.server_address},name=one", f"unix:{two.server_address},name=two"),
                       host="127.0.0.1", port=port, health_interval=0.2)
    with running_peer(target, export_config(config, target), tmp_path / target, port):
        bodies = {get(port, "/").body.split(b" ")[0] for _ in range(4)}
        assert bodies == {b"test.local"}
        assert len(one.connection_numbers) >= 1 and len(two.connection_numbers) >= 1


def test_admin_api_names_it_by_its_path_percent_encoded(balancer, unix_server):
    app = unix_server()
    b = balancer([f"unix:{app.server_address}"], admin_port=0)
    encoded = app.server_address.replace("/", "%2F")
    with RawClient(b.admin_port) as client:
        answer = client.request(f"POST /backends/{encoded}/drain HTTP/1.1\r\nHost: a\r\n"
                                "Content-Length: 0\r\n\r\n".encode())
    assert answer.status == 200, answer
    assert b.status()["backends"][0]["admin"] == "drain"
