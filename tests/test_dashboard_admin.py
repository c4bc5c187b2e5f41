"""The dashboard's admin buttons with --admin-token, and what its first paint and its chart show,
in headless Chromium (tests/browser.py) and in the page as served.

* With --admin-token, a button's POST is answered 401; the page then asks for the token once
  (a form, not a prompt), keeps it in the tab's sessionStorage, sends it as
  ``Authorization: Bearer`` and carries the action out; a wrong token is asked for again; later
  actions, also after a reload of the page, need no asking; "Forget" removes it.
* The first paint (the page as served, before any script runs) shows requests/s from the
  balancer's history instead of "–"; the chart counts every request and shows the balancer's own
  503s (no upstream available) in red.

The confirm() dialogs of Drain and Maint are accepted through CDP (Page.handleJavaScriptDialog);
waiting is on the page's state (Chromium.wait_for) or /status (wait_until), never a fixed sleep.
The browser's process group is killed by its id when the module ends.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser


from conftest import free_port, get, lb, wait_until

TOKEN = "s3cret token"


def status(admin_port: int, query: str = "") -> dict:
    r = get(admin_port, "/status" + query)
    assert r.status == 200, r
    return json.loads(r.body)


def admin_of(b, name: str) -> str:
    return next(x["admin"] for x in status(b.admin_port)["backends"] if x["name"] == name)


def open_live(browser, b) -> None:
    browser.open(f"http://127.0.0.1:{b.admin_port}/", timeout=10)
    browser.wait_for("document.getElementById('live').classList.contains('ok')", timeout=5)


def click(browser, name: str, action: str) -> None:
    """Click a row's button; accept the confirm() that Drain and Maint ask."""
    selector = json.dumps(f'tr[data-backend="{name}"] button[data-act="{action}"]')
    # From a timer: an evaluate that opened a dialog would not return until it is closed.
    browser.evaluate(f"setTimeout(() => document.querySelector({selector}).click(), 0), true")
    if action in ("drain", "maint"):
        browser.wait_event("Page.javascriptDialogOpening", timeout=5)
        browser.call("Page.handleJavaScriptDialog", accept=True)


def give_token(browser, token: str) -> None:
    browser.evaluate(f"document.getElementById('token-input').value = {json.dumps(token)};"
                     "document.getElementById('token').requestSubmit(), true")


TOKEN_FORM_SHOWN = "!document.getElementById('token').hidden"


def test_admin_buttons_ask_for_the_token_once_and_send_it(browser, upstreams, balancer):
    ups = upstreams(2)
    b = balancer([f"{u.url},name={n}" for u, n in zip(ups, "ab")], admin_port=free_port(),
                 admin_token=TOKEN)
    open_live(browser, b)
    assert not browser.evaluate(TOKEN_FORM_SHOWN)

    click(browser, "a", "drain")  # no token yet: 401, and the page asks for it
    browser.wait_for(TOKEN_FORM_SHOWN, timeout=5)
    assert "--admin-token" in browser.evaluate("document.getElementById('token-why').textContent")
    assert admin_of(b, "a") == "ready"

    give_token(browser, "wrong")  # refused: asked again, and the drain still waits
    browser.wait_for(TOKEN_FORM_SHOWN + " && document.getElementById('token-why').textContent"
                     ".includes('refused')", timeout=5)
    assert admin_of(b, "a") == "ready"

    give_token(browser, TOKEN)  # the drain goes through, without asking to confirm again
    assert wait_until(lambda: admin_of(b, "a") == "drain", timeout=5)
    browser.wait_for("document.getElementById('toast').textContent === 'a: drain accepted'", timeout=5)
    assert not browser.evaluate(TOKEN_FORM_SHOWN)
    assert browser.evaluate("sessionStorage.getItem('load_balancer.admin_token')") == TOKEN

    click(browser, "b", "maint")  # kept: not asked again
    assert wait_until(lambda: admin_of(b, "b") == "maint", timeout=5)
    assert not browser.evaluate(TOKEN_FORM_SHOWN)

    open_live(browser, b)  # a reload: the tab's sessionStorage keeps it
    click(browser, "a", "ready")
    assert wait_until(lambda: admin_of(b, "a") == "ready", timeout=5)
    assert not browser.evaluate(TOKEN_FORM_SHOWN)
    posts = [e["params"]["request"] for e in browser.events if e["method"] == "Network.requestWillBeSent"
             and e["params"]["request"]["method"] == "POST"]
    assert [(p["url"].rsplit("/", 2)[-2:], p["headers"].get("Authorization")) for p in posts] == [
        (["a", "ready"], f"Bearer {TOKEN}")], posts

    browser.evaluate("document.getElementById('token-forget').click(), true")
    assert browser.evaluate("sessionStorage.getItem('load_balancer.admin_token')") is None
    assert browser.console_errors() == [], browser.console_errors()


class RateTile(HTMLParser):
    """The text of the requests/s tile (#t-rps) in the page as served."""

    def __init__(self):
        super().__init__()
        self.inside, self.text = False, None

    def handle_starttag(self, tag, attrs):
        self.inside = dict(attrs).get("id") == "t-rps"

    def handle_data(self, data):
        if self.inside:
            self.text = (self.text or "") + data

    def handle_endtag(self, tag):
        self.inside = False


def served_rate(admin_port: int) -> str:
    r = get(admin_port, "/")
    assert r.status == 200, r
    tile = RateTile()
    tile.feed(r.body.decode("utf-8"))
    return tile.text


def test_the_first_paint_shows_requests_per_second_once_two_samples_are_known(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], admin_port=free_port())
    for i in range(5):
        assert get(b.port, f"/r{i}").status == 200
    # Two samples a second apart (the first is taken at start, the next at the next whole second).
    times = lambda: status(b.admin_port, "?history=1")["history"]["t"]
    assert wait_until(lambda: times()[-1] - times()[0] >= 0.25, timeout=5)
    assert re.fullmatch(r"\d+(\.\d)?[kM]?", served_rate(b.admin_port)), served_rate(b.admin_port)


def test_the_served_rate_is_the_last_interval_of_the_history():
    history = {"t": [100.0, 101.0, 102.0], "requests_total": [0, 10, 35], "failed_total": [0, 0, 0]}
    page = lb.render_dashboard({"history": history})
    assert '<b id="t-rps">25.0</b>' in page  # the script's rate(): one decimal below 100
    for unknown in ({"t": [100.0], "requests_total": [3]}, {"t": [100.0, 100.1], "requests_total": [3, 4]},
                    None, {"t": "odd"}, {"t": [1, 2], "requests_total": [5, None]}):
        assert '<b id="t-rps">–</b>' in lb.render_dashboard({"history": unknown})


def test_the_chart_shows_the_balancers_own_503s(browser, upstreams, balancer):
    up, = upstreams(1)
    b = balancer([f"{up.url},name=a"], admin_port=free_port())
    assert get(b.admin_port, "/backends/a/maint", method="POST").status == 200
    for i in range(10):
        assert get(b.port, f"/nothing{i}").status == 503

    def sampled() -> bool:  # a history sample taken after the 503s
        history = status(b.admin_port, "?history=1")["history"]
        return history["failed_total"][-1] == 10 and history["requests_total"][-1] == 10
    assert wait_until(sampled, timeout=5)
    open_live(browser, b)
    errors = browser.evaluate("document.querySelector('#chart .er').getAttribute('d')")
    assert errors and errors.startswith("M"), errors  # a red spike where the 503s were
    assert browser.evaluate("document.querySelector('#chart .ln').getAttribute('d')")
    assert browser.evaluate("document.getElementById('t-failed').textContent") == "10"
    assert browser.evaluate("document.getElementById('t-rps').textContent") != "–"
    assert browser.console_errors() == [], browser.console_errors()
