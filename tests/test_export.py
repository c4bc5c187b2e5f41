"""--export: the nginx.conf and haproxy.cfg it prints are accepted by ``nginx -t`` and ``haproxy -c``
for a range of configurations, and nginx and HAProxy started on them balance real upstreams as
load_balancer does (weights 3,1,1: 30/10/10 over 50 requests; the backup only once the primaries
are gone); plus the --export flag of the command line.

nginx and haproxy are looked up on PATH and in /usr/sbin. A missing one skips its tests, unless
LB_REQUIRE_SYSTEM_PROGRAMS=1 (.ci/run, which installs them), which makes that a failure. Peers are killed by
PID in a finally (nginx's workers too), every socket has a timeout, and readiness is polled
against a deadline, never slept for.
"""

from __future__ import annotations

import collections
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (PEERS, ROOT, check_file, exchange, free_ports, lb, make_certificate, PortServer,
                      require_program, running_peer, wait_until)

export_config = lb.export_config



# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def get(port: int, path: str = "/", headers: dict | None = None, *,
        tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One GET on a fresh connection (HTTPS with `tls`, to the name localhost): (status, body);
    (0, b"") when the connection failed."""
    status, _, body = exchange(port, path, headers, tls=tls)
    return status, body



# ---------------------------------------------------------------------------------------------------
# (a) nginx -t and haproxy -c accept what --export prints
# ---------------------------------------------------------------------------------------------------

UP1, UP2, UP3, UP4 = (f"http://127.0.0.1:{port}" for port in (18001, 18002, 18003, 18004))


def config_cases(tmp: Path) -> dict:
    """name -> Config, covering each group of settings (files they name are made in `tmp`)."""
    cert, key = make_certificate(tmp)
    return {
        "plain": lb.Config(backends=(UP1,)),
        "weights and backup": lb.Config(backends=(UP1 + ",weight=3", UP2, UP3, UP4 + ",backup"),
                                        host="127.0.0.1", port=18080),
        "https upstream with backend_ca": lb.Config(
            backends=("https://localhost:18443", "https://127.0.0.1:18444,weight=2"),
            backend_ca=str(cert), health_path="/health"),
        "https upstream, system CA, no health checks": lb.Config(
            backends=("https://localhost:18443",), health_interval=0),
        "TLS listener, key beside the certificate": lb.Config(
            backends=(UP1, UP2), tls_cert=str(cert), tls_key=str(cert) + ".key", port=18443,
            redirect_http_port=18080),
        "TLS listener, .crt and .key": lb.Config(
            backends=(UP1,), tls_cert=str(tmp / "site.crt"), tls_key=str(tmp / "site.key"), port=443,
            redirect_http_port=80),
        "TLS listener, separate key": lb.Config(
            backends=(UP1,), tls_cert=str(cert), tls_key=str(key)),
        "health path, tight limits, retries on timeouts": lb.Config(
            backends=(UP1, UP2 + ",name=two~2", UP3), health_path="/ready?full=1",
            health_interval=0.25, health_timeout=0.1, rise=1, fall=1, max_fails=2, fail_timeout=0.5,
            retry_on="conn-failure,empty-response,response-timeout", max_request_line=2000,
            max_field_size=1000, max_header_size=4000, max_headers=20, max_body_size=0),
        "no health checks, no pool, no retries, drain 0": lb.Config(
            backends=(UP1, UP2), health_interval=0, pool_size=0, retry_on="none", drain_timeout=0,
            workers=3, timeout=0.5, connect_timeout=0.25, idle_timeout=1.5, tunnel_timeout=7200),
        "admin port with token, IPv6": lb.Config(
            backends=("http://[::1]:18001", "http://[::1]:18002,backup"), host="::", port=18080,
            admin_host="::1", admin_port=18081, admin_token="s3cr3t 'quoted'"),
        "admin port, access log json": lb.Config(
            backends=(UP1, UP2), admin_port=18081, access_log=True, access_log_format="json"),
        "access log combined, all backups": lb.Config(
            backends=(UP1 + ",backup", UP2 + ",backup"), access_log=True, access_log_format="combined",
            log_level="debug"),
        "access log short and common": lb.Config(backends=(UP1,), access_log=True),
        "access log common": lb.Config(backends=(UP1,), access_log=True, access_log_format="common",
                                       log_level="error"),
        "request ID renamed, json log": lb.Config(backends=(UP1,), access_log=True,
                                                  access_log_format="json", request_id_header="X-Trace-9"),
        "request IDs off, combined log": lb.Config(backends=(UP1,), access_log=True,
                                                   access_log_format="combined", request_id_header=""),
        "PROXY protocol in, trusted proxies": lb.Config(
            backends=(UP1,), proxy_protocol_from="10.0.0.0/8,2001:db8::/32", trusted_proxies="192.0.2.0/24"),
        "PROXY protocol in, TLS listener": lb.Config(
            backends=(UP1,), proxy_protocol_from="10.0.0.0/8", tls_cert=str(cert), tls_key=str(cert) + ".key"),
        "unix sockets, health path": lb.Config(
            backends=("unix:/run/app.sock,weight=2", "unix:/run/other-app.sock,name=other",
                      UP1 + ",backup"), health_path="/health"),
        "send-proxy, send-proxy-v2, https": lb.Config(
            backends=(UP1 + ",send-proxy", "https://localhost:18443,send-proxy-v2", "unix:/run/a.sock,send-proxy"),
            health_path="/health"),
        "trusted proxies, TLS listener": lb.Config(
            backends=(UP1, UP2), trusted_proxies="10.0.0.0/8, 192.0.2.7,2001:db8::/32", access_log=True,
            tls_cert=str(cert), tls_key=str(cert) + ".key"),
        "allow and deny, IPv4, IPv6 and mapped, admin allow": lb.Config(
            backends=(UP1, UP2), allow=("10.0.0.0/8,2001:db8::/32", "::ffff:192.168.0.0/112"),
            deny=("10.1.0.0/16", "2001:db8::1"), admin_port=18081, admin_allow=("127.0.0.1", "::1")),
        "deny only, rate per second with a burst": lb.Config(
            backends=(UP1,), deny=("192.0.2.0/24",), rate_limit="10/s,burst=20"),
        "rate per minute, no burst, exempt ranges, many allowed ranges": lb.Config(
            backends=(UP1,), rate_limit="30/m", rate_limit_exempt=("127.0.0.0/8,::1",),
            allow=tuple(f"10.{n}.0.0/16" for n in range(100))),
        "fast rate with a burst, allow only": lb.Config(
            backends=(UP1,), rate_limit="1000/s,burst=3", allow=("127.0.0.1",)),
    }


@pytest.mark.parametrize("target", PEERS)
def test_peer_accepts_every_exported_config(target, tmp_path):
    require_program(target)
    cases = config_cases(tmp_path)
    # What the comments ask of a user: HAProxy wants the key beside the certificate or in it.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(key, str(cert) + ".key")
    shutil.copy(cert, tmp_path / "site.crt")
    shutil.copy(key, tmp_path / "site.key")
    failures = []
    for number, (name, config) in enumerate(cases.items()):
        text = export_config(config, target)
        if target == "haproxy" and config.tls_key == str(key):
            command = re.search(r"^ +#   (cat .*)$", text, re.M)
            assert command, text
            subprocess.run(command.group(1), shell=True, check=True, cwd=tmp_path, timeout=10)
        result = check_file(target, text, tmp_path / f"case{number}")
        if result.returncode != 0:
            failures.append(f"{name}: {result.stderr or result.stdout}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("target", PEERS)
def test_export_runs_in_the_foreground_without_system_paths(target):
    """The file names its version and command, has no daemon/chroot/user/stats socket, writes
    only under the prefix (nginx), and is the same text every time."""
    config = lb.Config(backends=(UP1 + ",weight=3", UP2, UP4 + ",backup"), port=18080,
                       health_path="/health", admin_port=18081, access_log=True)
    text = export_config(config, target)
    assert text == export_config(config, target)
    assert text.startswith(f"# {'nginx.conf' if target == 'nginx' else 'haproxy.cfg'} written by "
                           f"load_balancer {lb.__version__} (--export {target}), from:\n")
    assert f"python3 load_balancer.py --export {target} --backend {UP1},weight=3" in text
    directives = [line.split("#")[0].strip() for line in text.splitlines()]
    directives = [line for line in directives if line]
    assert not any(line.split()[0] in ("daemon", "chroot", "user", "group") for line in directives)
    if target == "nginx":
        assert "pid nginx.pid;" in directives
        assert "error_log stderr notice;" in directives
        for directive in ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path",
                          "uwsgi_temp_path", "scgi_temp_path", "access_log", "lock_file"):
            values = [line for line in directives if line.startswith(directive + " ")]
            assert values and all(not line.split()[1].startswith("/") for line in values), directive
        assert "server 127.0.0.1:18001 weight=3 max_fails=5 fail_timeout=10s;" in directives
        assert "server 127.0.0.1:18004 max_fails=5 fail_timeout=10s backup;" in directives
    else:
        assert not any(line.startswith("stats socket") for line in directives)
        assert "server 127.0.0.1:18001 127.0.0.1:18001 weight 3" in directives
        assert "server 127.0.0.1:18004 127.0.0.1:18004 backup" in directives
        assert "balance roundrobin" in directives
        assert "option httpchk" in directives


def test_export_config_refuses_an_unknown_target():
    with pytest.raises(ValueError, match="bogus"):
        export_config(lb.Config(backends=(UP1,)), "bogus")


# ---------------------------------------------------------------------------------------------------
# (b) nginx and HAProxy on the exported file balance like load_balancer
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", PEERS)
def test_peer_balances_weighted_round_robin_with_a_backup(target, tmp_path):
    """Weights 3,1,1 split 50 requests exactly 30/10/10 (smooth weighted round robin in nginx,
    weighted roundrobin in HAProxy, one worker); the backup gets none of them, and takes every
    request once the primaries are stopped. nginx finds that out by the requests that fail on
    them (it has no active checks) and passes each one on to the backup; HAProxy needs its
    health checks to mark them down (every 0.2 s, fall 1), so the test polls until the backup
    answers and then requires it to answer every request."""
    require_program(target)
    upstreams = [PortServer() for _ in range(4)]
    try:
        port, admin_port = free_ports(2)
        a, b, c, backup = upstreams
        config = lb.Config(
            backends=(f"http://127.0.0.1:{a.port},weight=3", f"http://127.0.0.1:{b.port}",
                      f"http://127.0.0.1:{c.port}", f"http://127.0.0.1:{backup.port},backup"),
            host="127.0.0.1", port=port, admin_port=admin_port, workers=1,
            health_path="/health", health_interval=0.2, health_timeout=0.5, rise=1, fall=1)
        with running_peer(target, export_config(config, target), tmp_path / target, port, admin_port):
            answers = [get(port, f"/r{i}", {"X-Forwarded-For": "203.0.113.7"}) for i in range(50)]
            assert {status for status, _ in answers} == {200}, answers
            counts = collections.Counter(int(body) for _, body in answers)
            assert counts == {a.port: 30, b.port: 10, c.port: 10}

            # What load_balancer sends upstream: Host as given, X-Forwarded-* set (a client's own
            # X-Forwarded-For replaced: the client is no --trusted-proxies peer).
            _, headers = a.proxied()[-1]
            assert headers["Host"] == "test.local"
            assert headers["X-Forwarded-For"] == "127.0.0.1"
            assert headers["X-Forwarded-Host"] == "test.local"
            assert headers["X-Forwarded-Proto"] == "http"

            # The admin port: nginx's stub_status, HAProxy's stats page and Prometheus exporter.
            if target == "nginx":
                status, body = get(admin_port, "/status")
                assert status == 200 and body.startswith(b"Active connections:"), body
            else:
                status, body = get(admin_port, "/;csv")
                assert status == 200 and b"upstreams," in body, body
                status, body = get(admin_port, "/metrics")
                assert status == 200 and b"haproxy_backend_" in body, body[:200]

            for upstream in (a, b, c):
                upstream.stop()
            assert wait_until(lambda: get(port) == (200, str(backup.port).encode())), (
                tmp_path / target / "peer.log").read_text()
            assert [get(port) for _ in range(10)] == [(200, str(backup.port).encode())] * 10
    finally:
        for upstream in upstreams:
            upstream.stop()


@pytest.mark.parametrize("target", PEERS)
def test_peer_serves_https_to_verified_https_upstreams(target, tmp_path):
    """--tls-cert/--tls-key: the peer answers HTTPS; --redirect-http-port: 308 to it; an https://
    upstream named localhost is verified against --backend-ca (its certificate names localhost)."""
    require_program(target)
    cert, key = make_certificate(tmp_path)
    shutil.copy(key, str(cert) + ".key")  # where HAProxy looks for the key of crt FILE
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    upstream = PortServer(tls=server_tls)
    try:
        port, redirect_port = free_ports(2)
        config = lb.Config(backends=(f"https://localhost:{upstream.port}",), backend_ca=str(cert),
                           host="127.0.0.1", port=port, tls_cert=str(cert), tls_key=str(cert) + ".key",
                           redirect_http_port=redirect_port, workers=1, health_interval=0)
        with running_peer(target, export_config(config, target), tmp_path / target, port, redirect_port):
            assert get(port, "/tls", tls=client_tls) == (200, str(upstream.port).encode()), (
                tmp_path / target / "peer.log").read_text()
            _, headers = upstream.proxied()[-1]
            assert headers["X-Forwarded-Proto"] == "https"
            status, head, _ = exchange(redirect_port, "/a/b?c=d")
            assert status == 308
            assert re.search(rb"(?im)^location: https://test\.local:%d/a/b\?c=d\r?$" % port, head), head
    finally:
        upstream.stop()


# ---------------------------------------------------------------------------------------------------
# (c) the command line
# ---------------------------------------------------------------------------------------------------

# load_balancer.main(), with the scratch export_config in place of the snapshot's placeholder
# while there is an export.py beside load_balancer.py.
CLI = """import sys
sys.path.insert(0, sys.argv.pop(1))
import load_balancer
try:
    import export
    load_balancer.export_config = export.export_config
except ImportError:
    pass
sys.exit(load_balancer.main(sys.argv[1:]))
"""


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, str(ROOT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=10, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("target", PEERS)
def test_cli_prints_the_file_and_exits_0(target, tmp_path):
    port = free_ports(1)[0]
    result = run_cli(["--export", target.upper() if target == "haproxy" else target,
                      "--backend", UP1 + ",weight=2", "--backend", UP2, "--port", str(port)])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == export_config(
        lb.Config(backends=(UP1 + ",weight=2", UP2), port=port), target)
    assert result.stdout.splitlines()[1] == (f"#   python3 load_balancer.py --export {target} "
                                             f"--backend {UP1},weight=2 --backend {UP2} --port {port}")
    check = check_file(target, result.stdout, tmp_path)
    assert check.returncode == 0, check.stderr


def test_cli_refuses_an_unknown_target_with_one_error_line():
    result = run_cli(["--export", "bogus", "--backend", UP1])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("load_balancer: error: argument --export"), lines
