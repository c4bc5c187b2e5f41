"""Consistent hashing (--balance hash, --hash-key) through real sockets.

- 1,000 keys (`header:X-User`) over 4 upstreams: each gets a fair part; a reload that removes one
  moves at most ~30% of the keys, every one of them from the removed upstream, none of those that
  were on the other three; a reload that adds it back brings every key home.
- The down-and-back case: an upstream in maintenance, one whose connect is refused (the retry
  goes on along the ring) and one marked down by health checks pass their keys to the next
  upstream on the ring (where a removal would have sent them), the others' keys stay; back in
  rotation, every key is home again.
- `cookie:sid`, `uri` and `client-ip` keys (the last from 16 source addresses of 127.0.0.0/8); a
  request without the key goes round robin; weights 3,1 give about 3/4 of the keys to the first.

The keys go through one keep-alive connection each pass (conftest's RawClient), to in-process
balancers over conftest's upstreams, named so that the ring is the same in every run.
"""

from __future__ import annotations

import socket
from collections import Counter

from conftest import SOCKET_TIMEOUT, RawClient, get, port_of, request, wait_until

KEYS = [f"user-{i}" for i in range(1000)]


def owners(port: int, keys, header: str = "X-User") -> dict:
    """key -> port of the upstream that answered, over one keep-alive connection."""
    found = {}
    with RawClient(port) as client:
        for key in keys:
            r = client.request(f"GET /k HTTP/1.1\r\nHost: t\r\n{header}: {key}\r\n\r\n".encode())
            assert r.status == 200, r
            found[key] = port_of(r)
    return found


def listing(ups, names=None) -> str:
    return "".join(f"{u.url},name=h{i}\n" for i, u in enumerate(ups) if names is None or f"h{i}" in names)


def test_removing_one_of_four_moves_only_its_keys_and_adding_it_back_restores_them(upstreams, balancer,
                                                                                    tmp_path):
    ups = upstreams(4)
    backends = tmp_path / "backends.txt"
    backends.write_text(listing(ups))
    b = balancer([], backends_file=str(backends), balance="hash", hash_key="header:X-User")
    before = owners(b.port, KEYS)
    shares = Counter(before.values())
    assert set(shares) == {u.port for u in ups}
    assert all(150 <= n <= 350 for n in shares.values()), shares
    removed = ups[1]
    backends.write_text(listing(ups, {"h0", "h2", "h3"}))
    b.reload()
    after = owners(b.port, KEYS)
    moved = [key for key in KEYS if after[key] != before[key]]
    assert len(moved) <= 300, len(moved)
    assert moved and all(before[key] == removed.port for key in moved)
    assert sorted(moved) == sorted(key for key in KEYS if before[key] == removed.port)
    assert removed.port not in after.values()
    backends.write_text(listing(ups))
    b.reload()
    assert owners(b.port, KEYS) == before


def test_an_upstream_out_passes_its_keys_along_the_ring_and_gets_them_back(upstreams, balancer, tmp_path):
    """maint, a refused connect and health checks: each sends the keys where a removal would."""
    ups = upstreams(4)
    keys = KEYS[:150]
    backends = tmp_path / "backends.txt"
    backends.write_text(listing(ups))
    # No pooled connections: a stopped conftest upstream's handler threads would answer on them.
    b = balancer([], backends_file=str(backends), balance="hash", hash_key="header:X-User",
                 health_path="/", health_interval=0.1, rise=1, fall=1, pool_size=0)
    home = owners(b.port, keys)
    out = ups[2]
    backends.write_text(listing(ups, {"h0", "h1", "h3"}))
    b.reload()
    elsewhere = owners(b.port, keys)  # where the ring sends its keys without it
    backends.write_text(listing(ups))
    b.reload()
    assert owners(b.port, keys) == home

    b.control.set_state("h2", "maint")
    assert owners(b.port, keys) == elsewhere
    b.control.set_state("h2", "ready")
    assert owners(b.port, keys) == home

    out.stop()  # refused: each of its keys' requests is retried on the next upstream on the ring
    assert owners(b.port, keys) == elsewhere
    assert wait_until(lambda: b.status()["backends"][2]["state"] == "down")
    assert owners(b.port, keys) == elsewhere
    out.start()  # same port again
    assert wait_until(lambda: b.status()["backends"][2]["state"] == "up")
    assert owners(b.port, keys) == home


def test_cookie_key_same_sid_same_upstream_and_without_it_round_robin(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url + f",name=c{i}" for i, u in enumerate(ups)], balance="hash", hash_key="cookie:sid")
    sids = [f"s{i}" for i in range(60)]
    first = owners(b.port, [f"theme=dark; sid={sid}" for sid in sids], header="Cookie")
    assert owners(b.port, [f"sid={sid}; lang=en" for sid in sids], header="Cookie") == {
        f"sid={sid}; lang=en": first[f"theme=dark; sid={sid}"] for sid in sids}
    assert len(set(first.values())) == 3
    # No sid (no Cookie, another cookie, an empty sid): round robin, a strict turn.
    with RawClient(b.port) as client:
        turn = [port_of(client.request(request(f"/n{i}"))) for i in range(3)]
        turn += [port_of(client.request(b"GET / HTTP/1.1\r\nHost: t\r\nCookie: other=1\r\n\r\n")) for _ in range(3)]
        turn += [port_of(client.request(b"GET / HTTP/1.1\r\nHost: t\r\nCookie: sid=\r\n\r\n")) for _ in range(3)]
    assert sorted(turn[:3]) == sorted(u.port for u in ups) and turn[3:6] == turn[:3] and turn[6:] == turn[:3]


def test_uri_key_includes_the_query(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url + f",name=u{i}" for i, u in enumerate(ups)], balance="hash", hash_key="uri")
    paths = [f"/item/{i}?v={i % 7}" for i in range(60)]
    with RawClient(b.port) as client:
        first = [port_of(client.request(request(path))) for path in paths]
        again = [port_of(client.request(request(path))) for path in paths]
    assert first == again and len(set(first)) == 3
    # The query is part of the key: one path with many queries spreads.
    with RawClient(b.port) as client:
        spread = {port_of(client.request(request(f"/same?q={i}"))) for i in range(30)}
    assert len(spread) == 3


def from_address(port: int, source: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT,
                                  source_address=(source, 0)) as sock:
        sock.sendall(request("/ip", close=True))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return int(next(line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("x-upstream-port:")))


def test_client_ip_key_one_upstream_per_address(upstreams, balancer):
    ups = upstreams(3)
    b = balancer([u.url + f",name=ip{i}" for i, u in enumerate(ups)], balance="hash")  # client-ip: the default
    addresses = [f"127.0.0.{i}" for i in range(2, 18)]
    first = {address: from_address(b.port, address) for address in addresses}
    for _ in range(2):
        assert {address: from_address(b.port, address) for address in addresses} == first
    assert len(set(first.values())) >= 2  # 16 addresses over 3 upstreams


def test_weights_three_to_one_give_about_three_quarters_of_the_keys(upstreams, balancer):
    ups = upstreams(2)
    b = balancer([ups[0].url + ",weight=3,name=w0", ups[1].url + ",name=w1"], balance="hash",
                 hash_key="header:X-User")
    shares = Counter(owners(b.port, KEYS[:400]).values())
    assert 260 <= shares[ups[0].port] <= 340, shares
    assert get(b.port, "/").status == 200
