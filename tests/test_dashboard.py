"""The admin dashboard (GET / on the admin listener) in a real browser: headless Chromium driven
over the DevTools protocol by tests/browser.py.

What is proved, and how:

* Every upstream has its row (``tr[data-backend=NAME]``), its state in the state cell's
  ``data-state``, matching /status; the numbers follow traffic: ``#requests-total`` and each row's
  ``.requests`` cell reach the counts /status has after requests are sent (the page polls /status
  once a second).
* An upstream taken down by active health checks (its /health starts failing; fall=1, 0.2 s
  interval) is shown as down within 2 s of /status saying so.
* A screenshot of the live page is written under pytest's tmp_path (its path is printed, and is in
  the assertion message).
* With JavaScript off the page is a complete snapshot: the server renders every row and number.
* Every request the page makes goes to its own origin (the browser's Network events), the HTML
  names no external URL, and it has a viewport meta element.

One Chromium serves the whole module (it takes seconds to start on this machine); each test has
its own balancer and upstreams on ephemeral 127.0.0.1 ports. Waiting is on the page's state
(Chromium.wait_for) or /status (conftest.wait_until), never a fixed sleep. The browser's process
group is killed by its id when the module ends (Chromium.close, in a `finally`).
"""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from urllib.parse import urlsplit


from conftest import HEALTH, HealthSwitch, free_port, get, wait_until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def status(admin_port: int) -> dict:
    r = get(admin_port, "/status")
    assert r.status == 200, r
    return json.loads(r.body)


def start(upstreams, balancer, n: int = 3):
    switches = [HealthSwitch(failing_code=503) for _ in range(n)]
    ups = [upstreams(1, s)[0] for s in switches]
    b = balancer([u.url for u in ups], admin_port=free_port(), health_path=HEALTH,
                 health_interval=0.2, fall=1)
    return b, ups, switches


def open_live(browser, b) -> str:
    """Load the dashboard and wait until its script has had an answer from /status."""
    url = f"http://127.0.0.1:{b.admin_port}/"
    browser.open(url, timeout=10)
    browser.wait_for("document.documentElement.className === 'js' && "
                     "document.getElementById('live').classList.contains('ok')", timeout=5)
    return url


ROWS_JS = """Array.from(document.querySelectorAll('#rows tr[data-backend]')).map((tr) => ({
  name: tr.dataset.backend, state: tr.querySelector('td.state').dataset.state,
  requests: tr.querySelector('td.requests').textContent}))"""


def row_state(name: str) -> str:
    return f"document.querySelector('tr[data-backend=\"{name}\"] td.state').dataset.state"


def test_rows_states_and_numbers_follow_traffic(browser, upstreams, balancer, tmp_path):
    b, ups, _ = start(upstreams, balancer)
    url = open_live(browser, b)
    names = [x["name"] for x in status(b.admin_port)["backends"]]
    assert names == [f"127.0.0.1:{u.port}" for u in ups]
    rows = browser.evaluate(ROWS_JS)
    assert [r["name"] for r in rows] == names, rows
    assert [r["state"] for r in rows] == [x["state"] for x in status(b.admin_port)["backends"]] == ["up"] * 3
    assert browser.evaluate("document.getElementById('requests-total').textContent") == "0"
    assert [r["requests"] for r in rows] == ["0"] * 3, rows

    for i in range(6):
        assert get(b.port, f"/traffic{i}").status == 200
    st = status(b.admin_port)
    assert st["requests_total"] == 6 and [x["requests"] for x in st["backends"]] == [2, 2, 2], st
    browser.wait_for("document.getElementById('requests-total').textContent === '6'", timeout=5)
    browser.wait_for(ROWS_JS + ".every((r) => r.requests === '2')", timeout=5)
    assert browser.evaluate("document.getElementById('r-2xx').textContent") == "6"

    shot = tmp_path / "dashboard.png"
    browser.screenshot(str(shot), full_page=True)
    print(f"\ndashboard screenshot: {shot}")
    data = shot.read_bytes() if shot.exists() else b""
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, f"screenshot {shot}: {len(data)} bytes"

    assert browser.console_errors() == [], f"{browser.console_errors()} (screenshot {shot})"
    origin = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
    fetched = [e["params"]["request"]["url"] for e in browser.events
               if e["method"] == "Network.requestWillBeSent"]
    assert f"{origin}/status?history=1" in fetched and f"{origin}/status" in fetched, fetched
    foreign = [u for u in fetched if not (u.startswith(origin + "/") or u.startswith("data:"))]
    assert foreign == [], f"requests to other origins: {foreign}"


def test_upstream_taken_down_is_shown_within_2_seconds(browser, upstreams, balancer):
    b, ups, switches = start(upstreams, balancer)
    open_live(browser, b)
    name = f"127.0.0.1:{ups[1].port}"
    assert browser.evaluate(row_state(name)) == "up"
    switches[1].healthy = False
    assert wait_until(lambda: status(b.admin_port)["backends"][1]["state"] == "down", timeout=5, interval=0.02)
    seen_down = time.monotonic()
    browser.wait_for(f"{row_state(name)} === 'down'", timeout=2, interval=0.05)
    assert time.monotonic() - seen_down < 2
    assert [r["state"] for r in browser.evaluate(ROWS_JS)] == ["up", "down", "up"]
    browser.wait_for("document.querySelector('#n-down b').textContent === '1'", timeout=2)
    assert browser.evaluate("document.title").startswith("\u25bc 1 down")


class PageScan(HTMLParser):
    """Attributes that name a URL, meta elements, and the rows with their cells' classes and text."""

    URL_ATTRIBUTES = {"src", "href", "action", "formaction", "poster", "data", "srcset", "background"}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.metas: list[dict] = []
        self.html_class = None
        self.rows: dict = {}
        self.row = None
        self.cell = None
        self.ids: dict = {}
        self.in_id = None
        self.styles: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in self.URL_ATTRIBUTES and v is not None]
        if "style" in a and a["style"]:
            self.styles.append(a["style"])
        if tag == "html":
            self.html_class = a.get("class")
        elif tag == "meta":
            self.metas.append(a)
        elif tag == "style":
            self.in_style = True
        elif tag == "tr" and "data-backend" in a:
            self.row = self.rows.setdefault(a["data-backend"], {})
        elif tag == "td" and self.row is not None:
            self.cell = (a.get("class") or "").split()[0]
            self.row[self.cell] = ""
            if "data-state" in a:
                self.row["data-state"] = a["data-state"]
        if "id" in a:
            self.in_id = a["id"]
            self.ids[self.in_id] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None
        elif tag == "td":
            self.cell = None
        elif tag == "style":
            self.in_style = False
        self.in_id = None

    def handle_data(self, data):
        if self.in_style:
            self.styles.append(data)
        if self.row is not None and self.cell is not None:
            self.row[self.cell] += data
        if self.in_id is not None:
            self.ids[self.in_id] += data


def test_page_without_javascript_is_a_complete_snapshot(browser, upstreams, balancer):
    b, ups, _ = start(upstreams, balancer)
    for i in range(5):
        assert get(b.port, f"/nojs{i}").status == 200
    st = status(b.admin_port)
    browser.call("Emulation.setScriptExecutionDisabled", value=True)
    try:
        browser.open(f"http://127.0.0.1:{b.admin_port}/", timeout=10)
        dom = browser.html()
        table_shown = browser.evaluate(
            "(() => { const t = document.getElementById('upstreams'), r = t.getBoundingClientRect();"
            " return getComputedStyle(t).display !== 'none' && r.height > 0 && r.width > 0; })()")
    finally:
        browser.call("Emulation.setScriptExecutionDisabled", value=False)
    scan = PageScan()
    scan.feed(dom)
    assert scan.html_class == "nojs", "the page script ran: this is not the page without JavaScript"
    assert table_shown, "the upstream table is not displayed without JavaScript"
    assert list(scan.rows) == [x["name"] for x in st["backends"]], scan.rows
    for x in st["backends"]:
        row = scan.rows[x["name"]]
        assert row["data-state"] == x["state"] == "up", row
        assert row["requests"].strip() == str(x["requests"]), row
    assert [int(scan.rows[x["name"]]["requests"]) for x in st["backends"]] == [2, 2, 1]
    assert scan.ids["requests-total"] == str(st["requests_total"]) == "5", scan.ids


def test_page_names_no_external_url_and_has_a_viewport(upstreams, balancer):
    """Static: the HTML as served (no browser needed) fetches nothing from elsewhere."""
    b, _, _ = start(upstreams, balancer)
    r = get(b.admin_port, "/")
    assert r.status == 200 and r.header("Content-Type") == "text/html; charset=utf-8", r
    scan = PageScan()
    scan.feed(r.body.decode("utf-8"))
    origin = f"http://127.0.0.1:{b.admin_port}"
    assert scan.urls, "no URL attribute at all: the scan is broken"
    for url in scan.urls:
        parts = urlsplit(url)
        same_origin = url.startswith(origin + "/")
        relative = not parts.scheme and not parts.netloc
        assert same_origin or relative or parts.scheme == "data", f"external URL {url!r}"
    for css in scan.styles:
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", css) + re.findall(r"@import\s+['\"]([^'\"]+)", css):
            assert not urlsplit(url).scheme or url.startswith(origin + "/") or url.startswith("data:"), url
    viewports = [m for m in scan.metas if m.get("name") == "viewport"]
    assert len(viewports) == 1 and "width=device-width" in viewports[0].get("content", ""), scan.metas
