"""TLS on both sides of the balancer: the HTTPS listener (--tls-cert/--tls-key), certificate reload
on SIGHUP, --redirect-http-port, https:// upstreams (--backend-ca), WebSocket tunnels over TLS, and
--workers 2 with TLS.

What is proved, and how:
- Certificates are made once per module with the `openssl` command: a CA, a server certificate for
  localhost and 127.0.0.1 signed by it, a renewed one (other key, serial and subject), one for
  wrong.example, a second unrelated CA and a localhost certificate signed by that one. Clients
  verify against the CA (hostname checks on), so every success below is a verified handshake.
- HTTPS listener: one TLS connection carries 6 keep-alive requests rotated a b c a b c; 5 MiB go
  up and 5 MiB come down intact (sha256); an event stream's first event arrives while the
  upstream still holds the second; upstreams see X-Forwarded-Proto: https; ALPN picks http/1.1
  when h2 is offered too; a client limited to TLS 1.1 gets a protocol-version alert; plain HTTP to
  the TLS port gets nginx's 400 at once and a close; a client stalled (or trickling) mid-handshake
  does not hold others up and is closed after --header-timeout; 200 silent connections do not
  keep real clients from being served long before their timeout; curl, requests and httpx work
  with the CA.
- Reload: the CLI as a process, its --tls-cert a file in tmp_path that is overwritten; SIGHUP makes
  new connections present the renewed certificate (its serial) while a keep-alive connection
  opened before goes on working; a broken file is logged (naming it) and the certificate in use
  stays; what a reload announced as loaded is what new connections get.
- --redirect-http-port: GET and POST get 308 to https://<host>:<tls port><same target>; requests
  follows it and the POST body arrives over TLS.
- https:// upstreams: TLS ThreadingHTTPServers (they count their completed handshakes) behind the
  balancer with backend_ca: requests succeed, one upstream connection carries 20 sequential
  requests and is then idle in the pool (/status idle_connections); a pooled connection the
  upstream closed is not reused; the wrong CA and the wrong host name are 502s whose log line
  names the certificate problem; a TCP health check does the TLS handshake, and fails (upstream
  down, reason about the certificate) against an untrusted one.
- WebSocket: a `websockets` echo server behind the balancer, a `websockets` client connecting to
  it, TLS on both sides and on each side alone (wss:// to a TLS listener, https:// upstream): text
  and 1 MiB binary echoed intact; close codes pass both ways, and the upstream's end of the
  connection after the closing handshake reaches the client at once (not after the client's close
  timeout).
- --workers 2 with TLS (CLI process, admin port): 20 fresh TLS connections all answered, both
  workers answered some (/status workers); after SIGHUP, 20 more all get the renewed certificate
  and both workers answered some of them.

Every socket has a timeout, asyncio work runs under asyncio.timeout, waits are on events or
conftest.wait_until, and CLI processes are stopped by PID in `finally` (conftest's `cli` kills the
process group after the test too).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import load_balancer as lb
from conftest import (SLACK, SOCKET_TIMEOUT, RawClient, Upstream, UpstreamServer,
                      default_handler, free_port, get, parse_head, port_of, read_head, require_program,
                      wait_until)
from conftest import request as plain_request

TIMEOUT = 5.0
BIG = 5 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Certificates (openssl command, once per module)
# ---------------------------------------------------------------------------------------------------

OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[localhost]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[wrong]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:wrong.example
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Leaf:
    cert: str
    key: str
    serial: str  # as ssl's getpeercert() spells it: upper-case hex


@dataclass(frozen=True)
class Certs:
    ca: str          # the CA everything below but `other_ca_leaf` is signed by
    other_ca: str    # an unrelated CA
    server: Leaf     # localhost + 127.0.0.1
    renewed: Leaf    # localhost + 127.0.0.1, another key, serial and subject
    wrong: Leaf      # wrong.example
    other_ca_leaf: Leaf  # localhost, signed by other_ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    openssl = require_program("openssl")
    d = tmp_path_factory.mktemp("certs")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)

    def run(*args: str) -> str:
        done = subprocess.run([openssl, *args], cwd=d, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-config", "openssl.cnf"]

    def ca(name: str, subject: str) -> str:
        run("req", "-x509", "-new", *newkey, "-extensions", "ca", "-keyout", f"{name}.key",
            "-out", f"{name}.crt", "-days", "2", "-subj", subject)
        return name

    def leaf(name: str, issuer: str, serial: str, subject: str, section: str) -> Leaf:
        run("req", "-new", *newkey, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.crt", "-CAkey", f"{issuer}.key",
            "-set_serial", serial, "-days", "2", "-extfile", "openssl.cnf", "-extensions", section,
            "-out", f"{name}.crt")
        printed = run("x509", "-noout", "-serial", "-in", f"{name}.crt").strip()  # serial=1001
        return Leaf(str(d / f"{name}.crt"), str(d / f"{name}.key"), printed.split("=", 1)[1].upper())

    ca("ca", "/CN=load_balancer test CA")
    ca("other_ca", "/CN=unrelated test CA")
    return Certs(
        ca=str(d / "ca.crt"), other_ca=str(d / "other_ca.crt"),
        server=leaf("server", "ca", "0x1001", "/CN=localhost", "localhost"),
        renewed=leaf("renewed", "ca", "0x2002", "/O=renewed/CN=localhost", "localhost"),
        wrong=leaf("wrong", "ca", "0x3003", "/CN=wrong.example", "wrong"),
        other_ca_leaf=leaf("other", "other_ca", "0x4004", "/CN=localhost", "localhost"),
    )


def client_context(cafile: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def server_context(leaf: Leaf) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert, leaf.key)
    return context


# ---------------------------------------------------------------------------------------------------
# Clients and upstreams
# ---------------------------------------------------------------------------------------------------

class TLSClient(RawClient):
    """RawClient over a verified TLS connection to 127.0.0.1:port, SNI and host name `localhost`."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = TIMEOUT):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self.file = self.sock.makefile("rb")

    @property
    def serial(self) -> str:
        return self.sock.getpeercert()["serialNumber"]


def request(target: str, method: str = "GET", body: bytes | None = None, close: bool = False) -> bytes:
    """conftest's request, to the host name the certificates name."""
    return plain_request(target, method, body, close, host="localhost")


def tls_get(port: int, context: ssl.SSLContext, target: str = "/"):
    """One GET on a fresh TLS connection: (response, peer certificate serial)."""
    with TLSClient(port, context) as c:
        return c.request(request(target, close=True)), c.serial


def routes(table: dict):
    """An upstream handler: table[target](h, req), else default_handler."""
    def handle(h, req):
        table.get(req.target, default_handler)(h, req)
    return handle


def assert_default_ok(resp, upstream, method: str = "GET", target: str = "/") -> None:
    assert resp.status == 200, resp
    assert resp.body == f"upstream {upstream.port} {method} {target}\n".encode(), resp


class TLSUpstreamServer(UpstreamServer):
    """conftest's upstream server, each connection wrapped in TLS on its own thread."""

    def finish_request(self, request, client_address):
        request.settimeout(SOCKET_TIMEOUT)
        try:
            tls = self.upstream.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self.upstream.handshake(error)
            return
        self.upstream.handshake(None)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()
            self.upstream.closed()


class TLSUpstream(Upstream):
    """A conftest Upstream speaking TLS with `leaf`; counts completed and failed handshakes, and
    the connections it has closed."""

    server_class = TLSUpstreamServer

    def __init__(self, leaf: Leaf, handler=default_handler):
        self.context = server_context(leaf)
        self.handshakes = self.closes = 0
        self.handshake_errors: list = []
        super().__init__(handler)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def handshake(self, error) -> None:
        with self._cond:
            if error is None:
                self.handshakes += 1
            else:
                self.handshake_errors.append(error)
            self._cond.notify_all()

    def closed(self) -> None:
        with self._cond:
            self.closes += 1
            self._cond.notify_all()


@pytest.fixture
def tls_upstreams():
    """Factory: tls_upstreams(leaf, n=1, handler=default_handler) -> list[TLSUpstream]."""
    made: list = []

    def make(leaf: Leaf, n: int = 1, handler=default_handler) -> list[TLSUpstream]:
        new = [TLSUpstream(leaf, handler) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for u in made:
        u.release()


def tls_balancer(balancer, certs: Certs, urls, **options):
    return balancer(urls, tls_cert=certs.server.cert, tls_key=certs.server.key, **options)


def client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes of a ClientHello as `context` writes it (no socket involved)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """The peer closes (end of stream or reset) within `timeout` seconds; nothing may arrive."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    assert data == b"", data
    return True


def still_open(sock: socket.socket) -> bool:
    """Nothing to read and no end of stream: the peer has not closed (checked without waiting)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(TIMEOUT)


# ---------------------------------------------------------------------------------------------------
# HTTPS listener
# ---------------------------------------------------------------------------------------------------

def test_keepalive_rotation_on_one_tls_connection(certs, upstreams, balancer):
    ups = upstreams(3)
    b = tls_balancer(balancer, certs, [u.url for u in ups])
    conn = http.client.HTTPSConnection("localhost", b.port, timeout=TIMEOUT,
                                       context=client_context(certs.ca))
    try:
        order, first = [], None
        for i in range(6):
            conn.request("GET", f"/r{i}")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body)
            order.append(int(resp.headers["X-Upstream-Port"]))
            assert body == f"upstream {order[-1]} GET /r{i}\n".encode()
            first = first or conn.sock
            assert conn.sock is first, "the client's TLS connection was not kept alive"
        assert first.getpeercert()["serialNumber"] == certs.server.serial
    finally:
        conn.close()
    assert order == [u.port for u in ups] * 2


def test_upstream_sees_forwarded_proto_https(certs, upstreams, balancer):
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url])
    resp, _ = tls_get(b.port, client_context(certs.ca), "/proto")
    assert_default_ok(resp, up, "GET", "/proto")
    assert up.requests[-1].header("X-Forwarded-Proto") == "https", up.requests[-1]


def test_alpn_negotiates_http11_even_when_h2_is_offered(certs, upstreams, balancer):
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url])
    with TLSClient(b.port, client_context(certs.ca, alpn=["h2", "http/1.1"])) as c:
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert_default_ok(c.request(request("/alpn")), up, "GET", "/alpn")


def test_5mib_upload_and_5mib_download_intact(certs, upstreams, balancer):
    payload = random.Random(7).randbytes(BIG)

    def big(h, req):
        if req.method == "POST":
            body = f"{len(req.body)} {hashlib.sha256(req.body).hexdigest()}".encode()
        else:
            body = payload
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    up, = upstreams(1, big)
    b = tls_balancer(balancer, certs, [up.url])
    upload = random.Random(8).randbytes(BIG)
    with TLSClient(b.port, client_context(certs.ca), timeout=15) as c:
        resp = c.request(request("/upload", "POST", upload))
        assert resp.status == 200, resp
        assert resp.body == f"{BIG} {hashlib.sha256(upload).hexdigest()}".encode()
        resp = c.request(request("/download"))
        assert resp.status == 200 and len(resp.body) == BIG, (resp.status, len(resp.body))
        assert hashlib.sha256(resp.body).digest() == hashlib.sha256(payload).digest()


def test_event_stream_first_event_arrives_while_upstream_holds_the_second(certs, upstreams, balancer):
    event1, event2 = b"event: tick\ndata: one\n\n", b"data: two\n\n"
    release, finished = threading.Event(), threading.Event()

    def events(h, req):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(event1), event1))
        release.wait(SOCKET_TIMEOUT)
        h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event2), event2))
        finished.set()

    up, = upstreams(1, routes({"/events": events}))
    b = tls_balancer(balancer, certs, [up.url])
    try:
        with TLSClient(b.port, client_context(certs.ca), timeout=3) as c:
            c.send(request("/events"))
            try:  # nothing here may wait for `release`
                status_line, fields = parse_head(read_head(c.file))
                assert status_line.split(" ")[1] == "200", status_line
                size = int(c.file.readline(100).strip(), 16)
                first = c.file.read(size)
            except socket.timeout:
                pytest.fail("the first event was not relayed while the upstream held the second")
            assert first == event1
            release.set()
            assert c.file.readline(100) == b"\r\n"
            assert c.file.readline(100).strip() == b"%x" % len(event2)
            assert c.file.read(len(event2)) == event2
            assert finished.wait(TIMEOUT)
    finally:
        release.set()


def test_tls_1_1_and_below_refused(certs, upstreams, balancer):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(certs.ca)
    try:
        with warnings.catch_warnings():  # TLSVersion.TLSv1_1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 needs this to offer TLS 1.0/1.1 at all
        client_hello(old)
    except (ssl.SSLError, ValueError, AttributeError) as error:
        pytest.skip(f"the local OpenSSL cannot offer TLS 1.1 ({error})")
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url])
    with pytest.raises(ssl.SSLError) as refused:
        TLSClient(b.port, old).close()
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value  # the server's alert
    assert up.requests == []
    # The same listener still serves a TLS 1.2+ client.
    assert_default_ok(tls_get(b.port, client_context(certs.ca), "/after")[0], up, "GET", "/after")


def test_plain_http_to_tls_port_gets_400_at_once_and_a_close(certs, upstreams, balancer):
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url])  # header_timeout stays 10 s: "at once" is not it
    started = time.monotonic()
    with RawClient(b.port, timeout=3) as c:
        resp = c.request(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        elapsed = time.monotonic() - started
        assert resp.status == 400, resp
        assert b"The plain HTTP request was sent to HTTPS port" in resp.body, resp
        assert resp.header("Connection") == "close", resp
        assert c.read_until_close() == b""
    assert elapsed < SLACK, elapsed  # well before the 10 s header timeout
    assert up.requests == []


def test_connection_close_over_tls_ends_the_connection_with_a_close_notify(certs, upstreams, balancer):
    """After a response with Connection: close, the client sees the end at once (a close_notify,
    then the close), rather than whenever the TLS socket would be garbage-collected; and the
    balancer holds no socket in CLOSE-WAIT afterwards."""
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url])
    for i in range(20):
        with TLSClient(b.port, client_context(certs.ca), timeout=2) as c:
            assert_default_ok(c.request(request(f"/close{i}", close=True)), up, "GET", f"/close{i}")
            assert c.read_until_close() == b""  # raises socket.timeout if the end never comes
    assert wait_until(lambda: b.server.connections == 0, timeout=3), b.server.connections


def test_stalled_handshake_does_not_block_others_and_is_closed_after_header_timeout(
        certs, upstreams, balancer):
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url], header_timeout=1)
    context = client_context(certs.ca)
    hello = client_hello(context)
    started = time.monotonic()
    with RawClient(b.port, timeout=5) as stalled:
        stalled.send(hello[:len(hello) // 2])
        resp, _ = tls_get(b.port, context, "/meanwhile")
        assert_default_ok(resp, up, "GET", "/meanwhile")
        assert still_open(stalled.sock), "the stalled handshake was given up before its timeout"
        assert stalled.is_closed(timeout=5)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 1 + SLACK, elapsed


def test_trickled_handshake_is_closed_after_header_timeout_in_total(certs, upstreams, balancer):
    """--header-timeout bounds the whole handshake, not each read of it: a ClientHello sent a few
    bytes at a time, each piece within the timeout, is still cut off at about 1 s."""
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url], header_timeout=1)
    hello = client_hello(client_context(certs.ca))
    started = time.monotonic()
    closed_at = None
    with RawClient(b.port, timeout=5) as c:
        for i in range(0, len(hello) - 1, 4):  # never the last byte
            try:
                c.send(hello[i:i + 4])
            except OSError:  # reset: closed
                closed_at = time.monotonic()
                break
            if closed_within(c.sock, 0.3):  # the pace of the trickle, and the check for the close
                closed_at = time.monotonic()
                break
            if time.monotonic() - started > 4:
                break
    assert closed_at is not None, "a trickled handshake held its connection for over 4 s"
    assert 0.9 <= closed_at - started < 2.0, closed_at - started


def test_200_silent_connections_do_not_stop_real_clients(certs, upstreams, balancer):
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url], header_timeout=2, max_connections=400)
    context = client_context(certs.ca)
    silent = []
    try:
        for _ in range(200):
            silent.append(socket.create_connection(("127.0.0.1", b.port), timeout=TIMEOUT))
        opened = time.monotonic()
        assert wait_until(lambda: b.status()["connections"] >= 200, timeout=5), b.status()["connections"]
        for i in range(5):
            t0 = time.monotonic()
            resp, serial = tls_get(b.port, context, f"/real{i}")
            assert_default_ok(resp, up, "GET", f"/real{i}")
            assert serial == certs.server.serial
            assert time.monotonic() - t0 < 1.0, time.monotonic() - t0
        assert time.monotonic() - opened < 2.0, "real clients were only served as silent ones timed out"
        assert all(still_open(s) for s in silent), "silent connections were closed before header_timeout"
    finally:
        for s in silent:
            s.close()


def test_curl_as_a_client(certs, upstreams, balancer):
    curl = require_program("curl")
    up, = upstreams(1)
    b = tls_balancer(balancer, certs, [up.url])
    done = subprocess.run([curl, "-sS", "--max-time", "10", "--cacert", certs.ca,
                           "-w", r"\n%{http_code} %{http_version}", f"https://localhost:{b.port}/curl"],
                          capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"upstream {up.port} GET /curl\n\n200 1.1", done.stdout


def test_requests_and_httpx_as_clients(certs, upstreams, balancer):
    import httpx
    import requests

    ups = upstreams(2)
    b = tls_balancer(balancer, certs, [u.url for u in ups])
    with requests.Session() as session:
        got = [session.get(f"https://localhost:{b.port}/requests{i}", verify=certs.ca, timeout=TIMEOUT)
               for i in range(2)]
    assert [r.status_code for r in got] == [200, 200]
    assert [r.text for r in got] == [f"upstream {u.port} GET /requests{i}\n" for i, u in enumerate(ups)]
    with httpx.Client(verify=client_context(certs.ca), timeout=TIMEOUT) as client:
        got = [client.post(f"https://127.0.0.1:{b.port}/httpx{i}", content=b"x" * 10) for i in range(2)]
    assert [r.status_code for r in got] == [200, 200]
    assert [r.http_version for r in got] == ["HTTP/1.1", "HTTP/1.1"]
    assert [r.text for r in got] == [f"upstream {u.port} POST /httpx{i}\n" for i, u in enumerate(ups)]


# ---------------------------------------------------------------------------------------------------
# Certificate reload (SIGHUP)
# ---------------------------------------------------------------------------------------------------

def install(leaf: Leaf, cert: Path, key: Path) -> None:
    """Put leaf's files in place as a renewal tool would (each file replaced whole)."""
    for source, target in ((leaf.cert, cert), (leaf.key, key)):
        shutil.copyfile(source, str(target) + ".new")
        os.replace(str(target) + ".new", target)


def start_tls_cli(cli, args: list[str]):
    """The CLI with TLS, once its https start-up line is out."""
    return cli(["--host", "127.0.0.1", "--port", "0", "--health-interval", "0", "--drain-timeout", "2",
                *args]).wait_ready(15)


def test_sighup_renews_certificate_for_new_connections_and_keeps_open_ones(
        certs, upstreams, cli, tmp_path):
    up, = upstreams(1)
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    install(certs.server, cert, key)
    p = start_tls_cli(cli, ["--tls-cert", str(cert), "--tls-key", str(key), "--backend", up.url])
    context = client_context(certs.ca)
    try:
        with TLSClient(p.port, context) as before:
            assert_default_ok(before.request(request("/before")), up, "GET", "/before")
            assert before.serial == certs.server.serial
            install(certs.renewed, cert, key)
            os.kill(p.proc.pid, signal.SIGHUP)
            line = p.wait_for_line("SIGHUP: certificate", timeout=5)
            assert line and f"{cert} loaded for new connections" in line, p.stderr_text()
            resp, serial = tls_get(p.port, context, "/new")
            assert serial == certs.renewed.serial
            assert_default_ok(resp, up, "GET", "/new")
            # The connection opened before the reload goes on, with the certificate it began with.
            assert_default_ok(before.request(request("/still")), up, "GET", "/still")
            assert before.serial == certs.server.serial
    finally:
        p.stop()
    assert "Traceback" not in p.stderr_text(), p.stderr_text()


def test_sighup_with_broken_certificate_logs_it_and_keeps_the_previous(certs, upstreams, cli, tmp_path):
    up, = upstreams(1)
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    install(certs.server, cert, key)
    p = start_tls_cli(cli, ["--tls-cert", str(cert), "--tls-key", str(key), "--backend", up.url])
    context = client_context(certs.ca)
    try:
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        os.kill(p.proc.pid, signal.SIGHUP)
        line = p.wait_for_line("SIGHUP: kept the previous certificate", timeout=5)
        assert line and "ERROR" in line and f"cannot load {cert}" in line, p.stderr_text()
        for i in range(2):
            resp, serial = tls_get(p.port, context, f"/after{i}")
            assert serial == certs.server.serial
            assert_default_ok(resp, up, "GET", f"/after{i}")
        assert p.proc.poll() is None
    finally:
        p.stop()
    assert "Traceback" not in p.stderr_text(), p.stderr_text()


def test_reload_announced_certificate_is_the_one_new_connections_get(certs, upstreams, balancer,
                                                                     tmp_path, caplog):
    """A reload that logged "certificate loaded for new connections" has loaded it: when the
    file is broken again before the next client connects (a renewal tool half-way through its
    next write), that client gets the certificate the reload announced, not the one before it."""
    up, = upstreams(1)
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    install(certs.server, cert, key)
    b = balancer([up.url], tls_cert=str(cert), tls_key=str(key))
    context = client_context(certs.ca)
    assert tls_get(b.port, context)[1] == certs.server.serial
    install(certs.renewed, cert, key)
    with caplog.at_level("INFO", logger="load_balancer"):
        b.reload()
    assert any("loaded for new connections" in r.getMessage() for r in caplog.records), caplog.text
    cert.write_text("")  # broken before anyone connected
    resp, serial = tls_get(b.port, context, "/next")
    assert_default_ok(resp, up, "GET", "/next")
    assert serial == certs.renewed.serial, "the reload announced the renewed certificate, but it is not used"


# ---------------------------------------------------------------------------------------------------
# --redirect-http-port
# ---------------------------------------------------------------------------------------------------

def test_redirect_http_port_answers_308_to_the_https_url(certs, upstreams, balancer):
    import requests

    up, = upstreams(1)
    redirect_port = free_port()
    b = tls_balancer(balancer, certs, [up.url], redirect_http_port=redirect_port)
    for method, body in (("GET", None), ("POST", b"a=1&b=2")):
        target = f"/form/{method.lower()}?x=1&y=%20"
        with RawClient(redirect_port, timeout=TIMEOUT) as c:
            resp = c.request(request(target, method, body).replace(
                b"Host: localhost", f"Host: localhost:{redirect_port}".encode()))
        assert resp.status == 308, resp
        assert resp.header("Location") == f"https://localhost:{b.port}{target}", resp
    assert up.requests == []
    # A real client follows it: the method and body go on, over TLS.
    r = requests.post(f"http://localhost:{redirect_port}/followed", data=b"payload", verify=certs.ca,
                      timeout=TIMEOUT)
    assert r.status_code == 200 and r.url == f"https://localhost:{b.port}/followed", (r.status_code, r.url)
    assert r.text == f"upstream {up.port} POST /followed\n"
    assert up.requests[-1].body == b"payload"


# ---------------------------------------------------------------------------------------------------
# https:// upstreams
# ---------------------------------------------------------------------------------------------------

def test_https_upstreams_answer_and_connections_are_pooled(certs, tls_upstreams, balancer):
    a, c = tls_upstreams(certs.server, 2)
    b = balancer([a.url, c.url], backend_ca=certs.ca)
    with RawClient(b.port, TIMEOUT) as client:
        for i in range(20):
            assert_default_ok(client.request(request(f"/p{i}")), (a, c)[i % 2], "GET", f"/p{i}")
    assert [len(a.requests), len(c.requests)] == [10, 10]
    assert [a.handshakes, c.handshakes] == [1, 1], "upstream TLS connections were not reused"
    assert a.handshake_errors == c.handshake_errors == []
    assert wait_until(lambda: [x["idle_connections"] for x in b.status()["backends"]] == [1, 1]), \
        b.status()["backends"]


def test_https_upstream_closed_pooled_connection_is_not_reused(certs, tls_upstreams, balancer):
    """The upstream closes each connection after its answer (without saying so): the pooled TLS
    connection must be seen as ended (TLSStream.is_reusable) before a POST, which is never
    replayed, is written to it."""
    def close_after(h, req):
        default_handler(h, req)
        h.close_connection = True

    up, = tls_upstreams(certs.server, 1, close_after)
    b = balancer([up.url], backend_ca=certs.ca)
    with RawClient(b.port, TIMEOUT) as client:
        for i in range(6):
            assert wait_until(lambda: up.closes == i), up.closes  # the one before is closed
            assert_default_ok(client.request(request(f"/c{i}", "POST", b"body %d" % i)), up, "POST", f"/c{i}")
    assert [r.body for r in up.requests] == [b"body %d" % i for i in range(6)]
    assert up.handshakes == 6
    assert b.status()["backends"][0]["errors"] == dict.fromkeys(lb.ERROR_KINDS, 0)


def test_https_upstream_with_untrusted_certificate_is_502_and_logged(certs, tls_upstreams, balancer,
                                                                      caplog):
    up, = tls_upstreams(certs.server, 1)
    b = balancer([up.url], backend_ca=certs.other_ca)
    with caplog.at_level("WARNING", logger="load_balancer"):
        resp = get(b.port, "/untrusted")
    assert resp.status == 502, resp
    assert up.requests == [] and up.handshakes == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "load_balancer"]
    assert any(up.url in m and "TLS certificate not verified: unable to get local issuer certificate"
               in m for m in lines), lines
    assert b.status()["backends"][0]["errors"]["tls"] == 1


def test_https_upstream_with_wrong_host_name_is_502(certs, tls_upstreams, balancer, caplog):
    up, = tls_upstreams(certs.wrong, 1)  # signed by the trusted CA, but for wrong.example
    b = balancer([up.url], backend_ca=certs.ca)
    with caplog.at_level("WARNING", logger="load_balancer"):
        resp = get(b.port, "/wrong-name")
    assert resp.status == 502, resp
    assert up.requests == []
    lines = [r.getMessage() for r in caplog.records if r.name == "load_balancer"]
    assert any(up.url in m and "Hostname mismatch" in m and "'localhost'" in m for m in lines), lines
    assert b.status()["backends"][0]["errors"]["tls"] == 1


def test_health_check_does_the_tls_handshake_and_fails_on_untrusted_certificate(
        certs, tls_upstreams, balancer):
    trusted, = tls_upstreams(certs.server, 1)
    untrusted, = tls_upstreams(certs.other_ca_leaf, 1)
    b = balancer([trusted.url, untrusted.url], backend_ca=certs.ca, health_interval=0.2,
                 health_timeout=1, fall=1, rise=1)

    def checks():
        return [(x["checks"]["passed"], x["checks"]["failed"]) for x in b.status()["backends"]]

    assert wait_until(lambda: checks()[0][0] >= 1 and checks()[1][1] >= 1), checks()
    (trusted_state, untrusted_state) = [(x["state"], x["reason"]) for x in b.status()["backends"]]
    assert checks()[0][1] == 0 and checks()[1][0] == 0, checks()
    assert trusted_state[0] == "up" and "TLS handshake" in trusted_state[1], trusted_state
    assert untrusted_state[0] == "down", untrusted_state
    assert "TLS certificate not verified" in untrusted_state[1], untrusted_state
    assert trusted.requests == []  # the checks were handshakes, no requests
    assert untrusted.handshakes == 0 and wait_until(lambda: untrusted.handshake_errors)
    for i in range(3):
        assert_default_ok(get(b.port, f"/h{i}"), trusted, "GET", f"/h{i}")


# ---------------------------------------------------------------------------------------------------
# WebSocket over TLS on both sides
# ---------------------------------------------------------------------------------------------------

class WebSocketEcho:
    """A `websockets` (asyncio) echo server on 127.0.0.1 (TLS with `context`), on its own thread and
    loop. "close NNNN" makes it close with that code; `closes` gets the code each connection ended
    with."""

    def __init__(self, context: ssl.SSLContext | None):
        import queue

        self.closes: queue.Queue = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(context), self.loop).result(TIMEOUT)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, context):
        from websockets.asyncio.server import serve

        return await serve(self._echo, "127.0.0.1", 0, ssl=context, max_size=4 << 20)

    async def _echo(self, ws):
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("close "):
                    await ws.close(int(message[6:]), "server says bye")
                    break
                await ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.put(ws.close_code)

    def stop(self) -> None:
        async def close():
            self.server.close()
            await self.server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()


@pytest.mark.parametrize("client_tls, upstream_tls", [(True, True), (True, False), (False, True)],
                         ids=["wss-to-wss", "wss-to-ws", "ws-to-wss"])
def test_websocket_over_tls(certs, balancer, client_tls, upstream_tls):
    """After the closing handshake the upstream ends the TCP connection (RFC 6455 section 7.1.1);
    that end must reach the client at once, whichever side speaks TLS: a client left waiting
    gives up only after its own close timeout (2 s here), or in recv() never."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    echo = WebSocketEcho(server_context(certs.server) if upstream_tls else None)
    try:
        upstream = f"https://localhost:{echo.port}" if upstream_tls else f"http://127.0.0.1:{echo.port}"
        if client_tls:
            b = tls_balancer(balancer, certs, [upstream], backend_ca=certs.ca)
            uri, context = f"wss://localhost:{b.port}/ws", client_context(certs.ca)
        else:
            b = balancer([upstream], backend_ca=certs.ca)
            uri, context = f"ws://localhost:{b.port}/ws", None
        binary = random.Random(9).randbytes(1 << 20)

        async def talk():
            async with asyncio.timeout(15):
                async with connect(uri, ssl=context, open_timeout=TIMEOUT, close_timeout=2,
                                   max_size=4 << 20) as ws:
                    await ws.send("héllo wörld")
                    assert await ws.recv() == "héllo wörld"
                    await ws.send(binary)
                    assert await ws.recv() == binary
                    started = time.monotonic()
                    await ws.close(4001, "client says bye")  # returns once the TCP connection ended
                    took = time.monotonic() - started
                    assert (ws.close_code, ws.close_reason) == (4001, "client says bye")  # the echo
                    assert took < 1.0, f"the upstream's end reached the client after {took:.1f}s"
                async with connect(uri, ssl=context, open_timeout=TIMEOUT, close_timeout=2) as ws:
                    await ws.send("close 4002")
                    started = time.monotonic()
                    try:  # recv() raises once the closing handshake is over and the TCP connection ended
                        async with asyncio.timeout(2):
                            await ws.recv()
                    except ConnectionClosedError as closed:  # 4002 is no "OK" code
                        took = time.monotonic() - started
                        assert (closed.rcvd.code, closed.rcvd.reason, closed.sent.code) == (
                            4002, "server says bye", 4002)
                        assert took < 1.0, f"the upstream's end reached the client after {took:.1f}s"
                    except TimeoutError:
                        pytest.fail("recv() still waits 2 s after the server closed the connection")

        asyncio.run(talk())
        assert echo.closes.get(timeout=TIMEOUT) == 4001
        assert echo.closes.get(timeout=TIMEOUT) == 4002
        assert wait_until(lambda: b.status()["tunnels"]["open"] == 0), b.status()["tunnels"]
        assert b.status()["tunnels"]["total"] == 2
    finally:
        echo.stop()


# ---------------------------------------------------------------------------------------------------
# --workers 2
# ---------------------------------------------------------------------------------------------------

def test_two_workers_serve_tls_and_both_reload_the_certificate(certs, upstreams, cli, tmp_path):
    ups = upstreams(2)
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    install(certs.server, cert, key)
    args = ["--workers", "2", "--admin-port", str(free_port()), "--tls-cert", str(cert),
            "--tls-key", str(key)]
    for u in ups:
        args += ["--backend", u.url]
    p = start_tls_cli(cli, args)
    context = client_context(certs.ca)

    def requests_by_worker() -> list[int]:
        status = json.loads(get(p.admin_port, "/status").body)
        assert status["listen"].startswith("https://"), status["listen"]
        return [w["requests"] for w in status["workers"]]

    def fresh_connections(n: int, serial: str) -> None:
        for i in range(n):
            resp, got = tls_get(p.port, context, f"/w{i}")
            assert resp.status == 200 and port_of(resp) in {u.port for u in ups}, resp
            assert got == serial

    try:
        fresh_connections(20, certs.server.serial)
        before = requests_by_worker()
        assert len(before) == 2 and sum(before) == 20 and all(n > 0 for n in before), before
        install(certs.renewed, cert, key)
        os.kill(p.proc.pid, signal.SIGHUP)  # to the supervisor, which tells the workers
        assert p.wait_for_line("SIGHUP: certificate", timeout=5), p.stderr_text()
        fresh_connections(20, certs.renewed.serial)
        after = requests_by_worker()
        assert sum(after) == 40 and all(a > b for a, b in zip(after, before)), (before, after)
    finally:
        p.stop()
    assert "Traceback" not in p.stderr_text(), p.stderr_text()
