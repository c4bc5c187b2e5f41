"""Unit tests of backend state, round robin and the fair gate in load_balancer.py, without sockets.

Backends are built from URLs whose hosts do not exist (".invalid"): nothing connects until asked,
and nothing here asks. Time-dependent rules (fail_timeout windows and ejections) run on a fake
clock: ``time.monotonic`` patched on the module's ``time`` object, restored by monkeypatch.
Threads are daemons; every wait for one has a timeout, and "a thread is queued" is observed by
polling the gate's queue against a deadline, never by sleeping "long enough".
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


def make(n: int = 3, **settings) -> tuple[list[lb.Backend], lb.RoundRobin]:
    config = lb.Config(backends=URLS[:n], **settings)
    backends = [lb.Backend(url, config) for url in config.backends]
    return backends, lb.RoundRobin(backends)


def take_down(backend: lb.Backend) -> None:
    for _ in range(backend.config.fall):
        backend.record_probe(False, "connection refused")
    assert backend.state == "down"


def picks(rr: lb.RoundRobin, n: int, exclude=()) -> list:
    return [rr.pick(exclude) for _ in range(n)]


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


# ===================================================================================================
# RoundRobin.pick
# ===================================================================================================

def test_backend_from_unresolvable_url_does_not_connect():
    backends, _ = make(2)
    assert [(b.host, b.port) for b in backends] == [("a.invalid", 8001), ("b.invalid", 8002)]
    assert backends[0].host_header == b"a.invalid:8001"
    assert backends[0].state == "up" and len(backends[0].pool) == 0


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


def test_pick_none_when_none_available():
    backends, rr = make(3)
    for backend in backends:
        take_down(backend)
    rr.refresh()
    assert rr.pick() is None
    assert rr.pick(exclude={backends[0]}) is None


def test_rotation_after_a_backend_goes_down_stays_cyclic_and_fair():
    backends, rr = make(4)
    picks(rr, 2)  # start the rotation somewhere in the middle
    take_down(backends[1])
    rr.refresh()
    got = picks(rr, 3000)
    assert_strictly_cyclic(got, {backends[0], backends[2], backends[3]})
    assert Counter(got) == {backends[0]: 1000, backends[2]: 1000, backends[3]: 1000}


def test_rotation_with_one_left():
    backends, rr = make(3)
    take_down(backends[0])
    take_down(backends[2])
    rr.refresh()
    assert picks(rr, 5) == [backends[1]] * 5


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
    rr._available = IndexOnly(backends)
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
    threads_n, per_thread, rounds = 8, 3000, 10

    def one_round() -> Counter:
        start = threading.Barrier(threads_n, timeout=WAIT)
        results = [Counter() for _ in range(threads_n)]

        def worker(i: int) -> None:
            start.wait()
            counts = results[i]
            for _ in range(per_thread):
                counts[rr.pick()] += 1

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        return sum(results, Counter())

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(rounds):
            assert one_round() == {b: threads_n * per_thread // 3 for b in backends}
    finally:
        sys.setswitchinterval(old_interval)


# ===================================================================================================
# Backend.record_probe: rise/fall hysteresis
# ===================================================================================================

@pytest.mark.parametrize("rise, fall", [(1, 1), (2, 3), (5, 4)])
def test_probe_fall_and_rise_exact_counts(rise, fall):
    (backend,), _ = make(1, rise=rise, fall=fall)
    changes = []
    for i in range(fall + 1):
        changes.append((backend.record_probe(False, f"refused #{i}"), backend.state))
    assert changes == [(False, "up")] * (fall - 1) + [(True, "down"), (False, "down")]
    changes = []
    for i in range(rise + 1):
        changes.append((backend.record_probe(True, f"HTTP 200 #{i}"), backend.state))
    assert changes == [(False, "down")] * (rise - 1) + [(True, "up"), (False, "up")]


def test_probe_pass_in_between_resets_fall():
    (backend,), _ = make(1, rise=2, fall=3)
    for ok in (False, False, True, False, False):
        assert backend.record_probe(ok, "x") is False
        assert backend.state == "up"
    assert backend.record_probe(False, "x") is True
    assert backend.state == "down"


def test_probe_fail_in_between_resets_rise():
    (backend,), _ = make(1, rise=2, fall=3)
    take_down(backend)
    for ok in (True, False, True):
        assert backend.record_probe(ok, "x") is False
        assert backend.state == "down"
    assert backend.record_probe(True, "x") is True
    assert backend.state == "up"


def test_probe_reason_mentions_detail():
    (backend,), _ = make(1, rise=2, fall=3)
    backend.record_probe(True, "HTTP 204 in 3 ms")
    assert "HTTP 204 in 3 ms" in backend.reason
    for _ in range(3):
        backend.record_probe(False, "connection refused")
    assert "connection refused" in backend.reason and "3" in backend.reason
    backend.record_probe(True, "HTTP 200")
    backend.record_probe(True, "HTTP 200 again")
    assert "HTTP 200 again" in backend.reason and backend.state == "up"


def test_probe_pass_on_down_and_ejected_backend_changes_nothing_visible(clock):
    backends, _ = make(2, rise=2, fall=3)
    backend = backends[0]
    take_down(backend)
    assert backend.record_failure("connection reset", may_eject=True) is True  # ejected as well
    changed = backend.record_probe(True, "HTTP 200")
    assert backend.state == "down"
    assert changed is False, f"reported a change though it stays down; reason now {backend.reason!r}"


# ===================================================================================================
# Backend.record_failure: max_fails within fail_timeout (passive checks)
# ===================================================================================================

def test_failures_within_window_eject(clock):
    backends, _ = make(2, max_fails=3, fail_timeout=10)
    backend = backends[0]
    results = []
    for i in range(3):
        results.append((backend.record_failure(f"connection reset #{i}", may_eject=True), backend.state))
        clock.advance(1)
    assert results == [(False, "up"), (False, "up"), (True, "down")]
    assert "connection reset #2" in backend.reason and "3 failed request" in backend.reason
    assert backend.errors == 3 and backend.consecutive_failures == 3


def test_failures_while_ejected_do_not_extend(clock):
    backends, _ = make(2, max_fails=1, fail_timeout=10)
    backend = backends[0]
    assert backend.record_failure("first", may_eject=True) is True
    until = backend.ejected_until
    assert until == pytest.approx(clock.now + 10)
    clock.advance(5)
    assert backend.record_failure("second", may_eject=True) is False
    assert backend.ejected_until == until


def test_may_eject_false_never_ejects(clock):
    backends, _ = make(2, max_fails=1, fail_timeout=10)
    backend = backends[0]
    for i in range(20):
        assert backend.record_failure(f"reset #{i}", may_eject=False) is False
    assert backend.state == "up" and backend.ejected_until == 0.0
    assert backend.errors == 20


def test_failure_window_resets_after_fail_timeout(clock):
    backends, _ = make(2, max_fails=2, fail_timeout=10)
    backend = backends[0]
    assert backend.record_failure("a", may_eject=True) is False
    clock.advance(10.5)  # the window of the first failure is over
    assert backend.record_failure("b", may_eject=True) is False
    assert backend.state == "up"
    clock.advance(1)
    assert backend.record_failure("c", may_eject=True) is True
    assert backend.state == "down"


def test_success_resets_consecutive_failures_only(clock):
    backends, _ = make(2, max_fails=2, fail_timeout=10)
    backend = backends[0]
    backend.record_failure("a", may_eject=True)
    backend.record_success()
    assert backend.consecutive_failures == 0
    assert backend.record_failure("b", may_eject=True) is True  # the window still counts both


def test_ejection_ends_after_fail_timeout(clock):
    backends, rr = make(3, max_fails=1, fail_timeout=10)
    a, b, c = backends
    assert b.record_failure("connection refused", may_eject=True) is True
    rr.refresh()
    assert_strictly_cyclic(picks(rr, 10), {a, c})
    clock.advance(9.9)
    assert b not in picks(rr, 10)
    assert b.state == "down"
    clock.advance(0.2)  # past ejected_until: the next pick reviews the rotation
    assert b.state == "up"
    got = picks(rr, 9)
    assert_strictly_cyclic(got, {a, b, c})
    assert b.ejected_until == 0.0


def test_ejection_ends_on_explicit_refresh(clock):
    backends, rr = make(3, max_fails=1, fail_timeout=10)
    b = backends[1]
    b.record_failure("reset", may_eject=True)
    rr.refresh()
    clock.advance(10.1)
    rr.refresh()
    assert rr._available == tuple(backends)
    assert b.ejected_until == 0.0


def test_passing_probe_ends_ejection_early(clock):
    backends, rr = make(3, max_fails=1, fail_timeout=10)
    b = backends[1]
    b.record_failure("reset", may_eject=True)
    rr.refresh()
    assert b not in picks(rr, 6)
    clock.advance(1)
    assert b.record_probe(True, "HTTP 200") is True
    assert b.state == "up" and b.ejected_until == 0.0
    assert "HTTP 200" in b.reason
    rr.refresh()
    assert_strictly_cyclic(picks(rr, 9), set(backends))


@pytest.mark.parametrize("elapsed, expected", [(3, 7), (5.5, 5), (9.5, 1), (9.999, 1), (10.5, 3),
                                               (7.9995, 3)])  # 2.0005 s left: rounded up, never down
def test_retry_after_counts_down_to_the_first_return(clock, elapsed, expected):
    backends, rr = make(3, max_fails=1, fail_timeout=10, health_interval=5)
    start = clock.now
    backends[0].record_failure("reset", may_eject=True)  # back at start + 10
    clock.advance(3)
    backends[1].record_failure("reset", may_eject=True)  # back at start + 13
    clock.now = start + elapsed
    assert rr.retry_after() == expected


@pytest.mark.parametrize("health_interval, expected", [(5, 5), (0.2, 1), (0, 1)])
def test_retry_after_without_ejections_is_health_interval(health_interval, expected):
    backends, rr = make(2, health_interval=health_interval)
    for backend in backends:
        take_down(backend)
    rr.refresh()
    assert rr.retry_after() == expected


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
