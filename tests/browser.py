"""Drive headless Chromium over the Chrome DevTools Protocol, standard library only.

For browser tests::

    with Chromium(width=1280, height=800) as browser:
        browser.open("http://127.0.0.1:8081/")
        browser.wait_for("document.querySelectorAll('tr[data-backend]').length === 3", timeout=5)
        state = browser.evaluate("document.querySelector('td.state').dataset.state")
        browser.screenshot("/tmp/page.png")

One page target, one WebSocket (a minimal RFC 6455 client below), every socket with a timeout,
and the browser's whole process group killed by its id on close(), whatever happened before.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server",  # tests talk to 127.0.0.1; an http_proxy in the environment must not apply
    "--hide-scrollbars", "--mute-audio",
)


class CDPError(RuntimeError):
    """The browser answered a command with an error, or a page script threw."""


class WebSocket:
    """Just enough RFC 6455 for CDP: text messages, client-side masking, ping/pong, fragments."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.buffer = bytearray()
        key = base64.b64encode(os.urandom(16))
        path = parts.path + ("?" + parts.query if parts.query else "")
        # No Origin header: Chromium refuses DevTools WebSockets from origins it was not told about.
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
            if len(self.buffer) > 65536:
                raise ConnectionError("WebSocket handshake: response head too long")
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[:end]
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest()).decode()
        if not head.startswith("HTTP/1.1 101") or accept not in head:
            raise ConnectionError(f"WebSocket handshake refused: {head.splitlines()[0]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools connection")
        self.buffer += chunk

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big"))
        self.sock.sendall(head + mask + masked.to_bytes(n, "big"))

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def _frame(self) -> tuple[bool, int, bytes]:
        """One whole frame. Bytes are consumed only once a frame is complete, so that a timeout
        in the middle of one leaves the stream intact for the next call."""
        while True:
            if len(self.buffer) >= 2:
                b0, b1 = self.buffer[0], self.buffer[1]
                n, at = b1 & 0x7F, 2
                if n == 126 and len(self.buffer) >= 4:
                    n, at = struct.unpack_from("!H", self.buffer, 2)[0], 4
                elif n == 127 and len(self.buffer) >= 10:
                    n, at = struct.unpack_from("!Q", self.buffer, 2)[0], 10
                if (b1 & 0x7F) < 126 or at > 2:
                    masked = b1 & 0x80
                    end = at + (4 if masked else 0) + n
                    if len(self.buffer) >= end:
                        payload = bytes(self.buffer[end - n:end])
                        if masked:
                            mask = self.buffer[at:at + 4]
                            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                        del self.buffer[:end]
                        return bool(b0 & 0x80), b0 & 0x0F, payload
            self._fill()

    def recv(self, timeout: float) -> str:
        """The next text message; TimeoutError after `timeout` seconds without one."""
        self.sock.settimeout(max(timeout, 0.001))
        message = bytearray()
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            message += payload
            if fin:
                return message.decode("utf-8")

    def close(self) -> None:
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


class Chromium:
    """One headless Chromium with one page, driven over CDP.

    Always close() it (or use ``with``): that kills the browser's process group by its id and
    removes the fresh profile directory it was started with."""

    def __init__(self, width: int = 1280, height: int = 800, *, mobile: bool = False, scale: float = 1,
                 javascript: bool = True, timeout: float = 30.0, binary: str = CHROMIUM,
                 args: tuple = ()) -> None:
        self.timeout = timeout
        self.events: collections.deque = collections.deque(maxlen=2000)
        self._id = 0
        self._ws: WebSocket | None = None
        self.profile = tempfile.mkdtemp(prefix="cdp-chromium-")
        self.log = open(os.path.join(self.profile, "chromium.log"), "wb")
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", *args, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: close() can end renderers and zygote too
        try:
            self._ws = WebSocket(self._page_socket_url(), timeout)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.set_viewport(width, height, mobile=mobile, scale=scale)
            if not javascript:
                self.call("Emulation.setScriptExecutionDisabled", value=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _page_socket_url(self) -> str:
        # --remote-debugging-port=0 picks a free port and writes it here: no port to guess or race for.
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                self.log.flush()
                with open(self.log.name, "rb") as f:  # close() removes the profile and its log
                    tail = f.read()[-800:].decode("utf-8", "replace").strip()
                raise CDPError(f"Chromium exited with {self.process.returncode}: {tail}")
            try:
                with open(port_file) as f:
                    port = int(f.readline())
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError("Chromium did not open its DevTools port") from None
                time.sleep(0.05)
        while True:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/json/list")
                targets = json.loads(connection.getresponse().read())
            finally:
                connection.close()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium has no page target")
            time.sleep(0.05)

    def _message(self, deadline: float) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from Chromium in time")
        return json.loads(self._ws.recv(remaining))

    def call(self, method: str, timeout: float | None = None, **params) -> dict:
        """Send one CDP command and return its result; events that arrive meanwhile go to
        `self.events`."""
        self._id += 1
        command_id = self._id
        self._ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = self._message(deadline)
            if message.get("id") == command_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        """The first stored or coming event named `method` (removed from `self.events`)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for event in list(self.events):
            if event["method"] == method:
                self.events.remove(event)
                return event
        while True:
            message = self._message(deadline)
            if message.get("method") == method:
                return message
            if "method" in message:
                self.events.append(message)

    def set_viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=scale, mobile=mobile)

    def open(self, url: str, timeout: float | None = None) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"cannot open {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout)

    def evaluate(self, js: str, timeout: float | None = None):
        """The value of a JavaScript expression in the page (promises awaited), as JSON data."""
        result = self.call("Runtime.evaluate", timeout, expression=js, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{js[:80]!r} threw: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, js_condition: str, timeout: float = 10.0, interval: float = 0.1):
        """Evaluate `js_condition` until it is truthy and return its value; TimeoutError if it is
        not within `timeout` seconds. A condition that throws counts as not yet true."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.evaluate(js_condition, timeout=max(1.0, deadline - time.monotonic()))
                if last:
                    return last
            except CDPError as error:
                last = error
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not true within {timeout} s: {js_condition} (last: {last})")
            time.sleep(interval)

    def screenshot(self, path: str, full_page: bool = False) -> str:
        """Save a PNG of the viewport (or of the whole page) and return its path."""
        params: dict = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.call("Page.captureScreenshot", **params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def html(self) -> str:
        """The page's current DOM as HTML, read through the DOM domain: works with scripts off."""
        root = self.call("DOM.getDocument", depth=0)["root"]
        return self.call("DOM.getOuterHTML", nodeId=root["nodeId"])["outerHTML"]

    def console_errors(self) -> list[str]:
        """Uncaught exceptions and console.error() calls seen so far (from stored events)."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        return found

    def close(self) -> None:
        """End the browser (its whole process group, by id) and remove its profile. Idempotent."""
        if self._ws is not None:
            try:
                self._ws.close()
            except OSError:
                pass
            self._ws = None
        if self.process.returncode is None:
            for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.process.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self.process.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children (renderer, zygote) that outlived the main process
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self.log.closed:
            self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def dump_dom(url: str, *, javascript: bool = True, timeout: float = 30.0, binary: str = CHROMIUM,
             args: tuple = ()) -> str:
    """The DOM of `url` once loaded, like --dump-dom prints it.

    Not --dump-dom itself: in new headless mode it reads the DOM with a script, so with
    ``--blink-settings=scriptEnabled=false`` it prints nothing. DOM.getOuterHTML needs no script."""
    if not javascript:
        args = (*args, "--blink-settings=scriptEnabled=false")
    with Chromium(timeout=timeout, binary=binary, args=args) as browser:
        browser.open(url, timeout)
        return browser.html()
