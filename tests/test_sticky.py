"""Sticky sessions (--sticky-cookie NAME, --sticky-key FILE) with real software.

The application of the issue: a Flask app that keeps its sessions in process memory (a dict: log in
on one process, and the others have never heard of you), run as three gunicorn instances (one sync
worker each). Behind round robin two requests in three are not logged in (the control case, so that
the sticky tests can fail); behind --sticky-cookie a `requests.Session` logs in and makes 60
requests, all logged in, through an in-process balancer and through the CLI with --workers 2 (every
request on a new connection, so both workers serve). A drained upstream keeps its sessions while a
new client goes elsewhere; a stopped one re-pins its clients with a new cookie, and they stick
there. Headless Chromium keeps the cookie across page loads. The cookie's value says nothing of the
address or port, is an HMAC of the upstream's name under the key (stable across balancers with one
key, different under another key), and a forged or stale value is balanced anew, never an error.
The balancer's cookie never reaches the upstream; the upstream's own cookies pass both ways.

gunicorn instances are child processes in sessions of their own, stopped by PID in a `finally` (or
by the module fixture's teardown); every socket has a timeout.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import (SOCKET_TIMEOUT, RawClient, admin_status, free_port, get, lb, refuses, require_program,
                      wait_until)

VENV_BIN = Path(sys.executable).parent
COOKIE = "lb"

# Sessions in process memory, as the application keeps them: a login on one gunicorn
# instance is unknown to the others. Every answer names the instance; /me also says which cookies
# the app received, so that a test sees the balancer's own cookie never reach it.
FLASK_APP = """
import os, secrets
from flask import Flask, make_response, request

app = Flask(__name__)
SESSIONS = {}
INSTANCE = os.environ["INSTANCE"]


def answer(body, status=200):
    response = make_response(body, status)
    response.headers["X-Instance"] = INSTANCE
    response.headers["X-Cookies-Seen"] = ",".join(sorted(request.cookies))
    return response


@app.post("/login")
def login():
    sid = secrets.token_hex(16)
    SESSIONS[sid] = request.form.get("user", "alice")
    response = answer(f"welcome {SESSIONS[sid]}\\n")
    response.set_cookie("sid", sid, httponly=True, samesite="Lax")
    return response


@app.get("/me")
def me():
    user = SESSIONS.get(request.cookies.get("sid", ""))
    return answer(f"user {user}\\n") if user else answer("not logged in\\n", 401)


@app.get("/")
def page():
    body = f"<!DOCTYPE html><title>app</title><p id=instance>{INSTANCE}</p>"
    response = answer(body)
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    return response
"""


class Gunicorn:
    """One gunicorn instance (one sync worker) of FLASK_APP on a free port, named `instance`."""

    def __init__(self, directory: Path, instance: str):
        self.instance, self.port = instance, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
             "--no-control-socket", "--chdir", str(directory), "flaskapp:app"],
            env={**os.environ, "INSTANCE": instance}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def wait_listening(self) -> None:
        assert wait_until(lambda: self.proc.poll() is not None or not refuses(self.port), 15, 0.05), \
            f"gunicorn {self.instance} does not listen on {self.port}"
        assert self.proc.poll() is None, f"gunicorn {self.instance} exited with {self.proc.returncode}"

    def stop(self) -> None:
        """SIGTERM by PID (an idle sync worker exits at once), SIGKILL to its group if it stays."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def start_apps(directory: Path, names=("a", "b", "c")) -> list[Gunicorn]:
    (directory / "flaskapp.py").write_text(FLASK_APP)
    apps = [Gunicorn(directory, name) for name in names]
    try:
        for app in apps:
            app.wait_listening()
    except BaseException:
        for app in apps:
            app.stop()
        raise
    return apps


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """Three instances for the tests that leave them running."""
    started = start_apps(tmp_path_factory.mktemp("flask"))
    yield started
    for app in started:
        app.stop()


@pytest.fixture
def own_apps(tmp_path):
    """Three instances for a test that stops one."""
    started = start_apps(tmp_path)
    yield started
    for app in started:
        app.stop()


def log_in(session: requests.Session, port: int, user: str = "alice") -> str:
    """POST /login through the balancer: the instance that has the session."""
    r = session.post(f"http://127.0.0.1:{port}/login", data={"user": user}, timeout=SOCKET_TIMEOUT)
    assert r.status_code == 200 and r.text == f"welcome {user}\n", (r.status_code, r.text)
    return r.headers["X-Instance"]


def me(session: requests.Session, port: int, n: int) -> list[tuple[int, str]]:
    """n GET /me: (status, instance) of each."""
    answers = []
    for _ in range(n):
        r = session.get(f"http://127.0.0.1:{port}/me", timeout=SOCKET_TIMEOUT)
        answers.append((r.status_code, r.headers["X-Instance"]))
    return answers


def expected_value(key: bytes, name: str) -> str:
    """The cookie value the README promises: base64url of the first 128 bits of an HMAC-SHA256 of
    the name, keyed by an HMAC-SHA256 of the key file's bytes."""
    derived = hmac.new(key, b"load_balancer sticky cookie key", "sha256").digest()
    digest = hmac.new(derived, b"load_balancer sticky cookie\0" + name.encode(), "sha256").digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def set_cookie(response) -> str | None:
    """The balancer's Set-Cookie of a conftest Response, if any."""
    found = [v for v in response.headers_named("Set-Cookie") if v.startswith(COOKIE + "=")]
    assert len(found) <= 1, found
    return found[0] if found else None


def cookie_value(set_cookie_line: str) -> str:
    return set_cookie_line.split(";", 1)[0].split("=", 1)[1]


# ---------------------------------------------------------------------------------------------------
# The Flask app with in-memory sessions under three gunicorn instances
# ---------------------------------------------------------------------------------------------------

def test_round_robin_loses_the_in_memory_session_two_requests_in_three(apps, balancer):
    """The control case: without --sticky-cookie the logged-in user is unknown to two instances."""
    b = balancer([app.url for app in apps])
    with requests.Session() as session:
        home = log_in(session, b.port)
        answers = me(session, b.port, 30)
    assert Counter(status for status, _ in answers) == {200: 10, 401: 20}
    assert {instance for status, instance in answers if status == 200} == {home}


def test_sixty_requests_after_a_login_all_stay_logged_in(apps, balancer, tmp_path):
    key = tmp_path / "sticky.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    b = balancer([app.url + f",name=app-{app.instance}" for app in apps], sticky_cookie=COOKIE,
                 sticky_key=str(key))
    with requests.Session() as session:
        home = log_in(session, b.port)
        assert set(session.cookies.keys()) == {COOKIE, "sid"}
        value = session.cookies[COOKIE]
        answers = me(session, b.port, 60)
        r = session.get(f"http://127.0.0.1:{b.port}/me", timeout=SOCKET_TIMEOUT)
    assert answers == [(200, home)] * 60
    # The app got its own cookie and never the balancer's (HAProxy's "indirect").
    assert r.headers["X-Cookies-Seen"] == "sid"
    # An HMAC of the name under the key: no port, no address, nothing a client can make.
    assert value == expected_value(b"0123456789abcdef0123456789abcdef", f"app-{home}")
    app = next(app for app in apps if app.instance == home)
    assert str(app.port) not in value and "127" not in value and len(value) == 22
    # The first response set it; none after did (they carried it).
    status = b.status()
    assert status["sticky"] == {"cookie": COOKIE, "hits": 61, "repicks": 0}


def test_through_two_workers_every_request_on_a_new_connection(apps, cli, tmp_path):
    """The key comes from the shared block, so both workers make and honour the same cookie."""
    p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--admin-port", "0",
             "--health-interval", "0", "--sticky-cookie", COOKIE,
             *[arg for app in apps for arg in ("--backend", app.url)]]).wait_ready()
    with requests.Session() as session:
        session.headers["Connection"] = "close"  # a new connection each: the kernel spreads them
        home = log_in(session, p.port)
        answers = me(session, p.port, 60)
    assert answers == [(200, home)] * 60
    status = admin_status(p.admin_port)
    assert all(worker["requests"] > 0 for worker in status["workers"]), status["workers"]
    # Each worker publishes its counts a few times a second, as it does its byte totals.
    expected = {"cookie": COOKIE, "hits": 60, "repicks": 0}
    assert wait_until(lambda: admin_status(p.admin_port)["sticky"] == expected), admin_status(p.admin_port)


def test_drained_upstream_keeps_its_sessions_and_a_new_client_goes_elsewhere(apps, balancer):
    b = balancer([app.url + f",name={app.instance}" for app in apps], sticky_cookie=COOKIE)
    with requests.Session() as first:
        home = log_in(first, b.port)
        b.control.set_state(home, "drain")
        assert me(first, b.port, 10) == [(200, home)] * 10
        for _ in range(4):  # new clients, each logging in: never on the draining instance
            with requests.Session() as newcomer:
                assert log_in(newcomer, b.port) != home
        assert me(first, b.port, 2) == [(200, home)] * 2
        b.control.set_state(home, "maint")  # maintenance: out at once, the session re-pinned
        r = first.get(f"http://127.0.0.1:{b.port}/me", timeout=SOCKET_TIMEOUT)
        assert r.status_code == 401 and r.headers["X-Instance"] != home
        assert r.cookies.get(COOKIE) is not None


def test_stopped_upstream_re_pins_the_client_with_a_new_cookie_and_it_sticks(own_apps, balancer):
    apps = own_apps
    b = balancer([app.url for app in apps], sticky_cookie=COOKIE, admin_port=0)
    with requests.Session() as session:
        home = log_in(session, b.port)
        old = session.cookies[COOKIE]
        next(app for app in apps if app.instance == home).stop()
        # The connect is refused: the request goes on to another instance, which never saw the
        # login; the response pins the client there.
        r = session.get(f"http://127.0.0.1:{b.port}/me", timeout=SOCKET_TIMEOUT)
        assert r.status_code == 401 and r.headers["X-Instance"] != home
        assert session.cookies[COOKIE] != old
        new_home = log_in(session, b.port)
        assert new_home == r.headers["X-Instance"]
        assert me(session, b.port, 10) == [(200, new_home)] * 10
    sticky = admin_status(b.admin_port)["sticky"]
    assert sticky["repicks"] == 1 and sticky["hits"] == 11, sticky


def test_chromium_keeps_the_cookie_across_page_loads(apps, balancer):
    require_program("chromium")
    from browser import Chromium

    b = balancer([app.url for app in apps], sticky_cookie=COOKIE)
    url = f"http://127.0.0.1:{b.port}/"
    with Chromium() as browser:
        seen = []
        for _ in range(4):
            browser.open(url, timeout=10)
            seen.append(browser.evaluate("document.getElementById('instance').textContent"))
        cookies = browser.call("Network.getCookies", urls=[url])["cookies"]
        hidden = browser.evaluate("document.cookie")
    assert len(set(seen)) == 1, seen
    ours = [c for c in cookies if c["name"] == COOKIE]
    assert len(ours) == 1, cookies
    assert ours[0]["httpOnly"] and ours[0]["sameSite"] == "Lax" and ours[0]["path"] == "/"
    assert ours[0]["session"]  # no expiry: a session cookie, as HAProxy's insert
    assert COOKIE not in hidden  # HttpOnly: scripts cannot read it


# ---------------------------------------------------------------------------------------------------
# The cookie itself, with conftest's upstreams
# ---------------------------------------------------------------------------------------------------

def test_set_cookie_exactly_and_secure_on_a_tls_listener(upstreams, balancer, tmp_path):
    openssl = require_program("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    up, = upstreams(1)
    plain = balancer([up.url], sticky_cookie=COOKIE)
    line = set_cookie(get(plain.port, "/"))
    assert line is not None
    assert line == f"{COOKIE}={cookie_value(line)}; Path=/; HttpOnly; SameSite=Lax"
    tls = balancer([up.url], sticky_cookie=COOKIE, tls_cert=str(cert), tls_key=str(key))
    r = requests.get(f"https://127.0.0.1:{tls.port}/", verify=str(cert), timeout=SOCKET_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Set-Cookie"] == f"{COOKIE}={cookie_value(line)}; Path=/; HttpOnly; SameSite=Lax; Secure"


def test_forged_and_stale_values_are_balanced_anew_never_an_error(upstreams, balancer, tmp_path):
    ups = upstreams(3)
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    key_a.write_bytes(os.urandom(32))
    key_b.write_bytes(os.urandom(32))
    b = balancer([u.url for u in ups], sticky_cookie=COOKIE, sticky_key=str(key_a))
    other = balancer([u.url for u in ups], sticky_cookie=COOKIE, sticky_key=str(key_b))
    stale = cookie_value(set_cookie(get(other.port, "/")))  # a real value, under another key
    for value in ("forged", stale, "", "x" * 4000, '"quoted"', "a=b"):
        r = get(b.port, "/", {"Cookie": f"{COOKIE}={value}"})
        assert r.status == 200, (value, r)
        assert set_cookie(r) is not None, value  # a new pin, with a value of this key
        assert cookie_value(set_cookie(r)) != value
    assert b.status()["sticky"]["repicks"] == 6


def test_one_key_gives_the_same_cookies_on_every_balancer_another_key_other_ones(upstreams, balancer,
                                                                                  tmp_path):
    """Two machines with the same --sticky-key share sessions: a cookie made by one balancer pins
    to the same upstream name on another."""
    ups = upstreams(2)
    key = tmp_path / "sticky.key"
    key.write_text("  a shared secret of some length \n")
    urls = [u.url + f",name=n{i}" for i, u in enumerate(ups)]
    first = balancer(urls, sticky_cookie=COOKIE, sticky_key=str(key))
    second = balancer(list(reversed(urls)), sticky_cookie=COOKIE, sticky_key=str(key))
    r = get(first.port, "/")
    value = cookie_value(set_cookie(r))
    pinned = int(r.header("X-Upstream-Port"))
    for _ in range(4):
        again = get(second.port, "/", {"Cookie": f"{COOKIE}={value}"})
        assert int(again.header("X-Upstream-Port")) == pinned and set_cookie(again) is None
    assert value == expected_value(b"a shared secret of some length", f"n{[u.port for u in ups].index(pinned)}")


def test_without_a_key_file_the_machine_id_keys_it_and_without_one_a_random_key(
        upstreams, balancer, tmp_path, monkeypatch, caplog):
    up, = upstreams(1)
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(lb, "MACHINE_ID_PATH", str(machine_id))
    values = [cookie_value(set_cookie(get(balancer([up.url], sticky_cookie=COOKIE).port, "/")))
              for _ in range(2)]
    assert values[0] == values[1]  # a restart keeps the sessions
    derived = hmac.new(b"0123456789abcdef0123456789abcdef", b"load_balancer sticky cookie key",
                       "sha256").digest()
    assert values[0] == base64.urlsafe_b64encode(hmac.new(
        derived, b"load_balancer sticky cookie\0" + f"127.0.0.1:{up.port}".encode(),
        "sha256").digest()[:16]).rstrip(b"=").decode()
    monkeypatch.setattr(lb, "MACHINE_ID_PATH", str(tmp_path / "none"))
    with caplog.at_level(logging.WARNING, logger="load_balancer"):
        random_values = {cookie_value(set_cookie(get(balancer([up.url], sticky_cookie=COOKIE).port, "/")))
                         for _ in range(2)}
    assert len(random_values) == 2 and values[0] not in random_values
    warnings = [r.getMessage() for r in caplog.records if "the cookie's key is random" in r.getMessage()]
    assert len(warnings) == 2, warnings


def test_the_balancers_cookie_is_taken_out_and_the_others_pass_untouched(raw_upstream, balancer):
    """Raw bytes both ways: what reaches the upstream, what reaches the client."""
    def serve(conn, upstream):
        while True:
            data = upstream.read_request(conn)
            if not data:
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nSet-Cookie: app=1; Path=/\r\nContent-Length: 2\r\n\r\nok")

    up = raw_upstream(serve)
    b = balancer([up.url], sticky_cookie=COOKIE)
    first = get(b.port, "/")
    assert first.headers_named("Set-Cookie")[0] == "app=1; Path=/"  # the upstream's own, first
    value = cookie_value(set_cookie(first))
    cases = [
        (f"a=1; {COOKIE}={value}; b=2", b"Cookie: a=1; b=2\r\n"),
        (f"{COOKIE}={value}", None),
        (f"x{COOKIE}=1;{COOKIE}={value};  c=3", b"Cookie: x" + COOKIE.encode() + b"=1; c=3\r\n"),
        ("a=1", b"Cookie: a=1\r\n"),
    ]
    with RawClient(b.port) as client:
        for cookie, forwarded in cases:
            before = len(up.received)
            r = client.request(f"GET /c HTTP/1.1\r\nHost: t\r\nCookie: {cookie}\r\n\r\n".encode())
            assert r.status == 200 and r.headers_named("Set-Cookie")[0] == "app=1; Path=/"
            assert (set_cookie(r) is None) == (COOKIE + "=" in cookie)
            sent = bytes(up.received[before:])
            cookie_lines = [line + b"\r\n" for line in sent.split(b"\r\n") if line.lower().startswith(b"cookie:")]
            assert cookie_lines == ([forwarded] if forwarded else []), sent
        # Two Cookie fields, the balancer's cookie in the second: the first stays as it was.
        before = len(up.received)
        r = client.request(f"GET /d HTTP/1.1\r\nHost: t\r\nCookie: a=1\r\nCookie: {COOKIE}={value}; z=9\r\n\r\n".encode())
        assert r.status == 200 and set_cookie(r) is None
        assert b"Cookie: a=1\r\nCookie: z=9\r\n" in bytes(up.received[before:])


def test_sticky_with_a_reload_that_removes_the_pinned_upstream(upstreams, balancer, tmp_path):
    ups = upstreams(3)
    listing = tmp_path / "backends.txt"
    listing.write_text("".join(f"{u.url},name=u{i}\n" for i, u in enumerate(ups)))
    b = balancer([], backends_file=str(listing), sticky_cookie=COOKIE)
    r = get(b.port, "/")
    value, pinned = cookie_value(set_cookie(r)), int(r.header("X-Upstream-Port"))
    assert [int(get(b.port, "/", {"Cookie": f"{COOKIE}={value}"}).header("X-Upstream-Port"))
            for _ in range(3)] == [pinned] * 3
    listing.write_text("".join(f"{u.url},name=u{i}\n" for i, u in enumerate(ups) if u.port != pinned))
    b.reload()
    again = get(b.port, "/", {"Cookie": f"{COOKIE}={value}"})
    assert int(again.header("X-Upstream-Port")) != pinned
    new = cookie_value(set_cookie(again))
    assert [int(get(b.port, "/", {"Cookie": f"{COOKIE}={new}"}).header("X-Upstream-Port"))
            for _ in range(3)] == [int(again.header("X-Upstream-Port"))] * 3
