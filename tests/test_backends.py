"""Unit tests of backend state, round robin and the fair gate in load_balancer.py, without sockets.

Backends are built from URLs whose hosts do not exist (".invalid"): nothing connects until asked,
and nothing here asks. The backend set and its state live in a SharedState block, as in a running
balancer; health results go through HealthChecker.record (its threads never start here).
Time-dependent rules (fail_timeout and ejections) run on a fake clock: ``time.monotonic`` patched
on the module's ``time`` object, restored by monkeypatch. Threads are daemons; every wait for one
has a timeout, and "a thread is queued" is observed by polling the gate's queue against a
deadline, never by sleeping "long enough".
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

import pytest

import load_balancer as lb
from conftest import wait_until

URLS = ("http://a.invalid:8001", "http://b.invalid:8002", "http://c.invalid:8003", "http://d.invalid:8004")
WAIT = 5.0  # upper bound for every wait on another thread; none should take more than milliseconds


class Balancer:
    """The pieces a worker routes with: shared state holding the backend set, its RoundRobin,
    and a HealthChecker to report probe results through."""

    def __init__(self, texts, **settings):
        settings.setdefault("health_interval", 0)
        self.config = lb.Config(backends=tuple(texts), **settings)
        self.shared = lb.SharedState.create(1)
        self.publish(self.config.backends)
        self.rr = lb.RoundRobin(self.shared, self.config)
        self.checker = lb.HealthChecker(self.shared, self.config, None)

    def publish(self, texts) -> None:
        for slot in range(1, len(texts) + 1):
            self.shared.reset(slot, "no active checks")
        self.shared.publish([(slot, text, None) for slot, text in enumerate(texts, 1)])

    @property
    def backends(self) -> list:
        return [self.rr.backends[slot] for slot in sorted(self.rr.backends)]

    def probe(self, backend: lb.Backend, ok: bool, detail: str = "x") -> None:
        self.checker.record(backend.slot, backend.spec, ok, detail)

    def take_down(self, backend: lb.Backend) -> None:
        for _ in range(self.config.fall):
            self.probe(backend, False, "connection refused")
        assert backend.state == "down"

    def fail(self, backend: lb.Backend, detail: str = "reset", may_eject: bool = True) -> bool:
        return self.shared.record_failure(backend.slot, detail, self.config, may_eject=may_eject)


def make(n: int = 3, **settings) -> tuple[list[lb.Backend], lb.RoundRobin]:
    b = Balancer(URLS[:n], **settings)
    return b.backends, b.rr


def picks(rr: lb.RoundRobin, n: int, exclude=()) -> list:
    return [rr.pick(exclude) for _ in range(n)]


def names(sequence: list) -> str:
    return " ".join(backend.name.split(".")[0] if backend else "-" for backend in sequence)


def assert_strictly_cyclic(sequence: list, members: set) -> None:
    """Every len(members) consecutive picks are all of them, and the pattern repeats exactly."""
    k = len(members)
    assert set(sequence) == members
    assert set(sequence[:k]) == members
    assert all(sequence[i] is sequence[i + k] for i in range(len(sequence) - k))


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(lb.time, "monotonic", fake)
    return fake


def wait_for(predicate) -> bool:
    """Poll another thread's progress: it takes milliseconds, so poll every millisecond."""
    return wait_until(predicate, timeout=WAIT, interval=0.001)


def in_threads(count: int, per_thread: int, call) -> Counter:
    """`call()` per_thread times in each of `count` threads started together, switching threads as
    often as the interpreter allows: the results counted."""
    start = threading.Barrier(count, timeout=WAIT)
    results = [Counter() for _ in range(count)]

    def worker(i: int) -> None:
        start.wait()
        counts = results[i]
        for _ in range(per_thread):
            counts[call()] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    finally:
        sys.setswitchinterval(old_interval)
    assert not any(t.is_alive() for t in threads)
    return sum(results, Counter())


# ===================================================================================================
# Backend syntax
# ===================================================================================================

def test_backend_from_unresolvable_url_does_not_connect():
    backends, _ = make(2)
    assert [(b.host, b.port) for b in backends] == [("a.invalid", 8001), ("b.invalid", 8002)]
    assert backends[0].host_header == b"a.invalid:8001"
    assert backends[0].state == "up" and len(backends[0].pool) == 0


@pytest.mark.parametrize("text, expected", [
    ("http://10.0.0.5:8000", ("http", "10.0.0.5", 8000, "10.0.0.5:8000", 1, False)),
    ("http://10.0.0.5:8000,weight=3", ("http", "10.0.0.5", 8000, "10.0.0.5:8000", 3, False)),
    ("http://a.example,backup", ("http", "a.example", 80, "a.example:80", 1, True)),
    ("https://a.example", ("https", "a.example", 443, "a.example:443", 1, False)),
    ("http://[::1]:81,name=v6,weight=256", ("http", "::1", 81, "v6", 256, False)),
    (" http://h:1/ , backup , name=web-1 ", ("http", "h", 1, "web-1", 1, True)),
])
def test_backend_syntax(text, expected):
    spec = lb.parse_backend(text)
    assert (spec.scheme, spec.host, spec.port, spec.name, spec.weight, spec.backup) == expected


@pytest.mark.parametrize("text, reason", [
    ("http://h:1,weight=0", "weight must be 1-256"),
    ("http://h:1,weight=257", "weight must be 1-256"),
    ("http://h:1,weight=x", "weight must be 1-256"),
    ("http://h:1,primary", "unknown option 'primary'"),
    ("http://h:1,name=a b", "a name is"),
    ("http://user:pw@h:1", "credentials in backend URLs are not supported"),
    ("http://h:1/api", "no path"),
    ("ftp://h:1", "only http:// and https://"),
])
def test_backend_syntax_errors(text, reason):
    with pytest.raises(ValueError, match=reason):
        lb.parse_backend(text)


def test_two_backends_with_one_name_are_refused():
    with pytest.raises(ValueError, match="two backends are named 'h:1'"):
        lb.Config(backends=("http://h:1", "http://h:1,weight=2"))
    lb.Config(backends=("http://h:1", "http://h:1,name=again"))


# ===================================================================================================
# RoundRobin.pick
# ===================================================================================================

def test_pick_strictly_cyclic_from_the_first():
    backends, rr = make(3)
    assert picks(rr, 9) == backends * 3


@pytest.mark.parametrize("n", [1, 2, 4])
def test_pick_cyclic_any_size(n):
    backends, rr = make(n)
    assert picks(rr, 5 * n) == backends * 5


def test_pick_exclude_skips():
    backends, rr = make(3)
    a, b, c = backends
    got = picks(rr, 10, exclude={a})
    assert a not in got
    assert all(x is not y for x, y in zip(got, got[1:]))  # b and c alternate
    assert Counter(got) == {b: 5, c: 5}
    assert picks(rr, 6, exclude=[a, c]) == [b] * 6  # any container


def test_pick_exclude_all_is_none():
    backends, rr = make(3)
    assert rr.pick(exclude=set(backends)) is None
    assert rr.pick(exclude=tuple(backends)) is None
    assert rr.pick() is not None  # excluding is per call


def test_pick_none_when_every_upstream_is_down_by_health_checks():
    b = Balancer(URLS[:3])
    for backend in b.backends:
        b.take_down(backend)
    assert b.rr.pick() is None
    assert b.rr.pick(exclude={b.backends[0]}) is None


def test_rotation_after_a_backend_goes_down_stays_cyclic_and_fair():
    b = Balancer(URLS[:4])
    backends = b.backends
    picks(b.rr, 2)  # start the rotation somewhere in the middle
    b.take_down(backends[1])
    got = picks(b.rr, 3000)
    assert_strictly_cyclic(got, {backends[0], backends[2], backends[3]})
    assert Counter(got) == {backends[0]: 1000, backends[2]: 1000, backends[3]: 1000}


def test_rotation_with_one_left():
    b = Balancer(URLS[:3])
    b.take_down(b.backends[0])
    b.take_down(b.backends[2])
    assert picks(b.rr, 5) == [b.backends[1]] * 5


class IndexOnly(tuple):
    """The rotation as pick sees it: counts indexing, refuses iteration (an O(n) scan)."""

    indexed = 0

    def __getitem__(self, i):
        type(self).indexed += 1
        return super().__getitem__(i)

    def __iter__(self):
        raise AssertionError("pick iterated over the backends")


def test_pick_without_exclusions_is_one_index():
    backends, rr = make(3)
    IndexOnly.indexed = 0
    rr._rotation.primary = IndexOnly(backends)
    assert picks(rr, 1000) == backends * 333 + [backends[0]]
    assert IndexOnly.indexed == 1000


def test_pick_100k_exact_counts():
    backends, rr = make(3)
    counts = Counter(rr.pick() for _ in range(100_000))
    assert counts == {backends[0]: 33_334, backends[1]: 33_333, backends[2]: 33_333}


def test_pick_concurrent_threads_exact_counts():
    # 8 threads x 3000 picks => each backend exactly 8000 times: the counter is one atomic C call.
    # Repeated, because a lost update in a non-atomic counter shows in most rounds, not in all.
    backends, rr = make(3)
    for _ in range(10):
        assert in_threads(8, 3000, rr.pick) == {b: 8000 for b in backends}


# ===================================================================================================
# Weights and backups
# ===================================================================================================

def test_weights_3_1_1_give_the_smooth_sequence():
    b = Balancer(["http://a.invalid:1,weight=3", "http://b.invalid:2", "http://c.invalid:3"])
    assert names(picks(b.rr, 10)) == "a b a c a a b a c a"


@pytest.mark.parametrize("weights, cycle", [
    ((5, 1, 1), "a a b a c a a"),
    ((2, 2), "a b"),                 # reduced by their common divisor
    ((4, 2, 1), "a b a c a b a"),
    ((1, 1, 1), "a b c"),
])
def test_smooth_weighted_cycles(weights, cycle):
    texts = [f"http://{n}.invalid:{i},weight={w}" for i, (n, w) in enumerate(zip("abc", weights), 1)]
    b = Balancer(texts)
    assert names(picks(b.rr, len(cycle.split()))) == cycle


def test_weighted_picks_exact_under_8_threads():
    b = Balancer(["http://a.invalid:1,weight=3", "http://b.invalid:2", "http://c.invalid:3"])
    a, bb, c = b.backends
    assert in_threads(8, 5000, b.rr.pick) == {a: 24000, bb: 8000, c: 8000}


def test_backup_only_while_no_primary_is_available():
    b = Balancer(["http://a.invalid:1", "http://b.invalid:2", "http://z.invalid:9,backup"])
    a, bb, z = b.backends
    assert z not in picks(b.rr, 20)
    b.take_down(a)
    assert picks(b.rr, 4) == [bb] * 4
    b.take_down(bb)
    assert picks(b.rr, 4) == [z] * 4


def test_backup_after_every_primary_was_tried():
    b = Balancer(["http://a.invalid:1", "http://b.invalid:2", "http://y.invalid:8,backup",
                  "http://z.invalid:9,backup,weight=2"])
    a, bb, y, z = b.backends
    assert names(picks(b.rr, 6, exclude=[a, bb])) == "z y z z y z"
    assert b.rr.pick(exclude=[a, bb, y, z]) is None


def test_reload_adds_removes_and_reweights_keeping_pools():
    b = Balancer(URLS[:3])
    a, bb, c = b.backends
    b.shared.publish([(1, "http://a.invalid:8001,weight=2", None), (3, "http://c.invalid:8003", None),
                      (4, "http://d.invalid:8004", None)])
    got = picks(b.rr, 8)
    assert names(got) == "a c d a a c d a"  # weights 2, 1, 1
    assert got[0] is a and got[1] is c  # the same objects: their pooled connections stay
    assert bb.pool.closed and not a.pool.closed


# ===================================================================================================
# Health checks: rise/fall hysteresis (HealthChecker.record)
# ===================================================================================================

@pytest.mark.parametrize("rise, fall", [(1, 1), (2, 3), (5, 4)])
def test_probe_fall_and_rise_exact_counts(rise, fall):
    b = Balancer(URLS[:2], rise=rise, fall=fall, health_interval=5)
    backend = b.backends[0]
    states = []
    for _ in range(fall):
        b.probe(backend, False)
        states.append(backend.state)
    for _ in range(rise):
        b.probe(backend, True)
        states.append(backend.state)
    assert states == ["up"] * (fall - 1) + ["down"] + ["down"] * (rise - 1) + ["up"]


def test_probe_pass_in_between_resets_fall():
    b = Balancer(URLS[:2], fall=3, health_interval=5)
    backend = b.backends[0]
    for ok in (False, False, True, False, False):
        b.probe(backend, ok)
    assert backend.state == "up"
    b.probe(backend, False)
    assert backend.state == "down"


def test_probe_fail_in_between_resets_rise():
    b = Balancer(URLS[:2], rise=3, health_interval=5)
    backend = b.backends[0]
    b.take_down(backend)
    for ok in (True, True, False, True, True):
        b.probe(backend, ok)
    assert backend.state == "down"
    b.probe(backend, True)
    assert backend.state == "up"


def test_probe_reason_mentions_detail_and_counts_checks():
    b = Balancer(URLS[:2], health_interval=5)
    backend = b.backends[0]
    b.probe(backend, True, "HTTP 204 in 3 ms")
    assert "HTTP 204 in 3 ms" in b.shared.reason(backend.slot)
    b.take_down(backend)
    assert "connection refused" in b.shared.reason(backend.slot)
    assert b.shared.get(backend.slot, lb.S_CHECKS_PASSED) == 1
    assert b.shared.get(backend.slot, lb.S_CHECKS_FAILED) == 3


# ===================================================================================================
# Passive checks: consecutive failures, ejection, panic mode
# ===================================================================================================

def test_consecutive_failures_eject_and_a_success_resets_the_run(clock):
    b = Balancer(URLS[:3], max_fails=3, fail_timeout=10)
    backend = b.backends[1]
    assert [b.fail(backend) for _ in range(2)] == [False, False]
    b.shared.record_success(backend.slot)  # one success between: the run starts again
    assert [b.fail(backend) for _ in range(3)] == [False, False, True]
    assert backend.state == "down"
    assert backend not in picks(b.rr, 6)
    assert "3 failed requests in a row" in b.shared.reason(backend.slot)


def test_failures_while_ejected_do_not_extend(clock):
    b = Balancer(URLS[:3], max_fails=1, fail_timeout=10)
    backend = b.backends[0]
    assert b.fail(backend) is True
    clock.advance(5)
    assert b.fail(backend) is False
    clock.advance(5.001)
    assert backend.state == "up"
    assert backend in picks(b.rr, 3)


def test_may_eject_false_never_ejects(clock):
    b = Balancer(URLS[:3], max_fails=1)
    backend = b.backends[0]
    for _ in range(10):
        assert b.fail(backend, may_eject=False) is False
    assert backend.state == "up"
    assert b.shared.get(backend.slot, lb.S_CONSECUTIVE_FAILURES) == 10


def test_ejection_ends_after_fail_timeout(clock):
    b = Balancer(URLS[:3], max_fails=1, fail_timeout=10)
    backends = b.backends
    b.fail(backends[1])
    assert backends[1] not in picks(b.rr, 6)
    clock.advance(9.999)
    assert backends[1] not in picks(b.rr, 6)
    clock.advance(0.002)
    assert_strictly_cyclic(picks(b.rr, 9), set(backends))  # pick() itself noticed


def test_passing_http_check_ends_ejection_early_a_tcp_connect_does_not(clock):
    tcp = Balancer(URLS[:3], max_fails=1, fail_timeout=10, health_interval=5)
    tcp.fail(tcp.backends[1])
    tcp.probe(tcp.backends[1], True, "TCP connect in 0.2 ms")
    assert tcp.backends[1].state == "down"
    http = Balancer(URLS[:3], max_fails=1, fail_timeout=10, health_interval=5, health_path="/health")
    http.fail(http.backends[1])
    http.probe(http.backends[1], True, "HTTP 200 from /health")
    assert http.backends[1].state == "up"
    assert "HTTP 200" in http.shared.reason(http.backends[1].slot)
    assert_strictly_cyclic(picks(http.rr, 9), set(http.backends))


def test_panic_mode_tries_upstreams_out_only_by_ejection(clock):
    b = Balancer(URLS[:3], max_fails=1, fail_timeout=10)
    a, bb, c = b.backends
    b.take_down(c)   # down by health checks: never tried in panic mode
    b.fail(a)
    b.fail(bb)
    assert names(picks(b.rr, 4)) == "a b a b"
    assert b.rr.panic
    assert b.shared.record_success(a.slot) is True  # a request to it succeeded: it is back
    assert picks(b.rr, 3) == [a, a, a] and not b.rr.panic


def test_no_panic_while_an_operator_state_holds_an_upstream_out(clock):
    b = Balancer(URLS[:2], max_fails=1, fail_timeout=10)
    a, bb = b.backends
    b.shared.set_admin(a.slot, "maint", "maint")
    b.fail(bb)
    assert picks(b.rr, 3) == [bb] * 3  # the ejected one in panic, never the one in maint


@pytest.mark.parametrize("elapsed, expected", [(3, 7), (5.5, 5), (9.5, 1), (9.999, 1), (10.5, 3),
                                               (7.9995, 3)])  # 2.0005 s left: rounded up, never down
def test_retry_after_counts_down_to_the_first_return(clock, elapsed, expected):
    b = Balancer(URLS[:3], max_fails=1, fail_timeout=10, health_interval=5)
    start = clock.now
    b.fail(b.backends[0])  # back at start + 10
    clock.advance(3)
    b.fail(b.backends[1])  # back at start + 13
    clock.now = start + elapsed
    assert b.rr.retry_after() == expected


@pytest.mark.parametrize("health_interval, expected", [(5, 5), (0.2, 1), (0, 1)])
def test_retry_after_without_ejections_is_health_interval(health_interval, expected):
    b = Balancer(URLS[:2], health_interval=health_interval)
    for backend in b.backends:
        b.take_down(backend)
    assert b.rr.retry_after() == expected


# ===================================================================================================
# FairGate
# ===================================================================================================

def run_in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def release_all(gate: lb.FairGate) -> None:
    """After a failed test: let every queued thread go, so that none outlives it."""
    with gate.mutex:
        while gate.waiting:
            gate.waiting.popleft().release()


def test_gate_below_threshold_never_blocks():
    gate = lb.FairGate(slots=1, threshold=8)
    inside = threading.Barrier(8, timeout=WAIT)  # all 8 must be inside at once
    errors = []

    def request():
        try:
            gate.enter(new_request=True)
            inside.wait()
            gate.leave(request_done=True)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [run_in_thread(request) for _ in range(8)]
    try:
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads), "a thread blocked below the threshold"
        assert errors == []
        assert (gate.in_flight, gate.running, len(gate.waiting)) == (0, 0, 0)
    finally:
        inside.abort()
        release_all(gate)


def test_gate_enter_leave_same_thread_below_threshold():
    gate = lb.FairGate(slots=2, threshold=64)

    def passes():
        for _ in range(1000):
            gate.enter(new_request=True)
            gate.leave()
            gate.enter()
            gate.leave(request_done=True)

    t = run_in_thread(passes)
    t.join(WAIT)
    assert not t.is_alive()
    assert (gate.in_flight, gate.running, len(gate.waiting)) == (0, 0, 0)


def test_gate_keep_gil_with_company_below_threshold_and_nobody_queueing():
    gate = lb.FairGate(slots=4, threshold=3)
    assert not gate.keep_gil
    gate.enter(new_request=True)
    assert not gate.keep_gil                # a lone request: nobody else wants the GIL
    gate.enter(new_request=True)
    gate.enter(new_request=True)
    assert gate.keep_gil                    # company, at the threshold
    gate.enter(new_request=True)
    assert not gate.keep_gil                # above it: the GIL must change hands
    gate.leave(request_done=True)
    assert gate.keep_gil
    gate.waiting.append(threading.Lock())   # a thread in line, even below the threshold
    assert not gate.keep_gil
    gate.waiting.clear()
    for _ in range(3):
        gate.leave(request_done=True)
    assert (gate.in_flight, gate.running, gate.keep_gil) == (0, 0, False)


@pytest.mark.parametrize("slots", [1, 2])
def test_gate_above_threshold_admits_fifo(slots):
    gate = lb.FairGate(slots=slots, threshold=0)
    n = 6
    admitted: list[int] = []
    entered = [threading.Event() for _ in range(n)]
    release = [threading.Event() for _ in range(n)]
    left = [threading.Event() for _ in range(n)]
    holders_release = threading.Event()
    holders_in = threading.Barrier(slots + 1, timeout=WAIT)

    def holder():
        gate.enter(new_request=True)
        holders_in.wait()
        holders_release.wait(WAIT)
        gate.leave(request_done=True)

    def queued(i: int):
        gate.enter(new_request=True)
        admitted.append(i)
        entered[i].set()
        release[i].wait(WAIT)
        gate.leave(request_done=True)
        left[i].set()

    threads = [run_in_thread(holder) for _ in range(slots)]
    try:
        holders_in.wait()  # the slots are taken
        assert gate.running == slots
        for i in range(n):  # queue in a known order
            threads.append(run_in_thread(queued, i))
            assert wait_for(lambda: len(gate.waiting) == i + 1), f"thread {i} did not queue"
        assert admitted == []
        holders_release.set()  # the holders leave: their places pass to the first `slots` in line
        for i in range(n):
            # Threads 0..i-1 have left; i .. i+slots-1 run (the ones admitted together may append
            # in either order); the rest still wait, in line.
            admitted_now = min(i + slots, n)
            assert entered[i].wait(WAIT), f"thread {i} was never admitted"
            assert wait_for(lambda: len(admitted) == admitted_now), f"admitted {admitted}"
            assert sorted(admitted) == list(range(admitted_now)), "not admitted in arrival order"
            assert all(not entered[j].is_set() for j in range(admitted_now, n))
            assert gate.running == admitted_now - i
            assert len(gate.waiting) == n - admitted_now
            release[i].set()
            assert left[i].wait(WAIT)
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert (gate.in_flight, gate.running, len(gate.waiting)) == (0, 0, 0)
    finally:
        holders_release.set()
        for event in release:
            event.set()
        holders_in.abort()
        release_all(gate)


def test_gate_newcomer_queues_behind_waiters_even_below_threshold():
    # threshold 2, slots 1: a continuing request (enter() without new_request) arriving while
    # others wait must not overtake them, even once in_flight is back at the threshold.
    gate = lb.FairGate(slots=1, threshold=2)
    order: list[str] = []
    go = {name: threading.Event() for name in ("b", "c", "late")}
    admitted = {name: threading.Event() for name in go}

    def worker(name: str, new: bool):
        gate.enter(new_request=new)
        order.append(name)
        admitted[name].set()
        go[name].wait(WAIT)
        gate.leave(request_done=new)

    threads = []
    try:
        gate.enter(new_request=True)                    # in_flight 1: running 1
        gate.enter(new_request=True)                    # in_flight 2 <= threshold: running 2
        threads.append(run_in_thread(worker, "b", True))    # in_flight 3: queued
        assert wait_for(lambda: len(gate.waiting) == 1)
        threads.append(run_in_thread(worker, "c", True))    # in_flight 4: queued
        assert wait_for(lambda: len(gate.waiting) == 2)
        gate.leave(request_done=True)                   # in_flight 3, running 2 > slots: running 1
        assert len(gate.waiting) == 2 and gate.running == 1
        gate.leave(request_done=True)                   # in_flight 2: the place passes to b
        assert admitted["b"].wait(WAIT)
        threads.append(run_in_thread(worker, "late", False))  # in_flight 2 <= 2, but c waits
        assert wait_for(lambda: len(gate.waiting) == 2), "the newcomer overtook a waiting thread"
        names = ["b", "c", "late"]
        for i, name in enumerate(names):
            assert admitted[name].wait(WAIT), f"{name} was never admitted"
            assert order == names[:i + 1], "admitted out of arrival order"
            go[name].set()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert (gate.in_flight, gate.running, len(gate.waiting)) == (0, 0, 0)
    finally:
        for event in go.values():
            event.set()
        release_all(gate)
