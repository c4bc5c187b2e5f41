"""Protecting the applications: --allow/--deny (proxy listener), --admin-allow (admin listener),
--rate-limit with --rate-limit-exempt (a token bucket per client address, shared by every worker).

Second client addresses come from 127.0.0.0/8: on Linux every one of them is local, so a client
socket bound to 127.0.0.2 reaches a balancer on 127.0.0.1 from another address."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time

import pytest

from conftest import RawClient, all_workers_listening, get, lb, request, wait_until


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def status_of(port: int) -> dict:
    response = get(port, "/status")
    assert response.status == 200, response
    return json.loads(response.body)


def assert_denied(response, detail: str = "not allowed") -> None:
    assert response.status == 403, response
    assert response.header("Connection") == "close", response
    assert detail in response.body.decode(), response


# ---------------------------------------------------------------------------------------------------
# The pure parts: ranges, addresses, the rate syntax, and one-line errors for bad values
# ---------------------------------------------------------------------------------------------------

def test_parse_networks_reads_cidr_lists_and_maps_ipv4_mapped_ranges():
    networks = lb.parse_networks("10.0.0.0/8, 2001:db8::/32,192.168.1.7,::ffff:172.16.0.0/108")
    assert [str(n) for n in networks] == ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7/32", "172.16.0.0/12"]
    assert str(lb.parse_networks("10.1.2.3/8")[0]) == "10.0.0.0/8"  # as nginx and HAProxy read it
    for bad in ("10.0.0.300", "10.0.0.0/33", "example.com", "", "10.0.0.0/8,"):
        with pytest.raises(ValueError, match="is not an address or CIDR"):
            lb.parse_networks(bad)


def test_address_in_treats_mapped_addresses_as_ipv4_and_never_mixes_versions():
    v4 = lb.parse_networks("127.0.0.0/8")
    v6 = lb.parse_networks("::1")
    assert lb.address_in("127.1.2.3", v4)
    assert lb.address_in(b"::ffff:127.0.0.1", v4)
    assert not lb.address_in("::1", v4)
    assert lb.address_in("::1", v6)
    assert not lb.address_in("127.0.0.1", v6)
    assert not lb.address_in("::ffff:10.0.0.1", v4)
    assert not lb.address_in("not an address", v4)


def test_parse_rate_limit():
    assert lb.parse_rate_limit("10/s") == (100_000, 1)
    assert lb.parse_rate_limit("30/m,burst=5") == (2_000_000, 5)
    for bad in ("10", "10/h", "0/s", "10/s,burst=0", "10/s,bust=3", "-1/s", "1.5/s"):
        with pytest.raises(ValueError):
            lb.parse_rate_limit(bad)


@pytest.mark.parametrize("args", [
    ["--rate-limit", "10/h"], ["--rate-limit", "5/s,burst=0"], ["--allow", "10.0.0.300"],
    ["--deny", "10.0.0.0/33"], ["--admin-allow", "localhost"], ["--rate-limit-exempt", "1.2.3.4,"],
    ["--allow", "/nonexistent/allow.txt"], ["--rate-limit-exempt", "10.0.0.0/8"],
    ["--admin-allow", "127.0.0.1"],
], ids=lambda a: " ".join(a))
def test_bad_values_exit_2_with_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lb.main(["--backend", "http://127.0.0.1:9", *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and args[0] in error and "Traceback" not in error, error


def test_a_list_file_with_no_range_is_refused(tmp_path):
    empty = tmp_path / "allow.txt"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(ValueError, match="no address range in the file"):
        lb.Config(backends=("http://127.0.0.1:9",), allow=(str(empty),))


# ---------------------------------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------------------------------

def test_without_limits_or_lists_nothing_is_checked(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url])
    assert b.server.guard is None
    assert "rate_limit" not in b.status()


def test_a_burst_passes_at_once_then_one_request_per_interval(upstreams, balancer, caplog):
    up, = upstreams(1)
    b = balancer([up.url], rate_limit="10/s,burst=3")
    with RawClient(b.port) as client:
        assert [client.request(request("/")).status for _ in range(3)] == [200, 200, 200]
        refused = client.request(request("/over"))
        assert refused.status == 429, refused
        assert refused.header("Retry-After") == "1"  # 0.1 s rounded up to whole seconds
        assert b"too many requests" in refused.body
        # Then as fast as the client can ask: one passes every 100 ms, the rest get 429 on the same
        # keep-alive connection.
        passed = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline or len(passed) < 2:
            response = client.request(request("/"))
            assert response.status in (200, 429), response
            if response.status == 200:
                passed.append(time.monotonic())
    gaps = [later - earlier for earlier, later in zip(passed, passed[1:])]
    assert min(gaps) > 0.085, gaps
    assert sum(gaps) / len(gaps) < 0.13, gaps
    assert len(up.requests) == 3 + len(passed)
    assert [r.target for r in up.requests].count("/over") == 0
    status = b.status()
    assert status["rate_limited_total"] > 0
    assert status["rate_limit"]["addresses"] == 1
    assert f"lb_rate_limited_total {status['rate_limited_total']}" in b.control.metrics()
    # Logged once, not once a request (the next line comes at most 5 s later, with the count).
    assert caplog.text.count("requests answered 429: over --rate-limit 10/s,burst=3") == 1, caplog.text


def test_429_keeps_the_connection_unless_a_body_is_left_unread(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], rate_limit="1/m")
    with RawClient(b.port) as client:
        assert client.request(request("/")).status == 200
        head = client.request(request("/", method="HEAD"), method="HEAD")
        assert head.status == 429 and head.body == b"" and head.header("Retry-After") == "60", head
        assert client.request(request("/")).status == 429  # still open
        posted = client.request(request("/", method="POST", body=b"x" * 100))
        assert posted.status == 429 and posted.header("Connection") == "close", posted
        assert client.is_closed()
    assert len(up.requests) == 1


def test_two_addresses_do_not_share_a_bucket(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], rate_limit="1/m,burst=2")
    for source in ("127.0.0.1", "127.0.0.2"):
        statuses = [get(b.port, source=source).status for _ in range(3)]
        assert statuses == [200, 200, 429], (source, statuses)
    assert len(up.requests) == 4
    assert b.status()["rate_limit"]["addresses"] == 2


def test_an_exempt_range_is_never_limited(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], rate_limit="1/m", rate_limit_exempt=("127.0.0.2/31,10.0.0.0/8",))
    assert [get(b.port, source="127.0.0.3").status for _ in range(20)] == [200] * 20
    assert [get(b.port, source="127.0.0.1").status for _ in range(2)] == [200, 429]
    assert b.status()["rate_limit"]["addresses"] == 1  # the exempt address takes no row


def test_a_full_table_evicts_the_least_recently_seen_address(upstreams, balancer, monkeypatch):
    monkeypatch.setattr(lb, "RATE_TABLE_SIZE", 2)
    up, = upstreams(1)
    b = balancer([up.url], rate_limit="1/m")
    a, b_, c = "127.0.0.2", "127.0.0.3", "127.0.0.4"

    def status(source: str) -> int:
        return get(b.port, source=source).status

    assert status(a) == 200 and status(b_) == 200   # table: b, a (newest first)
    assert status(a) == 429                          # a seen again: a, b
    assert status(c) == 200                          # full: b, least recently seen, goes
    assert status(a) == 429                          # a kept its empty bucket
    assert status(b_) == 200                         # b is new again; c goes
    assert status(a) == 429
    assert status(c) == 200
    usage = b.status()["rate_limit"]
    assert usage["addresses"] == 2 and usage["table_size"] == 2 and usage["evictions"] == 3
    # Many addresses through a tiny table: each new one is served, nothing breaks.
    assert [status(f"127.0.1.{n}") for n in range(1, 40)] == [200] * 39
    assert b.status()["rate_limit"]["evictions"] == 42
    assert get(b.port, source=f"127.0.1.{39}").status == 429


def test_with_workers_tokens_are_taken_ahead_only_from_a_deep_bucket():
    """What a worker may spend without the shared lock: an eighth of the bucket with two workers,
    so from a bucket of fewer than 16 tokens every request takes the lock (exact), and no more
    tokens are ever handed out than the bucket holds."""
    shared = lb.SharedState.create(2)
    key = shared.rate_key(bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]))
    interval, tolerance, now = 1_000_000, 99 * 1_000_000, lb.monotonic_us()
    taken = [shared.take_tokens(key, now, interval, tolerance, share=8)[0] for _ in range(40)]
    assert taken[:3] == [12, 11, 9] and sum(taken) == 100 and taken[-1] == 0, taken
    assert shared.take_tokens(key, now, interval, tolerance, share=8) == (0, 1_000_000)
    small = shared.rate_key(bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 2]))
    assert [shared.take_tokens(small, now, interval, 14 * interval, share=8)[0]
            for _ in range(16)] == [1] * 15 + [0]


def test_two_workers_share_one_limit_and_follow_a_reload(cli, upstreams, tmp_path):
    up, = upstreams(1)
    deny = tmp_path / "deny.txt"
    deny.write_text("192.0.2.0/24\n")
    p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--admin-port", "0",
             "--health-interval", "0", "--rate-limit", "1/m,burst=3", "--deny", str(deny),
             "--backend", up.url]).wait_ready()
    assert wait_until(lambda: all_workers_listening(p, 2), timeout=10)
    statuses = []

    def both_workers_answered() -> bool:
        statuses.append(get(p.port).status)  # a new connection each: SO_REUSEPORT spreads them
        workers = status_of(p.admin_port)["workers"]
        return len(statuses) >= 8 and all(worker["requests"] >= 2 for worker in workers)

    assert wait_until(both_workers_answered, timeout=10, interval=0), statuses
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) <= {429}, statuses
    assert statuses.count(200) == 3, statuses  # the same as one worker: the bucket is shared
    assert len(up.requests) == 3
    status = status_of(p.admin_port)
    assert status["rate_limited_total"] == len(statuses) - 3
    assert status["rate_limit"]["addresses"] == 1
    # SIGHUP: the supervisor reads the file again, and both workers refuse the address.
    deny.write_text("192.0.2.0/24\n127.0.0.1\n")
    os.kill(p.proc.pid, signal.SIGHUP)
    refused = []
    assert wait_until(lambda: refused.append(get(p.port).status) or refused[-8:] == [403] * 8), refused
    assert status_of(p.admin_port)["denied_total"] >= 8


# ---------------------------------------------------------------------------------------------------
# Allow and deny
# ---------------------------------------------------------------------------------------------------

def test_deny_inside_allow_wins_and_outside_every_allow_is_denied(upstreams, balancer, caplog):
    up, = upstreams(1)
    b = balancer([up.url], allow=("127.0.0.0/24", "127.0.0.3"), deny=("127.0.0.2/31",))
    assert get(b.port, source="127.0.0.1").status == 200
    assert get(b.port, source="127.0.0.4").status == 200
    assert_denied(get(b.port, source="127.0.0.2"))
    assert_denied(get(b.port, source="127.0.0.3"))   # allowed by name, but inside a deny range
    assert_denied(get(b.port, source="127.0.1.1"))   # outside every allow range
    assert len(up.requests) == 2
    status = b.status()
    assert status["denied_total"] == 3
    assert "lb_denied_total 3" in b.control.metrics()
    assert caplog.text.count("requests answered 403: client address not allowed") == 1, caplog.text


def test_a_denied_keep_alive_client_gets_403_and_a_close(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], deny=("127.0.0.1",))
    with RawClient(b.port) as client:
        client.send(request("/first") + request("/second"))
        response = client.response()
        assert_denied(response)
        assert client.is_closed()
    assert get(b.port, source="127.0.0.2").status == 200
    assert [r.target for r in up.requests] == ["/"]


def test_deny_alone_lets_everyone_else_in(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], deny=("127.0.0.2",))
    assert get(b.port, source="127.0.0.1").status == 200
    assert_denied(get(b.port, source="127.0.0.2"))


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_clients_are_matched_against_ipv6_ranges(upstreams, balancer):
    up, = upstreams(1)
    allowed = balancer([up.url], host="::1", allow=("::1/128",))
    assert get(allowed.port, host="::1").status == 200
    v4_only = balancer([up.url], host="::1", allow=("127.0.0.0/8",))
    assert_denied(get(v4_only.port, host="::1"))
    denied = balancer([up.url], host="::1", allow=("::/0",), deny=("::1",))
    assert_denied(get(denied.port, host="::1"))


def test_mapped_ipv4_clients_match_ipv4_ranges(upstreams, balancer):
    up, = upstreams(1)
    # An IPv6 socket bound to a mapped address: its IPv4 clients arrive as ::ffff:127.0.0.1.
    allowed = balancer([up.url], host="::ffff:127.0.0.1", allow=("127.0.0.1/32",))
    assert allowed.server.address_family == socket.AF_INET6
    assert get(allowed.port).status == 200
    denied = balancer([up.url], host="::ffff:127.0.0.1", deny=("127.0.0.0/8",))
    assert_denied(get(denied.port))
    # And a mapped range on a plain IPv4 listener is the IPv4 range.
    mapped_range = balancer([up.url], deny=("::ffff:127.0.0.0/120",))
    assert_denied(get(mapped_range.port))
    assert get(mapped_range.port, source="127.0.1.1").status == 200


def test_lists_in_a_file_change_on_reload(upstreams, balancer, tmp_path, caplog):
    up, = upstreams(1)
    allow = tmp_path / "allow.txt"
    allow.write_text("# office\n127.0.0.1\n")
    b = balancer([up.url], allow=(str(allow),), admin_port=0)
    assert get(b.port, source="127.0.0.1").status == 200
    assert_denied(get(b.port, source="127.0.0.2"))
    allow.write_text("127.0.0.1\n127.0.0.2, 127.0.0.3  # the new office\n")
    b.reload()
    assert wait_until(lambda: get(b.port, source="127.0.0.2").status == 200), "reload did not apply"
    allow.write_text("127.0.0.300\n")
    generation = b.shared.header[lb.H_LISTS_GENERATION]
    b.reload()  # refused: nothing is published, so no worker can apply anything
    assert b.shared.header[lb.H_LISTS_GENERATION] == generation
    assert "the previous address lists stay" in caplog.text
    assert get(b.port, source="127.0.0.3").status == 200
    assert_denied(get(b.port, source="127.0.0.4"))


def test_a_rate_in_a_file_changes_on_reload(upstreams, balancer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="load_balancer")
    up, = upstreams(1)
    rate = tmp_path / "rate.txt"
    rate.write_text("# per client address\n1/m,burst=2\n")
    b = balancer([up.url], rate_limit=str(rate), admin_port=0)
    assert [get(b.port).status for _ in range(3)] == [200, 200, 429]
    rate.write_text("6000/m,burst=5\n")
    b.reload()
    assert "SIGHUP: --rate-limit 6000/m,burst=5 (was 1/m,burst=2)" in caplog.text
    # The address the old rate held back for a minute passes at once under the new one.
    assert wait_until(lambda: get(b.port).status == 200), "the reloaded rate did not apply"
    assert b.status()["rate_limit"]["rate"] == "6000/m,burst=5"
    rate.write_text("fast please\n")
    generation = b.shared.header[lb.H_LISTS_GENERATION]
    b.reload()  # refused: the rate read before stays
    assert b.shared.header[lb.H_LISTS_GENERATION] == generation
    assert "the previous address lists stay, and the rate limit" in caplog.text
    assert b.status()["rate_limit"]["rate"] == "6000/m,burst=5"


def test_the_admin_listener_refuses_addresses_outside_its_list(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], admin_port=0, admin_allow=("127.0.0.2",))
    with RawClient(b.admin_port) as client:
        response = client.request(request("/status"))
        assert_denied(response, "--admin-allow")
        assert client.is_closed()
    assert get(b.admin_port, "/status", source="127.0.0.2").status == 200
    assert get(b.port).status == 200  # the proxy listener is not affected
