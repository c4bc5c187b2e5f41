#!/usr/bin/env python3
"""Fast benchmark upstream: canned HTTP/1.1 keep-alive responses from an asyncio Protocol (stdlib only).

    python3 bench/upstream.py --port 18001 [--host 127.0.0.1]

    GET /            200, 13-byte body
    GET /big         200, 8 MiB body (one preallocated bytes object, sent in slices with flow control)
    GET /health      200, "ok\\n"
    GET /ws          with Upgrade: websocket, a WebSocket echo (RFC 6455): 101 with Sec-WebSocket-Accept,
                     then every text/binary/continuation frame comes back unmasked as it was sent,
                     ping gets pong, close gets close (same status code) and the connection ends
    POST/PUT/...     the request body (Content-Length or chunked) is read and discarded, then 200 small body
    HEAD             the GET head without a body

Requests are parsed incrementally from a buffer, so partial reads and pipelined requests are handled;
responses go out in request order. `Connection: close` (or HTTP/1.0 without keep-alive) closes the
connection after the response. A WebSocket connection stays open until the client's close frame,
an unmasked client frame (close 1002) or a frame over 64 MiB (close 1009). SIGTERM / SIGINT stop
the server.
"""
import argparse
import asyncio
import base64
import collections
import hashlib
import signal
import struct

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
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_MAX_PAYLOAD = 64 << 20
WS_KEY_CACHE = 8             # per connection: mask keys of large frames whose repeated-key integers are kept
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def canned_response(method, path):
    """(head, body) for a request; the body is dropped for HEAD."""
    if method in (b"GET", b"HEAD") and path.startswith(b"/big"):
        head, body = BIG_HEAD, BIG_BODY
    elif path.startswith(b"/health"):
        head, body = HEALTH_HEAD, HEALTH_BODY
    else:
        head, body = SMALL_HEAD, SMALL_BODY
    return head, (b"" if method == b"HEAD" else body)


def websocket_accept(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def xor_mask(data, key, cache=None):
    """`data` XOR the 4-byte `key` repeated (masking and unmasking are the same), as one big-integer
    XOR: about 2-4 ms per MiB, where a Python loop over the bytes takes about 100 ms. `cache` keeps
    the integer of the repeated key for large frames (a client that reuses keys)."""
    n = len(data)
    if not n:
        return b""
    mask = cache.get((key, n)) if cache is not None else None
    if mask is None:
        mask = int.from_bytes((key * (n // 4 + 1))[:n], "little")
        if cache is not None and n >= 65536:
            if len(cache) >= WS_KEY_CACHE:
                cache.clear()
            cache[(key, n)] = mask
    return (int.from_bytes(data, "little") ^ mask).to_bytes(n, "little")


def ws_frame_head(first_byte, length):
    """An unmasked (server) frame head: FIN/opcode byte, then the 7-, 16- or 64-bit length."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return struct.pack("!BBH", first_byte, 126, length)
    return struct.pack("!BBQ", first_byte, 127, length)


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
        self.state = "head"          # head | length | chunk_size | chunk_data | trailer | ws
        self.left = 0                # body bytes still to discard in length/chunk_data states
        self.pending = None          # (head, body, close) of the request whose body is being read
        self.out = collections.deque()
        self.paused = False
        self.close_after_output = False
        self.transport = None
        self.mask_cache = {}

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
            elif self.state == "ws":
                if not self.parse_ws_frame():
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
        if method == b"GET" and path.startswith(b"/ws") and b"upgrade" in connection and \
                b"websocket" in (header_value(lines, b"upgrade") or b""):
            self.accept_websocket(fields.split(b"\r\n"), version)
            return True
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

    # ---- WebSocket ---------------------------------------------------------------------------

    def accept_websocket(self, fields, version):
        """Answer the opening handshake (101, or 400 without a key or version 13) and switch to frames."""
        key = ws_version = None
        for line in fields:   # original case: the key is base64
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
            elif sep and name.strip().lower() == b"sec-websocket-version":
                ws_version = value.strip()
        if not key or ws_version != b"13" or version != b"HTTP/1.1":
            self.send(BAD_REQUEST, b"", close=True)
            return
        self.state = "ws"
        self.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n\r\n", b"", close=False)

    def parse_ws_frame(self):
        """Handle one complete client frame from the buffer; False when more bytes are needed."""
        buf = self.buf
        if len(buf) < 2:
            return False
        first, second = buf[0], buf[1]
        length, offset = second & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return False
            length, offset = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return False
            length, offset = int.from_bytes(buf[2:10], "big"), 10
        if not second & 0x80:
            self.ws_close(1002)   # RFC 6455 section 5.1: a client frame must be masked
            return False
        if length > WS_MAX_PAYLOAD:
            self.ws_close(1009)
            return False
        end = offset + 4 + length
        if len(buf) < end:
            return False
        key = bytes(buf[offset:offset + 4])
        payload = xor_mask(bytes(buf[offset + 4:end]), key, self.mask_cache)
        del buf[:end]
        opcode = first & 0x0F
        if opcode in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
            self.ws_send(first & 0x8F, payload)          # echo as sent: FIN and opcode kept
        elif opcode == OP_PING:
            self.ws_send(0x80 | OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self.ws_send(0x80 | OP_CLOSE, payload[:2], close=True)
            return False
        elif opcode != OP_PONG:
            self.ws_close(1002)
            return False
        return True

    def ws_send(self, first_byte, payload, close=False):
        self.send(ws_frame_head(first_byte, len(payload)), payload, close)

    def ws_close(self, code):
        self.buf.clear()
        self.ws_send(0x80 | OP_CLOSE, code.to_bytes(2, "big"), close=True)

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
