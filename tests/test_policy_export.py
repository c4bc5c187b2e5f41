"""--export of the balancing policies (--balance, --hash-key, --sticky-cookie, --slow-start).

- `nginx -t` and `haproxy -c` accept every combination: each policy, each kind of hash key
  (including a cookie and a header whose names are no nginx variable names), with and without a
  sticky cookie, backups, slow start and a TLS listener; HAProxy without a warning.
- The mapping is the one the README names: nginx `least_conn`, `hash $remote_addr|$request_uri|
  $http_NAME|$cookie_NAME consistent`, the sticky cookie hashed with a comment that open source
  nginx cannot insert it, backups commented out under hash, slow_start as a comment; HAProxy
  `balance leastconn|source|uri whole|hdr(NAME)|hash req.cook(NAME)` with `hash-type consistent`,
  `cookie NAME insert indirect nocache httponly` (+ `secure` on TLS) with a cookie per server,
  `slowstart`.
- The peers started on the exported files behave as load_balancer does: HAProxy inserts the
  sticky cookie, keeps its clients on their server and passes it no further; nginx and HAProxy
  send one X-User to one upstream and spread many; nginx's and HAProxy's least connections avoid
  an upstream held by a slow request.

The peer helpers (start, stop, check, a port-echoing upstream) are test_export's.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from conftest import (PEERS, check_file, exchange, free_ports, lb, make_certificate, PortServer,
                      require_program, running_peer, wait_until)

UP1, UP2, UP3 = (f"http://127.0.0.1:{port}" for port in (18001, 18002, 18003))
HASH_KEYS = ("client-ip", "uri", "header:X-User", "cookie:sid", "cookie:a-b.c", "header:X.Y")


def combinations(tmp: Path) -> list:
    cert, key = make_certificate(tmp)
    cases = []
    policies = [("roundrobin", "client-ip"), ("leastconn", "client-ip")] + [("hash", k) for k in HASH_KEYS]
    for index, ((balance, hash_key), sticky) in enumerate(itertools.product(policies, (None, "lb", "s-id"))):
        backends = (UP1 + ",weight=2", UP2) + ((UP3 + ",backup",) if index % 2 else ())
        tls = {"tls_cert": str(cert), "tls_key": str(cert) + ".key"} if index % 3 == 0 else {}
        cases.append(lb.Config(backends=backends, balance=balance, hash_key=hash_key, sticky_cookie=sticky,
                               slow_start=2.5 if index % 4 else 0, health_interval=5 if index % 5 else 0,
                               **tls))
    return cases


@pytest.mark.parametrize("target", PEERS)
def test_peer_accepts_every_policy_combination(target, tmp_path):
    require_program(target)
    cases = combinations(tmp_path)
    (tmp_path / "cert.pem.key").write_bytes((tmp_path / "key.pem").read_bytes())
    failures = []
    for number, config in enumerate(cases):
        result = check_file(target, lb.export_config(config, target), tmp_path / f"case{number}")
        output = result.stderr + result.stdout
        if result.returncode != 0 or (target == "haproxy" and "WARNING" in output):
            failures.append(f"{config.balance} {config.hash_key} {config.sticky_cookie}: {output}")
    assert not failures, "\n".join(failures)


def directives(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


@pytest.mark.parametrize("hash_key,nginx,haproxy", [
    ("client-ip", "hash $remote_addr consistent;", "balance source"),
    ("uri", "hash $request_uri consistent;", "balance uri whole"),
    ("header:X-User", "hash $http_x_user consistent;", "balance hdr(X-User)"),
    ("cookie:sid", "hash $cookie_sid consistent;", "balance hash req.cook(sid)"),
])
def test_hash_keys_map_to_each_peers_own(hash_key, nginx, haproxy):
    config = lb.Config(backends=(UP1, UP2 + ",backup"), balance="hash", hash_key=hash_key)
    text = lb.export_config(config, "nginx")
    assert nginx in directives(text)
    assert "server 127.0.0.1:18002 max_fails=5 fail_timeout=10s backup;" not in directives(text)
    assert "# server 127.0.0.1:18002 max_fails=5 fail_timeout=10s backup;" in map(str.strip, text.splitlines())
    assert "# load_balancer: nginx's hash takes no backup servers" in text
    haproxy_lines = directives(lb.export_config(config, "haproxy"))
    assert haproxy in haproxy_lines and "hash-type consistent" in haproxy_lines


def test_leastconn_sticky_and_slow_start_map_to_each_peers_own():
    config = lb.Config(backends=(UP1, UP2), balance="leastconn", slow_start=30)
    nginx = lb.export_config(config, "nginx")
    assert "least_conn;" in directives(nginx)
    assert 'nginx Plus\'s "server ... slow_start=30s"' in nginx and "open source nginx has no slow start" in nginx
    haproxy = directives(lb.export_config(config, "haproxy"))
    assert "balance leastconn" in haproxy
    assert any(line.startswith("default-server ") and line.endswith(" slowstart 30s") for line in haproxy)

    sticky = lb.Config(backends=(UP1, UP2), sticky_cookie="lb", tls_cert="/c.pem", tls_key="/c.pem")
    nginx = lb.export_config(sticky, "nginx")
    assert "hash $lb_sticky_key consistent;" in directives(nginx)
    assert "map $cookie_lb $lb_sticky_key {" in directives(nginx)
    assert "open source nginx cannot insert a cookie" in re.sub(r"\s*\n\s*#\s*", " ", nginx)
    haproxy = directives(lb.export_config(sticky, "haproxy"))
    assert "cookie lb insert indirect nocache httponly secure attr SameSite=Lax" in haproxy
    assert "server 127.0.0.1:18001 127.0.0.1:18001 cookie s1" in haproxy
    assert "server 127.0.0.1:18002 127.0.0.1:18002 cookie s2" in haproxy


# ---------------------------------------------------------------------------------------------------
# The peers on the exported files
# ---------------------------------------------------------------------------------------------------

def run_peer(target: str, config_of, tmp_path: Path, check) -> None:
    """Start `target` on the export of config_of(upstream ports, listen port) over three
    PortServers, wait for it, run check(port, upstreams), stop everything."""
    require_program(target)
    ups = [PortServer() for _ in range(3)]
    try:
        port, = free_ports(1)
        text = lb.export_config(config_of([u.port for u in ups], port), target)
        with running_peer(target, text, tmp_path / target, port):
            check(port, ups)
    finally:
        for u in ups:
            u.stop()


def config(ports, port, **settings) -> lb.Config:
    return lb.Config(backends=tuple(f"http://127.0.0.1:{p}" for p in ports), host="127.0.0.1", port=port,
                     health_interval=0, **settings)


def test_haproxy_inserts_the_sticky_cookie_and_keeps_its_clients(tmp_path):
    def check(port, ups):
        status, head, body = exchange(port, "/")
        assert status == 200
        cookie = re.search(rb"(?im)^set-cookie: (lb=s[123]); path=/; httponly; samesite=lax", head)
        assert cookie, head
        pinned = body
        for _ in range(6):
            status, head, body = exchange(port, "/", {"Cookie": cookie.group(1).decode() + "; app=1"})
            assert (status, body) == (200, pinned) and b"set-cookie" not in head.lower()
        _, headers = next(u for u in ups if str(u.port).encode() == pinned).proxied()[-1]
        assert headers["Cookie"] == "app=1"  # indirect: the balancer's cookie goes no further

    run_peer("haproxy", lambda ports, port: config(ports, port, sticky_cookie="lb"), tmp_path, check)


@pytest.mark.parametrize("target", PEERS)
def test_peer_hashes_one_user_to_one_upstream(target, tmp_path):
    def check(port, ups):
        homes = {user: exchange(port, "/", {"X-User": user})[2] for user in (f"u{i}" for i in range(30))}
        for user, home in homes.items():
            assert exchange(port, "/", {"X-User": user})[2] == home
        assert len(set(homes.values())) == 3

    run_peer(target, lambda ports, port: config(ports, port, balance="hash", hash_key="header:X-User"),
             tmp_path, check)


@pytest.mark.parametrize("target", PEERS)
def test_peer_least_connections_avoid_an_upstream_held_by_a_slow_request(target, tmp_path):
    def check(port, ups):
        release = threading.Event()
        for up in ups:  # every upstream holds GET /slow until released
            def record(path, headers, original=up.record):
                original(path, headers)
                if path == "/slow":
                    release.wait(10)
            up.record = record
        slow = threading.Thread(target=exchange, args=(port, "/slow"), daemon=True)
        slow.start()
        try:
            assert wait_until(lambda: any(path == "/slow" for u in ups for path, _ in u.proxied()))
            held = next(u for u in ups if any(path == "/slow" for path, _ in u.proxied()))
            answers = Counter(int(exchange(port, f"/short{i}")[2]) for i in range(8))
            assert held.port not in answers and sum(answers.values()) == 8, answers
        finally:
            release.set()
            slow.join(10)

    run_peer(target, lambda ports, port: config(ports, port, balance="leastconn"), tmp_path, check)
