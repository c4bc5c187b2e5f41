"""The access log is a log a machine can read: each line exactly --access-log-format, nothing
before it, in a destination of its own (--access-log FILE, or standard output), reopened on
SIGUSR1 by every process (log rotation); the error log stays on standard error. A line for an
answer the balancer wrote itself (502, 504) names the upstream that was tried. Repeated warnings
are rate-limited by one rule, and the end of a burst is summarised too.

Through the real CLI process (conftest's `cli`, killed by PID at teardown) where the feature is
about processes and files, the in-process balancer elsewhere; every socket has a timeout, waiting
is on log lines, files or /status with wait_until.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import pytest

import load_balancer as lb
from conftest import (SlowUpstreamHandler, all_workers_listening, free_port, get, must_get, wait_until,
                      worker_pids)

# Apache's and nginx's combined format: what GoAccess's COMBINED log format reads.
# Apache's combined format, then the request ID (a field parsers of that format leave alone at the
# end of a line; --request-id-header '' leaves it out).
COMBINED = re.compile(r'(?P<host>\S+) - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
                      r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?:\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"'
                      r' (?P<request_id>[0-9a-f]{32})')


def start(cli, *args: str, workers: int = 1):
    p = cli(["--host", "127.0.0.1", "--port", "0", "--health-interval", "0", "--workers", str(workers),
             *args]).wait_ready()
    if workers > 1:
        assert wait_until(lambda: all_workers_listening(p, workers), timeout=5), p.stderr_text()
    return p


def lines_of(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def test_json_lines_in_their_own_file_parse_as_json(cli, upstreams, tmp_path):
    up, = upstreams(1)
    path = tmp_path / "access.log"
    p = start(cli, "--access-log", str(path), "--access-log-format", "json", "--backend", f"{up.url},name=app")
    for i in range(3):
        must_get(p, f"/json{i}?q=1")
    assert wait_until(lambda: len(lines_of(path)) == 3, timeout=5), lines_of(path)
    records = [json.loads(line) for line in lines_of(path)]
    assert [(r["target"], r["status"], r["upstream"]) for r in records] == [
        (f"/json{i}?q=1", 200, "app") for i in range(3)]
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    assert p.stop() == 0
    assert "/json" not in p.stderr_text(), p.stderr_text()  # the error log has none of them
    assert p.wait_ended(5)
    assert p.stdout_lines == []


def test_the_flag_alone_writes_bare_lines_to_standard_output(cli, upstreams):
    up, = upstreams(1)
    p = start(cli, "--access-log", "--access-log-format", "combined", "--backend", up.url)
    assert get(p.port, "/combined-line", headers={"User-Agent": "probe/1", "Referer": "http://r.example/"}
               ).status == 200
    assert p.stop() == 0
    assert p.wait_ended(5)
    lines = p.stdout_lines
    assert len(lines) == 1, lines
    match = COMBINED.fullmatch(lines[0])
    assert match, lines[0]
    assert (match["request"], match["status"], match["referer"], match["agent"]) == (
        "GET /combined-line HTTP/1.1", "200", "http://r.example/", "probe/1"), lines[0]
    assert "/combined-line" not in p.stderr_text()
    assert "listening on http://" in p.stderr_text()  # the error log stays on standard error


@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_sigusr1_reopens_the_access_log_in_every_process(workers, cli, upstreams, tmp_path):
    """logrotate's way: move the file, send SIGUSR1 to the balancer (the supervisor), and every
    process writes on in a new file at the path; nothing more goes to the moved one."""
    up, = upstreams(1)
    path = tmp_path / "access.log"
    p = start(cli, "--access-log", str(path), "--admin-port", str(free_port()), "--backend", up.url,
              workers=workers)
    for i in range(4):
        must_get(p, f"/before{i}")
    assert wait_until(lambda: len(lines_of(path)) == 4, timeout=5), lines_of(path)
    os.rename(path, tmp_path / "access.log.1")

    os.kill(p.proc.pid, signal.SIGUSR1)
    pids = {p.proc.pid} | (worker_pids(p.proc.pid) if workers > 1 else set())

    def reopened() -> set:
        return {int(m.group(1)) for m in re.finditer(r"\[(\d+)\] SIGUSR1: access log (\S+) reopened",
                                                     p.stderr_text()) if m.group(2) == str(path)}
    assert wait_until(lambda: reopened() == pids, timeout=5), p.stderr_text()

    # Requests until every worker has served some since the rotation.
    served = lambda: [w["requests"] for w in json.loads(get(p.admin_port, "/status").body)["workers"]]
    before, sent = served(), 0
    while sent < 4 or not all(now > then for now, then in zip(served(), before)):
        must_get(p, f"/after{sent}")
        sent += 1
        assert sent < 200, (served(), before)
    assert wait_until(lambda: len(lines_of(path)) == sent, timeout=5), (sent, lines_of(path))
    assert all("/after" in line for line in lines_of(path)), lines_of(path)
    # Each process appends its own lines: across two workers the order of two requests a moment
    # apart is the order of their writes, not of the requests.
    assert sorted(line.split('"')[1] for line in lines_of(tmp_path / "access.log.1")) == [
        f"GET /before{i} HTTP/1.1" for i in range(4)]
    assert p.stop() == 0, p.stderr_text()


def test_an_access_log_that_cannot_be_opened_is_one_error_line(cli, upstreams, tmp_path):
    up, = upstreams(1)
    p = cli(["--port", "0", "--access-log", str(tmp_path / "missing" / "access.log"), "--backend", up.url])
    assert p.proc.wait(10) == 2
    assert p.wait_ended(5)
    assert p.stderr_text().splitlines() == [
        f"{p.prog}: error: cannot open --access-log {tmp_path}/missing/access.log: "
        "no such file or directory (see --help)"]


@pytest.mark.parametrize("style", ["short", "json"])
def test_a_504_line_names_the_upstream_that_was_tried(style, upstreams, balancer, caplog):
    """As nginx's $upstream_addr: the upstream that did not answer in time is named; in json its
    status is null (it sent none)."""
    caplog.set_level(logging.INFO, logger="load_balancer.access")
    slow = SlowUpstreamHandler()
    up, = upstreams(1, slow)
    try:
        b = balancer([f"{up.url},name=app"], access_log="-", access_log_format=style, timeout=0.3)
        assert get(b.port, "/slow").status == 504
    finally:
        slow.release.set()
    records = lambda: [r.getMessage() for r in caplog.records if r.name == "load_balancer.access"]
    assert wait_until(lambda: len(records()) == 1, timeout=5), records()
    line = records()[0]
    if style == "short":
        assert re.fullmatch(rf'127\.0\.0\.1 "GET /slow HTTP/1\.1" 504 {re.escape(up.url)} \d+\.\dms [0-9a-f]{{32}}', line), line
    else:
        record = json.loads(line)
        assert (record["status"], record["upstream"], record["upstream_address"],
                record["upstream_status"]) == (504, "app", f"127.0.0.1:{up.port}", None), record


def test_the_old_switch_still_means_standard_output():
    config = lb.Config(backends=("http://127.0.0.1:1",), access_log=True)
    assert config.access_log == "-"
    assert lb.Config(backends=("http://127.0.0.1:1",), access_log=False).access_log is None


def test_the_end_of_a_burst_of_503s_is_summarised(upstreams, balancer, caplog, monkeypatch):
    """One rule for every repeated warning (an upstream's failures, refused connections, 503s):
    the first in full, the rest counted and summarised by a timer, so the counts add up even when
    nothing comes after the burst."""
    monkeypatch.setattr(lb, "LOG_SUMMARY_SECONDS", 0.3)
    caplog.set_level(logging.WARNING, logger="load_balancer")
    up, = upstreams(1)
    b = balancer([f"{up.url},name=app"], admin_port=free_port())
    assert get(b.admin_port, "/backends/app/maint", method="POST").status == 200
    for i in range(5):
        assert get(b.port, f"/nothing{i}").status == 503
    summary = "requests answered 503: no upstream is available: 4 more in the last 0.3s"
    assert wait_until(lambda: summary in [r.getMessage() for r in caplog.records], timeout=3), \
        [r.getMessage() for r in caplog.records]
    assert [r.getMessage() for r in caplog.records if "503" in r.getMessage()] == [
        "requests answered 503: no upstream is available", summary]


def test_a_line_that_cannot_be_written_is_said_in_the_error_log(caplog, monkeypatch):
    """A full disk (/dev/full) loses lines, as in nginx: one warning, then a count, no traceback."""
    monkeypatch.setattr(lb, "LOG_SUMMARY_SECONDS", 0.3)
    caplog.set_level(logging.WARNING, logger="load_balancer")
    handler = lb.AccessLogFile("/dev/full")
    try:
        for i in range(3):
            handler.handle(logging.makeLogRecord({"msg": f"line {i}", "levelno": logging.INFO}))
        expected = ["access log /dev/full: cannot write: no space left on device; the line is lost",
                    "access log /dev/full: 2 more line(s) lost in the last 0.3s"]
        assert wait_until(lambda: [r.getMessage() for r in caplog.records] == expected, timeout=3), \
            [r.getMessage() for r in caplog.records]
    finally:
        handler.close()
