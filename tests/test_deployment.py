"""What ships for running the balancer in production, tried here:

* examples/load-balancer.service passes `systemd-analyze verify` with no warning (skipped with
  the reason where systemd-analyze is missing, unless LB_REQUIRE_SYSTEM_PROGRAMS=1), its
  ExecStart flags are the balancer's, and it keeps the promises the README makes of it: SIGTERM
  to stop, HUP to reload, a stop timeout above the drain timeout, a user of its own with only
  CAP_NET_BIND_SERVICE.
* examples/certbot-deploy-haproxy.sh, run as certbot runs a deploy hook (RENEWED_LINEAGE set),
  writes the one PEM file that the HAProxy export names for certbot's files, private to its
  owner, and `haproxy -c` accepts the exported file with it.

Programs run with a timeout; files go under pytest's tmp_path.
"""

from __future__ import annotations

import configparser
import os
import shlex
import stat
import subprocess

from conftest import (ROOT, lb, make_certificate, require_program)

UNIT = ROOT / "examples" / "load-balancer.service"
HOOK = ROOT / "examples" / "certbot-deploy-haproxy.sh"


def unit_service() -> dict:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text().replace("\\\n", " "))  # systemd's line continuation
    return dict(parser["Service"])


def test_the_systemd_unit_verifies_without_a_warning():
    analyze = require_program("systemd-analyze")
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result


def test_the_systemd_unit_drains_reloads_and_runs_unprivileged():
    service = unit_service()
    command = shlex.split(service["ExecStart"])
    assert command[:2] == ["/usr/bin/python3", "/opt/load-balancer/load_balancer.py"], command
    options = lb.build_parser().parse_args(command[2:])  # every flag is one of the balancer's
    assert options.port == 80 and options.access_log == "/var/log/load-balancer/access.log"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert float(service["TimeoutStopSec"]) > options.drain_timeout
    assert service["User"] not in ("", "root") and service["User"] == service["Group"]
    assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["LogsDirectory"] == "load-balancer"  # /var/log/load-balancer, the user's


def test_the_certbot_hook_writes_the_file_the_haproxy_export_names(tmp_path):
    haproxy = require_program("haproxy")
    live = tmp_path / "letsencrypt" / "live" / "shop.example.com"
    live.mkdir(parents=True)
    make_certificate(live, "fullchain.pem", "privkey.pem")
    certs = tmp_path / "certs"
    certs.mkdir()
    reloaded = tmp_path / "reloaded"
    result = subprocess.run(
        [str(HOOK)], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
        env={**os.environ, "RENEWED_LINEAGE": str(live), "HAPROXY_CERTS": str(certs),
             "HAPROXY_RELOAD": f"touch {reloaded}"})
    assert result.returncode == 0, result
    combined = certs / "shop.example.com.pem"
    assert stat.S_IMODE(combined.stat().st_mode) == 0o600
    assert combined.read_text() == (live / "fullchain.pem").read_text() + (live / "privkey.pem").read_text()
    assert reloaded.exists() and sorted(p.name for p in certs.iterdir()) == ["shop.example.com.pem"]

    config = lb.Config(backends=("http://127.0.0.1:18001",), port=18443,
                       tls_cert="/etc/letsencrypt/live/shop.example.com/fullchain.pem",
                       tls_key="/etc/letsencrypt/live/shop.example.com/privkey.pem")
    text = lb.export_config(config, "haproxy")
    assert "ssl crt /etc/haproxy/certs/shop.example.com.pem " in text, text
    assert "examples/certbot-deploy-haproxy.sh" in text
    (tmp_path / "haproxy.cfg").write_text(text.replace("/etc/haproxy/certs/", f"{certs}/"))
    check = subprocess.run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True,
                           text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert check.returncode == 0, check.stderr
