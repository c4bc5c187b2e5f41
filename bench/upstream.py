#!/usr/bin/env python3
"""Fast benchmark upstream: canned HTTP/1.1 keep-alive responses from an asyncio Protocol (stdlib only).

    python3 bench/upstream.py --port 18001 [--host 127.0.0.1]

    GET /            200, 13-byte body
    GET /big         200, 8 MiB body (one preallocated bytes object, sent in slices with flow control)
    GET /health      200, "ok\\n"
    POST/PUT/...     the request body (Content-Length or chunked) is read and discarded, then 200 small body
    HEAD             the GET head without a body

Requests are parsed incrementally from a buffer, so partial reads and pipelined requests are handled;
responses go out in request order. `Connection: close` (or HTTP/1.0 without keep-alive) closes the
connection after the response. SIGTERM / SIGINT stop the server.
"""
import argparse
import asyncio
import collections
import signal

SMALL_BODY = b"Hello, world\n"
HEALTH_BODY = b"ok\n"
BIG_SIZE = 8 << 20
BIG_BODY = bytes(BIG_SIZE)
WRITE_SLICE = 256 << 10
MAX_HEAD = 64 << 10


def response_head(length, content_type="text/plain"):
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n").encode()


SMALL_HEAD = response_head(len(SMALL_BODY))
HEALTH_HEAD = response_head(len(HEALTH_BODY))
BIG_HEAD = response_head(BIG_SIZE, "application/octet-stream")
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def canned_response(method, path):
    """(head, body) for a request; the body is dropped for HEAD."""
    if method in (b"GET", b"HEAD") and path.startswith(b"/big"):
        head, body = BIG_HEAD, BIG_BODY
    elif path.startswith(b"/health"):
        head, body = HEALTH_HEAD, HEALTH_BODY
    else:
        head, body = SMALL_HEAD, SMALL_BODY
    return head, (b"" if method == b"HEAD" else body)


def header_value(lines, name):
    """Value of the last header `name` (lowercase bytes) in lowercased head lines, or None."""
    value = None
    for line in lines:
        key, sep, rest = line.partition(b":")
        if sep and key.strip() == name:
            value = rest.strip()
    return value


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: a request parser state machine plus an ordered output queue."""

    def __init__(self):
        self.buf = bytearray()
        self.state = "head"          # head | length | chunk_size | chunk_data | trailer
        self.left = 0                # body bytes still to discard in length/chunk_data states
        self.pending = None          # (head, body, close) of the request whose body is being read
        self.out = collections.deque()
        self.paused = False
        self.close_after_output = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_SLICE * 4, low=WRITE_SLICE)

    def connection_lost(self, exc):
        self.out.clear()
        self.transport = None

    # ---- input -------------------------------------------------------------------------------

    def data_received(self, data):
        if self.state in ("length", "chunk_data") and not self.buf:
            data = self.skip_body_bytes(data)
            if not data:
                return
        self.buf += data
        try:
            self.parse_buffer()
        except ValueError:
            self.buf.clear()
            self.send(BAD_REQUEST, b"", close=True)

    def skip_body_bytes(self, data):
        """Fast path: discard body bytes straight from `data` without buffering; return the rest."""
        n = min(self.left, len(data))
        self.left -= n
        if self.left == 0:
            self.finish_body_part()
        return data[n:]

    def parse_buffer(self):
        while self.transport is not None and not self.close_after_output:
            if self.state == "head":
                if not self.parse_head():
                    return
            elif self.state in ("length", "chunk_data"):
                if not self.buf:
                    return
                n = min(self.left, len(self.buf))
                del self.buf[:n]
                self.left -= n
                if self.left == 0:
                    self.finish_body_part()
            else:  # chunk_size or trailer: one CRLF-terminated line
                line = self.take_line()
                if line is None:
                    return
                self.parse_chunk_line(line)

    def take_line(self):
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("line too long")
            return None
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def parse_head(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("head too long")
            return False
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        request_line, _, fields = head.partition(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise ValueError("bad request line")
        method, path, version = parts
        lines = fields.lower().split(b"\r\n") if fields else []
        connection = header_value(lines, b"connection") or b""
        close = b"close" in connection or (version == b"HTTP/1.0" and b"keep-alive" not in connection)
        head_out, body_out = canned_response(method, path)
        self.pending = (head_out, body_out, close)
        if header_value(lines, b"transfer-encoding") is not None:
            self.state = "chunk_size"
        else:
            length = header_value(lines, b"content-length")
            self.left = int(length) if length else 0
            if self.left < 0:
                raise ValueError("negative Content-Length")
            self.state = "length" if self.left else "head"
            if not self.left:
                self.respond_pending()
        return True

    def parse_chunk_line(self, line):
        if self.state == "trailer":
            if not line:
                self.state = "head"
                self.respond_pending()
            return
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size < 0:
            raise ValueError("negative chunk size")
        if size == 0:
            self.state = "trailer"
        else:
            self.state, self.left = "chunk_data", size + 2   # data plus its CRLF

    def finish_body_part(self):
        if self.state == "chunk_data":
            self.state = "chunk_size"
        else:
            self.state = "head"
            self.respond_pending()

    def respond_pending(self):
        head, body, close = self.pending
        self.pending = None
        self.send(head, body, close)

    # ---- output ------------------------------------------------------------------------------

    def send(self, head, body, close):
        self.out.append(memoryview(head + body) if len(body) < WRITE_SLICE else memoryview(head))
        if len(body) >= WRITE_SLICE:
            self.out.append(memoryview(body))
        self.close_after_output = close
        self.pump()

    def pump(self):
        """Write queued bytes in slices until the transport asks us to pause."""
        while self.out and not self.paused and self.transport is not None and not self.transport.is_closing():
            view = self.out[0]
            if len(view) <= WRITE_SLICE:
                self.out.popleft()
                self.transport.write(view)
            else:
                self.transport.write(view[:WRITE_SLICE])
                self.out[0] = view[WRITE_SLICE:]
        if not self.out and self.close_after_output and self.transport is not None:
            self.transport.close()

    def pause_writing(self):
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.paused = False
        self.pump()
        if not self.paused and self.transport is not None and not self.close_after_output:
            self.transport.resume_reading()
            self.parse_buffer()


async def serve(host, port):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096, reuse_address=True)
    async with server:
        await stop.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
