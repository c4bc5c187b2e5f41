"""The balancing options on the command line, and the pure rules under them.

- A wrong --balance, --hash-key, --sticky-cookie, --sticky-key or --slow-start exits 2 with one
  line naming the flag (main() in this process: argparse's exit, no traceback).
- take_cookie: the balancer's cookie is found in every Cookie field and taken out, the other
  pairs kept in order; a field left empty goes; names that only end in it are someone else's.
- The ring depends on the upstreams' names and weights only (every worker, every machine builds
  the same one); the cookie value on the key and the name only.
- The shared block: a pick and its count are one step (SharedState.acquire), a release undoes
  it, and a worker that died leaves no count behind.
"""

from __future__ import annotations

import operator
from collections import Counter

import pytest

from conftest import lb

URL = "http://127.0.0.1:18001"


@pytest.mark.parametrize("args,needle", [
    (["--balance", "random"], "argument --balance: invalid choice: 'random'"),
    (["--balance", "hash", "--hash-key", "ip"], "--hash-key must be client-ip, uri, header:NAME or cookie:NAME, got ip"),
    (["--balance", "hash", "--hash-key", "header:"], "--hash-key must be"),
    (["--balance", "hash", "--hash-key", "header:X User"], "--hash-key must be"),
    (["--balance", "hash", "--hash-key", "cookie:s;d"], "--hash-key must be"),
    (["--hash-key", "uri"], "--hash-key uri needs --balance hash"),
    (["--sticky-cookie", "a b"], "--sticky-cookie must be a cookie name"),
    (["--sticky-cookie", "lb=1"], "--sticky-cookie must be a cookie name"),
    (["--sticky-key", "/etc/hostname"], "--sticky-key needs --sticky-cookie"),
    (["--sticky-cookie", "lb", "--sticky-key", "/nonexistent/key"],
     "cannot read --sticky-key /nonexistent/key: no such file or directory"),
    (["--slow-start", "-1"], "--slow-start must be >= 0, got -1.0"),
    (["--slow-start", "soon"], "argument --slow-start: invalid float value: 'soon'"),
])
def test_a_wrong_balancing_flag_is_one_line_and_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) as exited:
        lb.main(["--backend", URL, *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{lb.program_name()}: error: ") and needle in err, err


def test_a_short_or_empty_key_file_is_refused(tmp_path, capsys):
    for content in (b"", b"   \n", b"fifteen bytes!!\n"):
        key = tmp_path / "key"
        key.write_bytes(content)
        with pytest.raises(SystemExit):
            lb.main(["--backend", URL, "--sticky-cookie", "lb", "--sticky-key", str(key)])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a key needs 16 or more" in err, err
    key.write_bytes(b"sixteen bytes!!!\n")
    assert lb.Config(backends=(URL,), sticky_cookie="lb", sticky_key=str(key)).sticky_key == str(key)


def test_defaults_and_help():
    config = lb.Config(backends=(URL,))
    assert (config.balance, config.hash_key, config.sticky_cookie, config.sticky_key, config.slow_start) == (
        "roundrobin", "client-ip", None, None, 0.0)
    text = lb.build_parser().format_help()
    for flag in ("--balance", "--hash-key", "--sticky-cookie", "--sticky-key", "--slow-start"):
        assert flag in text
    assert lb.build_parser().parse_args(["--balance", "LeastConn"]).balance == "leastconn"


@pytest.mark.parametrize("fields,values,kept", [
    ([(b"cookie", b"Cookie: lb=abc")], [b"abc"], []),
    ([(b"cookie", b"Cookie: a=1; lb=abc; b=2")], [b"abc"], [(b"cookie", b"Cookie: a=1; b=2")]),
    ([(b"cookie", b"cookie:a=1;lb=abc")], [b"abc"], [(b"cookie", b"cookie: a=1")]),
    ([(b"cookie", b"Cookie: xlb=1; lb2=2")], [], None),
    ([(b"cookie", b"Cookie: a=lb=x")], [], None),
    ([(b"host", b"Host: t"), (b"cookie", b"Cookie: lb=1"), (b"accept", b"Accept: */*"),
      (b"cookie", b"Cookie: z=9; lb=2")],
     [b"1", b"2"], [(b"host", b"Host: t"), (b"accept", b"Accept: */*"), (b"cookie", b"Cookie: z=9")]),
    ([(b"x-cookie", b"X-Cookie: lb=1")], [], None),
    ([(b"cookie", b"Cookie:  lb=1 ")], [b"1"], []),
    ([(b"cookie", b"Cookie: a=1"), (b"cookie", b"Cookie: a=1")], [], None),
])
def test_take_cookie(fields, values, kept):
    found, rest = lb.take_cookie(fields, b"lb=")
    assert found == values
    if kept is None:
        assert rest is fields  # untouched: the same list
    else:
        assert rest == kept


def backends(texts, shared=None) -> tuple:
    shared = shared or lb.SharedState.create(1)
    config = lb.Config(backends=tuple(texts), health_interval=0)
    return tuple(lb.Backend(spec, slot, config, shared) for slot, spec in enumerate(config.backend_specs, 1))


def test_the_ring_depends_on_names_and_weights_only():
    one = backends(["http://10.0.0.1:80,name=a", "http://10.0.0.2:80,name=b,weight=2"])
    other = backends(["http://10.9.9.9:81,name=b,weight=2", "http://10.9.9.8:82,name=a"])
    assert [(point, b.name) for point, b in lb.hash_ring(one)] == [(point, b.name) for point, b in lb.hash_ring(other)]
    assert Counter(b.name for _, b in lb.hash_ring(one)) == {"a": 160, "b": 320}
    reweighted = backends(["http://10.0.0.1:80,name=a", "http://10.0.0.2:80,name=b,weight=3"])
    assert Counter(b.name for _, b in lb.hash_ring(reweighted)) == {"a": 160, "b": 480}


def test_the_cookie_value_depends_on_the_key_and_the_name_only():
    value = lb.sticky_cookie_value(b"k" * 32, "app1")
    assert value == lb.sticky_cookie_value(b"k" * 32, "app1") and len(value) == 22
    assert value != lb.sticky_cookie_value(b"k" * 32, "app2")
    assert value != lb.sticky_cookie_value(b"j" * 32, "app1")
    assert set(value) <= set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_acquire_release_and_a_dead_worker():
    shared = lb.SharedState.create(2)
    a, b = backends(["http://10.0.0.1:80", "http://10.0.0.2:80"], shared)

    def least(loads):
        counts = loads(operator.itemgetter(a.slot, b.slot))
        return (a, b)[counts.index(min(counts))]

    assert shared.acquire(0, least) is a
    assert shared.acquire(1, least) is b
    assert shared.acquire(1, least) is a
    assert (shared.in_flight(a.slot), shared.in_flight(b.slot)) == (2, 1)
    assert shared.acquire(0, lambda load: None) is None  # counted nowhere
    shared.release(0, a.slot)
    assert (shared.in_flight(a.slot), shared.in_flight(b.slot)) == (1, 1)
    shared.worker_died(1)
    assert (shared.in_flight(a.slot), shared.in_flight(b.slot)) == (0, 0)
