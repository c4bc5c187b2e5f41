"""Every policy through the CLI with --workers 2, a backup, drain and maint, and a SIGHUP reload.

For each of leastconn, hash (header:X-User) and a sticky cookie over round robin, one balancer
process with two workers (every request on a new connection, so both serve) over a backends file
of three primaries and a backup:
- the policy holds across workers: leastconn spreads 6 held requests 2/2/2 whichever worker took
  each; a hash key and a sticky cookie go to one upstream from both workers;
- the backup gets nothing while a primary is up, everything when they are all in maint;
- drain: no new requests (leastconn, hash: its keys go elsewhere) but a sticky client stays;
- maint: out at once for every policy;
- SIGHUP with one primary replaced: the removed one gets nothing, the new one its part; a hash key
  of the two that stayed stays or goes to the new one, never to another; a sticky cookie of one
  that stayed still pins.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from conftest import (SOCKET_TIMEOUT, RawClient, SlowUpstreamHandler, admin_post, admin_status, get,
                      port_of, request, wait_until)

POLICIES = {
    "leastconn": ["--balance", "leastconn"],
    "hash": ["--balance", "hash", "--hash-key", "header:X-User"],
    "sticky": ["--sticky-cookie", "lb"],
}


def write_backends(path, ups, names) -> None:
    """p0..p2 primaries, b0 the backup, each name= its upstream's index."""
    lines = [f"{ups[i].url},name={name}" + (",backup" if name.startswith("b") else "")
             for name, i in names.items()]
    path.write_text("\n".join(lines) + "\n")


def hit(port: int, headers: dict | None = None):
    r = get(port, "/p", headers)
    assert r.status == 200, r
    return r


def cookie_of(r) -> str:
    return next(v for v in r.headers_named("Set-Cookie") if v.startswith("lb=")).split(";")[0]


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_with_two_workers_a_backup_drain_maint_and_a_reload(policy, cli, upstreams, tmp_path):
    slow = SlowUpstreamHandler()
    ups = upstreams(5, slow)
    by_port = {u.port: i for i, u in enumerate(ups)}
    backends = tmp_path / "backends.txt"
    write_backends(backends, ups, {"p0": 0, "p1": 1, "p2": 2, "b0": 3})
    p = cli(["--host", "127.0.0.1", "--port", "0", "--workers", "2", "--admin-port", "0",
             "--health-interval", "0", "--backends-file", str(backends), *POLICIES[policy]]).wait_ready()

    def where(headers=None) -> int:
        return by_port[port_of(hit(p.port, headers))]

    keys = [{"X-User": f"u{i}"} for i in range(24)]
    if policy == "leastconn":
        held = []
        try:
            for _ in range(6):
                client = RawClient(p.port, SOCKET_TIMEOUT + 5)
                client.send(request("/slow"))
                held.append(client)
            assert wait_until(lambda: sum(len(u.requests) for u in ups) == 6)
            assert [len(u.requests) for u in ups] == [2, 2, 2, 0, 0]
        finally:
            slow.release.set()
            for client in held:
                assert client.response().status == 200
                client.close()
        homes = None
    elif policy == "hash":
        homes = [where(key) for key in keys]
        assert [where(key) for key in keys] == homes and set(homes) == {0, 1, 2}
    else:
        first = hit(p.port)
        cookie = cookie_of(first)
        pinned = by_port[port_of(first)]
        assert {where({"Cookie": cookie}) for _ in range(12)} == {pinned}

    # Drain p0: nothing new (a sticky client of p0 stays).
    admin_post(p.admin_port, "p0", "drain")
    spread = Counter(where(key) for key in keys)
    assert 0 not in spread and 3 not in spread, spread
    if policy == "hash":  # p0's keys went on along the ring; the others' stayed
        assert all(where(key) == h for h, key in zip(homes, keys) if h != 0)
    if policy == "sticky":
        pinned_cookie = cookie  # pinned somewhere; pin a client to p0 itself to see drain keep it
        for _ in range(60):  # a new client lands on p0 one time in three
            if pinned == 0:
                break
            admin_post(p.admin_port, "p0", "ready")
            r = hit(p.port)
            pinned, pinned_cookie = by_port[port_of(r)], cookie_of(r)
            admin_post(p.admin_port, "p0", "drain")
        assert pinned == 0
        assert {where({"Cookie": pinned_cookie}) for _ in range(6)} == {0}
    admin_post(p.admin_port, "p0", "ready")

    # Maint every primary: the backup takes everything, for every policy and cookie.
    for name in ("p0", "p1", "p2"):
        admin_post(p.admin_port, name, "maint")
    extra = {"Cookie": cookie} if policy == "sticky" else {}
    assert {where({**key, **extra}) for key in keys[:8]} == {3}
    for name in ("p0", "p1", "p2"):
        admin_post(p.admin_port, name, "ready")
    assert 3 not in {where(key) for key in keys}

    # SIGHUP: p1 leaves, p3 (upstream 4) joins.
    sticky_p2 = None
    if policy == "sticky":
        for _ in range(60):  # a new client lands on p2 one time in three
            r = hit(p.port)
            if by_port[port_of(r)] == 2:
                sticky_p2 = cookie_of(r)
                break
        assert sticky_p2 is not None
    write_backends(backends, ups, {"p0": 0, "p2": 2, "p3": 4, "b0": 3})
    p.proc.send_signal(signal.SIGHUP)
    assert p.wait_for_line("removed: p1"), p.stderr_text()
    assert wait_until(lambda: {b["name"] for b in admin_status(p.admin_port)["backends"]} == {"p0", "p2", "p3", "b0"})
    after = [where(key) for key in keys]
    assert 1 not in after and 3 not in after and 4 in after, after
    if policy == "hash":  # a key of p0 or p2 stays, or goes to the new p3; never to another
        assert all(a in (h, 4) for a, h in zip(after, homes) if h in (0, 2))
    if policy == "sticky":
        assert {where({"Cookie": sticky_p2}) for _ in range(6)} == {2}
    # Both workers served (over a hundred connections by now: the kernel spreads them).
    assert all(w["requests"] > 0 for w in admin_status(p.admin_port)["workers"])
