#!/usr/bin/env python3
"""A round-robin HTTP/1.1 load balancer in one file, standard library only.

Run it::

    python3 load_balancer.py                     # port 8080, over SERVER_URLS below
    python3 load_balancer.py --backend http://10.0.0.5:8000,weight=3 --backend http://10.0.0.6:8000
    python3 load_balancer.py --backends-file backends.txt --workers auto --admin-port 8081
    python3 load_balancer.py --help              # every option with its default

What happens to a request, in order:

* A ``ThreadingHTTPServer`` accepts the connection (one thread each, at most
  ``--max-connections``; a finished connection's thread waits as a spare for the next one), does
  the TLS handshake on that thread if the listener speaks HTTPS, and keeps the connection alive
  between requests (HTTP/1.1, HTTP/1.0 keep-alive).
* The request head is read against a deadline and checked strictly (RFC 9112): anything that two
  HTTP implementations could frame differently is refused with a 4xx before a byte of it reaches
  an upstream. The client's address is the connection's, or what a PROXY protocol header or a
  trusted proxy's ``X-Forwarded-For`` says (``identify``); ``--allow``/``--deny`` and
  ``--rate-limit`` judge it (``Guard``), and the request gets its ``X-Request-ID``.
* ``RoundRobin`` picks the next upstream (one ``itertools.count`` over a precomputed smooth
  weighted cycle, O(1), no lock), skipping the ones that health checks, failed requests or an
  operator took out of rotation; backups only when no primary can answer. ``--balance leastconn``
  (the fewest in flight, counted across workers), ``--balance hash`` (a consistent-hash ring) and
  ``--sticky-cookie`` read the request: a ``Route`` per request does that.
  An upstream at its ``maxconn`` makes a request wait in the balancer's queue (``RequestQueue``).
* ``Transport.round_trip`` sends it on a pooled keep-alive connection (TCP, TLS or a Unix socket,
  with a PROXY header where the backend asks for one), its body streamed in bounded pieces while
  the upstream is watched for an early answer; hop-by-hop headers are removed and
  ``X-Forwarded-*`` set. The response comes back the same way, bytes passed on as they arrive;
  after a ``101`` the connection becomes a tunnel (WebSocket).
* Every failure with an upstream is one ``UpstreamError`` whose kind ``classify`` named. When no
  upstream can answer, the client gets 502, 503 or 504 with a one-line reason, from the one
  function that builds every answer of the balancer's own (``error_response``). A request is
  tried on the next upstream only while that is safe (see ``ProxyHandler.may_retry``).

With ``--workers N`` a supervisor owns what there is one of (health checks, the admin listener,
reloads) and N worker processes serve; they share one block of memory for the backend set, the
upstreams' state and the counters (see "Shared state").

Embed it::

    import load_balancer
    balancer = load_balancer.LoadBalancer(load_balancer.Config(port=0, backends=("http://127.0.0.1:9001",)))
    balancer.start()       # serves from background threads
    ...
    balancer.close()       # graceful: in-flight requests finish
"""

from __future__ import annotations

import _thread
import argparse
import base64
import bisect
import collections
import datetime
import email.utils
import errno
import functools
import hashlib
import hmac
import html
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import mmap
import operator
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import ssl
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import urlsplit

try:
    import fcntl
except ImportError:  # not POSIX: one worker, no instance lock
    fcntl = None

__version__ = "2.0.0"

#: The upstream servers, in rotation order. Edit this list, or pass ``--backend URL`` (repeatable).
SERVER_URLS = [
    "http://localhost:8001",
    "http://localhost:8002",
    "http://localhost:8003",
]

log = logging.getLogger("load_balancer")
access_log = logging.getLogger("load_balancer.access")

# --- Tunables: the limits and intervals that are not settings (Config), each with its reason -------

# Bodies never sit in memory whole: they are copied in pieces of at most COPY_BUFFER bytes, through
# buffers reused across requests. A copy buffer larger than a socket reader's own READ_BUFFER is
# filled by BufferedReader.readinto1 straight from the socket (one recv, no copy through the
# reader's buffer; with 64 KiB pieces that copy and the per-piece work cost a quarter of an 8 MiB
# upload's CPU). Bytes the reader already holds are read alone first (copy_body): after copying
# them, readinto1 would block on the socket for more (a stalled event stream).
READ_BUFFER = 64 * 1024
COPY_BUFFER = 256 * 1024
# A request body up to this size that has fully arrived with its head goes upstream in the same
# send, and stays replayable if the upstream fails before answering.
SMALL_BODY = 64 * 1024
MAX_CHUNK_LINE = 4096            # chunk-size line with extensions (RFC 9112 section 7.1.1)
MAX_INTERIM_RESPONSES = 10       # 1xx responses skipped before a final one; more is an attack
MAX_LEADING_EMPTY_LINES = 8      # CRLFs tolerated before a request line (RFC 9112 section 2.2)
THREAD_STACK_SIZE = 512 * 1024   # per connection thread; the default 8 MiB reserves too much
# Above GATE_THRESHOLD requests in flight, at most GATE_SLOTS threads run request code at once, in
# arrival order (see FairGate): without the gate, CPython's unfair GIL gives some requests seconds
# of p99 under hundreds of connections. Fewer slots shorten the tail and cost requests/s; below the
# threshold the gate is one uncontended lock a pass, so moderate loads pay nothing; the threshold
# is as low as it can be without taxing 32 connections (measurements: README, "Performance").
GATE_SLOTS = 4
GATE_THRESHOLD = 32
# A connection thread that has finished waits this long for the next connection, and up to
# SPARE_THREADS of them wait (Apache's spare threads): starting a thread costs 55-150 us, and under
# load the accept loop would wait for the GIL once per connection (a burst of connects: about
# half the p99 with spares, see README).
SPARE_THREADS = 256
SPARE_THREAD_SECONDS = 60.0
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # Linux: EPIPE instead of SIGPIPE, whoever embeds us
SEND_NOW_FLAGS = int(MSG_DONTWAIT | MSG_NOSIGNAL)   # an int: "|" on the socket module's flags is an enum call
TCP_INFO = getattr(socket, "TCP_INFO", 0)  # Linux: struct tcp_info, see is_reusable
POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer closed its side (see Stream.peer_gone)
TCP_ESTABLISHED = 1              # tcpi_state's value for an open connection (the struct's first byte)
TCP_INFO_LENGTH = 136            # struct tcp_info up to tcpi_bytes_received (Linux 4.1+) ...
TCPI_BYTES_RECEIVED = slice(128, 136)  # ... a u64 at offset 128
LOG_SUMMARY_SECONDS = 5.0        # a failure that repeats is logged once, then summarised this often
GAUGE_SECONDS = 0.25             # how often a worker writes its gauges and byte totals to the shared block
LINGER_SECONDS = 30.0            # see linger_close: nginx's lingering_time and lingering_timeout
LINGER_IDLE_SECONDS = 5.0
REFUSED_LINGER_SECONDS = 2.0     # a connection refused at accept: read what it still sends this long
REFUSED_LINGER_MOST = 512        # ... at most this many at once (a flood is closed at once)
COPY_BUFFERS_KEPT = 32           # idle copy buffers kept per process (BufferPool)
UPLOAD_WATCH_EVERY = 4           # body pieces (up to 1 MiB) between looks at the upstream for an early answer
MAX_UPSTREAMS = 256              # distinct backend names over a balancer's life (the shared block's slots)
SAMPLE_SECONDS = 1               # /status history and the dashboard's charts: one sample a second
HISTORY_SAMPLES = 300            # five minutes of them
ORPHAN_DRAIN_SECONDS = 1.0       # a worker whose supervisor died drains this long at most
ADMIN_TIMEOUT_SECONDS = 30       # an admin or redirect connection idle longer is closed: each holds
REDIRECT_TIMEOUT_SECONDS = 10    # a thread, and neither listener has the proxy's connection cap
ADMIN_MAX_LINE = 65536           # http.server's own request-line limit, kept for the admin listener
ADMIN_MAX_BODY = 65536           # an admin POST's body (none is needed) is read and dropped up to this
REDIRECT_MAX_LINE = 8192         # the redirect listener's request line (nginx's default buffer)
HEALTH_MAX_BODY = 65536          # of a health check's answer, read so that the connection ends cleanly
# A queued request (see RequestQueue) is woken at once by a release in its own worker; releases in
# other workers are seen by the head of the queue re-reading the shared counts this often, and every
# waiter looks at its client this often (a client that went away leaves the queue).
QUEUE_RECHECK_SECONDS = 0.005
QUEUE_WATCH_SECONDS = 0.05
MAX_MAXCONN = 100_000            # a backend's maxconn=N
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(message)s"


# ===================================================================================================
# Configuration
# ===================================================================================================
# Each setting is declared once, as a Config field: its default, its help text, its flag type, its
# check and whether a reload (SIGHUP) may change it. argparse, validation, --export and the README's
# table are all read from these declarations.

def positive(value) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be >= 0"


def at_least_one(value) -> str | None:
    return None if value >= 1 else "must be >= 1"


def port_number(value) -> str | None:
    return None if value is None or 0 <= value <= 65535 else "must be a port number 0-65535"


def absolute_path(value) -> str | None:
    if value is None or (value.startswith("/") and not any(c in value for c in " \r\n\t#")):
        return None
    return "must be a path starting with '/'"


def retry_conditions(value) -> str | None:
    unknown = set(value.split(",")) - RETRY_CONDITIONS
    return f"has unknown conditions {sorted(unknown)} (known: {', '.join(sorted(RETRY_CONDITIONS))})" if unknown else None


def header_name(value) -> str | None:
    """A field name the balancer may write (--request-id-header), or '' (off). Not one it sets or
    reads itself: Host, framing, hop-by-hop fields, X-Forwarded-*."""
    if value == "":
        return None
    name = value.encode("utf-8", "replace")
    if not re.fullmatch(rb"[A-Za-z0-9][A-Za-z0-9-]{0,99}", name):  # a name nginx and HAProxy can say too
        return "must be a header field name of letters, digits and '-', or ''"
    if name.lower() in DROP_TO_UPSTREAM | REQUEST_FIELDS:
        return "must not be a field the balancer sets or reads itself"
    return None


def parse_networks(text: str) -> tuple:
    """``10.0.0.0/8, 2001:db8::/32, 192.0.2.7`` -> (ip_network, ...): the one parser of every list
    of addresses (trusted proxies, PROXY protocol sources, allow, deny, rate-limit exemptions). A bare address is a /32 (/128); host
    bits after the prefix are ignored, as nginx ignores them; an IPv4-mapped IPv6 network
    (::ffff:10.0.0.0/104) is the IPv4 one. ValueError with the item that is wrong."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR (such as 10.0.0.0/8)") from None
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


def parse_address(text):
    """An address as clients and proxies write it (``192.0.2.7``, ``192.0.2.7:5000``,
    ``2001:db8::1``, ``[2001:db8::1]:443``; str or bytes) -> IPv4Address or IPv6Address, an
    IPv4-mapped IPv6 address as the IPv4 one; None when it is not an address."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (address.ipv4_mapped or address) if address.version == 6 else address


def address_in(address, networks: tuple) -> bool:
    """Is `address` (str, bytes or an ip_address) in one of `networks` (parse_networks)?
    ::ffff:192.0.2.7 counts as 192.0.2.7; what is not an address is in none."""
    if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = parse_address(address)
    elif address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address is not None and any(address in network for network in networks)


def network_list(value) -> str | None:
    try:
        parse_networks(value)
    except ValueError as error:
        return f"must be a comma-separated list of addresses or CIDRs: {error}"
    return None


def worker_count(text: str) -> int:
    return (os.cpu_count() or 1) if text == "auto" else int(text)


def is_token(text: str) -> bool:
    """An HTTP token (RFC 9110 section 5.6.2): what a header name and a cookie name are made of."""
    return bool(text) and text.isascii() and not text.encode().translate(None, TCHAR)


def hash_key_form(value) -> str | None:
    kind, colon, name = value.partition(":")
    if value in ("client-ip", "uri") or (colon and kind in ("header", "cookie") and is_token(name)):
        return None
    return "must be client-ip, uri, header:NAME or cookie:NAME"


def cookie_name(value) -> str | None:
    return None if is_token(value) else "must be a cookie name (letters, digits and !#$%&'*+-.^_`|~)"


# HAProxy's retry-on keywords: what a request may be re-sent to the next upstream after.
RETRY_CONDITIONS = frozenset({"conn-failure", "empty-response", "response-timeout", "none"})


def log_destination(value) -> str | None:
    return None if value and not any(c in value for c in "\r\n\0") else "must be a file, or - for standard output"


def names_a_file(value: str) -> bool:
    """Does a list setting's value name a file of ranges (rather than hold them)?"""
    return value.startswith(("/", "."))


def read_networks(value: str) -> tuple:
    """One value of a list setting (--allow, --deny, --admin-allow, --rate-limit-exempt):
    ``CIDR[,CIDR...]``, or a file of them when it starts with "/" or "." (one or more a line,
    # comments; HAProxy's ``acl ... -f FILE``), read again on SIGHUP. ValueError: one line, naming
    the file and line."""
    if not names_a_file(value):
        return parse_networks(value)
    networks = []
    for number, text in settings_file_lines(value):
        try:
            networks += parse_networks(text)
        except ValueError as error:
            raise ValueError(f"{value}, line {number}: {error}") from None
    if not networks:  # a file emptied by mistake must not open (--deny) or close (--allow) the doors
        raise ValueError(f"{value}: no address range in the file")
    return tuple(networks)


MAX_RANGES = 5000  # address ranges over all lists: what LISTS_BYTES holds for the workers


class AccessLists(NamedTuple):
    """The address lists as ranges (read_access_lists); what a reload publishes to the workers."""

    allow: tuple = ()
    deny: tuple = ()
    admin_allow: tuple = ()
    rate_limit_exempt: tuple = ()


def read_access_lists(config: Config) -> AccessLists:
    """Every list setting of `config` read (its files too); ValueError naming the flag."""
    lists = {}
    for name in AccessLists._fields:
        networks: tuple = ()
        for value in getattr(config, name):
            try:
                networks += read_networks(value)
            except ValueError as error:
                raise ValueError(f"--{name.replace('_', '-')}: {error}") from None
        lists[name] = networks
    if sum(map(len, lists.values())) > MAX_RANGES:
        raise ValueError(f"the address lists hold more than {MAX_RANGES} ranges")
    return AccessLists(**lists)


RATE_LIMIT = re.compile(r"(\d{1,7})/([sm])(?:,burst=(\d{1,7}))?")


def parse_rate_limit(text: str) -> tuple[int, int]:
    """``"10/s,burst=20"`` -> (microseconds between two requests, bucket size): nginx's rate
    syntax (N/s, N/m) and a token bucket of `burst` requests (default 1: no burst, as nginx's
    limit_req without burst). ValueError with the reason."""
    match = RATE_LIMIT.fullmatch(text.replace(" ", ""))
    if not match:
        raise ValueError("must be N/s or N/m, optionally followed by ,burst=N (such as 10/s,burst=20)")
    count, unit, burst = int(match[1]), match[2], int(match[3] or 1)
    if count < 1 or burst < 1:
        raise ValueError("needs a rate and a burst of at least 1")
    return max(1, round((1_000_000 if unit == "s" else 60_000_000) / count)), burst


def read_rate_limit(value: str) -> str:
    """--rate-limit's value: the rate itself, or (starting with "/" or ".") a file whose first line
    that is not a # comment holds it, read again on SIGHUP. ValueError: one line, naming the file."""
    if not names_a_file(value):
        parse_rate_limit(value)
        return value
    lines = settings_file_lines(value)
    if len(lines) != 1:
        raise ValueError(f"{value} must hold one rate (such as 10/s,burst=20), found {len(lines)} lines")
    number, text = lines[0]
    try:
        parse_rate_limit(text)
    except ValueError as error:
        raise ValueError(f"{value} line {number}: {error}") from None
    return text


def rate_limit_syntax(value) -> str | None:
    try:
        read_rate_limit(value)
    except ValueError as error:
        return str(error)
    return None


def setting(default, help: str, *, group: str = "general", type=None, check=None, choices=None,
            metavar: str | None = None, reload: bool = False, flag: str | None = None, const=None):
    """A Config field with what the command line, validation and reload need to know of it.
    `const`: the value of the flag given without one."""
    return field(default=default, metadata={
        "help": help, "group": group, "type": type, "check": check, "choices": choices,
        "metavar": metavar, "reload": reload, "flag": flag, "const": const})


@dataclass(frozen=True)
class Config:
    """Every setting, with its default. Command-line flags are these names with dashes."""

    backends: tuple = setting(
        tuple(SERVER_URLS), "upstream URL (http://, https:// or unix:/path.sock)[,weight=N][,backup]"
        "[,name=NAME][,maxconn=N], repeatable; replaces "
        f"SERVER_URLS ({', '.join(SERVER_URLS)})", flag="--backend", metavar="BACKEND", reload=True)
    backends_file: str | None = setting(
        None, "file with one backend per line (same syntax, # comments)", metavar="FILE", reload=True)
    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8080, "port to listen on (0: any free port)", type=int, check=port_number)
    workers: int = setting(1, "processes sharing the port; 'auto' = one per CPU", type=worker_count,
                           check=at_least_one)
    # Upstream side. nginx: proxy_connect_timeout 60s, proxy_read_timeout 60s.
    timeout: float = setting(30.0, "seconds to wait for an upstream's response head, and between "
                             "reads of its body (504 after; an event stream idle that long is cut)",
                             group="upstream side", type=float, check=positive)
    connect_timeout: float = setting(5.0, "seconds to wait for an upstream to accept a connection",
                                     group="upstream side", type=float, check=positive)
    pool_size: int = setting(64, "idle keep-alive connections kept per upstream (Go: MaxIdleConnsPerHost)",
                             group="upstream side", type=int, check=non_negative)
    retry_on: str = setting("conn-failure,empty-response", "when a request goes on to the next upstream "
                            "(HAProxy retry-on): conn-failure, empty-response, response-timeout, none",
                            group="upstream side", check=retry_conditions, metavar="LIST")
    resolve_interval: float = setting(
        30.0, "seconds between look-ups of the backends' host names (by one process for all "
        "workers); every address is an upstream of its own, NAME@ADDRESS; 0 = once at start",
        group="upstream side", type=float, check=non_negative, metavar="SECONDS")
    backend_ca: str | None = setting(None, "CA bundle that verifies https:// upstreams (default: the "
                                     "system's trust store)", group="upstream side", metavar="FILE")
    # HAProxy's queue: a request that finds every upstream at its maxconn waits in the balancer.
    queue_timeout: float = setting(30.0, "seconds a request may wait in the queue when every upstream "
                                   "is at its maxconn (503 after; HAProxy timeout queue)",
                                   group="upstream side", type=float, check=positive, metavar="SECONDS")
    queue_size: int = setting(1024, "requests that may wait in the queue, per worker (503 at once "
                              "beyond)", group="upstream side", type=int, check=at_least_one)
    # Client side. nginx: client_header_timeout 60s, client_body_timeout 60s, keepalive_timeout 75s.
    header_timeout: float = setting(10.0, "seconds for a new connection's first byte (and TLS "
                                    "handshake), and for a whole request head (408 after)",
                                    group="client side", type=float, check=positive)
    idle_timeout: float = setting(60.0, "seconds a keep-alive connection may idle, or a body stall",
                                  group="client side", type=float, check=positive)
    tunnel_timeout: float = setting(3600.0, "seconds a WebSocket or other upgraded connection may "
                                    "idle (HAProxy timeout tunnel)", group="client side", type=float,
                                    check=positive)
    max_request_line: int = setting(8190, "bytes (414 above; Apache LimitRequestLine)",
                                    group="client side", type=int, check=at_least_one)
    max_field_size: int = setting(8192, "bytes of one header field line (431 above; nginx "
                                  "large_client_header_buffers 4 8k)", group="client side", type=int,
                                  check=at_least_one)
    max_header_size: int = setting(32768, "bytes of header fields (431 above)", group="client side",
                                   type=int, check=at_least_one)
    max_headers: int = setting(100, "header fields (431 above; Apache LimitRequestFields)",
                               group="client side", type=int, check=at_least_one)
    max_body_size: int = setting(1 << 30, "bytes of request body (413 above); 0 = unlimited",
                                 group="client side", type=int, check=non_negative)
    max_connections: int = setting(1024, "concurrent client connections per worker; at the cap the "
                                   "longest-idle keep-alive one is closed, 503 when all are busy",
                                   group="client side", type=int, check=at_least_one)
    tls_cert: str | None = setting(None, "certificate chain (PEM): the listener speaks HTTPS",
                                   group="client side", metavar="FILE", reload=True)
    tls_key: str | None = setting(None, "private key (PEM) for --tls-cert", group="client side",
                                  metavar="FILE", reload=True)
    redirect_http_port: int | None = setting(None, "with --tls-cert: a plain-HTTP port that answers "
                                             "308 to the https:// URL", group="client side", type=int,
                                             check=port_number, metavar="PORT")
    # Health. Active checks as HAProxy's "check inter 5s rise 2 fall 3" (a TCP connect without a
    # path, an HTTP GET with one); passive as Envoy's consecutive gateway failures.
    health_path: str | None = setting(None, "HTTP path of the active check (a 2xx or 3xx passes); "
                                      "without it the check is a TCP connect", group="health",
                                      check=absolute_path, metavar="PATH")
    health_interval: float = setting(5.0, "seconds between active checks; 0 = off", group="health",
                                     type=float, check=non_negative)
    health_timeout: float = setting(2.0, "seconds an active check may take", group="health",
                                    type=float, check=positive)
    rise: int = setting(2, "passed checks to come back up", group="health", type=int, check=at_least_one)
    fall: int = setting(3, "failed checks to go down", group="health", type=int, check=at_least_one)
    max_fails: int = setting(5, "consecutive failed requests that take an upstream out",
                             group="health", type=int, check=at_least_one)
    fail_timeout: float = setting(10.0, "seconds an upstream stays out after --max-fails",
                                  group="health", type=float, check=positive)
    # Balancing. Round robin is nginx's and HAProxy's default; the others are theirs too (see the
    # README for each peer's name of each).
    balance: str = setting("roundrobin", "how an upstream is chosen: roundrobin, leastconn (fewest "
                           "requests in flight for its weight) or hash (consistent hashing of "
                           "--hash-key)", group="balancing", choices=("roundrobin", "leastconn", "hash"))
    hash_key: str = setting("client-ip", "what --balance hash hashes: client-ip, uri, header:NAME or "
                            "cookie:NAME (a request without it goes round robin)", group="balancing",
                            check=hash_key_form, metavar="KEY")
    sticky_cookie: str | None = setting(None, "pin each client to an upstream with this cookie (set by "
                                        "the balancer; an HMAC of the upstream's name)",
                                        group="balancing", check=cookie_name, metavar="NAME")
    sticky_key: str | None = setting(None, "file whose bytes (16 or more) key the sticky cookie's HMAC; "
                                     "default: derived from /etc/machine-id", group="balancing",
                                     metavar="FILE")
    slow_start: float = setting(0.0, "seconds over which an upstream that comes back, or that a reload "
                                "added, ramps from a tenth of its weight to all of it; 0 = off",
                                group="balancing", type=float, check=non_negative, metavar="SECONDS")
    # Protection. nginx: allow/deny, limit_req; HAProxy: acl src, stick-table http_req_rate.
    allow: tuple = setting((), "CIDR[,CIDR...], repeatable: only these client addresses reach the "
                           "upstreams (403 and close for others); a value starting with / or . is "
                           "a file of them, read again on SIGHUP", group="protection", metavar="CIDR",
                           reload=True)
    deny: tuple = setting((), "CIDR[,CIDR...] or a file, repeatable: these client addresses get 403 "
                          "and a close; a deny wins over an allow", group="protection", metavar="CIDR",
                          reload=True)
    admin_allow: tuple = setting((), "CIDR[,CIDR...] or a file, repeatable: only these addresses reach "
                                 "the admin listener (403 and close for others)", group="protection",
                                 metavar="CIDR", reload=True)
    rate_limit: str | None = setting(None, "requests per client address, RATE as N/s or N/m, shared "
                                     "by every worker; 429 with Retry-After above it; burst=N lets N "
                                     "through at once; a value starting with / or . is a file that "
                                     "holds it", group="protection", check=rate_limit_syntax,
                                     metavar="RATE[,burst=N]", reload=True)
    rate_limit_exempt: tuple = setting((), "CIDR[,CIDR...] or a file, repeatable: client addresses "
                                       "--rate-limit never limits (health checkers, internal callers)",
                                       group="protection", metavar="CIDR", reload=True)
    # Operations.
    drain_timeout: float = setting(10.0, "seconds in-flight requests may take after SIGTERM, SIGINT "
                                   "or SIGQUIT", group="operations", type=float, check=non_negative)
    admin_host: str = setting("127.0.0.1", "address of the admin listener", group="operations")
    admin_port: int | None = setting(None, "port for /status, /metrics, the dashboard and the "
                                     "admin API; off unless given", group="operations", type=int,
                                     check=port_number, metavar="PORT")
    admin_token: str | None = setting(None, "bearer token every admin POST must carry (required "
                                      "when --admin-host is not a loopback address)",
                                      group="operations", metavar="TOKEN")
    # nginx's access_log: its own file, lines exactly the format. The flag alone (in 2.0.0 it
    # was a switch) is standard output.
    access_log: str | None = setting(None, "append one line per request to FILE, in the access "
                                     "log format and nothing else; '-' (or the flag alone): "
                                     "standard output. SIGUSR1 opens FILE again (log rotation)",
                                     group="operations", metavar="FILE", check=log_destination, const="-")
    access_log_format: str = setting("short", "access log line", group="operations",
                                     choices=("short", "common", "combined", "json"))
    log_level: str = setting("info", "logging level", group="operations",
                             choices=("debug", "info", "warning", "error"))
    # Forwarding: what the upstream, the client and the log learn about a request and its client.
    request_id_header: str = setting(
        "X-Request-ID", "field that carries each request's ID upstream, back to the client and "
        "into the access log; a client's own value is kept when it is 1-200 visible ASCII "
        "characters, else a new one is made; '' = off", group="forwarding", check=header_name,
        metavar="NAME")
    proxy_protocol_from: str | None = setting(
        None, "addresses (CIDR[,CIDR...]) whose connections must begin with a PROXY protocol v1 or v2 "
        "header (HAProxy's accept-proxy); the address it carries is the client's. A header from "
        "anyone else is refused", group="forwarding", check=network_list, metavar="CIDRS")
    trusted_proxies: str | None = setting(
        None, "proxies (CIDR[,CIDR...]) whose X-Forwarded-For, -Host, -Proto and Forwarded are "
        "kept; the client is the right-most address in X-Forwarded-For that is not one of them "
        "(nginx real_ip_recursive). From anyone else those fields are replaced",
        group="forwarding", check=network_list, metavar="CIDRS")

    # Derived in __post_init__, not settings: what the request path reads, worked out once.
    backend_specs: tuple = field(default=(), init=False, repr=False, compare=False)   # parsed --backend
    request_id_key: bytes = field(default=b"", init=False, repr=False, compare=False)  # lowercase; b"": off
    request_id_prefix: bytes = field(default=b"", init=False, repr=False, compare=False)  # b"Name: "
    request_fields: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    response_fields: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    proxy_protocol_networks: tuple = field(default=(), init=False, repr=False, compare=False)
    trusted_networks: tuple = field(default=(), init=False, repr=False, compare=False)
    access_lists: tuple = field(default=(), init=False, repr=False, compare=False)  # an AccessLists
    rate_limit_spec: str | None = field(default=None, init=False, repr=False, compare=False)  # the rate, read

    @classmethod
    def settings(cls) -> list:
        """The settings (the dataclass fields a flag sets), in declaration order."""
        return [item for item in fields(cls) if item.init]

    def __post_init__(self):
        """Refuse impossible settings with a one-line reason naming the flag (ValueError), and
        read --backends-file (its errors name the line)."""
        if isinstance(self.access_log, bool):  # a program written for 2.0.0 passes the old switch
            object.__setattr__(self, "access_log", "-" if self.access_log else None)
        for item in self.settings():
            check, choices = item.metadata.get("check"), item.metadata.get("choices")
            value = getattr(self, item.name)
            if value is None:
                continue
            problem = check(value) if check else None
            if choices and value not in choices:
                problem = f"must be one of {', '.join(choices)}"
            if problem:
                raise ValueError(f"{flag_of(item)} {problem}, got {value}")
        if self.backends_file is not None:
            object.__setattr__(self, "backends", read_backends_file(self.backends_file))
        if not self.backends:
            raise ValueError("at least one --backend is needed")
        object.__setattr__(self, "backend_specs", parse_backends(self.backends))
        # Read on every request: the request-ID field's name as it is matched (b"": off).
        key = self.request_id_header.lower().encode("ascii")
        object.__setattr__(self, "request_id_key", key)
        object.__setattr__(self, "request_id_prefix", self.request_id_header.encode("ascii") + b": " if key else b"")
        object.__setattr__(self, "request_fields", REQUEST_FIELDS | {key} if key else REQUEST_FIELDS)
        object.__setattr__(self, "response_fields", RESPONSE_FIELDS | {key} if key else RESPONSE_FIELDS)
        object.__setattr__(self, "proxy_protocol_networks",
                           parse_networks(self.proxy_protocol_from) if self.proxy_protocol_from else ())
        object.__setattr__(self, "trusted_networks",
                           parse_networks(self.trusted_proxies) if self.trusted_proxies else ())
        object.__setattr__(self, "access_lists", read_access_lists(self))
        object.__setattr__(self, "rate_limit_spec", read_rate_limit(self.rate_limit) if self.rate_limit else None)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.redirect_http_port is not None and self.tls_cert is None:
            raise ValueError("--redirect-http-port needs --tls-cert")
        if self.hash_key != "client-ip" and self.balance != "hash":
            raise ValueError(f"--hash-key {self.hash_key} needs --balance hash")
        if self.sticky_key is not None:
            if self.sticky_cookie is None:
                raise ValueError("--sticky-key needs --sticky-cookie")
            read_sticky_key(self.sticky_key)
        if self.rate_limit_exempt and not self.rate_limit:
            raise ValueError("--rate-limit-exempt needs --rate-limit")
        if self.admin_allow and self.admin_port is None:
            raise ValueError("--admin-allow needs --admin-port")
        if self.admin_port is not None and not self.admin_token and not is_loopback(self.admin_host):
            raise ValueError(f"--admin-host {self.admin_host} is not a loopback address: give "
                             "--admin-token too, or anyone who can reach it can drain your upstreams")

    @property
    def retry_conditions(self) -> frozenset:
        return frozenset(self.retry_on.split(","))

    @property
    def max_head_size(self) -> int:
        """The most a message head may take: a start line and the header fields, each line with
        its CRLF, and the empty line (the one limit read_head is given, both directions)."""
        return self.max_request_line + self.max_header_size + 4

    def reloaded(self) -> Config:
        """The same settings with what a reload may change read again (--backends-file)."""
        return replace(self)


def flag_of(item) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BackendSpec:
    """One upstream as configured: ``URL[,weight=N][,backup][,name=NAME][,maxconn=N]``, where URL may also be
    ``unix:/path/to/app.sock`` (HTTP over a Unix socket: nginx's ``server unix:``)."""

    url: str
    scheme: str
    host: str
    port: int
    netloc: str        # host[:port] as written: the Host header sent upstream (unix: localhost)
    name: str          # host:port as written (unix: the path), unless name= says otherwise
    weight: int = 1
    backup: bool = False
    unix_path: str | None = None  # a unix: upstream's socket
    send_proxy: int = 0           # PROXY protocol version sent first on each connection (0: none)
    address: str | None = None    # the address a host name resolved to (name: NAME@ADDRESS)
    maxconn: int = 0              # requests in flight at most, every worker's (0: no cap)

    @property
    def backend(self) -> str:
        """The configured backend's name (NAME of NAME@ADDRESS)."""
        return self.name[:-len(self.address) - 1] if self.address else self.name

    @property
    def needs_lookup(self) -> bool:
        """A host name (not an address literal, not a Unix socket), not yet resolved."""
        return self.address is None and self.unix_path is None and parse_address(self.host) is None

    def at(self, address: str) -> BackendSpec:
        """This backend at one address its host name resolved to."""
        return replace(self, name=f"{self.name}@{address}", address=address)


# sun_path holds 108 bytes with its NUL on Linux (104 on the BSDs and macOS).
MAX_UNIX_PATH = 107


BACKEND_NAME = re.compile(r"[A-Za-z0-9._:\[\]~-]{1,100}")
MAX_WEIGHT = 256  # HAProxy's range; weight 0 is spelled "maint" here (the admin API)


def parse_backend(text: str) -> BackendSpec:
    """``http://10.0.0.5:8000,weight=3,backup,name=a`` -> BackendSpec; ValueError with a one-line
    reason otherwise."""
    url, *options = [part.strip() for part in text.strip().split(",")]
    if url.startswith("unix:"):
        return parse_unix_backend(text, url, options)
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    except ValueError as error:
        raise ValueError(f"invalid backend URL {url!r}: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid backend URL {url!r}: only http:// and https:// upstreams are supported")
    if parts.username is not None or "@" in parts.netloc:
        raise ValueError(f"invalid backend URL {url!r}: credentials in backend URLs are not supported")
    if not parts.hostname or not HOST.fullmatch(parts.netloc.encode("utf-8", "replace")):
        raise ValueError(f"invalid backend URL {url!r}: no valid host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid backend URL {url!r}: give scheme, host and port only (no path)")
    host_port = parts.netloc if parts.port else f"{parts.netloc}:{port}"
    values = parse_backend_options(text, options, host_port)
    return BackendSpec(url=url.rstrip("/"), scheme=parts.scheme, host=parts.hostname, port=port,
                       netloc=parts.netloc, **values)


def parse_unix_backend(text: str, url: str, options: list) -> BackendSpec:
    """``unix:/run/app.sock[,options]``: HTTP over a Unix socket. Requests carry the client's
    Host, or ``localhost``; the name defaults to the path."""
    path = url[len("unix:"):]
    if not path.startswith("/") or any(c in path for c in " \t\r\n\0#"):
        raise ValueError(f"invalid backend {url!r}: a Unix socket is unix:/absolute/path")
    if len(path.encode("utf-8")) > MAX_UNIX_PATH:
        raise ValueError(f"invalid backend {url!r}: a Unix socket path has at most {MAX_UNIX_PATH} bytes")
    values = parse_backend_options(text, options, path)
    return BackendSpec(url=url, scheme="http", host="localhost", port=0, netloc="localhost",
                       unix_path=path, **values)


def parse_backend_options(text: str, options: list, name: str) -> dict:
    """``weight=N``, ``backup``, ``name=NAME``, ``send-proxy``, ``send-proxy-v2``, ``maxconn=N``
    (HAProxy's names) after a backend's address, with `name` the default."""
    values = {"weight": 1, "backup": False, "name": name, "send_proxy": 0, "maxconn": 0}
    for option in options:
        key, equals, value = option.partition("=")
        if key == "backup" and not equals:
            values["backup"] = True
        elif key in ("send-proxy", "send-proxy-v2") and not equals:
            if values["send_proxy"]:
                raise ValueError(f"invalid backend {text!r}: send-proxy and send-proxy-v2 exclude each other")
            values["send_proxy"] = 2 if key == "send-proxy-v2" else 1
        elif key == "weight" and equals:
            if not value.isdigit() or not 1 <= int(value) <= MAX_WEIGHT:
                raise ValueError(f"invalid backend {text!r}: weight must be 1-{MAX_WEIGHT}, got {value!r}")
            values["weight"] = int(value)
        elif key == "maxconn" and equals:
            if not value.isdigit() or not 1 <= int(value) <= MAX_MAXCONN:
                raise ValueError(f"invalid backend {text!r}: maxconn must be 1-{MAX_MAXCONN}, got {value!r}")
            values["maxconn"] = int(value)
        elif key == "name" and equals:
            if not BACKEND_NAME.fullmatch(value):
                raise ValueError(f"invalid backend {text!r}: a name is 1-100 of A-Z a-z 0-9 . _ : ~ - [ ]")
            values["name"] = value
        else:
            raise ValueError(f"invalid backend {text!r}: unknown option {option!r} "
                             "(known: weight=N, backup, name=NAME, send-proxy, send-proxy-v2, maxconn=N)")
    return values


def parse_backends(texts) -> tuple:
    specs = tuple(parse_backend(text) for text in texts)
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two backends are named {name!r}: give one of them name=...")
    return specs


def settings_file_lines(path: str, flag: str = "") -> list[tuple[int, str]]:
    """(line number, text) of each line of a file of settings that says something: "#" starts a
    comment, blank lines are skipped. ValueError "cannot read [FLAG ]PATH: why"."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {flag + ' ' if flag else ''}{path}: {describe_os_error(error)}") from None
    found = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            found.append((number, text))
    return found


def read_backends_file(path: str) -> tuple:
    """The backends of a --backends-file: one per line, # comments, blank lines ignored. Errors
    name the file and line."""
    backends = []
    for number, text in settings_file_lines(path, "--backends-file"):
        try:
            parse_backend(text)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        backends.append(text)
    if not backends:
        raise ValueError(f"{path}: no backend in the file")
    return tuple(backends)


MAX_STICKY_KEY_FILE = 65536


def read_sticky_key(path: str) -> bytes:
    """The bytes of a --sticky-key file, surrounding whitespace removed (so that the output of
    ``openssl rand -base64 32`` works as it is); ValueError with a one-line reason."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_STICKY_KEY_FILE + 1).strip()
    except OSError as error:
        raise ValueError(f"cannot read --sticky-key {path}: {describe_os_error(error)}") from None
    if len(data) > MAX_STICKY_KEY_FILE:
        raise ValueError(f"--sticky-key {path}: larger than {MAX_STICKY_KEY_FILE} bytes")
    if len(data) < 16:
        raise ValueError(f"--sticky-key {path}: {len(data)} bytes; a key needs 16 or more "
                         "(openssl rand -base64 32 > FILE)")
    return data


# ===================================================================================================
# HTTP/1.1 message rules (RFC 9110, RFC 9112): pure functions, bytes in, bytes out
# ===================================================================================================

class HTTPError(Exception):
    """A message that breaks the protocol or a limit. For a request, `status` is the answer;
    `head`, what was read of the head (for the log line of a refused request)."""

    def __init__(self, status: int, detail: str, head: bytes | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.head = head


# Hop-by-hop header fields (RFC 9110 section 7.6.1) describe one connection, not the message: they
# are removed before forwarding, in both directions, with every field that Connection names.
# The same table as Go's httputil.ReverseProxy.
HOP_BY_HOP = frozenset({
    b"connection",
    b"proxy-connection",     # non-standard, but still sent by libcurl and old browsers
    b"keep-alive",           # HTTP/1.0 keep-alive parameters (RFC 2068 section 19.7.1)
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",              # "Trailer", not "Trailers" (RFC 7230 erratum 4522)
    b"transfer-encoding",    # every body is re-framed by the balancer itself
    b"upgrade",              # rebuilt for an upgrade that is tunnelled (Go does the same)
})
# Toward the upstream, the balancer also writes these itself: Host (first, as Go writes it), the
# framing header (where the client had it), Expect (forwarded when the body is still to come, as
# Go and HAProxy do), and X-Forwarded-*: a client's own X-Forwarded-For, -Host and -Proto are
# replaced, and its Forwarded (RFC 7239) removed (Go's ReverseProxy.Rewrite removes all four), so
# that nobody can forge them. From a --trusted-proxies peer they are kept, its X-Forwarded-For
# extended where it was.
DROP_TO_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-for",
                                 b"x-forwarded-host", b"x-forwarded-proto", b"forwarded"}
DROP_FROM_TRUSTED = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-for"}
DROP_TO_CLIENT = HOP_BY_HOP | {b"content-length"}
FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding"})

# The header fields whose values the proxy itself needs to read.
REQUEST_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                            b"expect", b"x-forwarded-for", b"upgrade"})
RESPONSE_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date",
                             b"upgrade"})
# An upgrade token is a protocol name with an optional version (RFC 9110 section 7.8).
UPGRADE_VALUE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:/[!#$%&'*+.^_`|~0-9A-Za-z-]+)?")

# Body framing (RFC 9112 section 6.3).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)

TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEXDIG = b"0123456789abcdefABCDEF"
# A head may hold visible ASCII, obs-text, SP and HTAB, and CR LF as line ends (RFC 9110 section
# 5.5); NUL, other controls and DEL anywhere are refused (RFC 9112 section 2.2: at least as strict
# as HAProxy and nginx, which refuse them too).
HEAD_BYTES = b"\t\r\n" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
VISIBLE_ASCII = bytes(range(0x21, 0x7F))
MAX_REQUEST_ID = 200  # characters of a client's request ID that is kept (Heroku's router keeps 20-200)
# A request target is visible ASCII only; a fragment ("#") is never sent (RFC 9112 section 3.2).
TARGET_BYTES = bytes(b for b in range(0x21, 0x7F) if b != ord("#"))
CHUNK_EXT_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (.*))?", re.S)
# uri-host [ ":" port ] (RFC 9110 section 7.2; RFC 3986 section 3.2.2); userinfo is refused.
HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::[0-9]*)?")
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})  # RFC 9110 9.2.2
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Headers:
    """A header section as received: (lowercase name, raw line) pairs in order, repeats kept.

    Offers the part of ``email.message.Message`` that users of ``http.server`` and ``http.client``
    reach for (``get``, ``get_all``, ``items``, ``in``), without the cost of building one."""

    __slots__ = ("fields",)

    def __init__(self, fields: list[tuple[bytes, bytes]]):
        self.fields = fields

    def get_all(self, name: str, failobj=None) -> list[str] | None:
        key = name.lower().encode("latin-1")
        found = [line.partition(b":")[2].strip(b" \t").decode("latin-1")
                 for lname, line in self.fields if lname == key]
        return found or failobj

    def get(self, name: str, failobj=None) -> str | None:
        found = self.get_all(name)
        return found[0] if found else failobj

    def items(self) -> list[tuple[str, str]]:
        pairs = (line.partition(b":") for _, line in self.fields)
        return [(name.decode("latin-1"), value.strip(b" \t").decode("latin-1")) for name, _, value in pairs]

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def __contains__(self, name: str) -> bool:
        return self.get_all(name) is not None

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.fields)


def check_head_bytes(head: bytes) -> None:
    """Refuse control characters and any CR or LF that is not part of a CRLF line end."""
    if head.translate(None, HEAD_BYTES):
        raise HTTPError(400, "control character in message head")
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf:
        raise HTTPError(400, "bare CR or LF in message head (RFC 9112 section 2.2)")


def parse_fields(lines: list[bytes], wanted: frozenset, max_fields: int) -> tuple[list, dict]:
    """Header lines -> ([(lowercase name, line)], {wanted name: [values]}), strictly."""
    if len(lines) - 1 > max_fields:
        raise HTTPError(431, f"more than {max_fields} header fields")
    fields = []
    values: dict = {}
    for line in itertools.islice(lines, 1, None):
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TCHAR):
            raise HTTPError(400, describe_bad_field(line))
        lname = name.lower()
        fields.append((lname, line))
        if lname in wanted:
            values.setdefault(lname, []).append(value.strip(b" \t"))
    return fields, values


def describe_bad_field(line: bytes) -> str:
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding in header (RFC 9112 section 5.2)"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if name.rstrip(b" \t") != name:
        return "whitespace between header name and colon (RFC 9112 section 5.1)"
    return "empty or invalid header name"


def comma_list(values: list[bytes]) -> list[bytes]:
    """Elements of a list-valued field (RFC 9110 section 5.6.1), lowercased, empty ones kept."""
    return [item.strip(b" \t").lower() for value in values for item in value.split(b",")]


def connection_tokens(values: dict) -> frozenset:
    """The Connection field's options, lowercase (RFC 9110 section 7.6.1)."""
    return frozenset(comma_list(values[b"connection"])) if b"connection" in values else frozenset()


def keeps_alive(http11: bool, tokens: frozenset) -> bool:
    """Does the connection stay open after this message (RFC 9112 section 9.3)? HTTP/1.1: unless
    it says close; HTTP/1.0: only if it says keep-alive (RFC 2068 section 19.7.1)."""
    return b"close" not in tokens and (http11 or b"keep-alive" in tokens)


def parse_content_length(values: list[bytes], *, allow_repeats: bool) -> int:
    """RFC 9110 section 8.6. A request may carry one Content-Length, as nginx requires; a response
    may repeat the same value (RFC 9110 allows recipients to accept that), never differing ones."""
    items = [v.strip(b" \t") for value in values for v in value.split(b",")]
    if len(items) > 1 and not (allow_repeats and len(set(items)) == 1):
        raise HTTPError(400, "several Content-Length values")
    length = items[0]
    # bytes.isdigit: ASCII digits only, so no sign, no "0x", no spaces; at most 2**63-1, as HAProxy.
    if not length.isdigit() or len(length) > 19 or int(length) >= 1 << 63:
        raise HTTPError(400, "invalid Content-Length")
    return int(length)


class Request:
    """A request head that passed every check, with what the proxy needs already worked out."""

    __slots__ = ("method", "target", "version", "fields", "host", "framing", "length", "keep_alive",
                 "expect_continue", "connection_tokens", "forwarded_for", "upgrade",
                 # Set after the parse by the handler (ProxyHandler.identify), read by headers_for_upstream:
                 "request_id",   # the client's valid ID (from the parse), else the one made for it
                 "id_drop",      # the ID field's name when the client's own field(s) must go
                 "id_line",      # the ID field to add upstream (None: the client's stays as it is)
                 "via_proxy")    # the trusted proxy it came through (its X-Forwarded-* are kept)

    @property
    def headers(self) -> Headers:
        return Headers(self.fields)


def parse_request_head(head: bytes, config: Config) -> Request:
    """Parse and validate a request head (through its final CRLF CRLF), or raise HTTPError with the
    status to answer: 400 syntax, 413/414/431 limits, 417 expectation, 501 unsupported, 505 version."""
    check_head_bytes(head)
    lines = head.split(b"\r\n")
    del lines[-2:]
    request_line = lines[0]
    if len(request_line) > config.max_request_line:
        raise HTTPError(414, f"request line longer than {config.max_request_line} bytes")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if HTTP_VERSION.fullmatch(version):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HTTPError(400, "malformed request line")
    if not method or method.translate(None, TCHAR):
        raise HTTPError(400, "invalid method")
    if method == b"CONNECT":
        raise HTTPError(501, "CONNECT is not supported")
    if not target or target.translate(None, TARGET_BYTES):
        raise HTTPError(400, "invalid request target")
    authority = None
    if target[0] != 0x2F:  # not origin-form "/..."
        if target == b"*":
            if method != b"OPTIONS":
                raise HTTPError(400, "asterisk-form target is for OPTIONS only")
        else:
            authority, target = split_absolute_form(target)
    header_size = len(head) - len(request_line) - 4  # the field lines with their CRLFs
    if header_size > config.max_header_size:
        raise HTTPError(431, f"header fields larger than {config.max_header_size} bytes")
    if header_size > config.max_field_size and (
            max(map(len, itertools.islice(lines, 1, None))) > config.max_field_size):
        raise HTTPError(431, f"a header field longer than {config.max_field_size} bytes")
    fields, values = parse_fields(lines, config.request_fields, config.max_headers)

    request = Request()
    request.method, request.target, request.version, request.fields = method, target, version, fields
    hosts = values.get(b"host")
    if hosts:
        if len(hosts) > 1:
            raise HTTPError(400, "several Host header fields")
        if not HOST.fullmatch(hosts[0]):
            raise HTTPError(400, "invalid Host header")
    elif version == b"HTTP/1.1":
        raise HTTPError(400, "missing Host header (RFC 9112 section 3.2)")
    # RFC 9112 section 3.2.2: the authority of an absolute-form target replaces Host.
    request.host = authority or (hosts[0] if hosts else None)

    request.connection_tokens = tokens = connection_tokens(values)
    request.keep_alive = keeps_alive(version == b"HTTP/1.1", tokens)
    request.framing, request.length = request_framing(values, version, config.max_body_size)

    request.expect_continue = False
    if b"expect" in values:
        if comma_list(values[b"expect"]) != [b"100-continue"]:
            raise HTTPError(417, "only Expect: 100-continue is supported")
        # RFC 9110 section 10.1.1: an HTTP/1.0 client's Expect is ignored.
        request.expect_continue = request.framing != NO_BODY and version == b"HTTP/1.1"
    request.forwarded_for = values.get(b"x-forwarded-for")
    request.upgrade = upgrade_protocol(request, values[b"upgrade"]) if b"upgrade" in values else None
    request.request_id = request.id_drop = request.id_line = request.via_proxy = None
    key = config.request_id_key
    if key and key in values:
        given = values[key]
        if len(given) == 1 and valid_request_id(given[0]) and key not in tokens:
            request.request_id = given[0]
        else:  # invalid, several, or named in Connection: replaced by a new one
            request.id_drop = key
    return request


def valid_request_id(value: bytes) -> bool:
    """A client's request ID that is passed on as it is: 1-200 visible ASCII characters."""
    return 0 < len(value) <= MAX_REQUEST_ID and not value.translate(None, VISIBLE_ASCII)


def upgrade_protocol(request: Request, offers: list | None) -> bytes | None:
    """The protocol a request asks to switch to (RFC 9110 section 7.8), when it is one the
    balancer tunnels: asked by an HTTP/1.1 request without a body, with Connection: upgrade. h2c
    is never upgraded (an h2c upgrade through a proxy smuggles requests past it); such a request
    goes on as a plain one, its Upgrade removed."""
    if not offers or b"upgrade" not in request.connection_tokens or request.version != b"HTTP/1.1":
        return None
    value = b", ".join(offer.strip(b" \t") for offer in offers)
    protocols = comma_list(offers)
    if request.framing != NO_BODY or b"h2c" in protocols or not all(
            UPGRADE_VALUE.fullmatch(p) for p in protocols):
        return None
    return value


def split_absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """``http://host:port/path?query`` -> (authority, origin-form target)."""
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        raise HTTPError(400, "request target is neither origin-form nor absolute-form")
    rest = target[scheme_end + 3:]
    end = len(rest)
    for separator in (b"/", b"?"):
        found = rest.find(separator)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if not HOST.fullmatch(authority):
        raise HTTPError(400, "invalid authority in absolute-form target")
    return authority, path if path.startswith(b"/") else b"/" + path


def request_framing(values: dict, version: bytes, max_body_size: int) -> tuple[int, int]:
    """How the request body ends (RFC 9112 section 6.3), refusing every ambiguous framing: the
    request smuggling defences of RFC 9112 section 6.1 and 11.2."""
    te = values.get(b"transfer-encoding")
    cl = values.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":  # RFC 9112 section 6.1: faulty framing in HTTP/1.0
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = comma_list(te)
        if codings[-1] != b"chunked":
            raise HTTPError(400, "Transfer-Encoding must end with chunked")
        if len(codings) > 1:
            if any(not c or c.translate(None, TCHAR) or c == b"chunked" for c in codings[:-1]):
                raise HTTPError(400, "invalid Transfer-Encoding")
            raise HTTPError(501, "only the chunked transfer coding is supported")
        return CHUNKED, 0
    if cl is not None:
        length = parse_content_length(cl, allow_repeats=False)
        if max_body_size and length > max_body_size:
            raise HTTPError(413, f"request body larger than {max_body_size} bytes")
        return LENGTH, length
    return NO_BODY, 0


class ResponseHead:
    """A response head that passed every check."""

    __slots__ = ("status", "reason", "version", "fields", "framing", "length", "keep_alive",
                 "connection_tokens", "content_length", "has_date", "upgrade",
                 "id_sent")  # the request-ID field's name, when the upstream sent one


def parse_response_head(head: bytes, request_method: bytes, config: Config) -> ResponseHead:
    """Parse and validate an upstream's response head, or raise HTTPError (answered as 502)."""
    try:
        check_head_bytes(head)
        lines = head.split(b"\r\n")
        del lines[-2:]
        match = STATUS_LINE.fullmatch(lines[0])
        if not match:
            raise HTTPError(502, f"malformed status line {lines[0][:60]!r}")
        if sum(map(len, lines)) + 2 * len(lines) > config.max_header_size + config.max_request_line:
            raise HTTPError(502, f"header fields larger than {config.max_header_size} bytes")
        fields, values = parse_fields(lines, config.response_fields, config.max_headers)
        response = ResponseHead()
        response.id_sent = config.request_id_key if config.request_id_key in values else None
        response.version = 10 + int(match.group(1))
        response.status = status = int(match.group(2))
        response.reason = match.group(3) or b""
        response.fields = fields
        response.has_date = b"date" in values
        response.upgrade = values.get(b"upgrade")
        response.connection_tokens = tokens = connection_tokens(values)
        response.keep_alive = keeps_alive(response.version == 11, tokens)
        te = values.get(b"transfer-encoding")
        cl = values.get(b"content-length")
        response.content_length = None if cl is None else parse_content_length(cl, allow_repeats=True)
        if te is not None and cl is not None:
            raise HTTPError(502, "both Content-Length and Transfer-Encoding")
        if status < 200 or status == 204 or status == 304 or request_method == b"HEAD":
            response.framing, response.length = NO_BODY, 0
        elif te is not None:
            if response.version == 10 or comma_list(te) != [b"chunked"]:
                raise HTTPError(502, "unsupported Transfer-Encoding")
            response.framing, response.length = CHUNKED, 0
        elif cl is not None:
            response.framing, response.length = LENGTH, response.content_length
        else:
            response.framing, response.length = UNTIL_CLOSE, 0
            response.keep_alive = False
        return response
    except HTTPError as error:
        raise HTTPError(502, error.detail) from None


def headers_for_upstream(request: Request, client_ip: bytes, default_host: bytes, *,
                         proto: bytes = b"http", expect: bool = False) -> bytes:
    """The head sent upstream: hop-by-hop fields removed, then Host, framing, Expect and
    X-Forwarded-* set, after the removal, so that a client cannot strip them by naming them in
    Connection. `client_ip`: the client address (ProxyHandler.identify). X-Forwarded-For is that
    address; from a trusted proxy (request.via_proxy) it is the proxy's list extended by the
    proxy's address, and the proxy's own X-Forwarded-Host, -Proto and Forwarded stay. Fields keep
    their order: the framing field and X-Forwarded-For stay where the client put them. The request
    ID (request.id_line) follows X-Forwarded-Proto, unless the client's own valid one stays where
    it is. An upgrade that is tunnelled gets its Connection and Upgrade back."""
    via = request.via_proxy
    drop = DROP_TO_UPSTREAM if via is None else DROP_FROM_TRUSTED
    if request.connection_tokens:
        drop = drop | request.connection_tokens
    if request.id_drop:
        drop = drop | {request.id_drop}
    lines = [b"%s %s HTTP/1.1" % (request.method, request.target), b"Host: " + (request.host or default_host)]
    framing = (b"Content-Length: %d" % request.length if request.framing == LENGTH else
               b"Transfer-Encoding: chunked" if request.framing == CHUNKED else None)
    prior = request.forwarded_for
    if via is None:
        forwarded = b"X-Forwarded-For: " + client_ip  # a client's own list is not believed
    else:
        forwarded = b"X-Forwarded-For: " + (b", ".join(prior) + b", " + via if prior else via)
    if not (framing or prior or expect):  # the usual GET: nothing to put back in place
        lines += [line for lname, line in request.fields if lname not in drop]
        lines.append(forwarded)
    else:
        # Each takes the place of the first dropped field of its name (pop: the first only).
        place = {b"x-forwarded-for": forwarded}
        if framing:
            place[b"content-length"] = place[b"transfer-encoding"] = framing
        if expect:
            place[b"expect"] = b"Expect: 100-continue"
        lines += filter(None, [line if lname not in drop else place.pop(lname, None)
                               for lname, line in request.fields])
        if b"x-forwarded-for" in place:
            lines.append(forwarded)
    kept = () if via is None else {lname for lname, _ in request.fields if lname not in drop}
    if request.host and b"x-forwarded-host" not in kept:
        lines.append(b"X-Forwarded-Host: " + request.host)
    if b"x-forwarded-proto" not in kept:
        lines.append(b"X-Forwarded-Proto: " + proto)
    if request.id_line:
        lines.append(request.id_line)
    if request.upgrade:
        lines.append(b"Connection: upgrade")
        lines.append(b"Upgrade: " + request.upgrade)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def headers_for_client(response: ResponseHead, *, chunked: bool, keep_alive: bool, http10: bool,
                       upgrade: bytes | None = None, request_id: bytes | None = None) -> bytes:
    """The head sent to the client: the upstream's fields minus hop-by-hop ones, re-framed. A 101
    gets its Connection and Upgrade back (the protocol that was asked for). `request_id`: the
    request's ID field line, in place of any the upstream sent (Envoy's
    always_set_request_id_in_response), so that the client sees the ID the log has."""
    drop = DROP_TO_CLIENT | response.connection_tokens if response.connection_tokens else DROP_TO_CLIENT
    if response.id_sent and request_id:
        drop = dropping(drop, response.id_sent)
    lines = [b"HTTP/1.1 %d %s" % (response.status, response.reason)]
    lines += [line for lname, line in response.fields if lname not in drop]
    if request_id:
        lines.append(request_id)
    if response.framing == LENGTH or (response.content_length is not None and response.status != 204):
        # Also for HEAD and 304: there it states the length a GET would have (RFC 9110 8.6).
        lines.append(b"Content-Length: %d" % response.content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    if not response.has_date or b"date" in response.connection_tokens:  # RFC 9110 section 6.6.1
        lines.append(b"Date: " + http_date())
    if upgrade:
        lines.append(b"Connection: upgrade")
        lines.append(b"Upgrade: " + upgrade)
    elif not keep_alive:
        lines.append(b"Connection: close")
    elif http10:
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


@functools.lru_cache(maxsize=64)
def dropping(drop: frozenset, name: bytes) -> frozenset:
    """`drop` with one more field name, made once (a set built per response costs more)."""
    return drop | {name}


FIELD_NAME = operator.itemgetter(0)


def take_cookie(fields: list, prefix: bytes) -> tuple[list, list]:
    """(the values of the cookie `prefix` names (``b"lb="``) in a request's Cookie fields, the
    fields without it). A Cookie field is "; "-separated name=value pairs (RFC 6265 section 5.4;
    a client may send several fields, as an HTTP/2 gateway splits them); one left without a pair
    is dropped, the others keep their pairs and order. A name that only ends in the cookie's
    ("xlb=") or a value holding it ("a=lb=") is someone else's. When the cookie is not there the
    same list comes back. This runs for every request of a sticky balancer: the fields are
    searched in C, and the usual request (one Cookie field, the cookie alone in it) takes no loop."""
    names = list(map(FIELD_NAME, fields))
    count = names.count(b"cookie")
    if not count:
        return [], fields
    if count == 1:
        index = names.index(b"cookie")
        value = fields[index][1].partition(b":")[2].strip(b" \t")
        if value.startswith(prefix) and b";" not in value:
            kept = fields.copy()
            del kept[index]
            return [value[len(prefix):]], kept
        if prefix not in value:
            return [], fields
        indexes = [index]
    else:
        indexes = [index for index, name in enumerate(names) if name == b"cookie"]
    values: list = []
    kept = list(fields)
    for index in reversed(indexes):  # from the last: a removal leaves the earlier indexes as they are
        field_name, _, value = fields[index][1].partition(b":")
        value = value.strip(b" \t")
        if value.startswith(prefix) and b";" not in value:  # the cookie alone in this field
            values.insert(0, value[len(prefix):])
            del kept[index]
            continue
        found, others = [], []
        for pair in value.split(b";"):
            pair = pair.strip(b" \t")
            if pair.startswith(prefix):
                found.append(pair[len(prefix):])
            elif pair:
                others.append(pair)
        values[:0] = found
        if not others:
            del kept[index]
        elif found:
            kept[index] = (b"cookie", field_name + b": " + b"; ".join(others))
    return (values, kept) if values else (values, fields)


def field_value(fields: list, name: bytes) -> bytes | None:
    """The value of the first field named `name` (lowercase), or None."""
    for lname, line in fields:
        if lname == name:
            return line.partition(b":")[2].strip(b" \t")
    return None


_date_cache = [0, b""]


def http_date() -> bytes:
    """The current IMF-fixdate, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = now, email.utils.formatdate(now, usegmt=True).encode("ascii")
    return _date_cache[1]


TEXT_PLAIN = b"text/plain; charset=utf-8"
SERVER_FIELD = b"Server: load_balancer/%s\r\n" % __version__.encode()  # admin and redirect listeners


def own_response(status: int, content_type: bytes, body: bytes, *, close: bool, extra: bytes = b"",
                 head_only: bool = False) -> bytes:
    """The one format of every response the balancer writes itself (its errors, the redirect
    listener's 308, the admin listener's pages): `extra` holds the fields only that answer has
    (Retry-After, Allow, Location), each ending in CRLF. `head_only`: the answer to a HEAD."""
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n%s%s\r\n" % (
        status, HTTPStatus(status).phrase.encode(), content_type, len(body), http_date(), extra,
        b"Connection: close\r\n" if close else b""))
    return head if head_only else head + body


def error_response(status: int, detail: str, *, close: bool, extra: bytes = b"", head_only: bool = False,
                   as_json: bool = False) -> bytes:
    """Every error the balancer answers itself: the status and a one-line reason, as text
    (``503 Service Unavailable: no upstream is available``) or, for the admin API, as JSON."""
    if as_json:
        body, content_type = (json.dumps({"error": detail, "status": status}) + "\n").encode(), b"application/json"
    else:
        body, content_type = f"{status} {HTTPStatus(status).phrase}: {detail}\n".encode("utf-8", "replace"), TEXT_PLAIN
    return own_response(status, content_type, body, close=close, extra=extra, head_only=head_only)


# --- Reading a head and copying a body: one implementation for both directions ---------------------

def read_head(reader: io.BufferedReader, max_size: int, max_line: int, deadline: float,
              set_timeout, *, response: bool = False) -> bytes | None:
    """Read one message head, through the empty line, from a buffered reader; leave the body.

    Returns None at a clean end of stream before the first byte. The wait for the first byte is the
    caller's (its socket timeout); from the first byte on, the whole head must arrive before
    `deadline` (time.monotonic), or HTTPError(408) -- against clients that send a byte at a time.
    Errors: 431 too large, 414 first line too long, 400 incomplete, bare LF line ends, a start
    that no request (a method) or response ("HTTP/") begins with (a TLS handshake sent to a
    plain-HTTP port), or a request line without a version (HTTP/0.9): answered at once rather
    than at the deadline. An error carries what was read, for the log."""
    data = reader.peek(1)
    for _ in range(MAX_LEADING_EMPTY_LINES):
        if data[:1] != b"\r":
            break
        reader.read(1)  # its LF may not have arrived yet
        if reader.peek(1)[:1] != b"\n":
            raise HTTPError(400, "bare CR before the start line")
        reader.read(1)
        data = reader.peek(1)
    if not data:
        return None
    end = data.find(b"\r\n\r\n")
    if 0 <= end <= max_size - 4:
        return reader.read(end + 4)  # the whole head was in one read: the usual case
    head = bytearray()
    try:
        while True:
            start = max(len(head) - 3, 0)
            head += data
            end = head.find(b"\r\n\r\n", start)
            if end >= 0:
                reader.read(end + 4 - (len(head) - len(data)))
                del head[end + 4:]
                if len(head) > max_size:
                    break
                return bytes(head)
            reader.read(len(data))  # the buffer is now empty: the next peek reads the socket once
            if len(head) > max_size:
                break
            if (head[:5] != b"HTTP/"[:len(head)]) if response else head[:1].translate(None, TCHAR):
                raise HTTPError(400, "not an HTTP message")
            line_end = head.find(b"\r\n", 0, max_line + 2)
            if not response and line_end >= 0 and head.count(b" ", 0, line_end) != 2:
                raise HTTPError(400, "malformed request line (HTTP/0.9 is not supported)")
            lf_pending = len(head) == max_line + 1 and head.endswith(b"\r")  # a line of exactly max_line
            if line_end < 0 and len(head) > max_line and not lf_pending:
                raise HTTPError(414, f"request line longer than {max_line} bytes")
            if head.count(b"\n") != head.count(b"\r\n"):  # the CRLF CRLF ending might never come
                raise HTTPError(400, "bare LF line ends (RFC 9112 section 2.2)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HTTPError(408, "head not complete in time")
            set_timeout(remaining)
            try:
                data = reader.peek(1)
            except socket.timeout:
                raise HTTPError(408, "head not complete in time") from None
            if not data:
                raise HTTPError(400, "connection closed in the middle of a head")
    except HTTPError as error:
        error.head = bytes(head)
        raise
    raise HTTPError(431, f"head larger than {max_size} bytes", bytes(head))


def parse_chunk_size(line: bytes) -> int:
    """``1a;ext=val CRLF`` -> 26, strictly (RFC 9112 section 7.1): hex digits only, no sign, no
    "0x", no whitespace except before extensions, at most 16 digits."""
    if not line.endswith(b"\r\n"):
        raise HTTPError(400, "chunk size line not ended by CRLF")
    size, semicolon, extensions = line[:-2].partition(b";")
    if semicolon:
        size = size.rstrip(b" \t")  # BWS before ";" (RFC 9112 section 7.1.1)
        if extensions.translate(None, CHUNK_EXT_BYTES):
            raise HTTPError(400, "control character in chunk extension")
    if not size or len(size) > 16 or size.translate(None, HEXDIG):
        raise HTTPError(400, f"invalid chunk size {size[:20]!r}")
    return int(size, 16)


class ReadError(Exception):
    """Copying a body failed on the reading side: the sender stopped, timed out or broke framing."""


class WriteError(Exception):
    """Copying a body failed on the writing side: the receiver went away or stopped reading."""


def copy_body(reader, write, framing: int, length: int, buffer: bytearray, *, chunked_out: bool,
              max_size: int = 0, max_trailer: int = 32768) -> int:
    """Copy one body from `reader` to `write` as its bytes arrive, in pieces no larger than
    `buffer`. Chunked input is decoded, and the output chunked when `chunked_out` (each piece one
    chunk). Trailer fields are read, checked and dropped, never merged into the header section.
    Returns the payload length. Raises ReadError or WriteError with the cause as __cause__."""
    view = memoryview(buffer)
    if framing == LENGTH:
        return _copy_exactly(reader, write, length, view, False)
    total = 0
    if framing == UNTIL_CLOSE:
        buffered = buffered_bytes(reader)
        while True:
            if buffered:  # read alone (see _copy_exactly)
                piece, buffered = view[:buffered], 0
            else:
                piece = view
            try:
                n = reader.readinto1(piece)
            except OSError as error:
                raise ReadError(error) from error
            if not n:
                break
            total += n
            _write(write, view[:n], chunked_out)
    else:
        while True:
            try:
                size = parse_chunk_size(reader.readline(MAX_CHUNK_LINE))
            except (OSError, HTTPError) as error:
                raise ReadError(error) from error
            if not size:
                break
            total += size
            if max_size and total > max_size:
                too_large = HTTPError(413, f"request body larger than {max_size} bytes")
                raise ReadError(too_large) from too_large
            _copy_exactly(reader, write, size, view, chunked_out)
            try:
                if reader.read(2) != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
            except (OSError, HTTPError) as error:
                raise ReadError(error) from error
        _skip_trailer(reader, max_trailer)
    if chunked_out:
        _write(write, b"0\r\n\r\n", False)
    return total


def _copy_exactly(reader, write, length: int, view: memoryview, chunked_out: bool) -> int:
    remaining = length
    size = len(view)
    buffered = buffered_bytes(reader)
    while remaining:
        if buffered:  # read alone: readinto1 returns them without a wait (see COPY_BUFFER)
            piece = view[:min(buffered, remaining)]
            buffered -= len(piece)
        else:
            piece = view[:remaining] if remaining < size else view
        try:
            n = reader.readinto1(piece)
        except OSError as error:
            raise ReadError(error) from error
        if not n:
            ended = EOFError(f"connection closed {remaining} bytes before the end of the body")
            raise ReadError(ended) from ended
        remaining -= n
        _write(write, view[:n], chunked_out)
    return length


def _write(write, data, chunked_out: bool) -> None:
    try:
        write(b"%x\r\n%s\r\n" % (len(data), data) if chunked_out and data else data)
    except OSError as error:
        raise WriteError(error) from error


def _skip_trailer(reader, max_trailer: int) -> None:
    seen = 0
    while True:
        try:
            line = reader.readline(max_trailer + 1)
        except OSError as error:
            raise ReadError(error) from error
        seen += len(line)
        if line == b"\r\n":
            return
        if seen > max_trailer or not line.endswith(b"\r\n"):
            invalid = HTTPError(400, "invalid or oversized trailer section")
            raise ReadError(invalid) from invalid
        try:
            check_head_bytes(line)
            parse_fields([b"", line[:-2]], frozenset(), 1)
        except HTTPError as error:
            raise ReadError(error) from error


def decode_buffered_chunked(data: bytes, limit: int) -> tuple[bytes, int] | None:
    """A chunked body that is complete in `data` (already received): (decoded body, bytes it
    took), or None when it is not all there or decodes to more than `limit` bytes. Decoded by
    copy_body itself, so exactly as strictly (HTTPError): an error found at the end of `data` only
    means the rest has not arrived."""
    reader = io.BytesIO(data)
    body = bytearray()
    buffer = copy_buffers.get()
    try:
        copy_body(reader, body.extend, CHUNKED, 0, buffer, chunked_out=False, max_size=limit)
    except ReadError as error:
        cause = error.__cause__
        if reader.tell() >= len(data) or isinstance(cause, HTTPError) and cause.status == 413:
            return None
        raise cause from None
    finally:
        copy_buffers.put(buffer)
    return bytes(body), reader.tell()


# ===================================================================================================
# PROXY protocol (HAProxy's spec, versions 1 and 2): pure functions, bytes in, header out
# ===================================================================================================
# A TCP load balancer in front (a cloud's, HAProxy with send-proxy) begins each connection with
# the client's address. Accepted only from --proxy-protocol-from (see ProxyServer.accept_proxy);
# the parsers take what has arrived so far and say: complete (the header and its length), not yet
# (the bytes that may still belong to it), or malformed (ProxyProtocolError), as soon as that is
# known.

PROXY_V1_PREFIX = b"PROXY "
PROXY_V1_MAX = 107                                 # the whole line, CRLF included (spec 2.1)
PROXY_V1_BYTES = frozenset(b"PROXY TCP46UNKNOW0123456789abcdefABCDEF.:\r\n")
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_ADDRESSES = {0x1: (12, "!4s4sHH"), 0x2: (36, "!16s16sHH"), 0x3: (216, None)}  # INET, INET6, UNIX


class ProxyProtocolError(ValueError):
    """A PROXY protocol header that is malformed: the connection is closed without an answer."""


class NoProxyHeader(ProxyProtocolError):
    """The connection does not begin with a PROXY protocol header (answered 400)."""


class ProxyHeader(collections.namedtuple("ProxyHeader", "version command source destination")):
    """A PROXY protocol header: `command` PROXY, LOCAL (v2: the proxy's own connection, a health
    check) or UNKNOWN (v1); `source`, `destination`: (address, port), or None where the header
    carries no address (LOCAL, UNKNOWN, v2 AF_UNSPEC or AF_UNIX): the connection's own is used."""


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader | None, int]:
    """What the first bytes of a connection say: (header, its length) when it is complete,
    (None, the most bytes the header may have) while it is not; NoProxyHeader when they begin
    no PROXY header, ProxyProtocolError when they begin a malformed one."""
    if data[:len(PROXY_V2_SIGNATURE)] == PROXY_V2_SIGNATURE[:len(data)] and data:
        return parse_proxy_v2(data)
    if data[:len(PROXY_V1_PREFIX)] == PROXY_V1_PREFIX[:len(data)]:
        return parse_proxy_v1(data)
    raise NoProxyHeader("the connection does not begin with a PROXY protocol header")


def parse_proxy_v1(data: bytes) -> tuple[ProxyHeader | None, int]:
    """``PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\\r\\n`` (or TCP6, or ``PROXY UNKNOWN ...``):
    single spaces, addresses of the protocol's family, ports 0-65535 without leading zeros."""
    end = data.find(b"\r\n", 0, PROXY_V1_MAX)
    line = data[:end] if end >= 0 else data[:PROXY_V1_MAX]
    if end < 0 and line.endswith(b"\r"):
        line = line[:-1]  # its LF may be on its way
    if not line.startswith(PROXY_V1_PREFIX[:len(line)]) or any(b not in PROXY_V1_BYTES for b in line):
        raise ProxyProtocolError("PROXY v1: not a PROXY line")
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("PROXY v1: a line end other than CRLF")
    if end < 0:
        if len(data) >= PROXY_V1_MAX:
            raise ProxyProtocolError(f"PROXY v1: no CRLF within {PROXY_V1_MAX} bytes")
        return None, PROXY_V1_MAX
    parts = line.split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:  # the sender cannot say: the rest of the line is ignored
        return ProxyHeader(1, "UNKNOWN", None, None), end + 2
    if len(parts) != 6:
        raise ProxyProtocolError("PROXY v1: not 6 fields separated by single spaces")
    _, protocol, source, destination, source_port, destination_port = parts
    kind = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}.get(protocol)
    if kind is None:
        raise ProxyProtocolError(f"PROXY v1: unknown protocol {protocol[:8]!r}")
    addresses = []
    for what, text in (("source", source), ("destination", destination)):
        try:
            addresses.append(str(kind(text.decode("ascii"))))
        except ValueError:
            raise ProxyProtocolError(f"PROXY v1: invalid {what} address for {protocol.decode()}") from None
    ports = []
    for what, text in (("source", source_port), ("destination", destination_port)):
        if not text.isdigit() or (text[:1] == b"0" and text != b"0") or int(text) > 65535:
            raise ProxyProtocolError(f"PROXY v1: invalid {what} port")
        ports.append(int(text))
    return ProxyHeader(1, "PROXY", (addresses[0], ports[0]), (addresses[1], ports[1])), end + 2


def parse_proxy_v2(data: bytes) -> tuple[ProxyHeader | None, int]:
    """The binary header: 12-byte signature, version 2 and command (LOCAL or PROXY), family and
    transport, length, addresses; TLVs after the addresses are valid and ignored."""
    if data[:12] != PROXY_V2_SIGNATURE[:min(len(data), 12)]:
        raise ProxyProtocolError("PROXY v2: wrong signature")
    if len(data) > 12 and data[12] >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: version {data[12] >> 4}")
    if len(data) > 12 and data[12] & 0xF > 1:
        raise ProxyProtocolError(f"PROXY v2: unknown command {data[12] & 0xF}")
    if len(data) < 16:
        return None, 16
    command = "LOCAL" if data[12] & 0xF == 0 else "PROXY"
    family, transport = data[13] >> 4, data[13] & 0xF
    length = 16 + int.from_bytes(data[14:16], "big")
    if command == "PROXY" and (family > 3 or transport > 2 or (family and transport != 1)):
        raise ProxyProtocolError(f"PROXY v2: unsupported family and transport 0x{data[13]:02x}")
    size, layout = PROXY_V2_ADDRESSES.get(family, (0, None)) if command == "PROXY" else (0, None)
    if length - 16 < size:
        raise ProxyProtocolError(f"PROXY v2: {length - 16} bytes of addresses, {size} needed")
    if len(data) < length:
        return None, length
    if layout is None:  # LOCAL (a health check of the proxy itself), AF_UNSPEC, AF_UNIX
        return ProxyHeader(2, command, None, None), length
    source, destination, source_port, destination_port = struct.unpack_from(layout, data, 16)
    return ProxyHeader(2, command, (str(ipaddress.ip_address(source)), source_port),
                       (str(ipaddress.ip_address(destination)), destination_port)), length


def proxy_header_bytes(version: int, source: tuple | None = None, destination: tuple | None = None) -> bytes:
    """The PROXY header a connection to a send-proxy upstream begins with: `source` (the client)
    and `destination` (the address it reached) as (address, port); without them v1 ``UNKNOWN``,
    v2 ``LOCAL`` (the balancer's own connection: a health check). An IPv4 address beside an IPv6
    one is written as IPv4-mapped IPv6, so that both are of one family (the spec's rule)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n" if version == 1 else PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    addresses = [ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])]
    addresses = [a.ipv4_mapped or a if a.version == 6 else a for a in addresses]
    if addresses[0].version != addresses[1].version:
        addresses = [ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in addresses]
    six = addresses[0].version == 6
    if version == 1:
        return b"PROXY %s %s %s %d %d\r\n" % (b"TCP6" if six else b"TCP4", str(addresses[0]).encode(),
                                              str(addresses[1]).encode(), source[1], destination[1])
    block = addresses[0].packed + addresses[1].packed + struct.pack("!HH", source[1], destination[1])
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x21 if six else 0x11]) + struct.pack("!H", len(block)) + block


def read_proxy_header(sock: socket.socket, deadline: float) -> ProxyHeader:
    """Read a PROXY header from a new connection, taking exactly its bytes off the socket (what
    follows, HTTP or a TLS handshake, stays for the stream): peek at what has arrived, take the
    bytes that surely belong to the header, wait for more until `deadline` (socket.timeout).
    Raises what parse_proxy_header raises, and ProxyProtocolError for a close within a header."""
    data = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        arrived = sock.recv(PROXY_V1_MAX if len(data) < 16 else 65536, socket.MSG_PEEK)
        if not arrived:
            raise ProxyProtocolError("closed in the middle of a PROXY header")
        header, length = parse_proxy_header(data + arrived)
        take = (length - len(data)) if header is not None else len(arrived)
        while take:
            piece = sock.recv(take)
            if not piece:
                raise ProxyProtocolError("closed in the middle of a PROXY header")
            data += piece
            take -= len(piece)
        if header is not None:
            return header


# ===================================================================================================
# Streams: one per connection, plain or TLS, the same methods
# ===================================================================================================
# Handlers and upstream connections never touch a file descriptor: they read, write, time out and
# check for reuse through a Stream. The plain one keeps the fast paths (kernel timeouts, libc send
# keeping the GIL, TCP_INFO); the TLS one uses the SSLSocket's own methods and pending(), since the
# kernel only sees ciphertext there (a libc send on its descriptor would bypass TLS).

if sys.platform.startswith("linux"):
    # Kernel timeouts on blocking sockets: each read or write is one system call. Python's own
    # socket timeouts put a poll() before every call, and a switch of the GIL with it.
    def set_timeout(sock: socket.socket, seconds: float) -> None:
        seconds = max(seconds, 0.001)  # a zero timeval would mean "wait forever"
        value = struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
else:
    def set_timeout(sock: socket.socket, seconds: float) -> None:
        sock.settimeout(seconds)


def libc_send():
    """libc's send(2) through ctypes.PyDLL, which keeps the GIL during the call, or None.

    socket.send() gives up the GIL for every system call, even one that cannot block: under load
    the GIL is then taken by another thread, and getting it back costs two context switches.
    With MSG_DONTWAIT the call cannot block, so it may keep the GIL (when: FairGate.keep_gil).
    Measured here at 32 connections (wrk, nginx upstreams, one worker, A/B over 3 rounds): context
    switches per request 8.1 -> 4.6, system CPU per request 61 -> 39 us, requests/s +18%."""
    if not MSG_DONTWAIT:
        return None
    try:
        import ctypes
        send = ctypes.PyDLL(None).send
    except (ImportError, OSError, AttributeError, TypeError):  # no _ctypes, or no libc symbol
        return None
    send.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
    send.restype = ctypes.c_ssize_t
    return send


LIBC_SEND = libc_send()


class Stream:
    """A plain TCP connection. Blocking, with kernel timeouts (see set_timeout)."""

    tls = False
    scheme = b"http"

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.timeout_now = 0.0
        self.reader = io.BufferedReader(SocketReader(self), READ_BUFFER)
        self._poller = None
        self.write_closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def set_timeout(self, seconds: float) -> None:
        if seconds != self.timeout_now:
            set_timeout(self.sock, seconds)
            self.timeout_now = seconds

    def send_now(self, data, keep_gil: bool = True) -> int:
        """Send what the kernel takes at once, never blocking: the number of bytes sent. 0 also
        when the send failed: the caller's blocking send of the rest reports the error.
        `keep_gil=False` lets other threads run during the system call (see FairGate.keep_gil)."""
        if keep_gil and LIBC_SEND is not None and type(data) is bytes:
            sent = LIBC_SEND(self.fd, data, len(data), SEND_NOW_FLAGS)
            return sent if sent > 0 else 0
        if not MSG_DONTWAIT:
            return 0
        try:
            return self.sock.send(data, MSG_DONTWAIT)
        except OSError:
            return 0

    def sendall(self, data) -> None:
        self.sock.sendall(data)

    def pending(self) -> int:
        """Bytes decoded and waiting above the socket (TLS records); none for plain TCP."""
        return 0

    def is_reusable(self) -> bool:
        """An idle connection with something to read was closed by the peer (or is out of step
        with it: bytes nobody asked for would become the next client's answer). On Linux, TCP_INFO
        says it without a system call that gives up the GIL: the connection must still be
        ESTABLISHED and the kernel must have received no byte that was not read
        (tcpi_bytes_received, Linux 4.1+). Elsewhere poll(0) says whether anything is waiting."""
        if TCP_INFO:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_LENGTH)
            if len(info) >= TCP_INFO_LENGTH:
                return info[0] == TCP_ESTABLISHED and (
                    int.from_bytes(info[TCPI_BYTES_RECEIVED], sys.byteorder) == self.reader.raw.received)
        return not self.readable_now()

    def readable_now(self) -> bool:
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        return bool(self._poller.poll(0))

    def has_data(self) -> bool:
        """Is there something to read (bytes, or the end) without waiting?"""
        return bool(unread(self.reader)) or self.readable_now()

    def peer_gone(self) -> bool:
        """Has the peer closed its side or reset the connection (bytes it sent before do not
        count)? Linux's POLLRDHUP says it without reading, under TLS too; elsewhere False (a
        client that left is then found when its answer is written). nginx's check of a broken
        client connection also takes a half-close for a close."""
        if not POLLRDHUP:
            return False
        poller = select.poll()
        poller.register(self.sock, POLLRDHUP)
        return bool(poller.poll(0))

    def write_watching(self, data, check_answer, timeout: float) -> None:
        """Write all of `data`, waiting for room as long as `timeout` allows, calling
        `check_answer()` (which raises EarlyResponse) whenever the peer has something to read: an
        upstream that has answered may never read the rest (who calls: Upload.write)."""
        view = memoryview(data)
        sent = self.send_now(data, keep_gil=False)
        if sent == len(view):
            return
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT | select.POLLIN)
        deadline = time.monotonic() + timeout
        while sent < len(view):
            remaining = deadline - time.monotonic()
            events = poller.poll(max(remaining, 0) * 1000)
            if not events:
                raise socket.timeout("timed out")
            if events[0][1] & select.POLLIN:
                check_answer()
                poller.modify(self.sock, select.POLLOUT)  # read what there was: the end, or no answer yet
            try:
                sent += self.sock.send(view[sent:], MSG_DONTWAIT)
            except BlockingIOError:
                pass

    def shutdown(self, how: int) -> None:
        """Shut the socket down under whatever uses it (for TLS too: the base class's method, which
        leaves the SSL object in place)."""
        try:
            socket.socket.shutdown(self.sock, how)
        except OSError:
            pass

    def shutdown_write(self) -> None:
        """Pass an end of stream on (a half-close), once."""
        if not self.write_closed:
            self.write_closed = True
            self.shutdown(socket.SHUT_WR)

    def set_nonblocking(self) -> None:
        self.sock.setblocking(False)
        self.timeout_now = -1.0

    def read_nonblocking(self, buffer) -> int | None:
        """What can be read now; None when nothing waits, 0 at the end of the stream."""
        try:
            return self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return None

    def recv_now(self, buffer) -> int | None:
        """As read_nonblocking, on a blocking socket (one recv with MSG_DONTWAIT)."""
        try:
            return self.sock.recv_into(buffer, 0, MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def write_nonblocking(self, data) -> int:
        """What the socket takes now (0: nothing). TLS: call again with the same bytes."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def close(self) -> None:
        self.sock.close()


class TLSStream(Stream):
    """A TLS connection (ssl.SSLSocket), in Python's timeout mode: the kernel's byte counts and
    readiness are ciphertext, so reuse checks and reads go through the SSLSocket."""

    tls = True
    scheme = b"https"

    def set_timeout(self, seconds: float) -> None:
        if seconds != self.timeout_now:
            self.sock.settimeout(max(seconds, 0.001))
            self.timeout_now = seconds

    def send_now(self, data, keep_gil: bool = True) -> int:
        return 0  # a TLS record is written whole by sendall, never in part

    def pending(self) -> int:
        return self.sock.pending()

    def is_reusable(self) -> bool:
        return not self.has_data()

    def has_data(self) -> bool:
        """Application data (or the end) waiting. What polls as readable may be TLS 1.3 session
        tickets, sent unasked after the handshake: a non-blocking read tells them apart."""
        if unread(self.reader) or self.sock.pending():
            return True
        if not self.readable_now():
            return False
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            self.reader.peek(1)
            return True
        except socket.timeout:
            return False
        except OSError:
            return True  # an error waits: whoever reads next reports it
        finally:
            self.sock.settimeout(timeout)

    def write_watching(self, data, check_answer, timeout: float) -> None:
        """As Stream.write_watching. A TLS record that did not fit is written again, the same
        bytes (OpenSSL's rule), after each short wait that finds no answer."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        saved = self.sock.gettimeout()
        self.sock.settimeout(0.2)
        try:
            while view:
                piece = view[:16384]
                try:
                    self.sock.sendall(piece)
                    view = view[len(piece):]
                except socket.timeout:
                    check_answer()
                    if time.monotonic() >= deadline:
                        raise
        finally:
            self.sock.settimeout(saved)

    def shutdown_write(self) -> None:
        """Pass an end of stream on as TLS does: a close_notify alert (SSL_shutdown), sent without
        waiting for the peer's; reading goes on until the peer's own close_notify (or end)."""
        if self.write_closed:
            return
        self.write_closed = True
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            self.sock.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # ours is sent; the peer's close_notify is read later as the end of its stream
        except (OSError, ValueError):
            pass  # the connection is gone already: whoever reads next sees that
        finally:
            self.sock.settimeout(timeout)

    def read_nonblocking(self, buffer) -> int | None:
        try:
            return self.sock.recv_into(buffer)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None

    def recv_now(self, buffer) -> int | None:
        """Decoded bytes that wait above the socket; None otherwise (a TLS socket takes no flags)."""
        return self.sock.recv_into(buffer) if self.sock.pending() else None

    def write_nonblocking(self, data) -> int:
        try:
            return self.sock.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return 0


class UnixStream(Stream):
    """A Unix stream socket (a unix: upstream): a plain Stream without TCP_INFO, which only TCP
    sockets have; an idle one is fit for reuse when nothing waits to be read (poll)."""

    def is_reusable(self) -> bool:
        return not self.readable_now()


class SocketReader(io.RawIOBase):
    """The raw stream under a BufferedReader: one recv per read, a timeout reported as
    socket.timeout (socket.makefile would turn it into an end of stream), and a position, so that
    ``unread(reader)`` can tell how many bytes wait in the buffer without reading the socket."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.recv_into = stream.sock.recv_into  # bound once: one call less per read
        self.recv_now = stream.recv_now
        self.received = 0
        self.watch = None  # called before a read that would wait, see Upload.before_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.watch is not None:
            n = self.recv_now(buffer)
            if n is not None:
                self.received += n
                return n
            self.watch(self.stream)
        try:
            n = self.recv_into(buffer)
        except (BlockingIOError, ssl.SSLWantReadError):
            raise socket.timeout("timed out") from None
        self.received += n
        return n

    def tell(self) -> int:
        return self.received


def unread(reader: io.BufferedReader) -> int:
    """Bytes received and buffered but not yet read (BufferedReader.tell = raw position - those)."""
    return reader.raw.received - reader.tell()


def buffered_bytes(reader) -> int:
    """What copy_body's `reader` holds above its socket (0 for one that reads no socket, which
    never waits: decode_buffered_chunked's BytesIO)."""
    return unread(reader) if isinstance(getattr(reader, "raw", None), SocketReader) else 0


class BufferPool:
    """Copy buffers reused across requests: streaming a body allocates nothing per request."""

    def __init__(self, size: int = COPY_BUFFER, keep: int = COPY_BUFFERS_KEPT):
        self.size, self.keep = size, keep
        self._free: list = []

    def get(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(self.size)

    def put(self, buffer: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buffer)


copy_buffers = BufferPool()



# ===================================================================================================
# Shared state: one block of memory for every process of a balancer
# ===================================================================================================
# With --workers N, N processes serve one balancer. What belongs to the balancer rather than to a
# process lives in one block of shared memory: the backend set (written by the process that owns
# it: the supervisor), each upstream's state (health by the owner's checker; passive ejections by
# any worker; drain and maint by the admin API), and one counter block per worker, written by that
# worker only. The owner adds the blocks up for /status and /metrics, so every scrape is exact, and
# a worker that dies loses nothing it counted: its block outlives it. Counters take no lock across
# processes (each block has one writing process); state changes are rare and take SharedLock.
# With one worker the same block is private memory of one process.

METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"other")
METHOD_INDEX = {method: index for index, method in enumerate(METHODS[:-1])}
OTHER_METHOD = len(METHODS) - 1
STATUS_CODES = tuple(sorted({int(status) for status in HTTPStatus}))
CODE_INDEX = {code: index for index, code in enumerate(STATUS_CODES)}
N_CODES = len(STATUS_CODES) + 5  # codes without a name (299, 599) are counted per class: "2xx"
# Latency buckets (seconds), ten a decade from 0.1 ms to 60 s: fine enough for a p99 over the last
# minute. /metrics exports the subset EXPORTED_BOUNDS, the usual Prometheus boundaries.
LATENCY_BOUNDS = tuple(bound for bound in (round(m * 10.0 ** e, 6) for e in range(-4, 2)
                                           for m in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8)) if bound <= 60)
EXPORTED_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
ERROR_KINDS = ("connect", "tls", "timeout", "closed", "invalid", "body", "idle")
# Kinds that say nothing against the upstream: a response body idle for --timeout (an event stream,
# a long poll) is the application's way, and is cut without counting toward --max-fails.
NOT_AGAINST_THE_UPSTREAM = frozenset({"idle"})

# The header: generations that tell every process to look again. H_PICKS: picks counted by
# SharedState.acquire, by every worker.
(H_GENERATION, H_TLS_GENERATION, H_CONFIG_LENGTH, H_TLS_LENGTH, H_STICKY_KEY_LENGTH, H_PICKS,
 H_LISTS_GENERATION, H_LISTS_LENGTH, H_RATE_INTERVAL, H_RATE_BURST) = range(10)
HEADER_INTS = 12
CONFIG_BYTES = 64 * 1024
TLS_BYTES = 64 * 1024  # the certificate chain and key a reload checked, for every worker to load
STICKY_KEY_BYTES = 32  # the key of the sticky cookie's HMAC, the owner's, for every worker
LISTS_BYTES = 256 * 1024  # the address lists a reload read (JSON), for every worker: MAX_RANGES
# The rate-limit table (--rate-limit): one token bucket per client address, shared by every
# worker, RATE_TABLE_SIZE addresses at most; a new address when it is full takes the place of the
# least recently seen one (nginx's limit_req zone: 16,000 addresses a megabyte, evicted the same
# way). A bucket is one number, its theoretical arrival time (GCRA: a token bucket kept as the time
# at which it is full again). Rows are numbered from 1 (0: none), in one hash table (chains, on a
# keyed hash so that nobody can aim addresses at one chain) and one list from newest to oldest.
RATE_TABLE_SIZE = 16384
RT_SECRET, RT_USED, RT_NEWEST, RT_OLDEST, RT_EVICTIONS = 0, 2, 3, 4, 5  # the secret takes two ints
RATE_HEADER_INTS = 8
R_HIGH, R_LOW, R_TAT, R_NEWER, R_OLDER, R_CHAIN, R_BUCKET = range(7)  # the address is two ints
RATE_ROW_INTS = 7
RATE_TAKE_AHEAD = 256  # tokens a worker may take at once (see Guard)
# Each upstream slot's state. S_RAMP_START: when it came back (CLOCK_MONOTONIC us), for --slow-start.
(S_IN_USE, S_HEALTH, S_ADMIN, S_EJECTED_UNTIL, S_EJECTED_UNTIL_WALL, S_CONSECUTIVE_FAILURES,
 S_CHECKS_PASSED, S_CHECKS_FAILED, S_EJECTIONS, S_SINCE, S_REASON_LENGTH, S_RAMP_START) = range(12)
STATE_INTS = 12
REASON_BYTES = 240
HEALTH_STATES = ("unchecked", "up", "down")            # S_HEALTH's values, by name
HEALTH_UNCHECKED, HEALTH_UP, HEALTH_DOWN = range(3)
ADMIN_STATES = ("ready", "drain", "maint")             # S_ADMIN's values, by name
LAPSED_EJECTION = "back in rotation: its fail timeout passed"
# Each worker's block: its process, then one record per upstream slot.
(P_PID, P_CONNECTIONS, P_TUNNELS_OPEN, P_TUNNELS, P_TUNNEL_BYTES_UP, P_TUNNEL_BYTES_DOWN,
 P_RECEIVED, P_SENT, P_RESTARTS, P_ACCEPTED, P_STICKY_HITS, P_STICKY_REPICKS, P_DENIED,
 P_RATE_LIMITED) = range(14)
P_IN_FLIGHT, P_RESPONSES = 14, 15  # derived (Control.counters), never written by a worker
# The queue (RequestQueue): its length now, requests that waited, that timed out waiting, that
# found it full; the time they waited (microseconds) and its histogram over LATENCY_BOUNDS (+Inf).
(P_QUEUE_LENGTH, P_QUEUED, P_QUEUE_TIMEOUTS, P_QUEUE_FULL, P_QUEUE_WAIT_SUM) = range(16, 21)
P_QUEUE_HISTOGRAM = 21
PROCESS_INTS = P_QUEUE_HISTOGRAM + len(LATENCY_BOUNDS) + 1
U_CODES = 0
U_HISTOGRAM = U_CODES + len(METHODS) * N_CODES
U_LATENCY_SUM = U_HISTOGRAM + len(LATENCY_BOUNDS) + 1   # microseconds
U_ERRORS = U_LATENCY_SUM + 1
U_RETRIES = U_ERRORS + len(ERROR_KINDS)
U_ATTEMPTS = U_RETRIES + 1
U_IN_FLIGHT = U_ATTEMPTS + 1
U_IDLE = U_IN_FLIGHT + 1
UPSTREAM_INTS = U_IDLE + 1
WORKER_INTS = PROCESS_INTS + (MAX_UPSTREAMS + 1) * UPSTREAM_INTS
# Each worker's row of requests in flight per upstream slot (see SharedState.acquire).
IN_FLIGHT_INTS = MAX_UPSTREAMS + 1


def memory_directory() -> str | None:
    """Where a file is kept in memory (tmpfs), if there is such a place; else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def monotonic_us() -> int:
    """CLOCK_MONOTONIC in microseconds: one clock for every process of the machine."""
    return int(time.monotonic() * 1e6)


def panic_mode(states) -> bool:
    """Envoy's panic threshold, at zero: no upstream is up, and some are out only because of
    failed requests (not health checks, not an operator). Routing then tries those anyway."""
    states = list(states)
    return "up" not in states and "ejected" in states


def shown_state(routing: str) -> str:
    """The state /status and the dashboard show for a routing state: an upstream out after failed
    requests shows as down (HAProxy shows a server taken out by observe as DOWN too); the
    `ejected` field tells the two apart."""
    return "down" if routing == "ejected" else routing


def code_index(status: int) -> int:
    index = CODE_INDEX.get(status)
    return len(STATUS_CODES) + min(max(status // 100, 1), 5) - 1 if index is None else index


def rate_buckets() -> int:
    """The rate table's hash chains: a power of two, at least one per address."""
    return 1 << (RATE_TABLE_SIZE - 1).bit_length()


def code_label(index: int) -> str:
    return str(STATUS_CODES[index]) if index < len(STATUS_CODES) else f"{index - len(STATUS_CODES) + 1}xx"


class SharedLock:
    """A lock for every thread of every process of one balancer: a threading.Lock inside the
    process, and a POSIX record lock (lockf) across processes, which the kernel releases when its
    holder dies, so a killed worker cannot leave the others waiting."""

    def __init__(self, file=None):
        self.file = file
        self.local = threading.Lock()

    def __enter__(self) -> None:
        self.local.acquire()
        if self.file is not None:
            fcntl.lockf(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            fcntl.lockf(self.file, fcntl.LOCK_UN)
        self.local.release()


class SharedState:
    """The block of memory one balancer's processes share; who writes what is in the banner above.
    Made by the owner (``create``) before any worker starts; a worker process maps the same file
    (``attach``)."""

    def __init__(self, memory: mmap.mmap, workers: int, lock: SharedLock, files=()):
        self.memory, self.worker_count, self.lock, self.files = memory, workers, lock, files
        # acquire()'s: the process's own lock alone where no other process shares the block.
        self.pick_lock = lock if lock.file is not None else lock.local
        view = memoryview(memory)
        offset = 0

        def take(size: int, ints: bool = True):
            nonlocal offset
            part = view[offset:offset + size]
            offset += size
            return part.cast("q") if ints else part

        self.header = take(HEADER_INTS * 8)
        self.states = take((MAX_UPSTREAMS + 1) * STATE_INTS * 8)
        self.reasons = take((MAX_UPSTREAMS + 1) * REASON_BYTES, ints=False)
        self.config_area = take(CONFIG_BYTES, ints=False)
        self.tls_area = take(TLS_BYTES, ints=False)
        self.lists_area = take(LISTS_BYTES, ints=False)
        self.rate_header = take(RATE_HEADER_INTS * 8)
        self.rate_buckets = take(rate_buckets() * 8)
        self.rate_rows = take((RATE_TABLE_SIZE + 1) * RATE_ROW_INTS * 8)
        self.rate_secret = self.rate_header[RT_SECRET:RT_SECRET + 2].tobytes()
        self.workers = [take(WORKER_INTS * 8) for _ in range(workers)]
        self.sticky_key_area = take(STICKY_KEY_BYTES, ints=False)
        self.in_flight_rows = [take(IN_FLIGHT_INTS * 8) for _ in range(workers)]

    @staticmethod
    def size(workers: int) -> int:
        rate_table = RATE_HEADER_INTS + rate_buckets() + (RATE_TABLE_SIZE + 1) * RATE_ROW_INTS
        return 8 * (HEADER_INTS + (MAX_UPSTREAMS + 1) * STATE_INTS + rate_table
                    + workers * (WORKER_INTS + IN_FLIGHT_INTS)) + (
            (MAX_UPSTREAMS + 1) * REASON_BYTES + CONFIG_BYTES + TLS_BYTES + STICKY_KEY_BYTES + LISTS_BYTES)

    @classmethod
    def create(cls, workers: int = 1, *, processes: bool = False) -> SharedState:
        """`processes`: a file-backed block (in /dev/shm where there is one) that worker processes
        map by its descriptor, with a lock file; else private memory."""
        size = cls.size(workers)
        if not processes:
            memory, lock, files = mmap.mmap(-1, size), SharedLock(), ()
        else:
            block, lock_file = tempfile.TemporaryFile(dir=memory_directory()), tempfile.TemporaryFile()
            os.ftruncate(block.fileno(), size)
            memory, lock, files = mmap.mmap(block.fileno(), size), SharedLock(lock_file), (block, lock_file)
        state = cls(memory, workers, lock, files)
        state.rate_secret = os.urandom(16)  # the rate table's hash key, before any worker maps the block
        state.rate_header[RT_SECRET:RT_SECRET + 2] = memoryview(state.rate_secret).cast("q")
        return state

    @classmethod
    def attach(cls, block_fd: int, lock_fd: int, workers: int) -> SharedState:
        lock_file = os.fdopen(lock_fd, "r+b")
        return cls(mmap.mmap(block_fd, cls.size(workers)), workers, SharedLock(lock_file), (lock_file,))

    # -- the backend set (owner writes, workers read) -------------------------------------------

    # -- the owner's areas: bytes it publishes for every process, each with its length ----------

    def _write_area(self, area, length: int, data: bytes, what: str) -> None:
        """Put `data` in `area` (its size in the header at `length`). Called with the lock held."""
        if len(data) > len(area):
            raise ValueError(f"{what} take(s) more than {len(area)} bytes")
        area[:len(data)] = data
        self.header[length] = len(data)

    def _read_area(self, area, length: int) -> bytes:
        """What _write_area put there last (b"": nothing yet). Called with the lock held."""
        return bytes(area[:self.header[length]])

    def publish(self, entries: list) -> None:
        """Make [(slot, backend text, address or None)] the backend set every process routes over
        (the address a host name resolved to: see Control.resolve)."""
        data = json.dumps(entries).encode()
        in_use = {entry[0] for entry in entries}
        with self.lock:
            self._write_area(self.config_area, H_CONFIG_LENGTH, data, "the backend list")
            for slot in range(1, MAX_UPSTREAMS + 1):
                self.states[slot * STATE_INTS + S_IN_USE] = slot in in_use
            self.header[H_GENERATION] += 1

    def backend_set(self) -> list:
        with self.lock:
            return json.loads(self._read_area(self.config_area, H_CONFIG_LENGTH) or b"[]")

    def worker_died(self, index: int) -> None:
        """A worker's process is gone (who calls: supervise, before it starts the next one): what
        it had open is gone, what it counted stays, and it counts as a restart."""
        counters = self.workers[index]
        for gauge in (P_PID, P_CONNECTIONS, P_TUNNELS_OPEN, P_QUEUE_LENGTH):
            counters[gauge] = 0
        for slot in range(MAX_UPSTREAMS + 1):
            base = stats_base(slot)
            counters[base + U_IN_FLIGHT] = counters[base + U_IDLE] = 0
        with self.lock:
            self.in_flight_rows[index][:] = memoryview(bytes(8 * IN_FLIGHT_INTS)).cast("q")
        counters[P_RESTARTS] += 1

    def publish_tls(self, pem: bytes) -> None:
        """Make `pem` (certificate chain and key, as the owner checked it) what every worker's
        next connection uses."""
        with self.lock:
            self._write_area(self.tls_area, H_TLS_LENGTH, pem, "the certificate chain and key")
            self.header[H_TLS_GENERATION] += 1

    def tls_pem(self) -> tuple[int, bytes]:
        """(generation, the last published chain and key); b"" before the first reload."""
        with self.lock:
            return self.header[H_TLS_GENERATION], self._read_area(self.tls_area, H_TLS_LENGTH)

    def publish_sticky_key(self, key: bytes) -> None:
        """The sticky cookie's HMAC key, decided once by the owner (see sticky_cookie_key), for
        every worker: a random one must be the same in all of them."""
        with self.lock:
            self._write_area(self.sticky_key_area, H_STICKY_KEY_LENGTH, key[:STICKY_KEY_BYTES], "the sticky key")
            self.header[H_GENERATION] += 1

    def sticky_key(self) -> bytes:
        """b"" until the owner has published one."""
        with self.lock:
            return self._read_area(self.sticky_key_area, H_STICKY_KEY_LENGTH)

    # -- requests in flight at each upstream, exact across workers --------------------------------
    # Each worker counts what it sends in its own row (no other process writes it, so a worker
    # that dies takes its counts with it: worker_died zeroes the row); the count of a slot is the
    # sum of the rows. Paid only where something reads it: --balance leastconn (and, later,
    # per-upstream caps: a cap is a `choose` that returns None when the count is at the cap).

    def acquire(self, worker: int, choose, *args):
        """Count one more request in flight at what `choose(*args, self.loads)` returns (anything
        with a `slot`; None: nothing, counted nowhere), as one step for every thread of every worker:
        no two picks count from the same counts, so that 24 requests from 8 threads in 2 workers
        over 3 idle upstreams land exactly 8 on each. Returns what `choose` returned.

        Optimistic: `choose` runs without the lock, and the count is taken under it only if no
        other pick was counted meanwhile (H_PICKS), else it chooses again. The lock is never held
        across Python code that may give the GIL up: a thread that held it while the interpreter
        switched threads (every 5 ms under load) would queue every other pick behind it."""
        header, row = self.header, self.in_flight_rows[worker]
        while True:
            picks = header[H_PICKS]
            chosen = choose(*args, self.loads)
            if chosen is None:
                return None
            with self.pick_lock:
                if header[H_PICKS] == picks:
                    header[H_PICKS] = picks + 1
                    row[chosen.slot] += 1
                    return chosen

    def release(self, worker: int, slot: int) -> None:
        """A request that acquire() counted has ended (its tunnel too). Only this process writes
        its row: the process's lock is enough."""
        with self.lock.local:
            self.in_flight_rows[worker][slot] -= 1

    def in_flight(self, slot: int) -> int:
        """Requests in flight (and open tunnels) at `slot` that acquire() counted, every worker's."""
        total = 0
        for row in self.in_flight_rows:
            total += row[slot]
        return total

    def loads(self, slots) -> tuple:
        """in_flight() of each of `slots` (an operator.itemgetter of two or more slots: a pick
        reads every candidate's in one C call a row)."""
        rows = self.in_flight_rows
        counts = slots(rows[0])
        for row in rows[1:]:
            counts = tuple(map(operator.add, counts, slots(row)))
        return counts

    def publish_lists(self, lists: AccessLists, rate: str | None = None) -> None:
        """Make `lists` (as the owner read them) and the --rate-limit `rate` what every worker's
        next request is checked against (ValueError when they take more than LISTS_BYTES)."""
        data = json.dumps({name: [str(network) for network in networks]
                           for name, networks in lists._asdict().items()}).encode()
        interval, burst = parse_rate_limit(rate) if rate else (0, 0)
        with self.lock:
            self._write_area(self.lists_area, H_LISTS_LENGTH, data, "the address lists")
            self.header[H_RATE_INTERVAL], self.header[H_RATE_BURST] = interval, burst
            self.header[H_LISTS_GENERATION] += 1

    def rate_limit(self) -> tuple[int, int]:
        """(microseconds between two requests, burst) as the owner last published them; (0, 0)
        for none."""
        with self.lock:
            return self.header[H_RATE_INTERVAL], self.header[H_RATE_BURST]

    def access_lists(self) -> tuple[int, AccessLists | None]:
        """(generation, the last published lists); None before the first publish."""
        with self.lock:
            generation, data = self.header[H_LISTS_GENERATION], self._read_area(self.lists_area, H_LISTS_LENGTH)
        if not data:
            return generation, None
        return generation, AccessLists(**{name: tuple(ipaddress.ip_network(text) for text in texts)
                                          for name, texts in json.loads(data).items()})

    # -- the rate-limit table (any worker, under the lock) -------------------------------------

    def rate_key(self, address: bytes) -> tuple[int, int, int]:
        """A client's 16-byte address (IPv4 as IPv4-mapped IPv6) as the table keys it: (high, low,
        hash chain). Computed once per address and kept by the caller."""
        high, low = struct.unpack("<qq", address)
        digest = hashlib.blake2b(address, key=self.rate_secret, digest_size=8).digest()
        return high, low, int.from_bytes(digest, "little") & (len(self.rate_buckets) - 1)

    def take_tokens(self, key: tuple[int, int, int], now_us: int, interval_us: int, tolerance_us: int,
                    share: int = 0) -> tuple[int, int]:
        """A request from the address `key` (rate_key): (tokens taken, 0) if it may pass, else
        (0, microseconds until it may). GCRA: the bucket is the time at which it is full again; a
        request passes while that is at most `tolerance_us` (burst - 1 intervals) ahead, and moves
        it `interval_us` on. `share` > 0: take up to 1/share of the tokens there are (at most
        RATE_TAKE_AHEAD) instead of one, for the caller to spend without the lock."""
        high, low, bucket = key
        rows = self.rate_rows
        with self.lock:
            row = self.rate_buckets[bucket]
            while row:
                base = row * RATE_ROW_INTS
                if rows[base + R_LOW] == low and rows[base + R_HIGH] == high:
                    if row != self.rate_header[RT_NEWEST]:
                        self._rate_unlink(row)
                        self._rate_push(row)
                    break
                row = rows[base + R_CHAIN]
            else:
                row = self._rate_new_row(high, low, bucket)
                base = row * RATE_ROW_INTS
            # Never more than a full bucket's worth ahead of now at this rate: a rate a reload raised
            # applies at once to an address the old one had held back.
            due = max(rows[base + R_TAT], now_us)
            if due > now_us + tolerance_us + interval_us:
                due = rows[base + R_TAT] = now_us + tolerance_us + interval_us
            slack = now_us + tolerance_us - due
            if slack < 0:
                return 0, -slack
            taken = 1
            if share:
                taken = max(1, min(RATE_TAKE_AHEAD, (slack // interval_us + 1) // share))
            rows[base + R_TAT] = due + taken * interval_us
            return taken, 0

    def _rate_new_row(self, high: int, low: int, bucket: int) -> int:
        """A row for a new address: an unused one, or the least recently seen one's (unhooked
        from its chain). Pushed as the newest, at the head of `bucket`'s chain, with a full bucket."""
        rows, top = self.rate_rows, self.rate_header
        if top[RT_USED] < RATE_TABLE_SIZE:
            top[RT_USED] += 1
            row = top[RT_USED]
        else:
            row = top[RT_OLDEST]
            self._rate_unlink(row)
            base = row * RATE_ROW_INTS
            link = self.rate_buckets[rows[base + R_BUCKET]]
            if link == row:
                self.rate_buckets[rows[base + R_BUCKET]] = rows[base + R_CHAIN]
            else:
                while rows[link * RATE_ROW_INTS + R_CHAIN] != row:
                    link = rows[link * RATE_ROW_INTS + R_CHAIN]
                rows[link * RATE_ROW_INTS + R_CHAIN] = rows[base + R_CHAIN]
            top[RT_EVICTIONS] += 1
        base = row * RATE_ROW_INTS
        rows[base + R_HIGH], rows[base + R_LOW], rows[base + R_TAT] = high, low, 0
        rows[base + R_BUCKET], rows[base + R_CHAIN] = bucket, self.rate_buckets[bucket]
        self.rate_buckets[bucket] = row
        self._rate_push(row)
        return row

    def _rate_unlink(self, row: int) -> None:
        rows, top = self.rate_rows, self.rate_header
        base = row * RATE_ROW_INTS
        newer, older = rows[base + R_NEWER], rows[base + R_OLDER]
        if newer:
            rows[newer * RATE_ROW_INTS + R_OLDER] = older
        else:
            top[RT_NEWEST] = older
        if older:
            rows[older * RATE_ROW_INTS + R_NEWER] = newer
        else:
            top[RT_OLDEST] = newer

    def _rate_push(self, row: int) -> None:
        rows, top = self.rate_rows, self.rate_header
        base = row * RATE_ROW_INTS
        newest = top[RT_NEWEST]
        rows[base + R_NEWER], rows[base + R_OLDER] = 0, newest
        if newest:
            rows[newest * RATE_ROW_INTS + R_NEWER] = row
        else:
            top[RT_OLDEST] = row
        top[RT_NEWEST] = row

    def rate_table_usage(self) -> tuple[int, int]:
        """(addresses in the rate table, addresses evicted to make room)."""
        return self.rate_header[RT_USED], self.rate_header[RT_EVICTIONS]

    # -- one upstream's state --------------------------------------------------------------------

    def get(self, slot: int, field: int) -> int:
        return self.states[slot * STATE_INTS + field]

    def reason(self, slot: int) -> str:
        start = slot * REASON_BYTES
        return bytes(self.reasons[start:start + self.get(slot, S_REASON_LENGTH)]).decode("utf-8", "replace")

    def _set_reason(self, slot: int, text: str, *, since: bool = True, at: int | None = None) -> None:
        """Write the reason (who calls: reset, set_admin and _explain); `since` now, at `at`
        (wall-clock microseconds), or unchanged."""
        data = text.encode("utf-8", "replace")[:REASON_BYTES]
        start = slot * REASON_BYTES
        self.reasons[start:start + len(data)] = data
        base = slot * STATE_INTS
        self.states[base + S_REASON_LENGTH] = len(data)
        if at is not None:
            self.states[base + S_SINCE] = at
        elif since:
            self.states[base + S_SINCE] = int(time.time() * 1e6)

    def _explain(self, slot: int, text: str, *, since: bool = True, at: int | None = None) -> None:
        """The reason shown is the one that decides the routing state: while an operator's drain
        or maint holds, what health checks and requests find is counted but not written over it."""
        if not self.states[slot * STATE_INTS + S_ADMIN]:
            self._set_reason(slot, text, since=since, at=at)

    def _end_lapsed_ejection(self, slot: int) -> None:
        """An ejection whose --fail-timeout ran out ends where it is next seen (a request, a check,
        an operator): cleared, and said as of when it ran out. Called with the lock held."""
        base = slot * STATE_INTS
        # When it came back stays known: --slow-start ramps from the ejection's end.
        self.states[base + S_RAMP_START] = max(self.states[base + S_RAMP_START], self.states[base + S_EJECTED_UNTIL])
        self.states[base + S_EJECTED_UNTIL] = 0
        self._explain(slot, LAPSED_EJECTION, at=self.states[base + S_EJECTED_UNTIL_WALL])

    def ejection_lapsed(self, slot: int, now_us: int) -> bool:
        """An ejection ran out and nothing has cleared it yet (the state says so, not the text)."""
        return 0 < self.get(slot, S_EJECTED_UNTIL) <= now_us

    def explained(self, slot: int, now_us: int) -> tuple[str, int]:
        """(reason, since) as /status shows them: an ejection that ran out and that nothing has
        cleared yet is said as such."""
        if self.routing_state(slot, now_us) == "up" and self.ejection_lapsed(slot, now_us):
            return LAPSED_EJECTION, self.get(slot, S_EJECTED_UNTIL_WALL)
        return self.reason(slot), self.get(slot, S_SINCE)

    def reset(self, slot: int, reason: str) -> None:
        """A slot given to a new backend name starts as HAProxy starts a server: up, unchecked."""
        with self.lock:
            base = slot * STATE_INTS
            self.states[base:base + STATE_INTS] = memoryview(bytes(8 * STATE_INTS)).cast("q")
            self._set_reason(slot, reason)

    def start_ramp(self, slot: int) -> None:
        """The upstream comes back now: --slow-start ramps its weight from here (who calls: the
        owner's reload for an added upstream). Called with the lock held, or alone."""
        self.states[slot * STATE_INTS + S_RAMP_START] = monotonic_us()

    def ramp_start(self, slot: int, now_us: int) -> int:
        """When the upstream came back into rotation (0: not since it started): the later of the
        last recorded return and the end of an ejection that ran out by itself."""
        base = slot * STATE_INTS
        until = self.states[base + S_EJECTED_UNTIL]
        return max(self.states[base + S_RAMP_START], until if until <= now_us else 0)

    def routing_state(self, slot: int, now_us: int) -> str:
        """What routing sees: up, down (health checks), ejected (passive), drain or maint."""
        base = slot * STATE_INTS
        states = self.states
        if states[base + S_ADMIN]:
            return ADMIN_STATES[states[base + S_ADMIN]]
        if states[base + S_HEALTH] == HEALTH_DOWN:
            return "down"
        if states[base + S_EJECTED_UNTIL] > now_us:
            return "ejected"
        return "up"

    def record_failure(self, slot: int, detail: str, config: Config, *, may_eject: bool) -> bool:
        """A failed request: `config.max_fails` in a row take the upstream out for
        `config.fail_timeout` (Envoy's consecutive gateway failures). True if this took it out."""
        with self.lock:
            base = slot * STATE_INTS
            states = self.states
            states[base + S_CONSECUTIVE_FAILURES] += 1
            failures = states[base + S_CONSECUTIVE_FAILURES]
            now = monotonic_us()
            if not may_eject or failures < config.max_fails or states[base + S_EJECTED_UNTIL] > now:
                return False
            states[base + S_EJECTED_UNTIL] = now + int(config.fail_timeout * 1e6)
            states[base + S_EJECTED_UNTIL_WALL] = int((time.time() + config.fail_timeout) * 1e6)
            states[base + S_EJECTIONS] += 1
            self._explain(slot, f"out for {config.fail_timeout:g}s after {failures} failed requests "
                                f"in a row, last: {detail}")
            self.header[H_GENERATION] += 1
        return True

    def has_failures(self, slot: int) -> bool:
        base = slot * STATE_INTS
        return bool(self.states[base + S_CONSECUTIVE_FAILURES] or self.states[base + S_EJECTED_UNTIL])

    def record_success(self, slot: int) -> bool:
        """A request answered: the failure run ends, and so does an ejection (a request that went
        to it in panic mode succeeded: nginx resets its failure count the same way). True if it
        was out."""
        with self.lock:
            base = slot * STATE_INTS
            self.states[base + S_CONSECUTIVE_FAILURES] = 0
            until = self.states[base + S_EJECTED_UNTIL]
            if not until:
                return False
            now = monotonic_us()
            if until <= now:
                self._end_lapsed_ejection(slot)
                return False
            self.states[base + S_EJECTED_UNTIL] = 0
            self.states[base + S_RAMP_START] = now
            self._explain(slot, "back in rotation: a request to it succeeded")
            self.header[H_GENERATION] += 1
        return True

    def record_check(self, slot: int, ok: bool, health: int | None, reason: str,
                     *, may_end_ejection: bool) -> None:
        """An active check's result: counted; `health` set when rise/fall changed it; an ejection
        in effect ended when `may_end_ejection` (a passing HTTP check). `reason` is written where
        the check decides the routing state: not over an ejection still in effect, nor over an
        operator's state (see _explain); with a new `since` only when routing changes."""
        with self.lock:
            base = slot * STATE_INTS
            states = self.states
            states[base + (S_CHECKS_PASSED if ok else S_CHECKS_FAILED)] += 1
            changed = health is not None and health != states[base + S_HEALTH]
            if changed and health == HEALTH_UP and states[base + S_HEALTH] == HEALTH_DOWN:
                self.start_ramp(slot)  # down -> up; not unchecked -> up, at start
            if health is not None:
                states[base + S_HEALTH] = health
            until = states[base + S_EJECTED_UNTIL]
            ejected = until > monotonic_us()
            if ejected and may_end_ejection:
                states[base + S_EJECTED_UNTIL] = 0
                states[base + S_CONSECUTIVE_FAILURES] = 0
                self.start_ramp(slot)
                ejected, changed = False, True
                reason = "back in rotation: " + reason
            elif until and not ejected:
                self._end_lapsed_ejection(slot)
            if not ejected:
                self._explain(slot, reason, since=changed)
            if changed:
                self.header[H_GENERATION] += 1

    def set_admin(self, slot: int, state: str, reason: str) -> None:
        """An operator's state. Back to ready, the reason also says what still keeps it out."""
        with self.lock:
            base = slot * STATE_INTS
            states = self.states
            if state == "ready" and states[base + S_ADMIN] == ADMIN_STATES.index("maint"):
                self.start_ramp(slot)  # out of maintenance: back as from a failure (HAProxy)
            states[base + S_ADMIN] = ADMIN_STATES.index(state)
            if self.ejection_lapsed(slot, monotonic_us()):
                self._end_lapsed_ejection(slot)
            if state == "ready" and states[base + S_HEALTH] == HEALTH_DOWN:
                reason += "; still down: its health checks fail"
            elif state == "ready" and states[base + S_EJECTED_UNTIL]:
                reason += "; still out after failed requests"
            self._set_reason(slot, reason)
            self.header[H_GENERATION] += 1


class WorkerStats:
    """One worker's counter block. Every thread of the worker writes it under one lock, once a
    request (response(): a few increments); nobody else writes it, so no lock across processes
    is needed. The per-upstream methods take the record's `base` (stats_base(slot), kept by each
    Backend). What can be derived is not counted: requests in flight are the upstreams' in-flight
    tries, responses the histogram's observations (see Control.counters). Gauges (in flight,
    connections, idle connections) and the byte totals are plain stores, not increments:
    ProxyServer.publish_gauges writes them from what its connections hold."""

    def __init__(self, shared: SharedState, index: int):
        self.index = index
        self.counters = shared.workers[index]
        self.lock = threading.Lock()
        self.counters[P_PID] = os.getpid()

    def add(self, field: int, amount: int = 1) -> None:
        with self.lock:
            self.counters[field] += amount

    def failed(self, base: int, kind: str, retry: bool) -> None:
        """A try failed before its answer (`retry`: the request goes on to another upstream)."""
        counters = self.counters
        with self.lock:
            counters[base + U_ATTEMPTS] += 1
            counters[base + U_ERRORS + ERROR_KINDS.index(kind)] += 1
            counters[base + U_RETRIES] += retry

    def error(self, base: int, kind: str) -> None:
        """An upstream failed after its answer began (it broke off the body)."""
        self.add(base + U_ERRORS + ERROR_KINDS.index(kind))

    def queued(self, seconds: float, timed_out: bool) -> None:
        """A request left the queue after `seconds`: with a slot, or (`timed_out`) without."""
        counters = self.counters
        with self.lock:
            counters[P_QUEUED] += 1
            counters[P_QUEUE_TIMEOUTS] += timed_out
            counters[P_QUEUE_WAIT_SUM] += int(seconds * 1e6)
            counters[P_QUEUE_HISTOGRAM + bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def response(self, base: int, method: bytes, status: int, seconds: float) -> None:
        """A response head goes to the client (counted before it is sent, so a client that has its
        answer and then scrapes /metrics finds it counted), and with it the try that got it;
        `seconds` since the request head."""
        index = CODE_INDEX.get(status)
        cell = base + U_CODES + METHOD_INDEX.get(method, OTHER_METHOD) * N_CODES + (
            code_index(status) if index is None else index)
        bucket = base + U_HISTOGRAM + bisect.bisect_left(LATENCY_BOUNDS, seconds)
        counters = self.counters
        with self.lock:
            counters[cell] += 1
            counters[bucket] += 1
            counters[base + U_LATENCY_SUM] += int(seconds * 1e6)
            counters[base + U_ATTEMPTS] += 1


def stats_base(slot: int) -> int:
    """Where upstream slot `slot`'s record starts in a worker's counter block (slot 0: the
    balancer's own answers)."""
    return PROCESS_INTS + slot * UPSTREAM_INTS


OWN_ANSWERS = stats_base(0)


# ===================================================================================================
# Backends and round robin
# ===================================================================================================

class Backend:
    """One upstream as a worker sees it: its settings, its slot in the shared state, its idle
    connections, and the rate limit on its failure log lines."""

    def __init__(self, spec: BackendSpec, slot: int, config: Config, shared: SharedState,
                 stats: WorkerStats | None = None):
        self.spec, self.slot, self.config, self.shared, self.stats = spec, slot, config, shared, stats
        self.states, self.state_base = shared.states, slot * STATE_INTS  # read on every request
        self.stats_base = stats_base(slot)
        self.maint = False                # kept by RoundRobin.refresh: no idle connection is kept
        self.sticky_value = None          # its sticky cookie's value (RoundRobin._sticky_cookies)
        self.name, self.url = spec.name, spec.url
        self.host, self.port = spec.address or spec.host, spec.port
        # In log lines: the URL, and the name too when it is not the URL's own host:port.
        own_name = spec.unix_path or (spec.netloc if urlsplit(spec.url).port else f"{spec.netloc}:{spec.port}")
        self.label = spec.url if spec.name == own_name else f"{spec.name} ({spec.url})"
        self.host_header = spec.netloc.encode("idna")
        self.pool = ConnectionPool(self, config)
        self.failures = RateLimitedLog(f"upstream {self.label}", "failed request(s)")

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.url}>"

    def has_failures(self) -> bool:
        """Failed requests in a row, or an ejection (even one that ran out): the next success
        must be recorded (SharedState.record_success). Read without the lock, once a request."""
        return self.shared.has_failures(self.slot)

    @property
    def state(self) -> str:
        """As /status says: up, down (by health checks, or ejected after failed requests), drain
        or maint."""
        return shown_state(self.shared.routing_state(self.slot, monotonic_us()))


def smooth_weighted_cycle(backends: list, weights: list | None = None) -> tuple:
    """nginx's smooth weighted round robin, computed once for a whole cycle: weights 3,1,1 give
    ``a b a c a`` (never ``a a a b c``), and a pick stays one counter step. `weights`: instead of
    the configured ones (slow start's, see ramped_cycle)."""
    weights = [backend.spec.weight for backend in backends] if weights is None else list(weights)
    divisor = math.gcd(*weights) if weights else 1
    weights = [weight // divisor for weight in weights]
    total = sum(weights)
    current = [0] * len(backends)
    cycle = []
    for _ in range(total):
        best = 0
        for index, weight in enumerate(weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= total
        cycle.append(backends[best])
    return tuple(cycle)


# Slow start (--slow-start): an upstream that comes back (health checks, the end of an ejection, out
# of maint) or that a reload added gets SLOW_START_FLOOR of its weight at first, rising linearly to
# all of it over the window (Envoy's slow start with its default min_weight_percent of 10; nginx
# Plus and HAProxy start nearer 0). Not at start-up, when every upstream is new. The weights live in
# the rotation's cycle, rebuilt SLOW_START_STEPS times over the window, so a pick stays one counter
# step; SLOW_START_SCALE keeps a tenth of a weight a whole number, within MAX_RAMP_CYCLE picks.
SLOW_START_FLOOR = 0.1
SLOW_START_STEPS = 20
SLOW_START_SCALE = 10
MAX_RAMP_CYCLE = 10_000


def slow_start_factor(shared: SharedState, slot: int, window: float, now_us: int) -> float | None:
    """The share of its weight an upstream that is up gets now: between SLOW_START_FLOOR and 1
    while it ramps, None when it does not (or --slow-start is 0)."""
    if not window:
        return None
    start = shared.ramp_start(slot, now_us)
    elapsed = (now_us - start) / 1e6
    if not start or not 0 <= elapsed < window:
        return None
    return SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * elapsed / window


def ramped_cycle(backends: list, factors: dict) -> tuple:
    """The smooth weighted cycle of `backends`, the weight of each one in `factors` (ramping up)
    taken at that share."""
    if not any(backend in factors for backend in backends):
        return smooth_weighted_cycle(backends)
    scale = max(1, min(SLOW_START_SCALE, MAX_RAMP_CYCLE // sum(b.spec.weight for b in backends)))
    return smooth_weighted_cycle(backends, [max(1, round(b.spec.weight * scale * factors.get(b, 1.0)))
                                            for b in backends])


# Consistent hashing (--balance hash): each upstream owns RING_POINTS points per unit of weight on a
# ring of 64-bit hashes (nginx's "hash ... consistent" and ketama place 160), at most
# MAX_RING_POINTS in all. A key goes to the owner of the first point at or after its own hash that
# may take it: an upstream that is out passes its keys to the next points' owners and gets them
# back when it returns, and removing one of N moves its keys only, about 1/N. The points are
# hashes of the upstream's name, so every worker, every restart and every machine with the same
# names builds the same ring. Slow start does not apply here (as in Envoy): a key's upstream is
# its upstream.
RING_POINTS = 160
MAX_RING_POINTS = 1 << 16


def ring_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() is not)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def hash_ring(backends: tuple) -> list:
    """[(point, backend)] for `backends` by their configured weights, sorted by point."""
    total = sum(backend.spec.weight for backend in backends)
    per_weight = max(1, min(RING_POINTS, MAX_RING_POINTS // max(total, 1)))
    points = [(ring_hash(b"%s#%d" % (backend.name.encode(), index)), backend)
              for backend in backends for index in range(backend.spec.weight * per_weight)]
    points.sort(key=operator.itemgetter(0))
    return points


def sticky_cookie_value(key: bytes, name: str) -> bytes:
    """What the sticky cookie holds for the upstream `name`: an HMAC of the name, 128 bits in
    base64url. It says nothing of the upstream's address, and without the key nobody can make one
    (Traefik #2299: a cookie that names the address tells clients the network's layout)."""
    digest = hmac.new(key, b"load_balancer sticky cookie\0" + name.encode(), "sha256").digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=")


MACHINE_ID_PATH = "/etc/machine-id"


def sticky_cookie_key(config: Config) -> bytes:
    """The key of the sticky cookie's HMAC, decided once by the owner of the backend set: from
    --sticky-key; else from this machine's id (systemd's machine-id, itself never shown: only an
    HMAC of it, as sd_id128_get_machine_app_specific does), the same across restarts and workers;
    else random, with a warning (sessions then end with the process)."""
    label = b"load_balancer sticky cookie key"
    if config.sticky_key is not None:
        return hmac.new(read_sticky_key(config.sticky_key), label, "sha256").digest()
    try:
        with open(MACHINE_ID_PATH, "rb") as file:
            machine_id = file.read(4096).strip()
    except OSError:
        machine_id = b""
    if machine_id:
        return hmac.new(machine_id, label, "sha256").digest()
    log.warning("--sticky-cookie %s: no --sticky-key and no %s, so the cookie's key is random: "
                "sessions are pinned only until this balancer restarts", config.sticky_cookie,
                MACHINE_ID_PATH)
    return os.urandom(STICKY_KEY_BYTES)


class Rotation:
    """Where requests go, as of one generation of the shared state: immutable, read without a
    lock. `primary` cycles over the available primaries (in panic mode: over every upstream out
    only by passive ejection), `backup` over the available backups; weights are slow start's. What
    the other policies read: `weights` (leastconn: each member's weight, slow start's share of it),
    `rings` (hash: the primaries' and the backups' rings, as (points, owners, members), only
    points whose owner may take a request), `cookies` (sticky: value -> upstream, for every
    upstream in the set) and `pinnable` (the upstreams a sticky cookie may still send to: the
    members, and those draining whose health is fine). `factors`: upstream -> slow-start share.
    `groups`: (cycle, members, a getter of their slots, their weights or None where they are all
    alike, each cycle entry's index in members) of the primaries, then of the backups, where
    there are some (the getter also takes slot 0, so that one member still gives a tuple)."""

    __slots__ = ("generation", "primary", "backup", "primary_members", "backup_members",
                 "review_at", "panic", "factors", "weights", "groups", "rings", "cookies", "pinnable",
                 "caps")

    def __init__(self, generation: int, primary: tuple, backup: tuple, review_at: int, panic: bool,
                 factors: dict | None = None):
        self.generation, self.primary, self.backup = generation, primary, backup
        self.primary_members, self.backup_members = tuple(set(primary)), tuple(set(backup))
        self.review_at, self.panic = review_at, panic
        self.factors = factors or {}
        self.weights = {backend: backend.spec.weight * self.factors.get(backend, 1.0)
                        for backend in (*self.primary_members, *self.backup_members)}
        self.groups = tuple(
            (cycle, members, operator.itemgetter(*(b.slot for b in members), 0),
             None if len({self.weights[b] for b in members}) == 1 else tuple(self.weights[b] for b in members),
             tuple(map({b: index for index, b in enumerate(members)}.__getitem__, cycle)))
            for cycle, members in ((primary, self.primary_members), (backup, self.backup_members)) if members)
        self.rings = ()
        self.cookies: dict = {}
        self.pinnable: frozenset = frozenset()
        # (members with a maxconn, a getter of their slots and slot 0's, their caps), or None.
        capped = tuple(b for b in (*self.primary_members, *self.backup_members) if b.spec.maxconn)
        self.caps = (capped, operator.itemgetter(*(b.slot for b in capped), 0),
                     tuple(b.spec.maxconn for b in capped)) if capped else None


class RoundRobin:
    """The one place that picks. Round robin by default: strict rotation over the available
    upstreams, weighted and with backups. The n-th pick takes ``cycle[n % len(cycle)]`` from one
    ``itertools.count``: ``next()`` is one C call, atomic under the GIL, so threads never see the
    same number and each cycle's worth of picks follows the cycle exactly. The cycle is rebuilt
    (copy on write) only when the shared state changes generation, an ejection ends, or a slow
    start takes its next step, so a pick is O(1) and takes no lock.

    The other policies read the request (least connections, hash, a sticky cookie): for those,
    route() makes a Route per request: its pick() reads the sticky cookie, then the ring
    (on_ring) or the counts in flight (least_loaded), or falls back on round robin."""

    def __init__(self, shared: SharedState, config: Config, stats: WorkerStats | None = None):
        self.shared, self.config, self.stats = shared, config, stats
        self._header = shared.header
        self.backends: dict = {}          # slot -> Backend, this process's
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._entries: list = []
        self._panic = False
        self._rings: dict = {}            # the backends of a ring -> its points, for this backend set
        self._sticky_key = b""
        self._rotation = Rotation(-1, (), (), 0, False)
        self.worker = stats.index if stats is not None else 0
        # Requests in flight counted (SharedState.acquire): for leastconn, and where an upstream has a
        # maxconn (refresh() decides, as a reload may add or remove caps).
        self.counting = config.balance == "leastconn"
        self.capped = False               # some upstream of the set has a maxconn
        self.queue = RequestQueue(config, stats)
        self.sticky_name = config.sticky_cookie.encode() if config.sticky_cookie else None
        self.sticky_prefix = self.sticky_name + b"=" if self.sticky_name else None
        # (kind, what to look for): a header's lowercase name, a cookie's "name=".
        kind, _, name = config.hash_key.partition(":")
        self.hash_source = (kind, name.lower().encode() if kind == "header" else name.encode() + b"=") \
            if config.balance == "hash" else None
        self.reads_requests = config.balance != "roundrobin" or self.sticky_name is not None
        self.routes = self.reads_requests  # a Route per request (also wherever a cap counts them)
        # Sticky hits and re-picks: one atomic C call a request (no lock), written into the
        # worker's block by publish_counts, after what the block held (a worker started again).
        self.sticky_hits, self.sticky_repicks = itertools.count(), itertools.count()
        self._counted_before = (stats.counters[P_STICKY_HITS], stats.counters[P_STICKY_REPICKS]) \
            if stats is not None else (0, 0)
        self.refresh()

    def follow(self) -> None:
        """Take a change of the shared state now rather than at the next pick: an admin action's
        effect on idle connections should not wait for traffic (who calls: service_actions)."""
        if self._rotation.generation != self.shared.header[H_GENERATION]:
            self.refresh()

    def current(self) -> Rotation:
        """The rotation as of the shared state now (pick() reads it the same way, inline)."""
        rotation = self._rotation
        if rotation.generation != self._header[H_GENERATION] or (
                rotation.review_at and monotonic_us() >= rotation.review_at):
            rotation = self.refresh()
        return rotation

    def pick(self, exclude=()) -> Backend | None:
        rotation = self._rotation
        if rotation.generation != self._header[H_GENERATION] or (
                rotation.review_at and monotonic_us() >= rotation.review_at):
            rotation = self.refresh()
        for cycle, members in ((rotation.primary, rotation.primary_members),
                               (rotation.backup, rotation.backup_members)):
            size = len(cycle)
            if not size:
                continue
            if not exclude:
                return cycle[next(self._counter) % size]
            if all(member in exclude for member in members):
                continue  # every one of them was tried: the backups' turn, without a step
            for _ in range(size):
                backend = cycle[next(self._counter) % size]
                if backend not in exclude:
                    return backend
        return None

    # -- policies that read the request ---------------------------------------------------------

    def route(self, request: Request, client_ip: bytes, secure: bool) -> Route:
        """A request's Route (who calls: ProxyHandler.proxy, when `routes`). The balancer's sticky
        cookie is taken out of the request here: it goes no further (HAProxy's "indirect")."""
        values = key = None
        if self.sticky_prefix is not None:
            values, request.fields = take_cookie(request.fields, self.sticky_prefix)
        if self.hash_source is not None:
            kind, name = self.hash_source
            if kind == "client-ip":
                key = client_ip
            elif kind == "uri":
                key = request.target
            elif kind == "header":
                key = field_value(request.fields, name)
            else:
                found = take_cookie(request.fields, name)[0]
                key = found[0] if found else None
            # None, or empty: round robin (HAProxy's rule for a missing hdr()).
            key = ring_hash(key) if key else None
        return Route(self, secure, values, key)

    def least_loaded(self, rotation: Rotation, exclude, loads) -> Backend | None:
        """nginx's least_conn: the fewest requests in flight (tunnels included) for its weight;
        ties in weighted round-robin order, so an idle pool still rotates. Backups only when no
        primary may take the request. `loads`: SharedState.loads. (Written in whole-list steps:
        a pick runs a request.)"""
        for cycle, members, slots, weights, positions in rotation.groups:
            scores = loads(slots)[:-1]  # the getter's last count is slot 0's
            if weights is not None:
                scores = list(map(operator.truediv, scores, weights))
            if exclude:
                scores = [math.inf if backend in exclude else score for backend, score in zip(members, scores)]
            best = min(scores)
            if best == math.inf:
                continue  # every one of them was tried: the backups' turn
            ties = scores.count(best)
            if ties == 1:
                return members[scores.index(best)]
            size = len(cycle)
            if ties == len(scores):
                return cycle[next(self._counter) % size]
            for _ in range(size):  # every member is in the cycle: found within one turn
                index = next(self._counter) % size
                if scores[positions[index]] == best:
                    return cycle[index]
        return None

    def under_cap(self, rotation: Rotation, tried, key: int | None, loads) -> Backend | None:
        """The policy's pick among the upstreams below their maxconn (HAProxy's maxconn): None
        when every one that may take the request is at its cap. Backups stay for primaries that
        are out or tried, not for busy ones (HAProxy queues rather than use a backup)."""
        exclude = tried
        caps = rotation.caps
        if caps is not None:
            capped, slots, limits = caps
            full = [b for b, count, limit in zip(capped, loads(slots), limits) if count >= limit]
            if full:
                exclude = [*tried, *full]
            if rotation.backup_members and any(b not in tried for b in rotation.primary_members):
                exclude = [*exclude, *rotation.backup_members]
        if self.config.balance == "leastconn":
            return self.least_loaded(rotation, exclude, loads)
        if key is not None:
            return self.on_ring(rotation, key, exclude)
        return self.pick(exclude)

    def pinned_or_under_cap(self, rotation: Rotation, pinned: Backend, tried, key: int | None,
                            loads) -> Backend | None:
        """The upstream a sticky cookie names while it is below its maxconn; at its cap, the request
        is balanced anew (and its client pinned to where it goes: HAProxy's option redispatch)."""
        cap = pinned.spec.maxconn
        if not cap or self.shared.in_flight(pinned.slot) < cap:
            return pinned
        return self.under_cap(rotation, tried, key, loads)

    @staticmethod
    def on_ring(rotation: Rotation, key: int, exclude) -> Backend | None:
        """The owner of the first point at or after `key` on the primaries' ring that is not
        excluded (then on the backups' ring)."""
        for points, owners, members in rotation.rings:
            if not points or all(member in exclude for member in members):
                continue
            size = len(points)
            start = bisect.bisect_left(points, key)
            for step in range(size):
                backend = owners[(start + step) % size]
                if backend not in exclude:
                    return backend
        return None

    # -- the snapshot -------------------------------------------------------------------------

    @property
    def panic(self) -> bool:
        return self._rotation.panic

    def refresh(self) -> Rotation:
        """Rebuild the rotation from the shared state (called by pick() when it changed)."""
        with self._lock:
            shared, config = self.shared, self.config
            generation = shared.header[H_GENERATION]  # read first: a later change is seen next pick
            entries = shared.backend_set()
            if entries != self._entries:
                self._adopt(entries)
                self.capped = any(backend.spec.maxconn for backend in self.backends.values())
                self.counting = config.balance == "leastconn" or self.capped
                self.routes = self.reads_requests or self.capped
            now = monotonic_us()
            states = {slot: shared.routing_state(slot, now) for slot in self.backends}
            up = [b for slot, b in self.backends.items() if states[slot] == "up"]
            ejected = [b for slot, b in self.backends.items() if states[slot] == "ejected"]
            factors = {}
            for backend in up if config.slow_start else ():
                factor = slow_start_factor(shared, backend.slot, config.slow_start, now)
                if factor is not None:
                    factors[backend] = factor
            primary = ramped_cycle([b for b in up if not b.spec.backup], factors)
            backup = ramped_cycle([b for b in up if b.spec.backup], factors)
            panic = panic_mode(states.values())
            if panic:
                # Envoy's panic threshold: with every upstream out only by passive ejection, a 503
                # for everyone is worse than trying them; the first request that succeeds ends it.
                primary = smooth_weighted_cycle(ejected)
            if panic != self._panic:
                self._panic = panic
                (log.warning if panic else log.info)(
                    "panic mode %s: %s", "on" if panic else "off",
                    "every upstream is out after failed requests; trying them anyway" if panic
                    else "an upstream is available again")
            for slot, backend in self.backends.items():
                backend.maint = states[slot] == "maint"
                if backend.maint:
                    backend.pool.close_idle()  # maint: out at once, idle connections closed
            reviews = [shared.get(b.slot, S_EJECTED_UNTIL) for b in ejected]
            if factors:  # the ramp's next step
                reviews.append(now + int(max(config.slow_start / SLOW_START_STEPS, 0.05) * 1e6))
            draining = [b for slot, b in self.backends.items() if states[slot] == "drain"
                        and shared.get(slot, S_HEALTH) != 2] if self.sticky_name else []
            reviews += [until for until in (shared.get(b.slot, S_EJECTED_UNTIL) for b in draining) if until > now]
            rotation = Rotation(generation, primary, backup, min(reviews, default=0), panic, factors)
            if self.hash_source is not None:
                rotation.rings = tuple(self._ring(rotation, backup) for backup in (False, True))
            if self.sticky_name is not None:
                self._sticky_cookies(rotation, [b for b in draining if shared.get(b.slot, S_EJECTED_UNTIL) <= now])
            self._rotation = rotation
            return rotation

    def _ring(self, rotation: Rotation, backup: bool) -> tuple:
        """(points, owners, members) of the primaries' or the backups' ring in `rotation`: the
        ring of every such upstream in the set, whatever its state (cached until the set changes),
        less the points of those that may not take a request now."""
        group = tuple(b for b in self.backends.values() if b.spec.backup == backup)
        ring = self._rings.get(group)
        if ring is None:
            ring = self._rings[group] = hash_ring(group)
        members = rotation.backup_members if backup else rotation.primary_members
        available = set(members)
        kept = [(point, owner) for point, owner in ring if owner in available]
        return [point for point, _ in kept], [owner for _, owner in kept], members

    def _sticky_cookies(self, rotation: Rotation, draining: list) -> None:
        key = self.shared.sticky_key()
        if not key:
            return  # the owner has not published it yet: no cookie is set or honoured
        if key != self._sticky_key:
            self._sticky_key = key
            for backend in self.backends.values():
                backend.sticky_value = None
        for backend in self.backends.values():
            if backend.sticky_value is None:
                backend.sticky_value = sticky_cookie_value(key, backend.name)
        rotation.cookies = {backend.sticky_value: backend for backend in self.backends.values()}
        rotation.pinnable = frozenset((*rotation.primary_members, *rotation.backup_members, *draining))

    def _adopt(self, entries: list) -> None:
        """Take a new backend set: new slots get a Backend, changed ones their new settings (the
        same URL keeps its pooled connections), removed ones close their idle connections (one
        in flight is closed when its request ends, see ConnectionPool.release)."""
        current = {}
        for slot, text, address in entries:
            spec = parse_backend(text)
            if address is not None:
                spec = spec.at(address)
            backend = self.backends.get(slot)
            if backend is not None and backend.spec.url == spec.url:
                backend.spec = spec
            else:
                if backend is not None:
                    backend.pool.close()
                backend = Backend(spec, slot, self.config, self.shared, self.stats)
            current[slot] = backend
        for slot, backend in self.backends.items():
            if slot not in current:
                backend.pool.close()
        self.backends, self._entries = current, entries
        self._rings = {}

    def publish_counts(self) -> None:
        """Sticky hits and re-picks into the worker's block (who calls: publish_gauges, a few
        times a second and before a one-process balancer's /status)."""
        if self.stats is not None and self.sticky_name is not None:
            hits, repicks = self._counted_before
            counters = self.stats.counters
            counters[P_STICKY_HITS] = hits + steps_taken(self.sticky_hits)
            counters[P_STICKY_REPICKS] = repicks + steps_taken(self.sticky_repicks)

    def retry_after(self) -> int:
        """Seconds until an upstream may be back, for Retry-After on a 503."""
        now = monotonic_us()
        pending = [until for until in (self.shared.get(slot, S_EJECTED_UNTIL) for slot in self.backends)
                   if until > now]
        wait = (min(pending) - now) / 1e6 if pending else self.config.health_interval
        return max(1, math.ceil(wait))


def steps_taken(counter: itertools.count) -> int:
    """How far an itertools.count(0) has counted, read without a step (its repr is "count(N)")."""
    return int(repr(counter)[6:-1])


class Route:
    """One request's way through a policy that reads the request (made by RoundRobin.route, only
    when the policy needs it: plain round robin goes without). pick() once a try; answered() once,
    for the upstream whose response goes to the client; end() when the request, or its tunnel,
    is over. With leastconn it holds one count in flight (SharedState.acquire) from the pick to
    the end, moved to the next upstream on a retry."""

    __slots__ = ("round_robin", "secure", "values", "key", "pinned", "counted")

    def __init__(self, round_robin: RoundRobin, secure: bool, values: list | None, key: int | None):
        self.round_robin, self.secure = round_robin, secure
        self.values = values       # the sticky cookie's values the client sent (None: no sticky)
        self.key = key             # the hash of the request's --hash-key (None: it has none)
        self.pinned = None         # the upstream its sticky cookie names, at the last pick
        self.counted = None        # the slot where this request is counted in flight

    def pick(self, tried) -> Backend | None:
        round_robin = self.round_robin
        rotation = round_robin.current()
        pinned = None
        if self.values:
            # The upstream the cookie names, while it may take the request: up, or draining
            # (HAProxy's drain: no new sessions, the existing ones go on), and not tried yet. A
            # value that names none of the set (forged, from another key, removed by a reload)
            # is no error: the request is balanced anew.
            cookies, pinnable = rotation.cookies, rotation.pinnable
            for value in self.values:
                backend = cookies.get(value)
                if backend is not None and backend in pinnable and backend not in tried:
                    pinned = backend
                    break
            self.pinned = pinned
        if round_robin.counting:
            shared = round_robin.shared
            if self.counted is not None:  # a retry: the failed try is in flight no more
                shared.release(round_robin.worker, self.counted)
                self.counted = None
            if round_robin.capped:
                if pinned is None:
                    backend = shared.acquire(round_robin.worker, round_robin.under_cap, rotation, tried, self.key)
                else:
                    backend = shared.acquire(round_robin.worker, round_robin.pinned_or_under_cap, rotation, pinned,
                                             tried, self.key)
            elif pinned is None:
                backend = shared.acquire(round_robin.worker, round_robin.least_loaded, rotation, tried)
            else:
                backend = shared.acquire(round_robin.worker, lambda loads: pinned)
            if backend is not None:
                self.counted = backend.slot
            return backend
        if pinned is not None:
            return pinned
        if self.key is not None:
            return round_robin.on_ring(rotation, self.key, tried)
        return round_robin.pick(tried)

    def answered(self, backend: Backend, head: ResponseHead) -> None:
        """`backend`'s response goes to the client: a client not pinned to it gets the cookie that
        pins it, added to the response's fields (a new client, or one whose upstream was out)."""
        if self.values is None:
            return
        if backend is self.pinned:
            next(self.round_robin.sticky_hits)
            return
        if backend.sticky_value is None:
            return  # no key yet (the owner publishes it before the first request)
        if self.values:
            next(self.round_robin.sticky_repicks)
        head.fields.append((b"set-cookie", b"Set-Cookie: %s%s; Path=/; HttpOnly; SameSite=Lax%s" % (
            self.round_robin.sticky_prefix, backend.sticky_value, b"; Secure" if self.secure else b"")))

    def must_wait(self, tried) -> bool:
        """pick() found nothing, and only because of caps: some upstream that may take the request
        (up, not tried) is at its maxconn. The request waits in the queue."""
        rotation = self.round_robin.current()
        return rotation.caps is not None and any(
            b not in tried for b in (*rotation.primary_members, *rotation.backup_members))

    def end(self) -> None:
        if self.counted is not None:
            round_robin = self.round_robin
            round_robin.shared.release(round_robin.worker, self.counted)
            self.counted = None
            if round_robin.queue.waiting:
                round_robin.queue.offer()  # the freed slot goes to the head of the queue, now


class Waiter:
    """A request in the queue: `take()` picks and counts its upstream (Route.pick), `backend` is
    what it got, `event` wakes it."""

    __slots__ = ("take", "backend", "event")

    def __init__(self, take):
        self.take, self.backend, self.event = take, None, threading.Event()


class RequestQueue:
    """HAProxy's backend queue, one per worker: requests that found every upstream that may take
    them at its maxconn wait here, first come first served, and each goes to the first upstream
    that frees a slot (not necessarily the one round robin would have named). offer() hands free
    slots to the waiters in order, from the head, until one cannot take any: a release in this
    worker calls it at once (Route.end); releases in other workers are seen by the head re-reading
    the shared counts every QUEUE_RECHECK_SECONDS. Bounded by --queue-size, each wait by
    --queue-timeout. Costs nothing where no upstream has a cap: nobody ever waits."""

    def __init__(self, config: Config, stats: WorkerStats | None):
        self.size, self.timeout, self.stats = config.queue_size, config.queue_timeout, stats
        self.waiting: collections.deque = collections.deque()
        self.mutex = threading.Lock()

    def _gauge(self) -> None:
        if self.stats is not None:
            self.stats.counters[P_QUEUE_LENGTH] = len(self.waiting)

    def offer(self) -> None:
        with self.mutex:
            while self.waiting:
                waiter = self.waiting[0]
                backend = waiter.take()
                if backend is None:
                    break
                self.waiting.popleft()
                waiter.backend = backend
                waiter.event.set()
            self._gauge()

    def wait(self, take, gone) -> Backend | str:
        """Wait for `take()` to return an upstream: that upstream, or the one-line reason of a 503
        (the queue full, or --queue-timeout over). ClientError when `gone()` says the client
        went away: it leaves the queue at once, and nothing is sent upstream."""
        waiter = Waiter(take)
        with self.mutex:
            if len(self.waiting) >= self.size:
                if self.stats is not None:
                    self.stats.add(P_QUEUE_FULL)
                return (f"the queue is full: {self.size} requests wait for an upstream below its "
                        "maxconn (--queue-size)")
            self.waiting.append(waiter)
            self._gauge()
        started = time.monotonic()
        deadline = started + self.timeout
        self.offer()  # a slot may have been freed between the pick and now
        left = False
        while waiter.backend is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                head = self.waiting[0] is waiter  # a hint, read without the mutex
            except IndexError:
                head = False
            if waiter.event.wait(min(remaining, QUEUE_RECHECK_SECONDS if head else QUEUE_WATCH_SECONDS)):
                break
            if gone():
                left = True
                break
            if head:
                self.offer()  # what other workers released
        with self.mutex:
            if waiter.backend is None:  # else offer() gave it a slot just now: it goes
                self.waiting.remove(waiter)
                self._gauge()
        if self.stats is not None:
            self.stats.queued(time.monotonic() - started, timed_out=waiter.backend is None and not left)
        if waiter.backend is not None:
            return waiter.backend
        if left:
            raise ClientError()
        return (f"waited {self.timeout:g}s in the queue: every upstream is at its maxconn "
                "(--queue-timeout)")


# ===================================================================================================
# Health checks
# ===================================================================================================

class HealthChecker:
    """Active checks, in the process that owns the backend set: one probe per upstream per
    `health_interval`, however many workers. Without `health_path` a probe is a TCP connect (and
    the TLS handshake of an https:// upstream): HAProxy's plain ``check``. With it, ``GET path``
    must answer 2xx or 3xx within `health_timeout` (HAProxy's httpchk). Down after `fall` failed
    probes in a row, up after `rise` passed ones. A passing HTTP check also ends a passive
    ejection early; a TCP connect proves too little for that."""

    def __init__(self, shared: SharedState, config: Config, tls: ssl.SSLContext | None):
        self.shared, self.config, self.tls = shared, config, tls
        self.checks: dict = {}  # slot -> (spec, stop event)
        self.runs: dict = {}    # slot -> (passed in a row, failed in a row)

    def update(self, specs: dict) -> None:
        """Check exactly the upstreams in {slot: spec}: start new ones, stop removed or changed."""
        if not self.config.health_interval:
            return
        for slot, (spec, stopped) in list(self.checks.items()):
            if specs.get(slot) != spec:
                stopped.set()
                del self.checks[slot]
        for slot, spec in specs.items():
            if slot not in self.checks:
                stopped = threading.Event()
                self.checks[slot] = (spec, stopped)
                self.runs[slot] = (0, 0)
                threading.Thread(target=self.run, args=(slot, spec, stopped), daemon=True,
                                 name=f"health {spec.name}").start()

    def run(self, slot: int, spec: BackendSpec, stopped: threading.Event) -> None:
        while not stopped.is_set():
            ok, detail = self.probe(spec)
            if stopped.is_set():
                return
            self.record(slot, spec, ok, detail)
            stopped.wait(self.config.health_interval)

    def record(self, slot: int, spec: BackendSpec, ok: bool, detail: str) -> None:
        config, shared = self.config, self.shared
        passed, failed = self.runs.get(slot, (0, 0))
        passed, failed = (passed + 1, 0) if ok else (0, failed + 1)
        self.runs[slot] = (passed, failed)
        health = shared.get(slot, S_HEALTH)
        new = None
        if ok and health != HEALTH_UP and (passed >= config.rise or health == HEALTH_UNCHECKED):
            new = HEALTH_UP
        elif not ok and health != HEALTH_DOWN and failed >= config.fall:
            new = HEALTH_DOWN
        if new == HEALTH_UP and health == HEALTH_DOWN:
            reason = f"up: {passed} health check(s) passed, last: {detail}"
        elif new == HEALTH_DOWN:
            reason = f"down: {failed} health check(s) failed in a row, last: {detail}"
        else:
            reason = f"health check {'passed' if ok else 'failed'}: {detail}"
        # Written only where the check decides the state (see SharedState.record_check).
        shared.record_check(slot, ok, new, reason, may_end_ejection=ok and config.health_path is not None)
        if new == HEALTH_DOWN or (new == HEALTH_UP and health == HEALTH_DOWN):
            log.log(logging.INFO if ok else logging.WARNING, "upstream %s is %s: %s", spec.name,
                    "UP" if ok else "DOWN", reason)

    def probe(self, spec: BackendSpec) -> tuple[bool, str]:
        config = self.config
        started = time.monotonic()
        try:
            # A send-proxy upstream gets a PROXY header on checks too: LOCAL (v2), UNKNOWN (v1).
            sock = open_upstream(spec, config.health_timeout, self.tls if spec.scheme == "https" else None,
                                 proxy_header_bytes(spec.send_proxy) if spec.send_proxy else b"")
            if config.health_path is None:
                sock.close()
                what = ("TLS handshake" if spec.scheme == "https" else
                        f"connect to {spec.unix_path}" if spec.unix_path else "TCP connect")
                return True, f"{what} in {(time.monotonic() - started) * 1000:.1f} ms"
            conn = http.client.HTTPConnection(spec.host, spec.port, timeout=config.health_timeout)
            conn.sock = sock  # connected above
            try:
                conn.request("GET", config.health_path, headers={
                    "Host": spec.netloc, "Connection": "close",
                    "User-Agent": f"load_balancer/{__version__} health-check"})
                response = conn.getresponse()
                response.read(HEALTH_MAX_BODY)
            finally:
                conn.close()
            return 200 <= response.status < 400, f"HTTP {response.status} from {config.health_path}"
        except socket.timeout:
            return False, f"no answer within {config.health_timeout:g}s"
        except (OSError, http.client.HTTPException) as error:
            return False, describe_os_error(error)

    def stop(self) -> None:
        for _, stopped in self.checks.values():
            stopped.set()
        self.checks.clear()


def describe_os_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host ({error.strerror})"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not verified: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


# ===================================================================================================
# Upstream connections: the transport
# ===================================================================================================

class UpstreamError(Exception):
    """An exchange with an upstream failed before anything was sent to the client. `kind` (one of
    ERROR_KINDS) is all that retry, ejection and the answer (502 or 504) look at; classify() is the
    one place that decides it."""

    def __init__(self, kind: str, status: int, detail: str):
        super().__init__(detail)
        self.kind, self.status, self.detail = kind, status, detail


class ClientError(Exception):
    """The client went away or broke the rules in the middle of a request. `status` and `detail`:
    the answer it gets, if it can still be answered (None: nobody to answer)."""

    def __init__(self, status: int | None = None, detail: str = ""):
        super().__init__(detail)
        self.status, self.detail = status, detail


def classify(error: BaseException, config: Config, *, phase: str) -> UpstreamError:
    """Every way an exchange with an upstream can fail, as one UpstreamError. `phase`: "connect"
    (making the connection), "response" (sending the request, waiting for the response head) or
    "body" (copying the response body, after its head went to the client)."""
    if isinstance(error, UpstreamError):
        return error
    timed_out = isinstance(error, (socket.timeout, BlockingIOError)) or (
        isinstance(error, HTTPError) and error.status == 408)
    if phase == "body":
        if timed_out:  # --timeout bounds the wait between reads: an idle event stream is cut
            return UpstreamError("idle", 502, f"the response body stalled: nothing from the upstream "
                                 f"for {config.timeout:g}s (--timeout), so the idle stream was cut")
        return UpstreamError("body", 502, f"the upstream broke off the response body: {describe_os_error(error)}")
    if phase == "connect":
        if timed_out:
            return UpstreamError("connect", 504, "the upstream did not accept a connection within "
                                 f"{config.connect_timeout:g}s")
        if isinstance(error, ssl.SSLError) or isinstance(error, ssl.CertificateError):
            return UpstreamError("tls", 502, f"TLS with the upstream failed: {describe_os_error(error)}")
        return UpstreamError("connect", 502, f"cannot connect to the upstream: {describe_os_error(error)}")
    if timed_out:
        return UpstreamError("timeout", 504, f"the upstream did not answer within {config.timeout:g}s")
    if isinstance(error, HTTPError):
        return UpstreamError("invalid", 502, f"the upstream sent an invalid response: {error.detail}")
    if isinstance(error, EOFError):
        return UpstreamError("closed", 502, f"the upstream {error}")
    return UpstreamError("closed", 502, f"the upstream connection failed: {describe_os_error(error)}")


class EarlyResponse(Exception):
    """The upstream began its answer before the request body was all sent (a 413, a 401: nginx,
    HAProxy and Go pass such an answer on). Not a failure; the connection is not reused. Its
    argument: the ResponseHead, or the HTTPError that made it invalid."""


class UpstreamConnection(http.client.HTTPConnection):
    """A keep-alive connection to one upstream, opened by open_upstream (TCP with TCP_NODELAY or a
    Unix socket; the PROXY header of a send-proxy upstream; TLS, the certificate verified against
    the host name, for https://); the request head, validated on the way in, goes out with one
    send. `owner`: the client connection (ProxyHandler) of a send-proxy upstream's connection,
    whose address its PROXY header carries: the connection is that client's only (see
    ConnectionPool)."""

    def __init__(self, backend: Backend, config: Config, owner: ProxyHandler | None = None):
        super().__init__(backend.host, backend.port, timeout=config.connect_timeout)
        self.backend, self.config = backend, config
        self.stream: Stream | None = None
        self.owner = owner if backend.spec.send_proxy else None
        self.proxy_header = (proxy_header_bytes(backend.spec.send_proxy, *owner.proxy_endpoints())
                             if self.owner is not None else b"")

    def connect(self) -> None:
        spec = self.backend.spec
        tls = client_tls_context(self.config.backend_ca) if spec.scheme == "https" else None
        self.sock = open_upstream(spec, self.timeout, tls, self.proxy_header)
        if tls is not None:
            self.stream = TLSStream(self.sock)
        else:
            self.sock.settimeout(None)  # blocking, with kernel timeouts: see set_timeout
            self.stream = UnixStream(self.sock) if spec.unix_path else Stream(self.sock)
        self.stream.set_timeout(self.config.timeout)


def open_upstream(spec: BackendSpec, timeout: float, tls: ssl.SSLContext | None,
                  proxy_header: bytes = b"") -> socket.socket:
    """A connection to an upstream, for requests and health checks alike: TCP (TCP_NODELAY: a
    head and a body in two sends would wait for an ACK) or a Unix socket, then `proxy_header` as
    its first bytes (before TLS, as HAProxy sends it), then the TLS handshake when `tls` is given
    (SNI and the certificate checked against the host)."""
    if spec.unix_path is not None:
        sock = connect_unix(spec.unix_path, timeout)
    else:
        sock = socket.create_connection((spec.address or spec.host, spec.port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if proxy_header:
            sock.sendall(proxy_header)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=spec.host)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A connected Unix stream socket (a unix: upstream, its health check)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


@functools.lru_cache(maxsize=None)
def client_tls_context(cafile: str | None) -> ssl.SSLContext:
    """How https:// upstreams are verified: the system's trust store or `cafile`, host names
    checked, TLS 1.2 or later, ALPN http/1.1."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class ConnectionPool:
    """Idle keep-alive connections to one backend, most recently used first (the least likely to
    have been closed by the upstream's own idle timeout). At most `pool_size` are kept."""

    def __init__(self, backend: Backend, config: Config):
        self.backend, self.config = backend, config
        self._idle: collections.deque = collections.deque()
        self.closed = False
        stats = backend.stats
        self.gauge = stats.counters if stats is not None else None
        self.gauge_index = backend.stats_base + U_IDLE

    def __len__(self) -> int:
        return len(self._idle)

    def take_idle(self, client: ProxyHandler | None = None) -> UpstreamConnection | None:
        """The most recently used idle connection still fit for reuse, or None. A send-proxy
        upstream's connections are private (HAProxy makes them so): only `client`'s own."""
        if self.backend.spec.send_proxy:
            conn = client.private_upstreams.pop(self.backend.slot, None) if client is not None else None
            if conn is not None and conn.stream.is_reusable():
                return conn
            if conn is not None:
                conn.close()
            return None
        idle = self._idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                break
            if self.gauge is not None:
                self.gauge[self.gauge_index] = len(idle)
            if conn.stream.is_reusable():
                return conn
            conn.close()
        return None

    def connect(self, client: ProxyHandler | None = None) -> UpstreamConnection:
        """A new connection (for `client`: a send-proxy upstream's carries its address). Raises
        UpstreamError when it cannot be made."""
        conn = UpstreamConnection(self.backend, self.config, client)
        try:
            conn.connect()
        except (OSError, ValueError) as error:
            conn.close()
            raise classify(error, self.config, phase="connect") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.owner is not None:  # kept for its client's next request only, never pooled
            if self.closed or self.backend.maint or conn.owner.stream is None:
                conn.close()
            else:
                previous = conn.owner.private_upstreams.get(self.backend.slot)
                conn.owner.private_upstreams[self.backend.slot] = conn
                if previous is not None and previous is not conn:
                    previous.close()
            return
        idle = self._idle
        if not self.closed and len(idle) < self.config.pool_size and not self.backend.maint:
            idle.append(conn)
            if self.gauge is not None:
                self.gauge[self.gauge_index] = len(idle)
        else:
            conn.close()

    def count(self) -> None:
        """The idle-connections gauge of this worker's counter block (a plain store: last wins)."""
        if self.gauge is not None:
            self.gauge[self.gauge_index] = len(self._idle)

    def close_idle(self) -> None:
        while self._idle:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            self.count()  # before the close: whoever sees the close finds the gauge already down
            conn.close()
        self.count()

    def close(self) -> None:
        self.closed = True
        self.close_idle()


class Exchange:
    """One try of one request on one upstream, as Transport.round_trip returns it: the connection
    (with the response's bytes still to read), the response head, and `early`: the upstream
    answered before the request body was all sent (the connection is then never reused)."""

    __slots__ = ("backend", "conn", "head", "early")

    def __init__(self, backend: Backend, conn: UpstreamConnection, head: ResponseHead, early: bool):
        self.backend, self.conn, self.head, self.early = backend, conn, head, early


class Transport:
    """The exchange with an upstream (Go's RoundTripper): send one request, return the response
    head on its connection, or raise one UpstreamError whose kind classify() named. Every rule
    about upstream connections lives here: pooled or new, the stale-connection replay, the body
    streamed while the upstream is watched for an early answer, 1xx answers, the response body's
    copy and whether the connection goes back to the pool.

    The client's side is reached through `client` (who calls: ProxyHandler, passing itself):
    `client.rfile` is the body's source, `client.send(stream, data)` and
    `client.outside_gate(call, *args)` write and wait without holding a place in the fair gate,
    and `client.relay_interim(status)` passes a 100 Continue on. A client that breaks its body
    raises ClientError, carrying the answer it deserves."""

    def __init__(self, config: Config):
        self.config = config

    def round_trip(self, backend: Backend, request: Request, head: bytes, body: bytes | None,
                   client: ProxyHandler) -> Exchange:
        """Send `head` (the request head for this upstream) and the body: `body` when it arrived
        whole (sent with the head, replayable), else streamed from the client. A pooled
        connection that the upstream had closed meanwhile is replaced by a fresh one, once, if
        replay is safe."""
        expect = body is None and request.expect_continue
        if body:
            head += body
        for attempt in (1, 2):
            conn = None if request.upgrade else backend.pool.take_idle(client)
            reused = conn is not None
            if not reused:
                conn = client.outside_gate(backend.pool.connect, client)
            try:
                early = None
                if body is not None:
                    client.send(conn.stream, head)
                else:
                    early = self.send_streaming(conn, head, request, client)
                if early is None and not unread(conn.stream.reader):
                    client.outside_gate(conn.stream.reader.peek, 1)  # the upstream's think time
                response = early or self.read_response_head(
                    conn, request, client.relay_interim if expect else None, wait=True)
                conn.stream.set_timeout(self.config.timeout)
                return Exchange(backend, conn, response, early is not None)
            except (OSError, EOFError, HTTPError) as error:
                conn.close()
                stale = reused and not isinstance(error, (socket.timeout, BlockingIOError, HTTPError))
                if stale and attempt == 1 and replayable(request):
                    continue
                raise classify(error, self.config, phase="response") from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def read_response_head(self, conn: UpstreamConnection, request: Request, interim,
                           *, wait: bool) -> ResponseHead | None:
        """The final response head, each interim (1xx) one before it passed to `interim(status)`
        if given. A 101 is final only for an upgrade that was asked for, and only to that
        protocol. `wait=False`: only what has arrived (None when no final head is there yet)."""
        config, stream = self.config, conn.stream
        deadline = time.monotonic() + config.timeout
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            if not wait and not stream.has_data():
                return None
            head = read_head(stream.reader, config.max_head_size, config.max_request_line, deadline,
                             stream.set_timeout, response=True)
            if head is None:
                raise EOFError("closed the connection without answering")
            response = parse_response_head(head, request.method, config)
            if response.status == 101:
                if request.upgrade is None:
                    raise HTTPError(502, "switched protocols unasked (101)")
                if comma_list(response.upgrade or [b""]) != comma_list([request.upgrade]):
                    raise HTTPError(502, "switched to a protocol nobody asked for (101)")
                return response
            if response.status >= 200:
                return response
            if interim is not None:
                interim(response.status)
        raise HTTPError(502, f"more than {MAX_INTERIM_RESPONSES} interim (1xx) responses")

    def early_answer(self, conn: UpstreamConnection, request: Request, client: ProxyHandler) -> ResponseHead | None:
        """The upstream's final head if it has begun one while the body is still going up (a 1xx
        before it goes to the client), else None: nothing yet, or nothing to pass on (a broken
        connection is reported as such by whoever reads or writes next). An invalid head raises
        HTTPError."""
        try:
            return self.read_response_head(conn, request, client.relay_interim, wait=False)
        except (OSError, EOFError):
            return None

    def send_streaming(self, conn: UpstreamConnection, head: bytes, request: Request,
                       client: ProxyHandler) -> ResponseHead | None:
        """Send the head, then the body as it arrives, watching the upstream all along: an answer
        that begins before the body ends (a 413, a 401) stops the upload and is returned."""
        client.send(conn.stream, head)
        upload = Upload(self, conn, request, client)
        reader = client.rfile
        reader.raw.watch = upload.before_read
        buffer = copy_buffers.get()
        try:
            client.outside_gate(copy_body, reader, upload.write, request.framing, request.length, buffer,
                                chunked_out=request.framing == CHUNKED, max_size=self.config.max_body_size)
            return None
        except EarlyResponse as answered:
            answer = answered.args[0]
            if isinstance(answer, HTTPError):
                raise answer from None
            return answer
        except WriteError as error:
            answer = self.early_answer(conn, request, client)  # it answered and closed: pass it on
            if answer is not None:
                return answer
            raise error.__cause__ from None
        except ReadError as error:
            cause = error.__cause__
            if isinstance(cause, HTTPError):
                raise ClientError(cause.status, cause.detail) from None
            if isinstance(cause, socket.timeout):
                raise ClientError(408, f"no request body data for {self.config.idle_timeout:g}s") from None
            raise ClientError() from None
        finally:
            reader.raw.watch = None
            copy_buffers.put(buffer)

    def copy_response_body(self, exchange: Exchange, write, *, chunked: bool) -> int:
        """Copy the response body to `write` as it arrives (the payload length). The upstream
        breaking it off raises UpstreamError("body"), or ("idle") when it sent nothing for --timeout;
        the client going away, ClientError."""
        head = exchange.head
        buffer = copy_buffers.get()
        try:
            return copy_body(exchange.conn.stream.reader, write, head.framing, head.length, buffer,
                             chunked_out=chunked)
        except ReadError as error:
            raise classify(error.__cause__, self.config, phase="body") from None
        except WriteError:
            raise ClientError() from None
        finally:
            copy_buffers.put(buffer)

    @staticmethod
    def finish(exchange: Exchange, request: Request, complete: bool) -> None:
        """The connection back to the pool if the exchange ended cleanly, else closed. Bytes after
        a complete response (a body on a 204, a second response nobody asked for) mean it is out
        of step: reused, the next client would get them as its answer (response queue
        poisoning). Nor one that answered before the request body was all sent: it may still
        expect the rest."""
        conn = exchange.conn
        if complete and exchange.head.keep_alive and not exchange.early and not request.upgrade \
                and not unread(conn.stream.reader):
            exchange.backend.pool.release(conn)
        else:
            conn.close()


class Upload:
    """A request body on its way up, and the watch on the upstream that goes with it: who calls
    `before_read` is the client's SocketReader before a read that would wait, `write` is
    copy_body's. While the client's bytes keep coming, the upstream is looked at every
    UPLOAD_WATCH_EVERY pieces (a poll() per read cost a fifth of the upload rate); when the client
    pauses, one poll() waits on both sockets."""


    def __init__(self, transport: Transport, conn: UpstreamConnection, request: Request, client: ProxyHandler):
        self.transport, self.conn, self.request, self.client = transport, conn, request, client
        self.poller = None
        self.pieces = 0
        # A piece goes out in one call where the kernel takes it whole (the usual case), without
        # write_watching's frames: TCP and Unix sockets (a TLS record is written by write_watching).
        self.send = conn.stream.sock.send if MSG_DONTWAIT and not conn.stream.tls else None

    def check_answer(self) -> None:
        """Raise EarlyResponse if the upstream has begun its answer (an invalid one included)."""
        try:
            head = self.transport.early_answer(self.conn, self.request, self.client)
        except HTTPError as error:
            raise EarlyResponse(error) from None
        if head is not None:
            raise EarlyResponse(head)

    def before_read(self, client: Stream) -> None:
        """Wait for the client's next bytes, or raise EarlyResponse if the upstream answers first."""
        if client.pending():
            return
        upstream = self.conn.stream
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(client.fileno(), select.POLLIN)
            poller.register(upstream.fileno(), select.POLLIN)
            if upstream.pending() or unread(upstream.reader):
                self.check_answer()
        deadline = time.monotonic() + self.transport.config.idle_timeout
        while True:
            remaining = deadline - time.monotonic()
            events = dict(poller.poll(max(remaining, 0) * 1000))
            if not events:
                raise socket.timeout("timed out")
            if upstream.fileno() in events:
                self.check_answer()
                # Readable without an answer: its end (the write that follows reports it) or TLS
                # records of its own. Either way, nothing more to watch for there.
                poller.unregister(upstream.fileno())
            if client.fileno() in events:
                return

    def write(self, data) -> None:
        """One piece of the body to the upstream, never blocked by an upstream that stopped
        reading because it has answered (see Stream.write_watching)."""
        self.pieces += 1
        stream = self.conn.stream
        if not self.pieces % UPLOAD_WATCH_EVERY and stream.has_data():
            self.check_answer()
        if self.send is not None:
            try:
                sent = self.send(data, SEND_NOW_FLAGS)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        stream.write_watching(data, self.check_answer, self.transport.config.timeout)


# ===================================================================================================
# Protection: allow and deny lists, rate limits
# ===================================================================================================
# Checked for each request once its head is read and before anything else happens to it, on the
# client address the balancer vouches for (ProxyHandler.client_ip). Not at accept, although that
# would be earlier: on an HTTPS listener a proper 403 can only be sent after the TLS handshake,
# and the client address is final only with the head (X-Forwarded-For from a trusted proxy;
# nginx's allow/deny run after its realip module for the same reason). Reading a head is bounded
# (--header-timeout, --max-header-size), and a refused request never reaches an upstream.

class Guard:
    """--allow, --deny and --rate-limit on one worker's listener. A server has one only when one
    of them is given: without, nothing is checked at all. The lists follow reloads (follow());
    what an address is (allowed, its rate-table key) is worked out once per address and kept.

    The rate table is shared by every process, under the lock they share: a file lock, two system
    calls, and a queue when workers meet there (measured at 32 connections with two workers and
    a limit that never triggered: 0.60-0.72x the requests/s with one lock a request). So with
    several workers a worker takes tokens ahead, an eighth (1/(4 x workers)) of those the bucket
    holds, at most RATE_TAKE_AHEAD, and spends them without the lock within TAKE_AHEAD_US. Near
    the limit that is one token at a time, exact: from a full bucket of fewer than 16 tokens with
    two workers, exactly `burst` pass however the requests spread. No token is ever made: over
    time the rate is the configured one; within a burst of more than 16, a worker can refuse a
    few requests early while another holds tokens, or let a few more through than `burst` when
    the bucket filled up within TAKE_AHEAD_US of their taking."""

    MAX_VERDICTS = 4096  # addresses whose verdict is kept; the table starts again when full
    TAKE_AHEAD_US = 100_000

    def __init__(self, config: Config, shared: SharedState, stats: WorkerStats):
        self.shared, self.stats = shared, stats
        self.interval, burst = parse_rate_limit(config.rate_limit_spec) if config.rate_limit else (0, 1)
        self.tolerance = (burst - 1) * self.interval
        self.share = 4 * shared.worker_count if shared.worker_count > 1 else 0
        self.ahead: dict = {}                 # rate key -> [tokens taken ahead, until (us)]
        self.ahead_lock = threading.Lock()
        self.generation, lists = shared.access_lists()
        self.current = (lists or config.access_lists, {})  # (lists, verdicts): replaced as one
        self.denials = RateLimitedLog("requests answered 403: client address not allowed (--allow, --deny)")
        self.limited = RateLimitedLog(f"requests answered 429: over --rate-limit {config.rate_limit_spec}")

    @staticmethod
    def needed(config: Config) -> bool:
        return bool(config.allow or config.deny or config.rate_limit)

    def follow(self) -> None:
        """Lists a reload published apply from the next request (who calls: service_actions)."""
        if self.shared.header[H_LISTS_GENERATION] != self.generation:
            self.generation, lists = self.shared.access_lists()
            if lists is not None:
                self.current = (lists, {})
            interval, burst = self.shared.rate_limit()
            tolerance = (burst - 1) * interval
            if interval and self.interval and (interval, tolerance) != (self.interval, self.tolerance):
                # A rate read again from its file (a reload changes one, adds none).
                self.interval, self.tolerance = interval, tolerance
                self.limited = RateLimitedLog(f"requests answered 429: over --rate-limit (one request "
                                              f"every {interval / 1e6:g}s, burst {burst}, since a reload)")

    def refuses(self, handler: ProxyHandler, request: Request) -> bool:
        """Answer `request` 403 (not allowed) or 429 (over the rate) and say True; or False: it
        goes on. Who calls: ProxyHandler.handle_one_request."""
        lists, verdicts = self.current
        verdict = verdicts.get(handler.client_ip)
        if verdict is None:
            verdict = self.judge(handler.client_ip, lists, verdicts)
        allowed, key = verdict
        if not allowed:
            self.stats.add(P_DENIED)
            self.denials.note()
            handler.reject(403, "requests from your address are not allowed here")
            return True
        if key is None:
            return False
        if self.share:
            taken, wait = self.take_ahead(key, monotonic_us())
        else:
            taken, wait = self.shared.take_tokens(key, monotonic_us(), self.interval, self.tolerance)
        if taken:
            return False
        self.stats.add(P_RATE_LIMITED)
        self.limited.note()
        # The connection stays open unless a body is left unread (nginx keeps it too).
        unread_body = request.framing != NO_BODY and not (request.framing == LENGTH and not request.length)
        handler.reject(429, "too many requests from your address: slow down", close=unread_body,
                       extra=b"Retry-After: %d\r\n" % -(-wait // 1_000_000))
        return True

    def take_ahead(self, key: tuple, now: int) -> tuple[int, int]:
        """take_tokens with several workers: a token this worker took ahead, else the shared
        table's answer, taking ahead what it gives. One thread at a time: threads that ran out
        together would each take ahead, and most of it would lapse unused."""
        with self.ahead_lock:
            ahead = self.ahead.get(key)
            if ahead is not None and ahead[0] and ahead[1] > now:
                ahead[0] -= 1
                return 1, 0
            taken, wait = self.shared.take_tokens(key, now, self.interval, self.tolerance, self.share)
            if taken > 1:
                if ahead is None:
                    if len(self.ahead) >= self.MAX_VERDICTS:
                        self.ahead.clear()
                    ahead = self.ahead[key] = [0, 0]
                ahead[0], ahead[1] = taken - 1, now + self.TAKE_AHEAD_US
            return taken, wait

    def judge(self, client_ip: bytes, lists: AccessLists, verdicts: dict) -> tuple[bool, tuple | None]:
        """(allowed, rate-table key or None when not limited) for an address, kept in `verdicts`."""
        try:
            address = ipaddress.ip_address(client_ip.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            address = None
        if address is not None and address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address is None:  # nothing to match a range against: refused wherever lists are given
            allowed = not (lists.allow or lists.deny)
        else:
            allowed = not address_in(address, lists.deny) and (
                not lists.allow or address_in(address, lists.allow))
        key = None
        if self.interval and allowed and not (address is not None and address_in(address, lists.rate_limit_exempt)):
            if address is None:
                packed = hashlib.blake2b(client_ip, digest_size=16).digest()
            elif address.version == 6:
                packed = address.packed
            else:  # IPv4, and IPv4-mapped IPv6 with it: one key, the mapped form
                packed = bytes(10) + b"\xff\xff" + address.packed
            key = self.shared.rate_key(packed)
        if len(verdicts) >= self.MAX_VERDICTS:
            verdicts.clear()
        verdicts[client_ip] = (allowed, key)
        return allowed, key


# ===================================================================================================
# The request handler
# ===================================================================================================

def client_behind_proxies(forwarded_for: list | None, peer: bytes, trusted: tuple) -> bytes:
    """The client address of a request from a trusted proxy `peer` (nginx's real_ip_recursive):
    walking X-Forwarded-For from the right, the first address that is not trusted; the left-most
    when all are. An element that is not an address (``unknown``, garbage) ends the walk: the
    client is then the trusted hop that passed it on, since nothing it says further left can be
    vouched for."""
    client = peer
    for value in reversed(forwarded_for or ()):
        for item in reversed(value.split(b",")):
            address = parse_address(item.strip(b" \t"))
            if address is None:
                return client
            client = str(address).encode("ascii")
            if not address_in(address, trusted):
                return client
    return client


# Request IDs: 128 bits from os.urandom, taken 256 at a time and handed out from a list (pop is
# atomic under the GIL; a child process after a fork starts its own). One os.urandom per request
# would give the GIL up for a system call each time; formatting a 128-bit integer from the random
# module costs 2,600 instructions an ID. Measured with callgrind: 2,650 an ID with
# random.getrandbits, about 300 from the pool.
REQUEST_ID_BATCH = 256
_request_ids: list = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_request_ids.clear)


def new_request_id() -> bytes:
    """A new request ID: 32 lowercase hex digits (nginx's $request_id has the same form)."""
    try:
        return _request_ids.pop()
    except IndexError:
        digits = os.urandom(16 * REQUEST_ID_BATCH).hex().encode("ascii")
        _request_ids.extend([digits[i:i + 32] for i in range(0, len(digits), 32)])
        return _request_ids.pop()


class FairGate:
    """Runs request work in arrival order when many requests compete for the GIL.

    CPython's GIL is not fair: a thread returning from a system call takes it if it happens to be
    free, ahead of threads already waiting for it. With hundreds of busy connections some requests
    lose that race again and again: measured here with 256 connections, p50 25 ms but p99 2.7 s,
    and client timeouts. So above `threshold` requests in flight, at most `slots` threads run
    request code at once; the others wait on a lock of their own (outside the GIL) and each
    leaving thread hands its place to the one that has waited longest. A thread never keeps its
    place while it may block (see ProxyHandler.outside_gate): slow clients and upstreams cannot
    hold the gate. Below the threshold a pass costs one uncontended lock."""

    def __init__(self, slots: int = GATE_SLOTS, threshold: int = GATE_THRESHOLD):
        self.slots, self.threshold = slots, threshold
        self.in_flight = 0                    # requests begun and not finished
        self.running = 0                      # threads between enter() and leave()
        self.waiting: collections.deque = collections.deque()  # their turn locks, oldest first
        self.mutex = threading.Lock()

    @property
    def keep_gil(self) -> bool:
        """Should a system call that cannot block keep the GIL (send_now)? Read without the mutex:
        a hint. Yes while other requests are in flight and nobody queues: giving the GIL up would
        only cost two context switches to get it back. Not for a lone request: nobody else wants
        the GIL. And not while threads queue here: the GIL must then change hands often for the
        line to move. Measured with 256 connections, keeping it anyway gave 20% more requests/s
        but a p99 of 150-180 ms instead of 40-60 ms."""
        return 1 < self.in_flight <= self.threshold and not self.waiting

    def enter(self, new_request: bool = False) -> None:
        with self.mutex:
            self.in_flight += new_request
            if self.running < self.slots or (self.in_flight <= self.threshold and not self.waiting):
                self.running += 1
                return
            turn = threading.Lock()
            turn.acquire()
            self.waiting.append(turn)
        turn.acquire()  # until a leaving thread passes its place on

    def leave(self, request_done: bool = False) -> None:
        with self.mutex:
            self.in_flight -= request_done
            if self.waiting and (self.running <= self.slots or self.in_flight <= self.threshold):
                self.waiting.popleft().release()  # the place passes on; running stays the same
            else:
                self.running -= 1


def replayable(request: Request) -> bool:
    """May this request be sent again after an upstream saw it? Only an idempotent method without
    a body (RFC 9110 section 9.2.2)."""
    return request.method in IDEMPOTENT and (request.framing == NO_BODY or
                                             (request.framing == LENGTH and not request.length))


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: reads requests, forwards each to the next upstream, relays the answer.

    BaseHTTPRequestHandler's parse step (email.parser, lenient) is replaced by the strict one
    above, and its socket by a Stream (plain or TLS); the rest keeps http.server's shape: the
    handle() loop, close_connection, send_error, log_request and log_message. Called by
    ProxyServer.process_request_thread, on the connection's own thread."""

    protocol_version = "HTTP/1.1"   # keep-alive; http.server speaks HTTP/1.0 by default
    server: ProxyServer

    def setup(self) -> None:
        """Start the connection: TCP_NODELAY (else a response written in two sends waits ~40 ms
        for an ACK), and on a TLS listener the handshake, here on the connection's own thread,
        under --header-timeout and outside the fair gate."""
        self.connection = self.request
        self.config = self.server.config
        self.stats = self.server.stats
        # The setting, and the logger's level (which an embedding program may set): once here.
        self.logging_access = self.config.access_log is not None and access_log.isEnabledFor(logging.INFO)
        # The address the connection comes from, and the client's: the same unless a trusted proxy
        # names the client (identify()). Every later use reads client_ip.
        self.peer_ip = self.client_ip = self.client_address[0].encode("ascii")
        self.request_id: bytes | None = None   # the request's ID (identify()), for the log
        self.id_field: bytes | None = None     # its field line, for the client
        self.busy = False             # between the first byte of a request and the end of its answer
        self.evicted = False          # closed to make room for a new connection (see ProxyServer)
        self.idle_since = time.monotonic()
        self.linger = False           # close gently: the client may still be sending
        self.requests_seen = 0
        self.received_total = self.sent_total = 0  # bytes of ended requests, both ways
        self.in_flight_base = None    # the upstream record of the try in flight, if any
        self.route: Route | None = None  # the request's Route, when the policy reads requests
        self.gated = False            # holds a place in the server's FairGate
        self.started = time.monotonic()
        self.command = self.path = self.request_version = ""
        self.stream: Stream | None = None
        self.tunnel_peer: Stream | None = None
        self.private_upstreams: dict = {}    # slot -> idle connection to a send-proxy upstream
        self.proxy_destination = None        # the address a PROXY header said the client reached
        self.server.track(self, True)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stream = self.server.open_stream(self)
        except OSError:
            self.stream = None
        trusted = self.config.trusted_networks
        self.peer_trusted = bool(trusted) and address_in(self.peer_ip, trusted)
        if self.stream is not None:
            self.rfile = self.stream.reader

    def handle(self) -> None:
        if self.stream is not None:
            super().handle()

    def finish(self) -> None:
        self.server.track(self, False)
        for conn in self.private_upstreams.values():  # they carry this client's address: no one else's
            conn.close()
        self.private_upstreams.clear()
        if self.linger and self.stream is not None:
            linger_close(self.stream)
        if self.stream is not None and self.stream.tls:
            # socketserver closes the socket it accepted, which wrapping in TLS detached: the
            # TLS socket is closed here (after a close_notify), or it would wait for the GC.
            self.stream.shutdown_write()
            self.stream.close()

    # -- one request ----------------------------------------------------------------------------

    def handle_one_request(self) -> None:
        config = self.config
        self.close_connection = True
        self.requestline = self.command = self.path = self.request_version = ""
        self.stream.set_timeout(config.idle_timeout if self.requests_seen else config.header_timeout)
        try:
            if not self.rfile.peek(1):
                return
        except OSError:  # including the timeout: an idle connection is closed without a word
            return
        # Busy first, then the checks; make_room() and drain() set their flag first, then look at
        # busy: whichever comes second sees the other (under the GIL), without a lock a request.
        self.busy = True
        if self.evicted or self.server.draining and self.requests_seen:
            self.busy = False
            return
        self.requests_seen += 1
        self.started = time.monotonic()
        self.sent = 0
        self.head_sent = 0
        self.in_flight_base = None
        self.request_id = self.id_field = None
        head = None
        try:
            try:
                head = read_head(self.rfile, config.max_head_size,
                                 config.max_request_line, self.started + config.header_timeout,
                                 self.stream.set_timeout)
                if head is None:
                    return
                self.server.gate.enter(new_request=True)
                self.gated = True
                request = parse_request_head(head, config)
            except HTTPError as error:
                # read_head's errors carry what was read; parse_request_head's have the whole head
                self.name_request(error.head if error.head is not None else head)
                self.reject(error.status, error.detail)
                return
            self.stream.set_timeout(config.idle_timeout)
            self.command = request.method.decode("ascii")
            self.path = request.target.decode("ascii")
            self.request_version = request.version.decode("ascii")
            self.headers = Headers(request.fields)
            self.close_connection = not request.keep_alive
            self.identify(request)
            if self.server.guard is not None and self.server.guard.refuses(self, request):
                return
            self.proxy(request)
        except ClientError as error:
            if error.status is not None:
                self.reject(error.status, error.detail)
            self.close_connection = True
        except OSError:
            self.close_connection = True
        except Exception:
            log.exception("unexpected error proxying %s %s", self.command, self.path)
            self.close_connection = True
        finally:
            if self.gated:
                self.gated = False
                self.server.gate.leave(request_done=True)
            # Counted as this connection's (see ProxyServer.publish_gauges): bytes read from the
            # socket, a pipelined next request that came in the same read with this one.
            self.received_total = self.rfile.raw.received
            self.sent_total += self.sent
            self.in_flight_base = None
            if self.route is not None:
                self.route = self.route.end()  # None; a count in flight is released
            self.idle_since = time.monotonic()
            self.busy = False  # no lock: at worst make_room() passes over a connection just idle
            if self.evicted:
                self.close_connection = True
            if self.server.draining:
                self.close_connection = True
                self.server.wake_drainer()

    def name_request(self, head: bytes | None) -> None:
        """For the log of a refused request: its method and target, if its request line was read."""
        line = (head or b"").split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) == 3 and parts[0] and not parts[0].translate(None, TCHAR) and len(line) <= 8192:
            self.command, self.path, self.request_version = (
                part.decode("latin-1").encode("unicode_escape").decode("ascii") for part in parts)

    def proxy_endpoints(self) -> tuple:
        """(source, destination) for a PROXY header to a send-proxy upstream: the client address
        with its port (0 when the address came from X-Forwarded-For, which has none), and the
        address it reached (as its own PROXY header said, else this connection's)."""
        port = self.client_address[1] if self.client_ip == self.peer_ip else 0
        destination = self.proxy_destination or self.connection.getsockname()[:2]
        return (self.client_ip.decode("ascii"), port), destination

    def identify(self, request: Request) -> None:
        """Who a request is from and what it is called, decided once per request: the client
        address, and the request ID (the client's valid one, else a new one) that goes upstream,
        back to the client and into the log."""
        if self.peer_trusted:  # nginx real_ip_recursive: the address the trusted proxies name
            request.via_proxy = self.peer_ip
            self.client_ip = client_behind_proxies(request.forwarded_for, self.peer_ip,
                                                   self.config.trusted_networks)
        prefix = self.config.request_id_prefix
        if prefix:
            request_id = request.request_id
            if request_id is None:
                request_id = request.request_id = new_request_id()
                self.id_field = request.id_line = prefix + request_id
            else:
                self.id_field = prefix + request_id
            self.request_id = request_id

    def proxy(self, request: Request) -> None:
        """Forward one request to the next upstream and relay its answer; on failure try the next
        one while that is safe; else answer 502, 503 or 504 through reject()."""
        self.continue_sent = False
        body = b"" if request.framing == NO_BODY else self.arrived_body(request)
        round_robin, transport = self.server.round_robin, self.server.transport
        route = self.route = round_robin.route(request, self.client_ip, self.stream.tls) if round_robin.routes else None
        tried: list[Backend] = []
        failure = None
        while True:
            # While requests queue, a new one goes behind them (a slot freed is theirs: no barging).
            queue_first = route is not None and not tried and round_robin.queue.waiting
            backend = None if queue_first else round_robin.pick(tried) if route is None else route.pick(tried)
            if backend is None and route is not None and (queue_first or route.must_wait(tried)):
                backend = self.wait_in_queue(route, tried, request.framing != NO_BODY and body is None)
                if backend is None:
                    return  # answered 503
            if backend is None:
                break
            self.in_flight_base = backend.stats_base  # in flight there until the request ends
            tried.append(backend)
            head = headers_for_upstream(request, self.client_ip, backend.host_header, proto=self.stream.scheme,
                                        expect=body is None and request.expect_continue)
            try:
                exchange = transport.round_trip(backend, request, head, body, self)
            except UpstreamError as error:
                self.in_flight_base = None
                retry = self.may_retry(request, error)
                self.stats.failed(backend.stats_base, error.kind, retry)
                self.upstream_failed(backend, error)
                failure = error
                if retry:
                    continue
                break
            if backend.has_failures():
                self.server.shared.record_success(backend.slot)
            if route is not None:
                route.answered(backend, exchange.head)  # a sticky cookie's Set-Cookie
            if exchange.head.status == 101:
                self.tunnel(exchange, request)
            else:
                self.relay_response(exchange, request)
            return
        unread_body = request.framing != NO_BODY and body is None
        if failure is None:
            self.server.unavailable.note()
            self.reject(503, "no upstream is available", close=unread_body,
                        extra=b"Retry-After: %d\r\n" % round_robin.retry_after())
        else:
            self.reject(failure.status, failure.detail, close=unread_body, tried=tried[-1])

    def wait_in_queue(self, route: Route, tried: list, unread_body: bool) -> Backend | None:
        """Every upstream that may take the request is at its maxconn: wait in this worker's queue,
        holding no place in the fair gate, for the first one that frees a slot; None when answered
        503 instead (the queue full or its timeout over)."""
        waited = self.outside_gate(self.server.round_robin.queue.wait, lambda: route.pick(tried),
                                   self.stream.peer_gone)
        if isinstance(waited, str):
            # Retry-After: 1: the queue is full now, not out of service (a 503 of no upstream says
            # when one may be back).
            self.reject(503, waited, close=unread_body, extra=b"Retry-After: 1\r\n")
            return None
        if self.stream.peer_gone():  # gone while its slot came: nothing goes upstream
            raise ClientError()
        return waited

    def upstream_failed(self, backend: Backend, error: UpstreamError) -> None:
        backend.failures.note(f"{self.command} {self.path} -> {backend.label}: {error.detail}", error.kind)
        if error.kind in NOT_AGAINST_THE_UPSTREAM:
            return
        # nginx ignores max_fails when a group has a single server: with nowhere else to go,
        # taking it out would only turn its failures into 503s.
        if self.server.shared.record_failure(backend.slot, error.detail, self.config,
                                             may_eject=len(self.server.round_robin.backends) > 1):
            log.warning("upstream %s out of rotation for %gs: %d failed requests in a row, last: %s",
                        backend.label, self.config.fail_timeout, self.config.max_fails, error.detail)

    def may_retry(self, request: Request, error: UpstreamError) -> bool:
        """HAProxy's retry-on, kept safe. A connect that failed (conn-failure) left nothing behind:
        the request can go to the next upstream. An upstream that closed without answering
        (empty-response) or did not answer in time (response-timeout) may have acted on the
        request: only an idempotent one without a body goes on, and a timeout only when asked for
        (re-sending a slow request multiplies the load exactly when an app struggles). An invalid
        response is never retried (nginx: invalid_header is opt-in)."""
        conditions = self.config.retry_conditions
        if error.kind in ("connect", "tls"):
            return "conn-failure" in conditions
        if not replayable(request) or request.upgrade:  # an upgrade is never sent twice
            return False
        if error.kind == "closed":
            return "empty-response" in conditions
        return error.kind == "timeout" and "response-timeout" in conditions

    # -- the request body ---------------------------------------------------------------------

    def arrived_body(self, request: Request) -> bytes | None:
        """A small body that arrived whole with (or right after) its head, else None: the body is
        then streamed, its bytes passed on as they come. A chunked one is decoded and goes on with
        a Content-Length, in the same send as its head (as nginx buffers it)."""
        if request.framing == NO_BODY or (request.framing == LENGTH and not request.length):
            return b""
        if request.expect_continue and not unread(self.rfile):
            return None  # the client waits for the upstream's 100 Continue (or its own timeout)
        try:
            arrived = unread(self.rfile) or len(self.outside_gate(self.rfile.peek, 1))
        except socket.timeout:
            raise ClientError(408, f"no request body data for {self.config.idle_timeout:g}s") from None
        except OSError:
            raise ClientError() from None
        if not arrived:
            raise ClientError()  # the client went away before its body: nobody to answer
        if request.framing == LENGTH:
            if arrived < request.length or request.length > SMALL_BODY:
                return None
            return self.rfile.read(request.length)
        try:
            decoded = decode_buffered_chunked(self.rfile.peek(1), SMALL_BODY)
        except HTTPError as error:
            raise ClientError(error.status, error.detail) from None
        if decoded is None:
            return None
        body, used = decoded
        if self.config.max_body_size and len(body) > self.config.max_body_size:
            raise ClientError(413, f"request body larger than {self.config.max_body_size} bytes")
        self.rfile.read(used)
        request.framing, request.length = LENGTH, len(body)
        return body

    def relay_interim(self, status: int) -> None:
        """An upstream's 100 Continue goes to a client that asked for it, once (RFC 9110 15.2.1:
        other 1xx answers are dropped, as nginx does). Who calls: Transport."""
        if status == 100 and not self.continue_sent and self.request_version == "HTTP/1.1":
            self.continue_sent = True
            self.client_write(CONTINUE)

    # -- the response -------------------------------------------------------------------------

    def relay_response(self, exchange: Exchange, request: Request) -> None:
        backend, head = exchange.backend, exchange.head
        framing = head.framing
        keep_alive = request.keep_alive and not self.server.draining and not exchange.early
        chunked = False
        if framing == CHUNKED or framing == UNTIL_CLOSE:
            if request.version == b"HTTP/1.1":
                chunked = True
            else:
                keep_alive = False  # an HTTP/1.0 client reads such a body until the close
        out = headers_for_client(head, chunked=chunked, keep_alive=keep_alive,
                                 http10=request.version == b"HTTP/1.0", request_id=self.id_field)
        self.head_sent = len(out)
        self.stats.response(backend.stats_base, request.method, head.status, time.monotonic() - self.started)
        done = False
        try:
            self.relay_body(exchange, out, chunked)
            done = True
        except UpstreamError as failure:
            self.stats.error(backend.stats_base, failure.kind)
            self.upstream_failed(backend, failure)
        except ClientError:
            pass  # the client went away
        finally:
            self.server.transport.finish(exchange, request, done)
        if not done or not keep_alive:
            self.close_connection = True
        if exchange.early:
            self.linger = True  # the client may still be sending the body nobody reads
        if self.logging_access:
            self.log_request(head.status, backend)

    def relay_body(self, exchange: Exchange, out: bytes, chunked: bool) -> None:
        """The head, then the body: in the same send when it has all arrived with the head."""
        head, reader = exchange.head, exchange.conn.stream.reader
        if head.framing == NO_BODY or (head.framing == LENGTH and unread(reader) >= head.length):
            self.client_write(out + reader.read(head.length))
            return
        self.client_write(out)
        self.sent += self.outside_gate(self.server.transport.copy_response_body, exchange,
                                       self.stream.sendall, chunked=chunked)

    def tunnel(self, exchange: Exchange, request: Request) -> None:
        """After a 101, the connection is a byte tunnel both ways (Go's switchProtocolCopier), out
        of the fair gate, until either side closes or it idles past --tunnel-timeout."""
        conn = exchange.conn
        out = headers_for_client(exchange.head, chunked=False, keep_alive=True, http10=False,
                                 upgrade=request.upgrade, request_id=self.id_field)
        self.head_sent = len(out)
        self.stats.response(exchange.backend.stats_base, request.method, 101, time.monotonic() - self.started)
        self.close_connection = True
        try:
            self.client_write(out)
        except ClientError:
            conn.close()
            return
        if self.logging_access:
            self.log_request(101, exchange.backend)
        if self.gated:
            self.gated = False
            self.server.gate.leave(request_done=True)
        self.tunnel_peer = conn.stream  # for drain(): a cut ends both sides
        try:
            Tunnel(self.stream, conn.stream, self.config.tunnel_timeout, self.stats).run()
        finally:
            self.tunnel_peer = None
            conn.close()

    def outside_gate(self, call, *args, **kwargs):
        """Make a call that may block without holding a place in the gate, then queue again."""
        if not self.gated:
            return call(*args, **kwargs)
        gate = self.server.gate
        self.gated = False
        gate.leave()
        try:
            return call(*args, **kwargs)
        finally:
            gate.enter()
            self.gated = True

    def send(self, stream: Stream, data) -> None:
        """sendall, except that what the kernel does not take at once is sent outside the gate."""
        sent = stream.send_now(data, keep_gil=self.server.gate.keep_gil)
        if sent < len(data):
            self.outside_gate(stream.sendall, memoryview(data)[sent:])

    def client_write(self, data: bytes) -> None:
        try:
            self.send(self.stream, data)
        except OSError:
            raise ClientError() from None
        self.sent += len(data)

    # -- the one error path -----------------------------------------------------------------------

    def reject(self, status: int, detail: str, *, close: bool = True, extra: bytes = b"",
               tried: Backend | None = None) -> None:
        """Answer with a response of the balancer's own. `close` when the request (or its body) was
        not read whole: the connection cannot be reused, and is closed gently (see linger_close).
        `tried`: the upstream whose failure this answers, for the access log."""
        if close:
            self.close_connection = True
            self.linger = True
        # An upstream's failures are logged by its RateLimitedLog, and a 503 by another:
        # under an outage, one line per request would bury everything else.
        log.debug("%s %s from %s answered %d: %s", self.command or "-", self.path or "-",
                  self.client_address[0], status, detail)
        self.stats.response(OWN_ANSWERS, self.command.encode("latin-1", "replace"), status,
                            time.monotonic() - self.started)
        if self.id_field:
            extra += self.id_field + b"\r\n"
        answer = error_response(status, detail, close=close, extra=extra, head_only=self.command == "HEAD")
        self.head_sent = answer.index(b"\r\n\r\n") + 4
        try:
            self.client_write(answer)
        except ClientError:
            self.close_connection = True
            self.linger = False
        if self.logging_access:
            self.log_request(status, tried, answered=False)

    # -- the access log (http.server's hook name) -------------------------------------------------

    def log_request(self, code="-", backend: Backend | None = None, *, answered: bool = True) -> None:
        """`backend`: the upstream that answered, or (`answered` False) the one tried last, which
        the line names on a 502 or 504 too (nginx's $upstream_addr)."""
        access_log.info("%s", format_access_line(self.config.access_log_format, self, code, backend,
                                                 answered=answered))


def format_access_line(style: str, handler: ProxyHandler, status, backend: Backend | None, *,
                       answered: bool = True) -> str:
    """One access log line: `short` (this balancer's own), `common` and `combined` (Apache's and
    nginx's), or `json` (one object a line, with the upstream, its status and the timings).
    `backend`: the upstream that answered, or (not `answered`) the one tried last. The request ID
    ends every line (`json`: request_id), "-" for a request refused before it had one; with
    --request-id-header '' the text formats are exactly Apache's."""
    duration = time.monotonic() - handler.started
    client = handler.client_ip.decode("ascii")
    request_id = handler.request_id.decode("ascii") if handler.request_id else None
    tail = "" if not handler.config.request_id_key else f" {request_id or '-'}"
    request_line = f"{handler.command or '-'} {handler.path or '-'} {handler.request_version or '-'}"
    if style == "short":
        return (f'{client} "{request_line}" {status} {backend.url if backend else "-"} '
                f'{duration * 1000:.1f}ms{tail}')
    headers = getattr(handler, "headers", None) if handler.command else None
    if style == "json":
        return json.dumps({
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "client": client, "method": handler.command or None, "target": handler.path or None,
            "version": handler.request_version or None, "status": status,
            "upstream": backend.name if backend else None,
            "upstream_address": f"{backend.host}:{backend.port}" if backend else None,
            "upstream_status": status if backend and answered else None,
            "duration_ms": round(duration * 1000, 3), "bytes_sent": handler.sent,
            "bytes_received": handler.rfile.raw.received - handler.received_total,
            "user_agent": headers.get("User-Agent") if headers else None,
            "referer": headers.get("Referer") if headers else None}, separators=(",", ":"))
    when = time.strftime("%d/%b/%Y:%H:%M:%S %z")
    body = handler.sent - handler.head_sent  # Apache's %b, nginx's $body_bytes_sent: no head
    line = f'{client} - - [{when}] "{request_line}" {status} {body if body > 0 else "-"}'
    if style == "combined":
        referer = (headers.get("Referer") if headers else None) or "-"
        agent = (headers.get("User-Agent") if headers else None) or "-"
        line += f' "{referer}" "{agent}"'
    return line + tail


def linger_close(stream: Stream, seconds: float = LINGER_SECONDS, idle: float = LINGER_IDLE_SECONDS) -> None:
    """Close after a response sent before the request was read whole: stop writing, then read and
    drop what the client still sends, up to `seconds` in all and while it sends something every
    `idle` seconds (nginx's lingering_close, lingering_time 30s and lingering_timeout 5s). A
    client uploading a large body it was refused (an early 413) can then finish its send and read
    the answer; a close while it still sends would be a reset, and the answer lost with it."""
    try:
        stream.shutdown_write()
        deadline = time.monotonic() + seconds
        buffer = bytearray(READ_BUFFER)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            stream.set_timeout(min(remaining, idle))
            if not stream.reader.readinto(buffer):
                break
    except (OSError, ValueError):
        pass


class Tunnel:
    """The bytes of an upgraded connection (WebSocket and the like), both ways, from the
    connection's own thread with a selector rather than a thread per direction. What one side
    sends is written to the other; while such a write waits, reading from the side that feeds it
    stops (back pressure). An end of stream from one side is passed on as a half-close (Go's
    CloseWrite); the tunnel ends when both sides have ended, on an error, or after `idle` seconds
    without a byte either way (HAProxy's timeout tunnel)."""

    def __init__(self, client: Stream, upstream: Stream, idle: float, stats: WorkerStats):
        self.client, self.upstream, self.idle, self.stats = client, upstream, idle, stats

    def run(self) -> None:
        self.stats.add(P_TUNNELS)
        self.stats.add(P_TUNNELS_OPEN)
        try:
            self._run()
        except OSError:
            pass  # a reset, or a close by drain(): the tunnel is over
        finally:
            self.stats.add(P_TUNNELS_OPEN, -1)

    def _run(self) -> None:
        client, upstream = self.client, self.upstream
        ends = (client, upstream)
        other = {client: upstream, upstream: client}
        counter = {client: P_TUNNEL_BYTES_UP, upstream: P_TUNNEL_BYTES_DOWN}
        outbox = {client: bytearray(), upstream: bytearray()}  # bytes waiting to be written to it
        reading = {client: True, upstream: True}
        # What a reader already holds (a first frame that came with the upgrade request or with
        # the 101) goes first.
        for source in ends:
            waiting = unread(source.reader)
            if waiting:
                outbox[other[source]] += source.reader.read(waiting)
                self.stats.add(counter[source], waiting)
        for stream in ends:
            stream.set_nonblocking()
        buffer = bytearray(READ_BUFFER)
        interest = {client: 0, upstream: 0}
        with selectors.DefaultSelector() as selector:
            while True:
                for stream in ends:
                    if outbox[stream]:
                        self.flush(stream, outbox[stream])
                    if not outbox[stream] and not reading[other[stream]]:
                        stream.shutdown_write()  # the other side ended: pass the half-close on
                if not any(reading.values()) and not any(outbox.values()):
                    return
                for stream in ends:
                    wanted = (selectors.EVENT_READ if reading[stream] and not outbox[other[stream]] else 0) | (
                        selectors.EVENT_WRITE if outbox[stream] else 0)
                    if wanted != interest[stream]:
                        if not interest[stream]:
                            selector.register(stream.sock, wanted, stream)
                        elif not wanted:
                            selector.unregister(stream.sock)
                        else:
                            selector.modify(stream.sock, wanted, stream)
                        interest[stream] = wanted
                # Decoded TLS bytes can wait above a socket that polls as empty.
                ready = [s for s in ends if interest[s] & selectors.EVENT_READ and s.pending()]
                if not ready:
                    events = selector.select(self.idle)
                    if not events:
                        log.debug("tunnel idle for %gs: closed", self.idle)
                        return
                    ready = [key.data for key, mask in events if mask & selectors.EVENT_READ]
                for stream in ready:
                    n = stream.read_nonblocking(buffer)
                    if n is None:
                        continue
                    if n == 0:
                        reading[stream] = False
                        continue
                    outbox[other[stream]] += memoryview(buffer)[:n]
                    self.stats.add(counter[stream], n)

    @staticmethod
    def flush(stream: Stream, data: bytearray) -> None:
        """Write what the stream takes now, without waiting."""
        while data:
            n = stream.write_nonblocking(data)
            if not n:
                return
            del data[:n]


# ===================================================================================================
# Servers
# ===================================================================================================

class Listener(ThreadingHTTPServer):
    """What every listener of the balancer has: IPv6 when its address is one, daemon threads, no
    reverse DNS look-up at bind (HTTPServer.server_bind's socket.getfqdn() is slow offline), and a
    serve_forever() that shutdown() wakes at once: socketserver's notices it at the next poll
    interval, which every stop, drain and reload would wait for."""

    daemon_threads = True

    def __init__(self, address, handler, bind_and_activate: bool = True):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        self.stopping = False
        self.stopped = threading.Event()
        self.stopped.set()
        super().__init__(address, handler, bind_and_activate)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop: a connection, or `poll_interval` passing, then service_actions()."""
        self.stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self.wake_read, selectors.EVENT_READ)
                while not self.stopping:
                    ready = selector.select(poll_interval)
                    if self.stopping:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self.stopping = False
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever() and wait until it has returned (who calls: another thread)."""
        self.stopping = True
        try:
            os.write(self.wake_write, b"x")
        except OSError:
            pass  # a wake-up is pending already, or the listener is closed
        self.stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        for fd in (self.wake_read, self.wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self.wake_read = self.wake_write = -1


class ProxyServer(Listener):
    """ThreadingHTTPServer with what a proxy needs: a deep listen backlog accepted in bursts,
    connection threads kept as spares for the next connections, a cap on connections (at the cap
    the longest-idle keep-alive connection makes room; 503 only when all are busy), TLS, and
    graceful draining. `listener`: a listening socket handed over by the supervisor, else it binds
    --host and --port itself."""

    request_queue_size = 1024      # socketserver's 5 drops SYNs under load: 1 s client stalls
    allow_reuse_address = True

    def __init__(self, config: Config, round_robin: RoundRobin, stats: WorkerStats, shared: SharedState,
                 listener: socket.socket | None = None):
        self.config, self.round_robin, self.stats, self.shared = config, round_robin, stats, shared
        self.draining = False
        self.connections = 0          # counted at accept, so that the cap holds under a burst
        self.evicting = 0             # idle connections closed to make room, not yet gone
        # Bytes of closed connections; a worker started again goes on from its block's totals.
        self.retired_received, self.retired_sent = stats.counters[P_RECEIVED], stats.counters[P_SENT]
        self.gauged: set = set()      # upstream records whose in-flight gauge is not 0
        self.published_at = 0.0
        self.handlers: set = set()
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.drain_deadline = 0.0
        self.cut_off = False          # cut() was called: a drain that begins later ends at once
        self.closer = LingeringCloser()
        self.gate = FairGate()
        self.transport = Transport(config)
        self.spare_threads = 0        # connection threads waiting in handoff for a connection
        self.handoff: queue.SimpleQueue = queue.SimpleQueue()
        self.refusals = RateLimitedLog(f"connections refused: all {config.max_connections} "
                                       "connections are busy (--max-connections)")
        self.unavailable = RateLimitedLog("requests answered 503: no upstream is available")
        self.guard = Guard(config, shared, stats) if Guard.needed(config) else None
        self.tls: ssl.SSLContext | None = None
        self.tls_generation, pem = shared.tls_pem()
        if config.tls_cert:  # a worker started again after a reload loads what that reload checked
            self.tls = server_tls_context(config.tls_cert, config.tls_key, pem or None)
        if listener is None:
            super().__init__((config.host, config.port), ProxyHandler)
        else:
            super().__init__(listener.getsockname()[:2], ProxyHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()
            self.socket.setblocking(False)

    def server_activate(self) -> None:
        super().server_activate()
        # See service_actions. Accepted sockets stay blocking on Linux (accept4 does not inherit
        # O_NONBLOCK); elsewhere set_timeout() puts them in Python's timeout mode before any read.
        self.socket.setblocking(False)

    def service_actions(self) -> None:
        """serve_forever() accepts one connection per wake-up of its poll(); under a burst of
        connects, take the rest of the backlog now instead of one poll() each (at most one
        backlog's worth, so that a connect flood cannot keep shutdown() waiting). Also takes a
        change of the shared state (an admin action, a reload) within a poll interval, and
        publishes the gauges."""
        self.round_robin.follow()
        if self.guard is not None:
            self.guard.follow()
        now = time.monotonic()
        if now - self.published_at >= GAUGE_SECONDS:
            self.published_at = now
            self.publish_gauges()
        for _ in range(self.request_queue_size):
            try:
                request, client_address = self.socket.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            self.process_request(request, client_address)

    def process_request(self, request: socket.socket, client_address) -> None:
        with self.lock:
            refused = "shutting down" if self.draining else None
            if not refused and self.connections - self.evicting >= self.config.max_connections:
                refused = None if self.make_room() else "too many connections"
            if not refused:
                self.connections += 1
                spare = self.spare_threads > 0
                self.spare_threads -= spare
        if refused:
            self.stats.response(OWN_ANSWERS, b"other", 503, 0.0)
            if refused == "too many connections":
                self.refusals.note()
            self.closer.reject(request, error_response(503, refused, close=True, extra=b"Retry-After: 1\r\n"))
            return
        if spare:
            self.handoff.put((request, client_address))
        else:
            # _thread rather than threading.Thread: Thread.start() waits until the new thread runs,
            # which under load means until it gets the GIL; the accept loop should not wait.
            _thread.start_new_thread(self.connection_thread, (request, client_address))

    def make_room(self) -> bool:
        """At the cap, close the keep-alive connection that has idled longest, as nginx does, so
        that idle clients cannot lock new ones out. False when every connection is busy. Called
        with the lock held."""
        idle = [h for h in self.handlers if not h.busy and not h.evicted and h.stream is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda handler: handler.idle_since)
        victim.evicted = True
        self.evicting += 1
        if not victim.busy:  # else a request just began on it: it closes once that is answered
            victim.stream.shutdown(socket.SHUT_RDWR)
        return True

    def connection_thread(self, request: socket.socket, client_address) -> None:
        """Serves one connection, then waits as a spare thread for the next one handed over by
        process_request(); leaves after SPARE_THREAD_SECONDS idle or when the server closes."""
        while request is not None:
            try:
                self.process_request_thread(request, client_address)
            finally:
                with self.lock:
                    self.connections -= 1
                    spare = not self.draining and self.spare_threads < SPARE_THREADS
                    self.spare_threads += spare
            if not spare:
                return
            try:
                request, client_address = self.handoff.get(timeout=SPARE_THREAD_SECONDS)
            except queue.Empty:
                with self.lock:
                    if self.spare_threads > 0:  # no connection is on its way to this thread
                        self.spare_threads -= 1
                        return
                # process_request() counted this thread out and is putting a connection: take it
                request, client_address = self.handoff.get()

    def open_stream(self, handler: ProxyHandler) -> Stream | None:
        """The stream for a new connection; on a TLS listener after the handshake (None if it
        failed: the connection is then closed). Who calls: ProxyHandler.setup."""
        sock = handler.connection
        if self.config.proxy_protocol_networks and not self.accept_proxy(handler):
            return None
        if self.tls is None:
            return Stream(sock)
        if self.shared.header[H_TLS_GENERATION] != self.tls_generation:
            self.reload_certificate()
        sock.settimeout(self.config.header_timeout)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
            if first and first != b"\x16":  # not a TLS handshake record: plain HTTP, as nginx answers it
                if not first.translate(None, TCHAR):
                    self.stats.response(OWN_ANSWERS, b"other", 400, 0.0)
                    self.closer.reject(sock.dup(), error_response(
                        400, "The plain HTTP request was sent to HTTPS port", close=True))
                return None
            tls_sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            handler.connection = tls_sock
            tls_sock.do_handshake()
        except (OSError, ValueError) as error:
            log.debug("TLS handshake with %s failed: %s", handler.client_address[0], describe_os_error(error))
            return None
        return TLSStream(tls_sock)

    def accept_proxy(self, handler: ProxyHandler) -> bool:
        """--proxy-protocol-from, before anything else is read (TLS too): a connection from a
        listed address must begin with a PROXY header, whose address becomes the client's (for the
        log, X-Forwarded-For, --trusted-proxies and whatever reads ProxyHandler.client_ip); one
        from anywhere else must not. Each within --header-timeout. False: the connection is
        refused (400 when it lacks the header or has one it may not send; closed without an
        answer when the header is malformed or incomplete, as HAProxy does)."""
        sock = handler.connection
        peer = handler.client_address[0]
        deadline = time.monotonic() + self.config.header_timeout
        refusal = None
        try:
            if address_in(peer, self.config.proxy_protocol_networks):
                header = read_proxy_header(sock, deadline)
                if header.source is not None:  # else LOCAL or UNKNOWN: the connection's own
                    handler.client_address = header.source
                    handler.peer_ip = handler.client_ip = header.source[0].encode("ascii")
                    handler.proxy_destination = header.destination
                return True
            sock.settimeout(self.config.header_timeout)
            first = sock.recv(len(PROXY_V2_SIGNATURE), socket.MSG_PEEK)
            if first[:6] == PROXY_V1_PREFIX or first == PROXY_V2_SIGNATURE:
                refusal = "a PROXY protocol header from an address not in --proxy-protocol-from"
            return refusal is None
        except NoProxyHeader:
            refusal = "a PROXY protocol header is expected from this address"
            return False
        except (ProxyProtocolError, OSError) as error:
            log.debug("PROXY protocol from %s: %s", peer, describe_os_error(error))
            return False
        finally:
            if refusal:
                log.debug("refused %s: %s", peer, refusal)
                self.stats.response(OWN_ANSWERS, b"other", 400, 0.0)
                self.closer.reject(sock.dup(), error_response(400, refusal, close=True))
            sock.settimeout(None)  # blocking again, with kernel timeouts (see set_timeout)

    def reload_certificate(self) -> None:
        """Load the renewed certificate for new connections: the bytes the reload checked and
        published (Control.reload), not the file as it is now, which may have changed since."""
        generation, pem = self.shared.tls_pem()
        try:
            self.tls = server_tls_context(self.config.tls_cert, self.config.tls_key, pem)
        except (OSError, ssl.SSLError) as error:
            log.error("kept the previous certificate: cannot load %s: %s", self.config.tls_cert,
                      describe_os_error(error))
        self.tls_generation = generation

    def track(self, handler: ProxyHandler, active: bool) -> None:
        counters = self.stats.counters
        with self.lock:  # the only writer of these fields: plain stores, no other lock
            if active:
                self.handlers.add(handler)
                counters[P_ACCEPTED] += 1
            else:
                self.handlers.discard(handler)
                self.retired_received += handler.received_total
                self.retired_sent += handler.sent_total
                if handler.evicted:
                    self.evicting -= 1
                self.drained.notify_all()
            counters[P_CONNECTIONS] = len(self.handlers)

    def publish_gauges(self) -> None:
        """Write this worker's gauges and byte totals into its counter block, from what its
        connections hold: requests in flight at each upstream, and the bytes of every ended
        request (lock-free on the request path; who calls: service_actions, a few times a second,
        and Control before it answers in a one-process balancer)."""
        counters = self.stats.counters
        in_flight: collections.Counter = collections.Counter()
        with self.lock:
            received, sent = self.retired_received, self.retired_sent
            for handler in self.handlers:
                base = handler.in_flight_base
                if base is not None:
                    in_flight[base] += 1
                received += handler.received_total
                sent += handler.sent_total
            for base in self.gauged | in_flight.keys():
                counters[base + U_IN_FLIGHT] = in_flight[base]
            self.gauged = set(in_flight)
            counters[P_RECEIVED], counters[P_SENT] = received, sent
        self.round_robin.publish_counts()

    def wake_drainer(self) -> None:
        with self.lock:
            self.drained.notify_all()

    def handle_error(self, request, client_address) -> None:
        log.exception("unexpected error on the connection from %s", client_address[0])

    def drain(self, timeout: float) -> None:
        """Let requests in flight (and tunnels) finish, up to `timeout` seconds or until cut();
        close idle connections now."""
        with self.lock:
            self.drain_deadline = 0.0 if self.cut_off else time.monotonic() + timeout
            self.draining = True
            for _ in range(self.spare_threads):  # each spare thread takes one and leaves
                self.handoff.put((None, None))
            self.spare_threads = 0
            while True:
                for handler in self.handlers:
                    if not handler.busy:  # waiting for a next request: end that wait
                        shutdown_socket(handler.connection, socket.SHUT_RD)
                remaining = self.drain_deadline - time.monotonic()
                if remaining <= 0 or not any(h.busy for h in self.handlers):
                    break
                self.drained.wait(remaining)
            cut = sum(1 for h in self.handlers if h.busy)
            for handler in self.handlers:
                shutdown_socket(handler.connection, socket.SHUT_RDWR)
                peer = handler.tunnel_peer
                if peer is not None:
                    peer.shutdown(socket.SHUT_RDWR)
        if cut and self.cut_off:
            log.warning("drain ended early by a second stop signal: %d request(s) or tunnel(s) in "
                        "flight were cut off", cut)
        elif cut:
            log.warning("drain timeout: %d request(s) or tunnel(s) still in flight after %gs were "
                        "cut off", cut, timeout)
        self.closer.stop()

    def cut(self) -> None:
        """End a drain now, as a second stop signal does: what is still in flight is cut off."""
        with self.lock:
            self.cut_off = True
            self.drain_deadline = 0.0
            self.drained.notify_all()


def shutdown_socket(sock: socket.socket, how: int) -> None:
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def server_tls_context(cert: str, key: str, pem: bytes | None = None) -> ssl.SSLContext:
    """The listener's TLS: TLS 1.2 and 1.3 with the ssl module's secure defaults, ALPN http/1.1.
    From the files, or from `pem` (chain and key) as read_certificate() returned it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if pem is None:
        context.load_cert_chain(cert, key)
    else:  # OpenSSL loads from files only: a private one (mode 0600) in memory, removed at once
        with tempfile.NamedTemporaryFile(prefix="load_balancer-tls-", dir=memory_directory()) as file:
            file.write(pem)
            file.flush()
            context.load_cert_chain(file.name)
    context.set_alpn_protocols(["http/1.1"])
    return context


def read_certificate(cert: str, key: str) -> bytes:
    """The chain and key files' bytes as one PEM, loaded once to check them (OSError, SSLError)."""
    with open(cert, "rb") as file:
        pem = file.read()
    if key != cert:
        with open(key, "rb") as file:
            pem += b"\n" + file.read()
    server_tls_context(cert, key, pem)
    return pem


class RateLimitedLog:
    """A WARNING that may repeat many times a second (an upstream failing under load, a flood of
    connections over the cap, 503s while nothing is available): the first is written at once, in
    full; the repeats are counted, by kind, and written as one summary line per
    LOG_SUMMARY_SECONDS, by a timer, so that the end of a burst is reported too and the counts add
    up to every occurrence. `subject` begins the summary, `what` names what is counted."""

    def __init__(self, subject: str, what: str = ""):
        self.subject, self.what = subject, what
        self.lock = threading.Lock()
        self.quiet_until = 0.0
        self.kinds: collections.Counter = collections.Counter()
        self.timer = None

    def note(self, line: str | None = None, kind: str = "") -> None:
        """One occurrence: `line` says it in full (default: the subject), `kind` sorts repeats."""
        with self.lock:
            now = time.monotonic()
            if now < self.quiet_until or self.kinds:
                self.kinds[kind] += 1
                if self.timer is None:
                    self.timer = threading.Timer(max(self.quiet_until - now, 0.0), self.summarise)
                    self.timer.daemon = True
                    self.timer.start()
                return
            self.quiet_until = now + LOG_SUMMARY_SECONDS
        log.warning("%s", line or self.subject)

    def flush(self) -> None:
        """Write the pending summary now (who calls: Worker.close, so that no line comes later)."""
        with self.lock:
            timer = self.timer
        if timer is not None:
            timer.cancel()
            self.summarise()

    def summarise(self) -> None:
        with self.lock:
            kinds, self.kinds, self.timer = self.kinds, collections.Counter(), None
            self.quiet_until = time.monotonic() + LOG_SUMMARY_SECONDS
        if kinds:
            named = ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common() if kind)
            log.warning("%s: %d more%s in the last %gs%s", self.subject, sum(kinds.values()),
                        " " + self.what if self.what else "", LOG_SUMMARY_SECONDS,
                        f" ({named})" if named else "")


class LingeringCloser:
    """Answers and closes connections refused at accept, from one thread for all of them: after
    the response, reads and drops what the client still sends for a moment before closing, so the
    close does not turn into a reset that destroys the response (nginx's lingering_close)."""

    def __init__(self, seconds: float = REFUSED_LINGER_SECONDS, most: int = REFUSED_LINGER_MOST):
        self.seconds, self.most = seconds, most
        self.pending: dict = {}       # fd -> (socket, deadline)
        self.lock = threading.Lock()
        self.thread = None
        self.stopped = False

    def reject(self, sock: socket.socket, response: bytes) -> None:
        try:
            sock.setblocking(False)
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self.lock:
            if self.stopped or len(self.pending) >= self.most:
                sock.close()
                return
            self.pending[sock.fileno()] = (sock, time.monotonic() + self.seconds)
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, daemon=True, name="lingering close")
                self.thread.start()

    def run(self) -> None:
        poller = select.poll()
        registered: set = set()
        while not self.stopped:
            with self.lock:
                for fd in self.pending.keys() - registered:
                    poller.register(fd, select.POLLIN)
                    registered.add(fd)
            ready = {fd for fd, _ in poller.poll(100)}
            now = time.monotonic()
            with self.lock:
                for fd in list(self.pending):
                    sock, deadline = self.pending[fd]
                    if fd in ready:
                        try:
                            if sock.recv(65536):
                                continue
                        except BlockingIOError:
                            continue
                        except OSError:
                            pass
                    elif now < deadline:
                        continue
                    poller.unregister(fd)
                    registered.discard(fd)
                    del self.pending[fd]
                    sock.close()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for sock, _ in self.pending.values():
                sock.close()
            self.pending.clear()


# Every answer of the admin listener: never cached, its type never guessed.
ADMIN_FIELDS = SERVER_FIELD + b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"


class AdminHandler(BaseHTTPRequestHandler):
    """The admin listener (in the process that owns the balancer: the supervisor with workers):
    ``GET /`` the dashboard, ``GET /status`` JSON, ``GET /metrics`` Prometheus text, and
    ``POST /backends/<name>/drain|maint|ready``. HEAD works wherever GET does; another method gets
    405 with Allow. Nothing is cached (Cache-Control: no-store). Errors on API paths are JSON."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two sends: no 40 ms delayed-ACK wait
    timeout = ADMIN_TIMEOUT_SECONDS
    server: AdminServer
    ACTIONS = ("drain", "maint", "ready")

    def handle_one_request(self) -> None:
        """http.server's, with one dispatch for every method (its own answers 501 to a method it
        has no do_ function for)."""
        try:
            self.raw_requestline = self.rfile.readline(ADMIN_MAX_LINE + 1)
        except (OSError, ValueError):
            self.close_connection = True
            return
        if not self.raw_requestline or len(self.raw_requestline) > ADMIN_MAX_LINE:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        try:
            self.dispatch()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        control = self.server.control
        if path in ("/", "/index.html"):
            allowed, page = ("GET", "HEAD"), lambda: (
                b"text/html; charset=utf-8", render_dashboard(control.status(history=True)).encode())
        elif path in ("/status", "/status/"):
            allowed, page = ("GET", "HEAD"), lambda: (
                b"application/json", (json.dumps(control.status(history="history=1" in query.split("&")),
                                                 indent=2) + "\n").encode())
        elif path == "/metrics":
            allowed, page = ("GET", "HEAD"), lambda: (
                b"text/plain; version=0.0.4; charset=utf-8", control.metrics().encode())
        elif path.startswith("/backends/"):
            return self.backend_action(path)
        else:
            return self.error(404, "try /, /status or /metrics", api=False)
        if self.command not in allowed:
            return self.not_allowed(allowed, api=path != "/")
        content_type, body = page()
        self.answer(own_response(200, content_type, body, close=self.close_connection, extra=ADMIN_FIELDS,
                                 head_only=self.command == "HEAD"), 200)

    def backend_action(self, path: str) -> None:
        parts = path.split("/")
        if len(parts) != 4 or parts[3] not in self.ACTIONS:
            return self.error(404, f"no such endpoint {path!r}: POST /backends/<name>/drain, "
                                   "/maint or /ready")
        if self.command != "POST":
            return self.not_allowed(("POST",), api=True)
        refusal = self.refuse_post()
        if refusal:
            return self.error(*refusal)
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= ADMIN_MAX_BODY:
            self.rfile.read(int(length))
        elif length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
        name = urllib.parse.unquote(parts[2])
        result = self.server.control.set_state(name, parts[3])
        if result is None:
            return self.error(404, f"no backend named {name!r}")
        self.answer(own_response(200, b"application/json", (json.dumps(result, indent=2) + "\n").encode(),
                                 close=self.close_connection, extra=ADMIN_FIELDS), 200)

    def refuse_post(self) -> tuple[int, str] | None:
        """Any web page a browser opens can POST to 127.0.0.1: a request from another origin is
        refused (Origin, or Sec-Fetch-Site: cross-site), and with --admin-token every POST must
        carry it as a bearer token."""
        origin = self.headers.get("Origin")
        own = f"http://{self.headers.get('Host', '')}"
        if (origin is not None and origin != own) or self.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            return 403, "cross-origin requests to the admin API are refused"
        token = self.server.control.config.admin_token
        if token:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return 401, "this admin API needs Authorization: Bearer <--admin-token>"
        return None

    def not_allowed(self, allowed: tuple, *, api: bool) -> None:
        self.error(405, f"{self.command} is not allowed here; allowed: {', '.join(allowed)}", api=api,
                   extra=b"Allow: %s\r\n" % ", ".join(allowed).encode())

    def error(self, status: int, detail: str, *, api: bool = True, extra: bytes = b"") -> None:
        """An error answer: JSON on the API's paths, text elsewhere."""
        if status == 401:
            extra += b'WWW-Authenticate: Bearer realm="load_balancer admin"\r\n'
        self.answer(error_response(status, detail, close=self.close_connection, extra=ADMIN_FIELDS + extra,
                                   head_only=self.command == "HEAD", as_json=api), status)

    def answer(self, response: bytes, status: int) -> None:
        self.log_request(status)
        self.wfile.write(response)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line) in the same form."""
        self.close_connection = True
        try:
            self.error(code, message or HTTPStatus(code).phrase, api=False)
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:
        log.debug("admin: %s " + format, self.client_address[0], *args)


class AdminServer(Listener):
    request_queue_size = 64

    def __init__(self, address, control: Control):
        self.control = control
        self.closer = LingeringCloser()
        self.refusals = RateLimitedLog("admin connections answered 403: address not in --admin-allow")
        super().__init__(address, AdminHandler)

    def verify_request(self, request: socket.socket, client_address) -> bool:
        """--admin-allow, decided at accept: the admin listener is plain HTTP and its client is
        the peer, so a 403 can go out before a thread starts or a byte is read."""
        allowed = self.control.lists.admin_allow
        if not allowed or address_in(client_address[0], allowed):
            return True
        self.refusals.note()
        self.closer.reject(request.dup(), error_response(
            403, "this address may not use the admin listener (--admin-allow)", close=True, extra=ADMIN_FIELDS))
        return False

    def server_close(self) -> None:
        super().server_close()
        self.closer.stop()

    def handle_error(self, request, client_address) -> None:
        log.exception("unexpected error on the admin connection from %s", client_address[0])


class RedirectHandler(BaseHTTPRequestHandler):
    """--redirect-http-port: every request gets 308 to the same URL on https (a permanent redirect
    that keeps the method, RFC 9110 section 15.4.9)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = REDIRECT_TIMEOUT_SECONDS

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(REDIRECT_MAX_LINE + 1)
        except OSError:
            self.close_connection = True
            return
        if not self.raw_requestline or not self.parse_request():
            self.close_connection = True
            return
        host = (self.headers.get("Host") or self.server.server_name).rsplit("]", 1)
        name = host[0] + "]" if len(host) == 2 else host[0].split(":")[0]
        port = self.server.https_port
        target = self.path if self.path.startswith("/") else "/"
        location = f"https://{name}{'' if port == 443 else f':{port}'}{target}"
        self.log_request(308)
        self.wfile.write(error_response(308, location, close=True, head_only=self.command == "HEAD",
                                        extra=SERVER_FIELD + b"Location: %s\r\n" % location.encode("latin-1")))
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        log.debug("redirect: %s " + format, self.client_address[0], *args)


class RedirectServer(Listener):
    def __init__(self, address, https_port: int):
        self.https_port = https_port
        super().__init__(address, RedirectHandler)


# ===================================================================================================
# Admin dashboard (GET / on the admin listener)
# ===================================================================================================

DASHBOARD_CSS = """
:root{--bg:#0d1117;--panel:#151b23;--alt:#1c232d;--line:#29313c;--text:#e6edf3;--mute:#8d96a0;
--accent:#4aa3ff;--up:#3fb950;--down:#f85149;--drain:#e3a008;--maint:#8d96a0;color-scheme:dark}
@media (prefers-color-scheme:light){:root{--bg:#f4f6f8;--panel:#fff;--alt:#f3f5f7;--line:#d9dee4;
--text:#1f2328;--mute:#626c76;--accent:#0969da;--up:#1a7f37;--down:#cf222e;--drain:#9a6700;
--maint:#6e7781;color-scheme:light}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);font:14px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-variant-numeric:tabular-nums}
a{color:var(--accent)}
.mono,.nm{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
.mute,.sub{color:var(--mute)}
.sub{display:block;font-size:12px}
[hidden]{display:none!important}
.nojs .js,table:not(.adm) .act{display:none}
header{display:flex;flex-wrap:wrap;align-items:center;gap:6px 18px;padding:10px 20px;
background:var(--panel);border-bottom:1px solid var(--line)}
h1{font-size:16px;margin:0;display:flex;align-items:center;gap:8px}
h1 svg{color:var(--accent)}
.meta{display:flex;flex-wrap:wrap;gap:4px 14px;color:var(--mute);font-size:13px}
.meta b{color:var(--text);font-weight:500}
.live{margin-left:auto;display:flex;align-items:center;gap:8px;font-size:13px;padding:3px 10px;
border-radius:999px;border:1px solid var(--line)}
.live i{width:8px;height:8px;border-radius:50%;background:var(--mute)}
.live.ok i{background:var(--up);box-shadow:0 0 0 3px color-mix(in srgb,var(--up) 25%,transparent)}
.live.lost{color:var(--down);border-color:var(--down);font-weight:600}
.live.lost i{background:var(--down)}
main{padding:16px 20px;max-width:1600px;margin:auto}
.banner{padding:10px 14px;border-radius:8px;margin-bottom:14px;font-weight:500;border:1px solid}
.panic{background:color-mix(in srgb,var(--drain) 15%,transparent);border-color:var(--drain)}
.lost{background:color-mix(in srgb,var(--down) 13%,transparent);border-color:var(--down)}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:10px;margin-bottom:14px}
.tile,.panel{background:var(--panel);border:1px solid var(--line);border-radius:10px}
.tile{padding:10px 14px;min-width:0}
.tile h3,th,td::before{font-size:11px;font-weight:600;letter-spacing:.06em;text-transform:uppercase;
color:var(--mute);margin:0}
.tile b{display:block;font-size:24px;font-weight:600;line-height:1.3;white-space:nowrap}
.tile small{color:var(--mute);font-size:12px;display:block;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
.tile.hot b{color:var(--drain)}.tile.bad b{color:var(--down)}
.grid2{display:grid;grid-template-columns:minmax(0,3fr) minmax(240px,1fr);gap:14px;margin-bottom:14px}
.nojs .grid2{grid-template-columns:1fr}
.panel{padding:12px 16px}
.ph{display:flex;flex-wrap:wrap;align-items:center;gap:6px 14px;margin-bottom:8px}
h2{font-size:14px;margin:0}
.key{display:inline-block;width:10px;height:3px;vertical-align:middle;margin:0 4px 0 8px}
.chart{position:relative;height:150px;padding-bottom:16px}
.chart svg{width:100%;height:100%;display:block;border-bottom:1px solid var(--line)}
.chart span{position:absolute;font-size:11px;color:var(--mute);bottom:0}
.grid{stroke:var(--line);stroke-dasharray:3 4}
.ar{fill:color-mix(in srgb,var(--accent) 18%,transparent)}
.ln{fill:none;stroke:var(--accent);stroke-width:1.6}
.er{fill:none;stroke:var(--down);stroke-width:2}
svg path{vector-effect:non-scaling-stroke}
.bar{display:flex;height:10px;border-radius:5px;overflow:hidden;background:var(--alt);margin:10px 0}
dl{display:grid;grid-template-columns:auto 1fr;gap:3px 12px;margin:0;font-size:13px}
dt{color:var(--mute)}dd{margin:0;text-align:right}
dt i{display:inline-block;width:8px;height:8px;border-radius:2px;margin-right:6px}
.chips{display:flex;gap:6px;flex-wrap:wrap}
.chip{font-size:12px;padding:1px 9px;border-radius:999px;background:var(--alt);color:var(--mute)}
.chip b{color:var(--text)}
.chip::before,.badge::before{content:"";display:inline-block;width:7px;height:7px;border-radius:50%;
background:var(--c);margin-right:6px;vertical-align:1px}
.scroll{overflow-x:auto;margin:0 -16px}
table{border-collapse:collapse;width:100%}
th,td{padding:7px 8px;text-align:left;border-top:1px solid var(--line)}
th{border-top:0;vertical-align:bottom;line-height:1.25}
th:first-child,td:first-child{padding-left:16px}
.num{text-align:right;white-space:nowrap}
tbody tr:hover{background:var(--alt)}
td.name{white-space:nowrap;box-shadow:inset 3px 0 var(--c,transparent)}
.nm{font-weight:600;display:inline-block;max-width:200px;overflow:hidden;text-overflow:ellipsis;
vertical-align:bottom}
.tag{font-size:11px;margin-right:4px;padding:0 5px;border-radius:4px;border:1px solid var(--line)}
.s-up{--c:var(--up)}.s-down{--c:var(--down)}.s-drain{--c:var(--drain)}.s-maint{--c:var(--maint)}
.state .sub{white-space:nowrap}
.badge{display:inline-block;padding:0 9px 1px;border-radius:999px;font-weight:700;font-size:15px;
font-variant-caps:all-small-caps;letter-spacing:.05em;color:var(--c,var(--mute));
background:color-mix(in srgb,var(--c,var(--mute)) 15%,transparent)}
.s-maint td:not(.state):not(.act){opacity:.6}
.reason{min-width:170px;font-size:13px}
.err{color:var(--mute)}.err.bad{color:var(--down)}
.hist svg{width:120px;height:30px;display:block}
.seg{display:inline-flex;border:1px solid var(--line);border-radius:6px;overflow:hidden}
button{font:inherit;font-size:12px;padding:2px 8px;border:0;background:none;color:var(--text);cursor:pointer}
.seg button+button{border-left:1px solid var(--line)}
button:hover:not(:disabled){background:var(--alt)}
button:disabled{cursor:default}
button.on{font-weight:600;color:var(--c);background:color-mix(in srgb,var(--c) 15%,transparent)}
[data-act=ready]{--c:var(--up)}[data-act=drain]{--c:var(--drain)}[data-act=maint]{--c:var(--maint)}
.token{display:flex;flex-wrap:wrap;align-items:center;gap:8px 12px;font-weight:400;
background:color-mix(in srgb,var(--accent) 10%,transparent);border-color:var(--accent)}
.token label{flex:1 1 320px}
.token input{font:inherit;padding:4px 8px;border-radius:6px;border:1px solid var(--line);
background:var(--bg);color:var(--text);min-width:220px}
.token button,#token-forget{border:1px solid var(--line);border-radius:6px;padding:4px 10px}
#toast{position:fixed;right:16px;bottom:16px;max-width:420px;padding:10px 14px;border-radius:8px;
background:var(--panel);border:1px solid var(--accent);box-shadow:0 6px 24px #0006}
#toast.err{border-color:var(--down);color:var(--down)}
footer{color:var(--mute);font-size:12px;padding:0 20px 20px;text-align:center}
@media (max-width:700px){
header,main{padding:10px 12px}.live{margin-left:0}
main{display:flex;flex-direction:column}.grid2{order:1}
.grid2{grid-template-columns:1fr}
.tiles{grid-template-columns:repeat(3,minmax(0,1fr));gap:6px}
.tile{padding:6px 10px}.tile b{font-size:18px}.tile h3{font-size:10px;letter-spacing:.02em}
.tile small{font-size:11px}.chart{height:120px}
.scroll{margin:0;overflow:visible}
table,tbody,td{display:block}
thead{display:none}
tr{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:6px 8px;padding:10px 12px;margin-top:10px;
border:1px solid var(--line);border-radius:10px;border-left:4px solid var(--c,var(--line))}
td,td:first-child,td.num{padding:0;border:0;text-align:left;box-shadow:none;min-width:0}
.nm{max-width:100%}
.err .sub{display:inline;margin-left:4px}
td.name,td.state{grid-column:span 2}
td.state{text-align:right}
td.reason,td.hist,td.act,tr.none td{grid-column:1/-1}
td::before{display:block}
td.rate::before{content:"Req/s"}td.requests::before{content:"Requests"}
td.err::before{content:"Errors"}td.p50::before{content:"p50 ms"}td.p99::before{content:"p99 ms"}
td.inflight::before{content:"In flight"}td.idle::before{content:"Idle conns"}
td.hist::before{content:"Last 5 min: req/s, errors in red"}
.hist svg{width:100%;height:44px}
}
"""

DASHBOARD_JS = r"""
"use strict";
(() => {
const WINDOW = 300;                 // seconds of history kept and drawn
const $ = (id) => document.getElementById(id);
const rows = new Map(), series = new Map();
// The whole balancer: every response to a client, and the 5xx it answered itself (no upstream
// available, upstream failures), as /status counts them in requests_total and failed_total.
const total = {t: [], r: [], e: [], last: null, now: null, at: 0};
let prev = null, skew = 0, gap = 3, lastOk = null;

const num = (v) => (typeof v === "number" && isFinite(v)) ? v : 0;
const sum = (o) => Object.values(o || {}).reduce((a, v) => a + num(v), 0);
const rate = (v) => v >= 1e6 ? (v / 1e6).toFixed(1) + "M" : v >= 1e4 ? (v / 1e3).toFixed(1) + "k"
  : v >= 100 || v === 0 ? String(Math.round(v)) : v.toFixed(1);
const ms = (v) => typeof v !== "number" ? "–"
  : v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : String(Math.round(v));
const pct = (v) => v === 0 ? "0%" : v < 0.1 ? "<0.1%" : v < 10 ? v.toFixed(1) + "%" : Math.round(v) + "%";
const p2 = (n) => String(n).padStart(2, "0");
function dur(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + p2(m) + "m" : m ? m + "m " + p2(s % 60) + "s" : s + "s";
}
function bytes(n) {
  let i = 0;
  for (; n >= 1024 && i < 4; i++) n /= 1024;
  return (i ? n.toFixed(1) : n) + " " + ["B", "KiB", "MiB", "GiB", "TiB"][i];
}
// Writes only what changed, so that hovering and text selection survive the poll.
function put(el, v) { v = String(v); if (el.textContent !== v) el.textContent = v; }

// The server's clock, from its own numbers: the browser's clock may be off, and history
// timestamps are the server's. `started` has whole seconds only; `skew` makes up for that.
function clock(s) {
  const st = Date.parse(s.started);
  return (isFinite(st) ? st / 1000 + num(s.uptime_seconds) : Date.now() / 1000) + skew;
}

function track(name) {
  let s = series.get(name);
  if (!s) series.set(name, s = {t: [], r: [], e: [], last: null, now: null, at: 0});
  return s;
}
// Rates are differences of cumulative counters over the server's time between two samples.
function feed(s, t, req, err) {
  const l = s.last;
  if (l && t - l.t < 0.25) return;  // too close to the previous sample for a meaningful rate
  s.last = {t, req, err};
  if (!l) return;
  const dt = t - l.t, dr = req - l.req, de = err - l.err;
  if (dr < 0 || de < 0) { s.now = null; return; }  // counters went back: restart or reload
  s.now = {r: dr / dt, e: de / dt, p: dr ? Math.min(100, 100 * de / dr) : de ? 100 : 0};
  s.t.push(t); s.r.push(dr / dt); s.e.push(de / dt); s.at = t;
}
function trim(s, now) {
  let i = 0;
  while (i < s.t.length && s.t[i] < now - WINDOW - 5) i++;
  if (i) { s.t.splice(0, i); s.r.splice(0, i); s.e.splice(0, i); }
}

function backfill(st) {
  const h = st.history;
  if (!h || !Array.isArray(h.t) || !h.t.length) return;
  gap = Math.max(3, 3 * num(h.interval_seconds));
  skew = Math.max(0, h.t[h.t.length - 1] - clock(st));
  const all = [[total, h.requests_total || [], h.failed_total || []]];
  for (const [name, v] of Object.entries(h.backends || {})) all.push([track(name), v.requests || [], v.errors || []]);
  for (const [s, req, err] of all) {
    h.t.forEach((t, i) => { if (typeof req[i] === "number") feed(s, t, req[i], num(err[i])); });
    // The live counters start a new baseline: the last history sample may be up to one
    // interval older than this response, and our clock for it is only known to a second.
    // The last interval's rate stays shown until the next poll gives a live one.
    s.last = null;
  }
}

function nice(v) {
  if (v <= 1) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1.5, 2, 3, 4, 5, 6, 8, 10].find((f) => v <= f * p) * p;
}
// Requests/s as a line over a light area; errors/s as red spikes from the baseline, so that a
// single failed request stays visible next to hundreds of good ones.
function draw(svg, s, now) {
  const [w, h] = svg.getAttribute("viewBox").split(" ").slice(2).map(Number), t0 = now - WINDOW;
  let top = 0;
  s.t.forEach((t, i) => { if (t >= t0) top = Math.max(top, s.r[i], s.e[i]); });
  top = nice(top);
  const X = (t) => ((t - t0) / WINDOW * w).toFixed(1), Y = (v) => (h - 1 - v / top * (h - 4)).toFixed(1);
  let ln = "", ar = "", er = "", first = null, px = null;
  const close = () => { if (first !== null) ar += "L" + px + " " + h + "L" + first + " " + h + "Z"; };
  s.t.forEach((t, i) => {
    if (t < t0) return;
    const x = X(t), y = Y(s.r[i]);
    const gapped = first === null || t - s.t[i - 1] > gap;  // a missed poll breaks the line
    if (gapped) { close(); first = x; }
    ln += (gapped ? "M" : "L") + x + " " + y; ar += (gapped ? "M" : "L") + x + " " + y;
    px = x;
    if (s.e[i] > 0) er += "M" + x + " " + h + "V" + Math.min(h - 3, +Y(s.e[i]));
  });
  close();
  svg.querySelector(".ar").setAttribute("d", ar);
  svg.querySelector(".ln").setAttribute("d", ln);
  svg.querySelector(".er").setAttribute("d", er);
  return top;
}

// The chart and the buttons are built here rather than server-side: they need the script anyway.
const SPARK = '<svg viewBox="0 0 300 40" preserveAspectRatio="none" aria-hidden="true">' +
  '<path class="ar"/><path class="ln"/><path class="er"/></svg>';
const BUTTONS = '<span class="seg">' + ["ready", "drain", "maint"].map((a) =>
  `<button data-act="${a}" title="POST backends/&lt;name&gt;/${a}">${a[0].toUpperCase() + a.slice(1)}</button>`).join("") + "</span>";
function row(name) {
  let tr = rows.get(name);
  if (!tr) {
    tr = $("row-tpl").content.firstElementChild.cloneNode(true);
    tr.setAttribute("data-backend", name);
    rows.set(name, tr);
  }
  if (!tr._c) {
    tr.querySelector(".hist").innerHTML = SPARK;
    tr.querySelector(".act").innerHTML = BUTTONS;
    tr._c = {buttons: tr.querySelectorAll("button")};
    for (const el of tr.querySelectorAll("[class]")) tr._c[el.classList[0]] ||= el;
  }
  return tr;
}

function fill(tr, b, s, now) {
  const c = tr._c, st = String(b.state || "unknown"), w = b.weight;
  tr.className = "s-" + st;
  put(c.nm, b.name); c.nm.title = b.url || "";
  c.bk.hidden = !b.backup;
  c.wt.hidden = w === 1 || w === undefined || w === null; put(c.wt, "weight " + w);
  c.rs.hidden = !b.resolved; put(c.rs, b.resolved ? "resolved " + String(b.resolved).slice(17, 25) : "");
  c.rs.title = b.resolved ? `${b.backend}: looked up ${b.resolved}` : "";
  c.ss.hidden = typeof b.slow_start !== "number";
  if (!c.ss.hidden) put(c.ss, "slow start " + Math.round(100 * b.slow_start) + "%");
  c.state.setAttribute("data-state", st); put(c.badge, st);
  const sub = [b.health === "unchecked" ? "no checks" : b.health ? "health " + b.health : "", b.admin || "",
    b.ejected ? "ejected" : ""].filter(Boolean);
  put(c.adm, sub.join(" · "));
  const ck = b.checks || {};
  c.state.title = `checks passed ${num(ck.passed)}, failed ${num(ck.failed)}; ` +
    `consecutive failures ${num(b.consecutive_failures)}; retries ${num(b.retries)}`;
  put(c.why, b.reason || "");
  const since = Date.parse(b.since) / 1000;
  put(c.since, isFinite(since) ? "for " + dur(now - since) : ""); c.since.title = b.since || "";
  put(c.rate, s.now ? rate(s.now.r) : "–");
  put(c.requests, num(b.requests));
  const errs = sum(b.errors), reqs = num(b.requests);
  put(c.eps, s.now ? rate(s.now.e) + "/s" : "–");
  put(c.epc, s.now ? pct(s.now.p) : "");
  c.err.classList.toggle("bad", !!(s.now && s.now.e > 0));
  c.err.title = `${errs} errors in total (${pct(reqs ? 100 * errs / reqs : 0)} of ${reqs} requests): ` +
    Object.entries(b.errors || {}).map(([k, v]) => k + " " + v).join(", ") +
    `; upstream 5xx ${num((b.responses || {})["5xx"])}`;
  const lat = b.latency_ms || {};
  put(c.p50, ms(lat.p50)); put(c.p99, ms(lat.p99));
  put(c.inflight, num(b.in_flight)); put(c.idle, num(b.idle_connections));
  const top = draw(c.hist.querySelector("svg"), s, now);
  c.hist.title = `scale 0–${top} req/s over the last 5 minutes; red: errors/s`;
  c.act.hidden = b.admin === undefined;
  for (const btn of c.buttons) {
    btn.disabled = btn.dataset.act === b.admin;
    btn.classList.toggle("on", btn.dataset.act === b.admin);
  }
}

// Same text as the server's _dashboard_policy().
function policy(st) {
  const s = st.sticky && typeof st.sticky === "object" ? st.sticky : null;
  return String(st.balance || "roundrobin") + (st.hash_key ? " " + st.hash_key : "") +
    (s ? " · sticky " + s.cookie : "") + (num(st.slow_start_seconds) ? " · slow start " + st.slow_start_seconds + "s" : "");
}

function render(st) {
  const now = clock(st), backends = Array.isArray(st.backends) ? st.backends : [];
  put($("version"), st.version || "?"); put($("pid"), st.pid ?? "?"); put($("listen"), st.listen || "");
  put($("policy"), policy(st));
  const sk = st.sticky && typeof st.sticky === "object" ? st.sticky : null;
  $("policy").title = sk ? `sticky cookie ${sk.cookie}: ${num(sk.hits)} hits, ${num(sk.repicks)} re-picks` : "";
  put($("uptime"), dur(num(st.uptime_seconds)));
  $("panic").hidden = !st.panic;

  const req = num(st.requests_total), ref = num(st.refused_total), fail = num(st.failed_total);
  feed(total, now, req, fail);
  trim(total, now);
  const fr = total.now ? total.now.e : 0;
  let rr = 0;
  if (prev && now - prev.t >= 0.25) rr = Math.max(0, ref - prev.ref) / (now - prev.t);
  if (!prev || now - prev.t >= 0.25) prev = {t: now, ref};
  if (total.now) put($("t-rps"), rate(total.now.r));
  put($("requests-total"), req);
  put($("t-inflight"), num(st.in_flight)); put($("t-conns"), num(st.connections));
  const tun = st.tunnels || {};
  put($("t-tunnels"), num(tun.open)); put($("t-tunnels-total"), num(tun.total) + " total");
  const q = st.queue || {};
  put($("t-queue"), num(q.length));
  put($("t-queue-sub"), num(q.queued_total) + " waited, " + num(q.timeouts_total) + " timed out");
  put($("t-refused"), ref); put($("t-refused-rate"), rr ? "+" + rate(rr) + "/s now" : "4xx by balancer");
  put($("t-failed"), fail); put($("t-failed-rate"), fr ? "+" + rate(fr) + "/s now" : "5xx by balancer");
  $("tile-refused").classList.toggle("hot", rr > 0); $("tile-failed").classList.toggle("bad", fr > 0);
  put($("t-uptime"), dur(num(st.uptime_seconds)));
  const started = new Date(st.started);
  if (isFinite(started)) put($("t-started"), "since " + started.toLocaleString([],
    {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23"}));
  const wk = Array.isArray(st.workers) ? st.workers : [];
  put($("t-workers"), wk.length || 1);
  put($("t-pids"), wk.length ? "pids " + wk.map((w) => w.pid).join(", ") : "pid " + (st.pid ?? "?"));
  $("tile-workers").title = wk.map((w) => `#${w.index} pid ${w.pid}: ${num(w.connections)} connections, ` +
    `${num(w.requests)} requests, ${num(w.restarts)} restarts`).join("\n");

  const rs = st.responses || {}, all = sum(rs);
  for (const k of ["1xx", "2xx", "3xx", "4xx", "5xx"]) {
    put($("r-" + k), num(rs[k]));
    const bar = $("b-" + k);
    if (bar) bar.style.width = (all ? 100 * num(rs[k]) / all : 0) + "%";
  }
  put($("bytes-in"), bytes(num(st.bytes_received))); put($("bytes-out"), bytes(num(st.bytes_sent)));

  const seen = new Set(), tbody = $("rows"), counts = {up: 0, down: 0, drain: 0, maint: 0};
  backends.forEach((b, i) => {
    const name = String(b.name), s = track(name), tr = row(name);
    seen.add(name);
    feed(s, now, num(b.requests), sum(b.errors));
    trim(s, now);
    fill(tr, b, s, now);
    counts[b.state] = (counts[b.state] || 0) + 1;
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  for (const [name, tr] of rows) if (!seen.has(name)) { tr.remove(); rows.delete(name); series.delete(name); }
  for (const name of series.keys()) if (!seen.has(name)) series.delete(name);
  $("none").hidden = backends.length > 0;
  if (!$("none").hidden) tbody.appendChild($("none"));
  $("upstreams").classList.toggle("adm", backends.some((b) => b.admin !== undefined));
  for (const k of Object.keys(counts)) {
    const el = $("n-" + k);
    if (el) { put(el.firstChild, counts[k]); el.style.opacity = counts[k] ? 1 : 0.5; }
  }
  document.title = (counts.down ? `▼ ${counts.down} down · ` : "") + "Load balancer " + (st.listen || "");

  put($("c-max"), draw($("chart"), total, now) + " req/s");
}

function connected(ok, why) {
  const live = $("live");
  live.className = "live " + (ok ? "ok" : "lost");
  if (ok) lastOk = new Date();
  put($("live-text"), ok ? "Live" : "Connection lost");
  put($("updated"), lastOk ? (ok ? "updated " : "last data ") + lastOk.toLocaleTimeString() : "no data yet");
  $("lost").hidden = ok;
  if (!ok) put($("lost-why"), `${why}. Showing the last data received` +
    (lastOk ? ` (${lastOk.toLocaleTimeString()})` : "") + "; retrying every second.");
}

async function get(url) {
  const ctl = new AbortController(), timer = setTimeout(() => ctl.abort(), 3000);
  try {
    const r = await fetch(url, {cache: "no-store", signal: ctl.signal});
    if (!r.ok) throw new Error(`/status answered ${r.status}`);
    return await r.json();
  } catch (e) {
    throw new Error(e.name === "AbortError" ? "/status did not answer within 3 s"
      : e instanceof TypeError ? `cannot reach /status (${e.message})` : e.message);
  } finally { clearTimeout(timer); }
}

// setTimeout after each answer rather than setInterval: a slow balancer gets one poll at a time.
async function tick(first) {
  const began = Date.now();
  let st = null;
  try { st = await get(first === true ? "status?history=1" : "status"); connected(true); }
  catch (e) { connected(false, e.message); }
  if (st) {
    try { if (first === true) backfill(st); render(st); }
    catch (e) { console.error(e); toast("Dashboard error: " + e.message, true); }
  }
  setTimeout(tick, Math.max(100, 1000 - (Date.now() - began)));
}

let toastTimer = 0;
function toast(msg, bad) {
  const t = $("toast");
  put(t, msg); t.className = bad ? "err" : ""; t.hidden = false;
  clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 10000 : 4000);
}

// --admin-token: the operator gives it once; it is kept in this tab's sessionStorage (gone when
// the tab closes, never sent anywhere but this balancer) and sent as Authorization: Bearer.
const TOKEN = "load_balancer.admin_token";
let pending = null;                 // the action that waits for a token
function token() { try { return sessionStorage.getItem(TOKEN) || ""; } catch (e) { return ""; } }
function keepToken(t) {
  try { t ? sessionStorage.setItem(TOKEN, t) : sessionStorage.removeItem(TOKEN); } catch (e) { /* storage off */ }
  $("token-forget").hidden = !t;
}
function askToken(why) {
  put($("token-why"), why);
  $("token").hidden = false;
  $("token-input").value = "";
  $("token-input").focus();
}

async function act(name, action, btn) {
  btn.disabled = true;
  try {
    const headers = token() ? {Authorization: "Bearer " + token()} : {};
    // Upstream names are host:port; keep the colon readable in the path.
    const r = await fetch(`backends/${encodeURIComponent(name).replace(/%3A/gi, ":")}/${action}`,
                          {method: "POST", cache: "no-store", headers});
    const body = (await r.text()).trim().slice(0, 300);
    if (r.ok) toast(`${name}: ${action} accepted`);
    else if (r.status === 401) {
      pending = {name, action, btn};
      askToken(token() ? "That admin token was refused: give the balancer's --admin-token."
        : "Admin actions on this balancer need its --admin-token.");
      if (token()) keepToken("");
    } else toast(`${name}: ${action} refused (${r.status}${r.status === 403 ?
      ", not allowed from here" : ""}) ${body}`, true);
  } catch (e) { toast(`${name}: ${action} failed: ${e.message}`, true); }
  btn.disabled = false;
}

document.addEventListener("click", (ev) => {
  const btn = ev.target.closest("button[data-act]");
  if (!btn) return;
  const name = btn.closest("tr").getAttribute("data-backend"), action = btn.dataset.act;
  const ask = {drain: `Drain ${name}? It finishes what it has and gets no new requests.`,
               maint: `Put ${name} in maintenance? It is taken out of rotation at once.`}[action];
  if (ask && !confirm(ask)) return;
  act(name, action, btn);
});
$("token").addEventListener("submit", (ev) => {
  ev.preventDefault();
  keepToken($("token-input").value.trim());
  $("token").hidden = true;
  const p = pending;
  pending = null;
  if (p && token()) act(p.name, p.action, p.btn);
});
$("token-cancel").addEventListener("click", () => { $("token").hidden = true; pending = null; });
$("token-forget").addEventListener("click", () => { keepToken(""); toast("admin token forgotten"); });
keepToken(token());

for (const tr of document.querySelectorAll("#rows tr[data-backend]")) rows.set(tr.getAttribute("data-backend"), tr);
put($("live-text"), "Connecting…");
tick(true);
})();
"""

DASHBOARD_PAGE = string.Template("""<!DOCTYPE html>
<html lang="en" class="nojs">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark light">
<title>$title</title>
<link rel="icon" href="data:,">
<script>document.documentElement.className = "js"</script>
<noscript><meta http-equiv="refresh" content="10"></noscript>
<style>$css</style>
</head>
<body>
<header>
<h1><svg width="20" height="20" viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2"
 stroke-linecap="round" aria-hidden="true"><circle cx="4" cy="12" r="2.5"/><path d="M6.5 12H11l7-7M11 12h7M11 12l7 7"/>
<circle cx="20" cy="5" r="1.5"/><circle cx="20" cy="12" r="1.5"/><circle cx="20" cy="19" r="1.5"/></svg>
Load balancer</h1>
<div class="meta"><span class="mono" id="listen">$listen</span><span>version <b id="version">$version</b></span>
<span>balance <b id="policy" title="$policy_title">$policy</b></span>
<span>pid <b id="pid">$pid</b></span><span>up <b id="uptime">$uptime</b></span></div>
<div id="live" class="live" role="status" aria-live="polite"><i></i><span id="live-text">Snapshot</span>
<span id="updated" class="mute">$rendered</span></div>
</header>
<main>
<noscript><div class="banner lost">JavaScript is off: this is a snapshot taken at $rendered,
reloaded every 10 seconds. Rates and charts need JavaScript.</div></noscript>
<div id="panic" class="banner panic" role="alert"$panic_hidden>&#9888; Panic mode: every upstream is out after
failed requests, so requests are tried on them anyway; the first one that succeeds ends it.</div>
<div id="lost" class="banner lost" role="alert" hidden><b>&#9888; Connection lost.</b> <span id="lost-why"></span></div>
<form id="token" class="banner token" hidden><label for="token-input"><b>Admin token.</b>
<span id="token-why"></span> It is kept in this browser tab only (sessionStorage) and sent as
<code>Authorization: Bearer</code>.</label><input id="token-input" type="password" autocomplete="off"
required aria-label="admin token"><button type="submit">Use token</button><button type="button"
id="token-cancel">Cancel</button></form>
<section class="tiles">
<div class="tile"><h3>Requests/s</h3><b id="t-rps">$rps</b><small><span id="requests-total">$requests</span> total</small></div>
<div class="tile"><h3>In flight</h3><b id="t-inflight">$in_flight</b><small>requests</small></div>
<div class="tile"><h3>Connections</h3><b id="t-conns">$connections</b><small>from clients</small></div>
<div class="tile"><h3>Open tunnels</h3><b id="t-tunnels">$tunnels</b><small id="t-tunnels-total">$tunnels_total total</small></div>
<div class="tile" id="tile-queue"><h3>Queued</h3><b id="t-queue">$queue_length</b><small id="t-queue-sub">$queue_sub</small></div>
<div class="tile" id="tile-refused"><h3>Refused</h3><b id="t-refused">$refused</b><small id="t-refused-rate">4xx by balancer</small></div>
<div class="tile" id="tile-failed"><h3>Failed</h3><b id="t-failed">$failed</b><small id="t-failed-rate">5xx by balancer</small></div>
<div class="tile"><h3>Uptime</h3><b id="t-uptime">$uptime</b><small id="t-started" title="$started">since $started</small></div>
<div class="tile" id="tile-workers" title="$workers_title"><h3>Workers</h3><b id="t-workers">$workers</b><small id="t-pids">$pids</small></div>
</section>
<div class="grid2">
<section class="panel js">
<div class="ph"><h2>Requests</h2><span class="mute" style="font-size:12px">
<i class="key" style="background:var(--accent)"></i>requests/s from clients<i class="key"
style="background:var(--down)"></i>failed/s (5xx answered by the balancer itself) &nbsp;· last 5 minutes</span></div>
<div class="chart"><svg id="chart" viewBox="0 0 1000 150" preserveAspectRatio="none" aria-hidden="true">
<path class="grid" d="M0 37.5H1000M0 75H1000M0 112.5H1000"/><path class="ar"/><path class="ln"/><path class="er"/></svg>
<span id="c-max" style="top:2px;left:4px;bottom:auto"></span><span style="left:0">−5 min</span>
<span style="left:50%">−2.5 min</span><span style="right:0">now</span></div>
</section>
<section class="panel">
<h2>Responses to clients</h2>
<div class="bar">$bars</div>
<dl>$codes
<dt>Received</dt><dd id="bytes-in">$bytes_in</dd><dt>Sent</dt><dd id="bytes-out">$bytes_out</dd></dl>
</section>
</div>
<section class="panel">
<div class="ph"><h2>Upstreams</h2><span class="chips">$chips</span></div>
<div class="scroll"><table id="upstreams"><thead><tr><th>Upstream</th><th>State</th><th>Reason</th>
<th class="num js">Req/s</th><th class="num">Requests</th><th class="num">Errors</th><th class="num">p50<br>ms</th>
<th class="num">p99<br>ms</th><th class="num">In<br>flight</th><th class="num">Idle<br>conns</th>
<th class="js">Last 5 min<br><span style="text-transform:none;font-weight:400">req/s, errors red</span></th>
<th class="js act">Admin</th></tr></thead>
<tbody id="rows">$rows<tr id="none" class="none"$none_hidden><td colspan="12" class="mute">No upstreams configured.</td></tr></tbody>
</table></div>
</section>
</main>
<footer>All numbers come from <a href="status">/status</a> (JSON).
<button type="button" id="token-forget" class="js" hidden>Forget the admin token</button></footer>
<div id="toast" role="status" hidden></div>
<template id="row-tpl">$template_row</template>
<script>$js</script>
</body>
</html>
""")


def _dashboard_number(value: object) -> int | float:
    """A counter from the status dict, or 0 for anything that is not one, so that a missing or
    odd field shows as 0 instead of breaking the whole page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return value


def _dashboard_duration(seconds: object) -> str:
    """Same format as the page script's dur(): "3d 4h", "2h 05m", "5m 07s", "12s"."""
    s = int(max(0, _dashboard_number(seconds)))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s % 60:02d}s" if m else f"{s}s"


def _dashboard_bytes(n: object) -> str:
    """Same format as the page script's bytes()."""
    value, unit = _dashboard_number(n), 0
    while value >= 1024 and unit < 4:
        value, unit = value / 1024, unit + 1
    return (f"{value:.1f}" if unit else f"{value:g}") + " " + ("B", "KiB", "MiB", "GiB", "TiB")[unit]


def _dashboard_ms(value: object) -> str:
    """Same format as the page script's ms(): "–" when there was no request to measure."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{round(value)}"


def _dashboard_rate(history: object) -> str:
    """Requests/s over the last interval of /status's history, in the page script's rate()
    format, so that the first paint shows what is known; "–" before there are two samples."""
    if not isinstance(history, dict):
        return "–"
    times, totals = history.get("t"), history.get("requests_total")
    if not isinstance(times, list) or not isinstance(totals, list) or len(times) < 2 or len(totals) != len(times):
        return "–"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in times + totals):
        return "–"
    # The sample before the last one, at least a quarter second earlier (as the script's feed()).
    t1, r1 = times[-1], totals[-1]
    earlier = [(t, r) for t, r in zip(times[:-1], totals[:-1]) if t1 - t >= 0.25]
    if not earlier or earlier[-1][1] > r1:
        return "–"
    t0, r0 = earlier[-1]
    value = (r1 - r0) / (t1 - t0)
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return str(int(value + 0.5)) if value >= 100 or value == 0 else f"{value:.1f}"


def _dashboard_row(backend: dict) -> str:
    """One upstream's <tr>. The page script fills the same cells (found by class) on every poll,
    and clones a blank one (``backend == {}``) from <template> for an upstream a reload added.
    The blank one has no data-backend or data-state, so that no test or scraper counts it."""
    e = html.escape
    name, url = str(backend.get("name", "")), str(backend.get("url", ""))
    state = str(backend.get("state", "")) if backend else ""
    weight = backend.get("weight", 1)
    health, admin = backend.get("health"), backend.get("admin")
    resolved = str(backend.get("resolved") or "")  # a host name's address: when it was looked up
    looked_up = f"{backend.get('backend')}: looked up {resolved}" if resolved else ""
    sub = ["no checks" if health == "unchecked" else f"health {health}" if health else "",
           str(admin or ""), "ejected" if backend.get("ejected") else ""]
    errors = backend.get("errors") if isinstance(backend.get("errors"), dict) else {}
    error_count = sum(_dashboard_number(v) for v in errors.values())
    requests = _dashboard_number(backend.get("requests"))
    latency = backend.get("latency_ms") if isinstance(backend.get("latency_ms"), dict) else {}
    share = f"{100 * error_count / requests:.1f}%" if requests else ""
    ramp = backend.get("slow_start") if isinstance(backend.get("slow_start"), (int, float)) else None
    hide = ' hidden'
    key = f' data-backend="{e(name)}"' if backend else ""
    state_attribute = f' data-state="{e(state)}"' if backend else ""
    return (
        f'<tr{key} class="s-{e(state)}">'
        f'<td class="name"><span class="nm" title="{e(url)}">{e(name)}</span><span class="tags sub">'
        f'<span class="bk tag"{"" if backend.get("backup") else hide}>backup</span>'
        f'<span class="wt tag"{hide if weight in (1, None) else ""}>weight {e(str(weight))}</span>'
        f'<span class="rs tag"{"" if resolved else hide} title="{e(looked_up)}">'
        f'{e("resolved " + resolved[17:25]) if resolved else ""}</span>'
        f'<span class="ss tag"{"" if ramp is not None else hide}>slow start {round(100 * (ramp or 0))}%</span></span></td>'
        f'<td class="state"{state_attribute}><span class="badge">{e(state)}</span>'
        f'<span class="adm sub">{e(" · ".join(filter(None, sub)))}</span></td>'
        f'<td class="reason"><span class="why">{e(str(backend.get("reason") or ""))}</span>'
        f'<span class="since sub">{"since " + e(str(backend["since"])) if backend.get("since") else ""}</span></td>'
        f'<td class="rate num js">–</td>'
        f'<td class="requests num">{requests}</td>'
        f'<td class="err num"><span class="eps">{error_count}</span><span class="epc sub">{share}</span></td>'
        f'<td class="p50 num">{_dashboard_ms(latency.get("p50"))}</td>'
        f'<td class="p99 num">{_dashboard_ms(latency.get("p99"))}</td>'
        f'<td class="inflight num">{_dashboard_number(backend.get("in_flight"))}</td>'
        f'<td class="idle num">{_dashboard_number(backend.get("idle_connections"))}</td>'
        f'<td class="hist js"></td><td class="act js"></td></tr>'
    )


def _dashboard_policy(status: dict) -> str:
    """How upstreams are chosen, in one line: "hash header:X-User · sticky lb · slow start 30s"."""
    sticky = status.get("sticky") if isinstance(status.get("sticky"), dict) else None
    slow = _dashboard_number(status.get("slow_start_seconds"))
    return (str(status.get("balance") or "roundrobin") +
            (f" {status['hash_key']}" if status.get("hash_key") else "") +
            (f" \u00b7 sticky {sticky.get('cookie')}" if sticky else "") +
            (f" \u00b7 slow start {slow:g}s" if slow else ""))


def render_dashboard(status: dict) -> str:
    """The complete HTML page for ``GET /`` on the admin listener, from one /status snapshot.

    Called by the admin route for ``/`` with the dict that ``/status?history=1`` serves (the
    history gives the first paint its requests/s). The page shows every number without
    JavaScript; with it, it polls ``/status``.
    Never raises on a missing or odd field: a broken dashboard is worst exactly when something
    else is broken too."""
    e = html.escape
    n = _dashboard_number
    backends = [b for b in status.get("backends") or () if isinstance(b, dict)]
    responses = status.get("responses") if isinstance(status.get("responses"), dict) else {}
    tunnels = status.get("tunnels") if isinstance(status.get("tunnels"), dict) else {}
    workers = [w for w in status.get("workers") or () if isinstance(w, dict)]
    all_responses = sum(n(v) for v in responses.values())
    colours = {"1xx": "var(--mute)", "2xx": "var(--up)", "3xx": "var(--accent)", "4xx": "var(--drain)",
               "5xx": "var(--down)"}
    bars = "".join(
        f'<i id="b-{k}" style="width:{100 * n(responses.get(k)) / all_responses if all_responses else 0:.2f}%;'
        f'background:{c}"></i>' for k, c in colours.items())
    codes = "".join(f'<dt><i style="background:{c}"></i>{k}</dt><dd id="r-{k}">{n(responses.get(k))}</dd>'
                    for k, c in colours.items())
    counts = {s: sum(1 for b in backends if b.get("state") == s) for s in ("up", "down", "drain", "maint")}
    chips = "".join(f'<span class="chip s-{s}" id="n-{s}"{"" if counts[s] else " style=opacity:.5"}>'
                    f'<b>{counts[s]}</b> {s}</span>' for s in counts)
    listen = str(status.get("listen") or "")
    pid = status.get("pid")
    sticky = status.get("sticky") if isinstance(status.get("sticky"), dict) else None
    queue = status.get("queue") if isinstance(status.get("queue"), dict) else {}
    return DASHBOARD_PAGE.substitute(
        title=e(("\u25bc %d down \u00b7 " % counts["down"] if counts["down"] else "") + "Load balancer " + listen),
        css=DASHBOARD_CSS,
        js=DASHBOARD_JS,
        listen=e(listen),
        policy=e(_dashboard_policy(status)),
        policy_title=e(f"sticky cookie {sticky.get('cookie')}: {n(sticky.get('hits'))} hits, "
                       f"{n(sticky.get('repicks'))} re-picks" if sticky else ""),
        version=e(str(status.get("version") or "?")),
        pid=e(str(pid if pid is not None else "?")),
        uptime=_dashboard_duration(status.get("uptime_seconds")),
        started=e(str(status.get("started") or "?")),
        rendered=time.strftime("%H:%M:%S UTC", time.gmtime()),
        panic_hidden="" if status.get("panic") else " hidden",
        requests=n(status.get("requests_total")),
        rps=_dashboard_rate(status.get("history")),
        in_flight=n(status.get("in_flight")),
        queue_length=n(queue.get("length")),
        queue_sub=e(f"{n(queue.get('queued_total'))} waited, {n(queue.get('timeouts_total'))} timed out"),
        connections=n(status.get("connections")),
        tunnels=n(tunnels.get("open")),
        tunnels_total=n(tunnels.get("total")),
        refused=n(status.get("refused_total")),
        failed=n(status.get("failed_total")),
        workers=len(workers) or 1,
        pids=e("pids " + ", ".join(str(w.get("pid")) for w in workers) if workers else f"pid {pid}"),
        workers_title=e("\n".join(
            f"#{w.get('index')} pid {w.get('pid')}: {n(w.get('connections'))} connections, "
            f"{n(w.get('requests'))} requests, {n(w.get('restarts'))} restarts" for w in workers)),
        bars=bars,
        codes=codes,
        bytes_in=_dashboard_bytes(status.get("bytes_received")),
        bytes_out=_dashboard_bytes(status.get("bytes_sent")),
        chips=chips,
        rows="".join(_dashboard_row(b) for b in backends),
        none_hidden=" hidden" if backends else "",
        template_row=_dashboard_row({}),
    )


# ===================================================================================================
# The balancer: what there is one of, and what every worker runs
# ===================================================================================================

class ListenError(OSError):
    """A listening socket could not be opened; says which address and why, in one line."""

    def __init__(self, host: str, port: int, error: OSError | str, *, where: str | None = None):
        if isinstance(error, str):
            reason, number = error, errno.EADDRINUSE
        else:
            number = error.errno
            reason = "address already in use" if error.errno == errno.EADDRINUSE else describe_os_error(error)
        super().__init__(number, f"cannot listen on {where or f'{host}:{port}'}: {reason}")


def listen(host: str, port: int, make):
    try:
        return make()
    except OSError as error:
        raise ListenError(host, port, error) from None


class NameLookup(collections.namedtuple("NameLookup", "host addresses resolved error failures")):
    """A backend's host name as last looked up: its addresses (the last known ones while
    look-ups fail), when it last resolved (time.time(), None: never), the last error (None after
    a success) and how many look-ups have failed."""


def lookup_addresses(host: str, port: int) -> tuple:
    """Every address `host` resolves to for a TCP connection, in getaddrinfo's order (RFC 6724),
    each once: the system's resolver (/etc/hosts, DNS). Raises OSError (socket.gaierror)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(info[4][0] for info in found))


class Control:
    """What there is one of per balancer, however many workers: the backend set (which name has
    which slot of the shared state, for the balancer's life), the health checker, reloads, admin
    actions, the once-a-second sampler behind latency percentiles and the dashboard's history,
    and the admin and redirect listeners. Lives in the supervisor, or in the one process."""

    def __init__(self, config: Config, shared: SharedState, https_port: int | None = None):
        self.config, self.shared = config, shared
        self.lock = threading.Lock()        # reloads and admin actions, one at a time
        self.slots: dict = {}               # backend name (NAME@ADDRESS for a host name's) -> slot, never reused
        self.current: list = []             # [(slot, BackendSpec)], in configured order
        self.names: dict = {}               # backend name -> NameLookup, for backends with a host name
        self.resolving = threading.Lock()   # one round of look-ups at a time
        self.checker = HealthChecker(shared, config, client_tls_context(config.backend_ca))
        self.history: collections.deque = collections.deque(maxlen=HISTORY_SAMPLES)
        self.routing: dict = {}             # slot -> routing state at the last sample
        self.started = time.time()
        self.stopped = threading.Event()
        self.threads: list = []
        self.before_reading = None          # one process: the worker's publish_gauges, for exact gauges
        if config.sticky_cookie:
            shared.publish_sticky_key(sticky_cookie_key(config))
        self.apply(config)
        self.lists = config.access_lists    # as the last reload read them; every worker has them
        self.rate_spec = config.rate_limit_spec  # the same for --rate-limit
        shared.publish_lists(self.lists, self.rate_spec)
        self.admin = self.redirect = None
        if config.admin_port is not None:
            self.admin = listen(config.admin_host, config.admin_port,
                                lambda: AdminServer((config.admin_host, config.admin_port), self))
        if config.redirect_http_port is not None:
            try:
                self.redirect = listen(config.host, config.redirect_http_port, lambda: RedirectServer(
                    (config.host, config.redirect_http_port), https_port or config.port))
            except OSError:
                if self.admin:
                    self.admin.server_close()
                raise

    # -- the backend set ----------------------------------------------------------------------

    def apply(self, config: Config) -> tuple:
        """Make config's backends the set every worker routes over: (added, removed, changed)
        names. A name keeps its slot, and with it its counters and its drain or maint state. A
        backend with a host name is one upstream per address it resolves to (NAME@ADDRESS); a
        name not looked up yet is looked up now."""
        for spec in config.backend_specs:
            if spec.needs_lookup and spec.name not in self.names:
                self.look_up(spec)
        with self.lock:
            before = {spec.name: spec for _, spec in self.current}
            entries, current = [], []
            for text, spec in self.expand(config):
                slot = self.slots.get(spec.name)
                if slot is None:
                    slot = len(self.slots) + 1
                    if slot > MAX_UPSTREAMS:
                        raise ValueError(f"more than {MAX_UPSTREAMS} backend names since start: "
                                         "restart the balancer to add more")
                    self.slots[spec.name] = slot
                old = before.get(spec.name)
                if old is None or old.url != spec.url:
                    self.shared.reset(slot, "not checked yet" if config.health_interval else "no active checks")
                    if before:  # added by a reload: slow start (not at start-up, when all are new)
                        self.shared.start_ramp(slot)
                entries.append((slot, text, spec.address))
                current.append((slot, spec))
            self.shared.publish(entries)
            configured = {spec.name for spec in config.backend_specs}
            for name in set(self.names) - configured:
                del self.names[name]
            self.current, self.config = current, config
            self.checker.update({slot: spec for slot, spec in current})
        names = {spec.name for _, spec in current}
        added = [name for name in names if name not in before]
        removed = [name for name in before if name not in names]
        changed = [spec.name for _, spec in current if spec.name in before and before[spec.name] != spec]
        return added, removed, changed

    def expand(self, config: Config) -> list:
        """[(backend text, BackendSpec)]: the configured backends, one per address for a host
        name (in the order the look-up gave them; none while it has none)."""
        expanded = []
        for text, spec in zip(config.backends, config.backend_specs):
            if spec.needs_lookup:
                lookup = self.names.get(spec.name)
                expanded += [(text, spec.at(address)) for address in (lookup.addresses if lookup else ())]
            else:
                expanded.append((text, spec))
        return expanded

    def look_up(self, spec: BackendSpec) -> bool:
        """Look a backend's host name up (lookup_addresses) and keep the result; a failed or
        empty look-up keeps the addresses known before (Caddy's grace), logged once per run of
        failures. True if its addresses changed."""
        before = self.names.get(spec.name)
        try:
            addresses = lookup_addresses(spec.host, spec.port)
            error = None if addresses else "no address"
        except OSError as failure:
            addresses, error = (), describe_os_error(failure)
        now = time.time()
        if error is None:
            lookup = NameLookup(spec.host, addresses, now, None, before.failures if before else 0)
            if before is None or before.error:
                log.info("backend %s: %s resolves to %s", spec.name, spec.host, ", ".join(addresses))
            elif before.addresses != addresses:
                log.info("backend %s: %s resolves to %s now (was %s)", spec.name, spec.host,
                         ", ".join(addresses), ", ".join(before.addresses) or "nothing")
        else:
            kept = before.addresses if before else ()
            lookup = NameLookup(spec.host, kept, before.resolved if before else None, error,
                                (before.failures if before else 0) + 1)
            if before is None:
                log.warning("backend %s: cannot look %s up (%s): no address until it resolves (503 "
                            "if no other upstream can answer)", spec.name, spec.host, error)
            elif not before.error:
                log.warning("backend %s: look-up of %s failed (%s): keeping its %d address(es)",
                            spec.name, spec.host, error, len(kept))
        self.names[spec.name] = lookup
        return before is None or before.addresses != lookup.addresses

    def resolve(self) -> int:
        """Look every host name up again (every --resolve-interval, and on SIGHUP); publish the
        new backend set if an address came or went: a new one joins the rotation, one that left
        is drained (its requests in flight finish, no new ones come). The number of names."""
        with self.resolving:
            specs = [spec for spec in self.config.backend_specs if spec.needs_lookup]
            changed = [self.look_up(spec) for spec in specs]
            if any(changed):
                try:
                    self.apply(self.config)
                except ValueError as error:
                    log.error("new addresses not taken: %s", error)
            return len(specs)

    def run_resolver(self) -> None:
        while not self.stopped.wait(self.config.resolve_interval):
            try:
                self.resolve()
            except Exception:
                log.exception("looking host names up failed")

    def reload(self) -> None:
        """SIGHUP: read --backends-file again (a file that does not parse changes nothing), or
        with no file look the host names up again; load a renewed TLS certificate."""
        config = self.config
        if config.backends_file is None:
            names = self.resolve()
            log.info("SIGHUP: no --backends-file, so the %d backend(s) stay; %d host name(s) looked "
                     "up again", len(config.backend_specs), names)
        else:
            try:
                added, removed, changed = self.apply(config.reloaded())
            except ValueError as error:
                log.error("SIGHUP: %s; the previous %d backend(s) stay", error, len(self.current))
            else:
                log.info("SIGHUP: %s read again: %d backend(s); added: %s; removed: %s; changed: %s",
                         config.backends_file, len(self.current), ", ".join(added) or "none",
                         ", ".join(removed) or "none", ", ".join(changed) or "none")
        self.reload_lists(config)
        if config.tls_cert:
            try:
                self.shared.publish_tls(read_certificate(config.tls_cert, config.tls_key))
            except (OSError, ssl.SSLError, ValueError) as error:
                log.error("SIGHUP: kept the previous certificate: cannot load %s: %s", config.tls_cert,
                          describe_os_error(error))
            else:
                log.info("SIGHUP: certificate %s loaded for new connections", config.tls_cert)

    def reload_lists(self, config: Config) -> None:
        """SIGHUP, for the address lists and the rate limit given as files: read them again and
        publish them to every worker; a file that does not read or parse changes nothing."""
        values = [value for name in AccessLists._fields for value in getattr(config, name)]
        if not any(names_a_file(value) for value in values + [config.rate_limit or ""]):
            return
        try:
            lists = read_access_lists(config)
            rate = read_rate_limit(config.rate_limit) if config.rate_limit else None
        except ValueError as error:
            log.error("SIGHUP: %s; the previous address lists stay, and the rate limit", error)
            return
        self.shared.publish_lists(lists, rate)
        if rate != self.rate_spec:
            log.info("SIGHUP: --rate-limit %s (was %s)", rate, self.rate_spec)
        self.lists, self.rate_spec = lists, rate
        log.info("SIGHUP: address lists read again: %s", ", ".join(
            f"--{name.replace('_', '-')} {len(networks)} range(s)"
            for name, networks in lists._asdict().items() if getattr(config, name)))

    def set_state(self, name: str, action: str) -> dict | None:
        """The admin API: drain (no new requests; those in flight finish), maint (out at once;
        idle connections closed; health checks go on) or ready (back in rotation), for one
        upstream (NAME, or NAME@ADDRESS of a host name) or every address of a backend (NAME).
        Its /status entry, or {"name", "backends": [entries]} for several; None: no such one."""
        with self.lock:
            slots = [slot for slot, spec in self.current if spec.name == name] or [
                slot for slot, spec in self.current if spec.address and spec.backend == name]
            if not slots:
                return None
            reason = {"drain": "drain: no new requests (admin API)",
                      "maint": "maint: out of rotation (admin API)",
                      "ready": "ready: back in rotation (admin API)"}[action]
            for slot in slots:
                self.shared.set_admin(slot, action, reason)
        log.info("upstream %s: %s", name, reason)
        entries = [b for b in self.status()["backends"] if b["name"] == name or b["backend"] == name]
        exact = [b for b in entries if b["name"] == name]
        return exact[0] if exact else {"name": name, "backends": entries}

    # -- counting -----------------------------------------------------------------------------

    def counters(self) -> tuple:
        """What every worker has counted, added up: (process fields, {slot: upstream record},
        [each worker's process fields]). Every slot ever used counts, so that totals never go back
        when an upstream is removed; P_IN_FLIGHT and P_RESPONSES are derived here."""
        if self.before_reading is not None:
            self.before_reading()
        slots = [0, *self.slots.values()]
        process = [0] * PROCESS_INTS
        per_slot = {slot: [0] * UPSTREAM_INTS for slot in slots}
        per_worker = []
        for block in self.shared.workers:
            own = block[:PROCESS_INTS].tolist()
            responses = in_flight = 0
            for slot in slots:
                base = stats_base(slot)
                record = block[base:base + UPSTREAM_INTS].tolist()
                responses += sum(record[U_HISTOGRAM:U_LATENCY_SUM])
                in_flight += record[U_IN_FLIGHT]
                per_slot[slot] = list(map(operator.add, per_slot[slot], record))
            own[P_RESPONSES], own[P_IN_FLIGHT] = responses, in_flight
            per_worker.append(own)
            process = list(map(operator.add, process, own))
        if self.config.balance == "leastconn" or any(spec.maxconn for _, spec in self.current):
            # counted exactly as it happens (leastconn, caps): that count is shown
            for slot in slots:
                per_slot[slot][U_IN_FLIGHT] = self.shared.in_flight(slot)
        return process, per_slot, per_worker

    def sample(self) -> None:
        """Once a second: the counters for the last minute's percentiles and the dashboard's
        history, and a log line when an ejection ends by itself."""
        now = time.time()  # before the counters are read: a sample holds all that was counted by then
        _, per_slot, _ = self.counters()
        samples = {slot: (sum(record[U_CODES:U_HISTOGRAM]), sum(record[U_ERRORS:U_ERRORS + len(ERROR_KINDS)]),
                          record[U_HISTOGRAM:U_LATENCY_SUM]) for slot, record in per_slot.items()}
        # The whole balancer too (requests_total, failed_total): its own 503s are traffic as well.
        totals = (sum(sample[0] for sample in samples.values()), responses_by_class(per_slot[0])["5xx"])
        self.history.append((now, samples, totals))
        now_us = monotonic_us()
        for slot, spec in self.current:
            state = self.shared.routing_state(slot, now_us)
            if self.routing.get(slot) == "ejected" and state == "up":
                log.info("upstream %s %s", spec.name, self.shared.explained(slot, now_us)[0])
            self.routing[slot] = state

    def run_sampler(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS - time.time() % SAMPLE_SECONDS):
            try:
                self.sample()
            except Exception:
                log.exception("sampling the counters failed")

    def latency(self, slot: int, histogram: list) -> dict:
        """p50 and p99 (ms) over the last minute, from the histogram now and a minute ago."""
        then = None
        for when, sample, _ in self.history:
            if when >= time.time() - 60 and slot in sample:
                then = sample[slot][2]
                break
        recent = histogram if then is None else [a - b for a, b in zip(histogram, then)]
        return {"p50": quantile(recent, 0.5), "p99": quantile(recent, 0.99)}

    def status(self, history: bool = False) -> dict:
        """GET /status: every field is described in the README."""
        process, per_slot, per_worker = self.counters()
        now_us = monotonic_us()
        backends = []
        states = []
        for slot, spec in self.current:
            record = per_slot[slot]
            routing = self.shared.routing_state(slot, now_us)
            states.append(routing)
            reason, since = self.shared.explained(slot, now_us)
            lookup = self.names.get(spec.backend) if spec.address else None
            factor = slow_start_factor(self.shared, slot, self.config.slow_start, now_us) \
                if routing == "up" else None
            backends.append({
                "name": spec.name, "url": spec.url, "weight": spec.weight, "backup": spec.backup,
                "maxconn": spec.maxconn or None,
                "backend": spec.backend, "address": spec.address,
                "resolved": http_date_of(lookup.resolved) if lookup else None,
                "state": shown_state(routing),
                "health": HEALTH_STATES[self.shared.get(slot, S_HEALTH)] if self.config.health_interval
                else "unchecked",
                "admin": ADMIN_STATES[self.shared.get(slot, S_ADMIN)],
                "ejected": routing == "ejected",
                "reason": reason,
                "since": email.utils.formatdate(since / 1e6, usegmt=True),
                "requests": record[U_ATTEMPTS],
                "responses": responses_by_class(record),
                "errors": dict(zip(ERROR_KINDS, record[U_ERRORS:U_ERRORS + len(ERROR_KINDS)])),
                "retries": record[U_RETRIES],
                "in_flight": record[U_IN_FLIGHT],
                "idle_connections": record[U_IDLE],
                "slow_start": None if factor is None else round(factor, 3),
                "consecutive_failures": self.shared.get(slot, S_CONSECUTIVE_FAILURES),
                "ejections": self.shared.get(slot, S_EJECTIONS),
                "latency_ms": self.latency(slot, record[U_HISTOGRAM:U_LATENCY_SUM]),
                "checks": {"passed": self.shared.get(slot, S_CHECKS_PASSED),
                           "failed": self.shared.get(slot, S_CHECKS_FAILED)},
            })
        own = responses_by_class(per_slot[0])
        totals = [0] * 5
        for record in per_slot.values():
            totals = list(map(operator.add, totals, responses_by_class(record).values()))
        scheme = "https" if self.config.tls_cert else "http"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        status = {
            "version": __version__,
            "pid": os.getpid(),
            "started": email.utils.formatdate(self.started, usegmt=True),
            "uptime_seconds": round(time.time() - self.started, 3),
            "listen": f"{scheme}://{host}:{self.config.port}",
            "requests_total": process[P_RESPONSES],
            "responses": dict(zip(CLASS_LABELS, totals)),
            "refused_total": own["4xx"],
            "failed_total": own["5xx"],
            "denied_total": process[P_DENIED],
            "rate_limited_total": process[P_RATE_LIMITED],
            "in_flight": process[P_IN_FLIGHT],
            "connections": process[P_CONNECTIONS],
            "tunnels": {"open": process[P_TUNNELS_OPEN], "total": process[P_TUNNELS],
                        "bytes_from_client": process[P_TUNNEL_BYTES_UP],
                        "bytes_from_upstream": process[P_TUNNEL_BYTES_DOWN]},
            "bytes_received": process[P_RECEIVED],
            "bytes_sent": process[P_SENT],
            "panic": panic_mode(states),
            "balance": self.config.balance,
            "hash_key": self.config.hash_key if self.config.balance == "hash" else None,
            "sticky": {"cookie": self.config.sticky_cookie, "hits": process[P_STICKY_HITS],
                       "repicks": process[P_STICKY_REPICKS]} if self.config.sticky_cookie else None,
            "slow_start_seconds": self.config.slow_start,
            "queue": self.queue_status(process),
            "workers": [{"index": index, "pid": own[P_PID], "connections": own[P_CONNECTIONS],
                         "requests": own[P_RESPONSES], "restarts": own[P_RESTARTS]}
                        for index, own in enumerate(per_worker)],
            "backends": backends,
            "names": [{"backend": name, "host": lookup.host, "addresses": list(lookup.addresses),
                       "resolved": http_date_of(lookup.resolved), "error": lookup.error,
                       "failures": lookup.failures} for name, lookup in self.names.items()],
        }
        if self.config.rate_limit:
            addresses, evictions = self.shared.rate_table_usage()
            status["rate_limit"] = {"rate": self.rate_spec, "addresses": addresses,
                                    "table_size": RATE_TABLE_SIZE, "evictions": evictions}
        if history:
            status["history"] = self.history_series()
        return status

    def queue_status(self, process: list) -> dict:
        """The queue of requests waiting for an upstream below its maxconn, every worker's."""
        histogram = process[P_QUEUE_HISTOGRAM:P_QUEUE_HISTOGRAM + len(LATENCY_BOUNDS) + 1]
        return {"length": process[P_QUEUE_LENGTH], "size": self.config.queue_size * self.shared.worker_count,
                "timeout_seconds": self.config.queue_timeout, "queued_total": process[P_QUEUED],
                "timeouts_total": process[P_QUEUE_TIMEOUTS], "full_total": process[P_QUEUE_FULL],
                "wait_seconds_total": round(process[P_QUEUE_WAIT_SUM] / 1e6, 6),
                "wait_ms": {"p50": quantile(histogram, 0.5), "p99": quantile(histogram, 0.99)}}

    def history_series(self) -> dict:
        samples = list(self.history)
        series = {}
        for slot, spec in self.current:
            points = [sample.get(slot) for _, sample, _ in samples]
            series[spec.name] = {
                "requests": [p[0] if p else None for p in points],
                "errors": [p[1] if p else None for p in points],
                "p99_ms": [None] + [quantile([a - b for a, b in zip(p[2], q[2])], 0.99) if p and q else None
                                    for q, p in zip(points, points[1:])],
            }
        return {"interval_seconds": SAMPLE_SECONDS, "t": [round(when, 3) for when, _, _ in samples],
                "requests_total": [totals[0] for _, _, totals in samples],
                "failed_total": [totals[1] for _, _, totals in samples],
                "backends": series}

    def metrics(self) -> str:
        """GET /metrics: Prometheus text format 0.0.4; every family is described in the README."""
        process, per_slot, _ = self.counters()
        out = MetricsWriter()
        # Every name a slot has had: a removed upstream's counters go on existing, never back.
        names = {0: "-", **{slot: name for name, slot in self.slots.items()}}
        out.family("lb_requests_total", "counter", "Responses sent to clients, by the upstream that "
                   "answered (\"-\": the balancer itself), request method and status code.")
        for slot, record in per_slot.items():
            for method_index, method in enumerate(METHODS):
                row = record[U_CODES + method_index * N_CODES:U_CODES + (method_index + 1) * N_CODES]
                for index, count in enumerate(row):
                    if count:
                        out.sample("lb_requests_total", count, upstream=names[slot],
                                   method=method.decode(), code=code_label(index))
        out.family("lb_request_duration_seconds", "histogram", "Time from a request's head to its "
                   "response head (time to first byte), by upstream.")
        for slot, record in per_slot.items():
            out.histogram("lb_request_duration_seconds", record[U_HISTOGRAM:U_LATENCY_SUM],
                          record[U_LATENCY_SUM] / 1e6, upstream=names[slot])
        upstreams = [(slot, spec, per_slot[slot]) for slot, spec in self.current]
        out.family("lb_upstream_requests_total", "counter", "Requests sent to an upstream (every "
                   "try, retries included).")
        for slot, spec, record in upstreams:
            out.sample("lb_upstream_requests_total", record[U_ATTEMPTS], upstream=spec.name)
        out.family("lb_upstream_errors_total", "counter", "Failed exchanges with an upstream, by "
                   "kind: connect, tls, timeout, closed, invalid, body.")
        for slot, spec, record in upstreams:
            for offset, kind in enumerate(ERROR_KINDS):
                out.sample("lb_upstream_errors_total", record[U_ERRORS + offset], upstream=spec.name, kind=kind)
        out.family("lb_upstream_retries_total", "counter", "Requests that went on to another "
                   "upstream after this one failed.")
        for slot, spec, record in upstreams:
            out.sample("lb_upstream_retries_total", record[U_RETRIES], upstream=spec.name)
        out.family("lb_upstream_ejections_total", "counter", "Times an upstream was taken out "
                   "after --max-fails failed requests in a row.")
        for slot, spec, _ in upstreams:
            out.sample("lb_upstream_ejections_total", self.shared.get(slot, S_EJECTIONS), upstream=spec.name)
        out.family("lb_health_checks_total", "counter", "Active health checks, by result.")
        for slot, spec, _ in upstreams:
            out.sample("lb_health_checks_total", self.shared.get(slot, S_CHECKS_PASSED), upstream=spec.name,
                       result="passed")
            out.sample("lb_health_checks_total", self.shared.get(slot, S_CHECKS_FAILED), upstream=spec.name,
                       result="failed")
        out.family("lb_upstream_state", "gauge", "1 for an upstream's current routing state: up, "
                   "down (health checks), ejected (failed requests), drain or maint.")
        now_us = monotonic_us()
        states = [self.shared.routing_state(slot, now_us) for slot, _, _ in upstreams]
        for (slot, spec, _), current in zip(upstreams, states):
            for state in ROUTING_STATES:
                out.sample("lb_upstream_state", int(state == current), upstream=spec.name, state=state)
        for name, kind, index, help_text in UPSTREAM_GAUGES:
            out.family(name, kind, help_text)
            for slot, spec, record in upstreams:
                out.sample(name, spec.weight if index is None else record[index], upstream=spec.name)
        out.family("lb_upstream_slow_start_factor", "gauge", "The share of its weight an upstream "
                   "gets while it ramps up after coming back (--slow-start); 1 otherwise.")
        for (slot, spec, _), current in zip(upstreams, states):
            factor = slow_start_factor(self.shared, slot, self.config.slow_start, now_us) \
                if current == "up" else None
            out.sample("lb_upstream_slow_start_factor", 1 if factor is None else round(factor, 3),
                       upstream=spec.name)
        for name, kind, index, help_text in PROCESS_METRICS:
            out.family(name, kind, help_text)
            out.sample(name, process[index])
        out.family("lb_queue_wait_seconds", "histogram", "Time requests waited in the queue for an "
                   "upstream below its maxconn (those that got one, that timed out, that left).")
        out.histogram("lb_queue_wait_seconds", process[P_QUEUE_HISTOGRAM:P_QUEUE_HISTOGRAM + len(LATENCY_BOUNDS) + 1],
                      process[P_QUEUE_WAIT_SUM] / 1e6)
        out.family("lb_upstream_maxconn", "gauge", "An upstream's maxconn (0: no cap).")
        for slot, spec, _ in upstreams:
            out.sample("lb_upstream_maxconn", spec.maxconn, upstream=spec.name)
        out.family("lb_tunnel_bytes_total", "counter", "Bytes through tunnels (WebSocket and other "
                   "upgrades), by direction.")
        out.sample("lb_tunnel_bytes_total", process[P_TUNNEL_BYTES_UP], direction="client_to_upstream")
        out.sample("lb_tunnel_bytes_total", process[P_TUNNEL_BYTES_DOWN], direction="upstream_to_client")
        out.family("lb_balance_info", "gauge", "How upstreams are chosen: --balance, --hash-key (with "
                   "hash) and --sticky-cookie (\"\": none).")
        out.sample("lb_balance_info", 1, policy=self.config.balance,
                   hash_key=self.config.hash_key if self.config.balance == "hash" else "",
                   sticky_cookie=self.config.sticky_cookie or "")
        names = list(self.names.items())
        out.family("lb_name_addresses", "gauge", "Addresses a backend's host name resolves to (the "
                   "last known ones while look-ups fail).")
        for name, lookup in names:
            out.sample("lb_name_addresses", len(lookup.addresses), backend=name)
        out.family("lb_name_resolved_time_seconds", "gauge", "When a backend's host name last "
                   "resolved, in Unix time (0: never).")
        for name, lookup in names:
            out.sample("lb_name_resolved_time_seconds", round(lookup.resolved or 0, 3), backend=name)
        out.family("lb_name_lookup_failures_total", "counter", "Look-ups of a backend's host name "
                   "that failed or found no address.")
        for name, lookup in names:
            out.sample("lb_name_lookup_failures_total", lookup.failures, backend=name)
        if self.config.rate_limit:
            addresses, evictions = self.shared.rate_table_usage()
            out.family("lb_rate_limit_addresses", "gauge", "Client addresses in the rate-limit table.")
            out.sample("lb_rate_limit_addresses", addresses)
            out.family("lb_rate_limit_evictions_total", "counter", "Addresses evicted from the full "
                       "rate-limit table, least recently seen first.")
            out.sample("lb_rate_limit_evictions_total", evictions)
        out.family("lb_panic_mode", "gauge", "1 while every upstream is out after failed requests "
                   "and requests are tried on them anyway.")
        out.sample("lb_panic_mode", int(panic_mode(states)))
        out.family("lb_workers", "gauge", "Worker processes.")
        out.sample("lb_workers", len(self.shared.workers))
        out.family("lb_start_time_seconds", "gauge", "When the balancer started, in Unix time.")
        out.sample("lb_start_time_seconds", round(self.started, 3))
        out.family("lb_build_info", "gauge", "The balancer's version.")
        out.sample("lb_build_info", 1, version=__version__)
        return out.text()

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        for server in filter(None, (self.admin, self.redirect)):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      daemon=True, name=f"serve {server.server_address[1]}")
            thread.start()
            self.threads.append((server, thread))
        thread = threading.Thread(target=self.run_sampler, daemon=True, name="sampler")
        thread.start()
        if self.config.resolve_interval and any(spec.needs_lookup for spec in self.config.backend_specs):
            threading.Thread(target=self.run_resolver, daemon=True, name="resolver").start()
        self.sample()

    def close(self) -> None:
        self.stopped.set()
        self.checker.stop()
        for server in filter(None, (self.admin, self.redirect)):
            if any(s is server for s, _ in self.threads):
                server.shutdown()
            server.server_close()


ROUTING_STATES = ("up", "down", "ejected", "drain", "maint")
CLASS_LABELS = ("1xx", "2xx", "3xx", "4xx", "5xx")
CODE_CLASS = [STATUS_CODES[i] // 100 - 1 if i < len(STATUS_CODES) else i - len(STATUS_CODES)
              for i in range(N_CODES)]
UPSTREAM_GAUGES = (
    ("lb_upstream_in_flight", "gauge", U_IN_FLIGHT, "Requests at an upstream now (tunnels included; "
     "exact across workers with --balance leastconn)."),
    ("lb_upstream_idle_connections", "gauge", U_IDLE, "Idle keep-alive connections to an upstream."),
    ("lb_upstream_weight", "gauge", None, "An upstream's weight in the rotation."),
)
PROCESS_METRICS = (
    ("lb_client_connections", "gauge", P_CONNECTIONS, "Open client connections."),
    ("lb_client_connections_accepted_total", "counter", P_ACCEPTED, "Client connections accepted."),
    ("lb_in_flight_requests", "gauge", P_IN_FLIGHT, "Client requests being answered now."),
    ("lb_tunnels_open", "gauge", P_TUNNELS_OPEN, "Open tunnels (WebSocket and other upgrades)."),
    ("lb_tunnels_total", "counter", P_TUNNELS, "Tunnels opened."),
    ("lb_received_bytes_total", "counter", P_RECEIVED, "Bytes of requests received from clients."),
    ("lb_sent_bytes_total", "counter", P_SENT, "Bytes of responses sent to clients."),
    ("lb_worker_restarts_total", "counter", P_RESTARTS, "Workers started again after one died."),
    ("lb_sticky_hits_total", "counter", P_STICKY_HITS, "Requests that went to the upstream their "
     "sticky cookie named."),
    ("lb_sticky_repicks_total", "counter", P_STICKY_REPICKS, "Requests whose sticky cookie named an "
     "upstream that could not take them (or none): sent elsewhere, with a new cookie."),
    ("lb_queue_length", "gauge", P_QUEUE_LENGTH, "Requests waiting in the queue now (every upstream "
     "that may take them at its maxconn)."),
    ("lb_queue_timeouts_total", "counter", P_QUEUE_TIMEOUTS, "Requests answered 503 after "
     "--queue-timeout in the queue."),
    ("lb_queue_full_total", "counter", P_QUEUE_FULL, "Requests answered 503 at once: the queue was "
     "full (--queue-size)."),
    ("lb_denied_total", "counter", P_DENIED, "Requests answered 403: client address not allowed "
     "(--allow, --deny)."),
    ("lb_rate_limited_total", "counter", P_RATE_LIMITED, "Requests answered 429: over --rate-limit."),
)


def http_date_of(when: float | None) -> str | None:
    return None if when is None else email.utils.formatdate(when, usegmt=True)


def responses_by_class(record: list) -> dict:
    totals = [0] * 5
    for method_index in range(len(METHODS)):
        start = U_CODES + method_index * N_CODES
        for index, count in enumerate(record[start:start + N_CODES]):
            if count:
                totals[CODE_CLASS[index]] += count
    return dict(zip(CLASS_LABELS, totals))


def quantile(histogram: list, q: float) -> float | None:
    """The q-quantile (ms) of LATENCY_BOUNDS buckets, interpolated within its bucket as
    Prometheus' histogram_quantile does; None without observations."""
    total = sum(histogram)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for index, count in enumerate(histogram):
        if count and cumulative + count >= rank:
            lower = LATENCY_BOUNDS[index - 1] if index else 0.0
            upper = LATENCY_BOUNDS[min(index, len(LATENCY_BOUNDS) - 1)]
            return round((lower + (upper - lower) * (rank - cumulative) / count) * 1000, 3)
        cumulative += count
    return round(LATENCY_BOUNDS[-1] * 1000, 3)


def format_bound(bound: float) -> str:
    return repr(float(bound))


class MetricsWriter:
    """Prometheus text exposition format 0.0.4: HELP and TYPE once per family, then its samples."""

    def __init__(self):
        self.lines: list = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value, **labels) -> None:
        if labels:
            inner = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in labels.items())
            self.lines.append(f"{name}{{{inner}}} {value}")
        else:
            self.lines.append(f"{name} {value}")

    def histogram(self, name: str, histogram: list, total_seconds: float, **labels) -> None:
        """The samples of a histogram counted over LATENCY_BOUNDS (+Inf), at EXPORTED_BOUNDS."""
        cumulative, index = 0, 0
        for bound in EXPORTED_BOUNDS:
            while index < len(LATENCY_BOUNDS) and LATENCY_BOUNDS[index] <= bound:
                cumulative += histogram[index]
                index += 1
            self.sample(name + "_bucket", cumulative, **labels, le=format_bound(bound))
        count = sum(histogram)
        self.sample(name + "_bucket", count, **labels, le="+Inf")
        self.sample(name + "_sum", total_seconds, **labels)
        self.sample(name + "_count", count, **labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Worker:
    """What each worker process runs (and the one process, with one worker): the proxy server,
    its round robin over the shared backend set, and its counter block."""

    def __init__(self, config: Config, shared: SharedState, index: int = 0,
                 listener: socket.socket | None = None):
        self.config = config
        self.stats = WorkerStats(shared, index)
        self.round_robin = RoundRobin(shared, config, self.stats)
        self.server = listen(config.host, config.port, lambda: ProxyServer(
            config, self.round_robin, self.stats, shared, listener))
        self.thread = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       daemon=True, name=f"serve {self.port}")
        self.thread.start()

    def close(self, drain_timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to drain_timeout), close the rest."""
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()
        self.server.drain(drain_timeout)
        for backend in self.round_robin.backends.values():
            backend.pool.close()
            backend.failures.flush()
        self.server.refusals.flush()
        self.server.unavailable.flush()

    def cut(self) -> None:
        self.server.cut()


class LoadBalancer:
    """One balancer in one process: the Control and one Worker over private shared state.
    ``start()`` serves from background threads; ``close()`` drains. Used by ``--workers 1`` and
    by programs that embed the balancer (the tests do)."""

    def __init__(self, config: Config, *, listener: socket.socket | None = None):
        self.config = config
        self.shared = SharedState.create(1)
        self.worker = Worker(config, self.shared, 0, listener)
        try:
            # The port listened on (config.port may be 0, or a handed-over listener's): /status
            # and the dashboard name it, as the supervisor's do.
            self.control = Control(replace(config, port=self.worker.port), self.shared,
                                   https_port=self.worker.port)
        except BaseException:
            self.worker.server.server_close()
            raise
        self.worker.round_robin.refresh()
        self.control.before_reading = self.worker.server.publish_gauges
        self._closed = False

    @property
    def port(self) -> int:
        return self.worker.port

    @property
    def admin_port(self) -> int | None:
        return self.control.admin.server_address[1] if self.control.admin else None

    @property
    def server(self) -> ProxyServer:
        return self.worker.server

    @property
    def backends(self) -> list:
        """This process's Backend objects, in configured order."""
        return [self.worker.round_robin.backends[slot] for slot, _ in self.control.current
                if slot in self.worker.round_robin.backends]

    def start(self) -> None:
        self.worker.start()
        self.control.start()

    def reload(self) -> None:
        self.control.reload()

    def status(self, history: bool = False) -> dict:
        return self.control.status(history)

    def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.worker.close(self.config.drain_timeout if drain_timeout is None else drain_timeout)
        self.control.close()

    def cut(self) -> None:
        self.worker.cut()


# ===================================================================================================
# Logs
# ===================================================================================================
# Two logs, as nginx keeps them. The error log (start, stop, state changes, failures) goes to
# standard error, each line with its time, level and process. The access log (--access-log) is one
# line per request, exactly in --access-log-format with nothing before it, so that jq, GoAccess or
# a log shipper read it as it is, to a file of its own or to standard output. logrotate moves the
# file away and sends SIGUSR1: every process then opens the path again, as nginx does on USR1.

class AccessLogFile(logging.Handler):
    """Where access log lines go: a file opened for appending, or standard output ("-"). Each line
    is one write(2) on a descriptor opened with O_APPEND, so lines from several threads and worker
    processes never interleave within a line (nginx writes its access log the same way)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.fd = sys.stdout.fileno() if path == "-" else self.open()
        self.setFormatter(logging.Formatter("%(message)s"))
        # A full disk or a closed pipe loses lines, as in nginx: said in the error log, not a
        # traceback a request.
        self.failures = RateLimitedLog(f"access log {'on standard output' if path == '-' else path}",
                                       "line(s) lost")

    def open(self) -> int:
        """A descriptor of the file at `path` (OSError if it cannot be opened). 0640: the lines name
        clients and what they asked for."""
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            view = memoryview((self.format(record) + "\n").encode("utf-8", "replace"))
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as error:
            self.failures.note(f"{self.failures.subject}: cannot write: {describe_os_error(error)}; "
                               "the line is lost")
        except Exception:
            self.handleError(record)

    def reopen(self) -> None:
        """Open the path again and put the new file under the same descriptor (dup2: a line being
        written goes whole to the old file or the new one, never lost). OSError: the old stays."""
        if self.path == "-":
            return
        fd = self.open()
        try:
            os.dup2(fd, self.fd, inheritable=False)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.path != "-" and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def configure_logging(config: Config) -> None:
    """Logging for a process of the command line (main(), and every worker process): the error
    log on standard error at --log-level; the access log to its own destination, its lines
    exactly the format. OSError when the access log file cannot be opened. A program that embeds
    the balancer configures logging itself: access lines are INFO records of the
    "load_balancer.access" logger, the line as the message."""
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    for handler in access_log.handlers[:]:
        access_log.removeHandler(handler)
        handler.close()
    if config.access_log:
        access_log.addHandler(AccessLogFile(config.access_log))
    access_log.propagate = not config.access_log  # its lines do not go to the error log too
    access_log.setLevel(logging.INFO if config.access_log else logging.WARNING)


def reopen_access_log() -> None:
    """SIGUSR1 (in every process: the supervisor passes it on to its workers): open the access log
    file again, after logrotate has moved it."""
    files = [h for h in access_log.handlers if isinstance(h, AccessLogFile) and h.path != "-"]
    if not files:
        log.info("SIGUSR1: nothing to do (no --access-log file to reopen)")
    for handler in files:
        try:
            handler.reopen()
        except OSError as error:
            log.error("SIGUSR1: cannot reopen the access log %s: %s; writing on to the old file",
                      handler.path, describe_os_error(error))
        else:
            log.info("SIGUSR1: access log %s reopened", handler.path)


# ===================================================================================================
# Processes and signals
# ===================================================================================================
# Signals (kill -s NAME pid):
#   TERM, INT, QUIT  drain: stop accepting, let requests in flight finish (--drain-timeout), exit 0;
#                    a second TERM or INT during the drain stops at once
#   HUP              reload: --backends-file and the TLS certificate read again
#   USR1             reopen the access log file (log rotation), in every process
# With --workers N the supervisor takes these and tells its workers through a pipe each; a worker
# whose pipe ends (the supervisor died, even by SIGKILL) stops by itself within a second.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class Signals:
    """Signals as events for a process's main loop: the handlers only note them, and a wake-up pipe
    ends the loop's wait, whichever thread the kernel delivered the signal to."""

    def __init__(self, handled=(*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1)):
        self.received: collections.deque = collections.deque()
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in handled:
            signal.signal(sig, lambda signum, frame: self.received.append(signum))

    def wait(self, timeout: float | None, fds=()) -> tuple[list, list]:
        """Signals that arrived and descriptors ready to read, waiting up to `timeout`."""
        if not self.received:
            try:
                ready = select.select([self.read_fd, *fds], [], [], timeout)[0]
            except InterruptedError:
                ready = []
        else:
            ready = select.select(list(fds), [], [], 0)[0] if fds else []
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass
        signals = []
        while self.received:
            signals.append(self.received.popleft())
        return signals, [fd for fd in ready if fd != self.read_fd]


class StopSignals:
    """What TERM, INT and QUIT mean, in the supervisor and in a worker alike: the first one drains
    (nginx's graceful stop; QUIT is only ever that), a second TERM or INT during the drain stops
    now. A worker already draining on its supervisor's word takes a first signal as the same stop:
    one sent to the whole process group (a terminal's Ctrl-C, systemd) reaches both."""

    def __init__(self, drain_timeout: float):
        self.drain_timeout = drain_timeout
        self.received = 0

    def action(self, sig: int, draining: bool) -> str | None:
        """"drain", "cut" or None (nothing more to do), with the log line that says so."""
        self.received += 1
        name = signal.Signals(sig).name
        if self.received == 1:
            if draining:
                return None
            log.info("%s: draining requests in flight (up to %gs)", name, self.drain_timeout)
            return "drain"
        if sig == signal.SIGQUIT:
            return None
        log.warning("%s during the drain: stopping now", name)
        return "cut"


def run_until_stopped(signals: Signals, drain, cut, drain_timeout: float, reload=None,
                      control_fd: int | None = None) -> None:
    """A process's main loop. A stop signal starts `drain(timeout)` in a thread and a second TERM
    or INT calls `cut()`; HUP calls `reload()`; USR1 reopens the access log. A worker also reads
    its control pipe: "D" drains, "S" stops now, "R" reopens the access log, and its end (the
    supervisor is gone) drains briefly. A stop signal sent to the whole process group
    (timeout(1), a terminal's Ctrl-C, systemd) reaches a worker as well as its supervisor's "D":
    that is one stop, not two."""
    stopper = None
    stops = StopSignals(drain_timeout)

    def begin(timeout: float) -> None:
        nonlocal stopper
        if stopper is None:
            stopper = threading.Thread(target=drain, args=(timeout,), name="drain")
            stopper.start()

    watch = [control_fd] if control_fd is not None else []
    while stopper is None or stopper.is_alive():
        arrived, ready = signals.wait(0.2 if stopper else None, watch)
        if ready:
            data = os.read(control_fd, 64)
            if not data:
                watch = []
                log.warning("the supervisor is gone: stopping")
                begin(min(drain_timeout, ORPHAN_DRAIN_SECONDS))
            if b"D" in data or b"S" in data:
                begin(drain_timeout)
            if b"S" in data:
                cut()
            if b"R" in data:
                reopen_access_log()
        for sig in arrived:
            if sig in STOP_SIGNALS:
                action = stops.action(sig, draining=stopper is not None)
                if action == "drain":
                    begin(drain_timeout)
                elif action == "cut":
                    cut()
            elif sig == signal.SIGHUP and reload is not None:
                reload()
            elif sig == signal.SIGUSR1:
                reopen_access_log()
            else:
                log.info("%s: nothing to do here", signal.Signals(sig).name)
    stopper.join()


def instance_lock(port: int) -> object:
    """One balancer per port: a second one on a port that a running balancer holds would join it
    silently through SO_REUSEPORT. An exclusive flock on a file named after the port, held while
    the process lives (the kernel lets it go when it dies). Raises ListenError if it is held."""
    path = os.path.join(tempfile.gettempdir(), f"load_balancer-port-{port}.lock")
    try:
        file = open(path, "a+")
    except OSError as error:
        log.warning("cannot open %s to guard port %d: %s", path, port, describe_os_error(error))
        return None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        holder = file.read().strip() or "?"
        file.close()
        raise ListenError("", port, f"another load_balancer (pid {holder}) is serving it "
                                    f"(lock {path})", where=f"port {port}") from None
    file.seek(0)
    file.truncate()
    file.write(str(os.getpid()))
    file.flush()
    return file


def serve(config: Config, ready=None) -> int:
    """Run one balancer in this process until a stop signal, then drain. Returns 0."""
    threading.stack_size(THREAD_STACK_SIZE)
    signals = Signals()
    lock = instance_lock(config.port) if config.port else None
    balancer = LoadBalancer(config)
    if lock is None:
        lock = instance_lock(balancer.port)
    balancer.start()
    if ready:
        ready(balancer)
    run_until_stopped(signals, balancer.close, balancer.cut, config.drain_timeout, balancer.reload)
    if lock is not None:
        lock.close()
    return 0


def listening_sockets(host: str, port: int, count: int) -> list:
    """`count` listening sockets on one port with SO_REUSEPORT, one per worker: the kernel spreads
    connections over them. Made by the supervisor and handed to each worker it starts, also to a
    worker started again: connections queued on a worker's socket wait for it, never dropped."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listen(host, port, lambda: sock.bind((host, port)))
            port = sock.getsockname()[1]
            sock.listen(ProxyServer.request_queue_size)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# A worker imports this module rather than running this file as a script: an import reads the
# compiled bytecode that Python caches beside the file, where a script is compiled again at every
# start (about a fifth of a second of CPU per worker, paid again at each restart).
WORKER_COMMAND = "import sys; sys.path.insert(0, sys.argv.pop(1)); import load_balancer; sys.exit(load_balancer.main())"


class WorkerProcess:
    """One worker as the supervisor sees it: a fresh interpreter importing this file and running
    ``main(["--worker-process", ...])``, its listening socket and the shared state passed as descriptors, its
    settings as JSON over its control pipe, which then carries "drain" and "stop now"."""

    def __init__(self, index: int, config: Config, shared: SharedState, listener: socket.socket,
                 ready_fd: int):
        self.index = index
        self.started = time.monotonic()
        control_read, self.control = os.pipe()
        block, lock_file = shared.files
        fds = (block.fileno(), lock_file.fileno(), listener.fileno(), control_read, ready_fd)
        passed = [fd for fd in fds if fd >= 0]
        for fd in passed:
            os.set_inheritable(fd, True)
        settings = {item.name: getattr(config, item.name) for item in Config.settings()}
        settings["backends_file"] = None  # the supervisor owns the backend set
        settings["sticky_key"] = None     # and the sticky cookie's key (in the shared block)
        for name, networks in config.access_lists._asdict().items():  # and reads the lists' files
            settings[name] = [",".join(map(str, networks))] if networks else []
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER_COMMAND, os.path.dirname(os.path.abspath(__file__)),
             "--worker-process", ",".join(map(str, (index, config.workers, *fds)))],
            pass_fds=passed, stdin=subprocess.DEVNULL)
        os.close(control_read)
        os.write(self.control, (json.dumps(settings) + "\n").encode())

    def tell(self, command: bytes) -> None:
        try:
            os.write(self.control, command)
        except OSError:
            pass  # it has gone already

    def close(self) -> None:
        try:
            os.close(self.control)
        except OSError:
            pass


def supervise(config: Config, ready=None) -> int:
    """The parent of `config.workers` worker processes. It owns what there is one of (the Control:
    health checks, admin listener, reloads) and the listening sockets; it restarts a worker that
    dies (its counters stay in the shared block) and passes stop signals on. Returns 0 once every
    worker has drained."""
    threading.stack_size(THREAD_STACK_SIZE)
    signals = Signals((*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD))
    lock = instance_lock(config.port) if config.port else None
    listeners = listening_sockets(config.host, config.port, config.workers)
    port = listeners[0].getsockname()[1]
    if lock is None:
        lock = instance_lock(port)
    config = replace(config, port=port)
    shared = SharedState.create(config.workers, processes=True)
    try:
        control = Control(config, shared, https_port=port)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    control.start()
    ready_read, ready_write = os.pipe()
    workers: dict = {}
    for index in range(config.workers):
        workers[index] = WorkerProcess(index, config, shared, listeners[index], ready_write)
    os.close(ready_write)
    waiting = config.workers
    stopping = False
    stops = StopSignals(config.drain_timeout)
    while workers:
        arrived, readable = signals.wait(0.5, [ready_read] if waiting else [])
        if readable:
            data = os.read(ready_read, 64)
            waiting = waiting - len(data) if data else 0
            if not waiting:
                os.close(ready_read)
                if ready and not stopping:
                    ready(config, control)
        for sig in arrived:
            if sig == signal.SIGHUP:
                control.reload()
            elif sig == signal.SIGUSR1:
                reopen_access_log()
                for worker in workers.values():
                    worker.tell(b"R")
            elif sig in STOP_SIGNALS:
                action = stops.action(sig, draining=stopping)
                if action == "drain":
                    stopping = True
                    for worker in workers.values():
                        worker.tell(b"D")
                    for sock in listeners:  # new connections are refused now, not queued for nobody
                        sock.close()
                elif action == "cut":
                    for worker in workers.values():
                        worker.tell(b"S")
        for index, worker in list(workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            worker.close()
            del workers[index]
            if stopping:
                continue
            log.warning("worker %d (pid %d) exited with %s; starting a new one", index, worker.process.pid,
                        f"signal {-code}" if code < 0 else f"code {code}")
            shared.worker_died(index)
            if time.monotonic() - worker.started < 1:
                time.sleep(1)  # a worker that dies at once would otherwise restart in a tight loop
            workers[index] = WorkerProcess(index, config, shared, listeners[index], -1)
    control.close()
    for sock in listeners:
        sock.close()
    if lock is not None:
        lock.close()
    return 0


def worker_process(spec: str) -> int:
    """The body of a worker process (``load_balancer.py --worker-process ...``, started by
    supervise): serve on the handed-over socket until the supervisor says drain or stop, or goes
    away. Stop signals sent to the worker itself (systemd sends them to every process) drain it
    too; HUP is the supervisor's business; USR1 (sent to it, or passed on by the supervisor as
    "R") reopens its access log."""
    index, workers, block_fd, lock_fd, listen_fd, control_fd, ready_fd = map(int, spec.split(","))
    threading.stack_size(THREAD_STACK_SIZE)
    settings = json.loads(read_line(control_fd))
    config = Config(**{name: tuple(value) if isinstance(value, list) else value
                       for name, value in settings.items()})
    configure_logging(config)  # the supervisor has opened the access log file: so can a worker
    signals = Signals()
    shared = SharedState.attach(block_fd, lock_fd, workers)
    worker = Worker(config, shared, index, socket.socket(fileno=listen_fd))
    worker.start()
    if ready_fd >= 0:
        os.write(ready_fd, b".")
        os.close(ready_fd)
    run_until_stopped(signals, worker.close, worker.cut, config.drain_timeout, control_fd=control_fd)
    logging.shutdown()
    return 0


def read_line(fd: int) -> bytes:
    """One line from a pipe, read a byte at a time so that nothing after it is taken."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError("the supervisor closed the control pipe")
        data += byte
    return bytes(data)


# ===================================================================================================
# --export: this balancer as an nginx.conf or a haproxy.cfg
# ===================================================================================================
# The way out when one Python process is no longer enough: the same listener, upstreams, weights,
# backups, timeouts, limits, health checks, retries and admin port on an engine that scales.
# main() calls export_config() for ``--export nginx|haproxy`` and prints what it returns. Nothing
# here opens a file or a socket, and the text depends on the Config alone (no clock, no host name,
# no probe of the installed peer), so the same flags always give the same file. Where a target
# cannot say what a setting means here, the file says so on a "# load_balancer: ..." line, next to
# where the directive would have gone; lines starting "# " without it explain a mapping.

EXPORT_TARGETS = ("nginx", "haproxy")
# The trust store of https:// upstreams when --backend-ca is not given: Debian's and Ubuntu's
# bundle (Red Hat's is /etc/pki/tls/certs/ca-bundle.crt). Python reads OpenSSL's default paths,
# which on those systems lead to the same certificates.
EXPORT_SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
# HAProxy's reserve at the end of each buffer for header rewrites (tune.maxrewrite's default): a
# request head must fit in tune.bufsize minus this.
HAPROXY_MAXREWRITE = 1024
HAPROXY_DEFAULT_BUFSIZE = 16384


def export_config(config: Config, target: str) -> str:
    """The configuration of another load balancer that reproduces `config`: ``target`` is
    ``"nginx"`` (an nginx.conf) or ``"haproxy"`` (a haproxy.cfg). Called by main() for
    ``--export`` (argparse has already checked the target); ValueError for any other target."""
    if target == "nginx":
        return export_nginx(config)
    if target == "haproxy":
        return export_haproxy(config)
    raise ValueError(f"--export must be one of {', '.join(EXPORT_TARGETS)}, got {target!r}")


# ---------------------------------------------------------------------------------------------------
# Shared by both targets
# ---------------------------------------------------------------------------------------------------

def _export_command(config: Config, target: str) -> str:
    """The command line that exports `config` again: the flags whose values differ from their
    defaults, in --help order. The admin token is not repeated in a comment."""
    words = ["python3", "load_balancer.py", "--export", target]
    for item in Config.settings():
        value = getattr(config, item.name)
        if value == item.default:
            continue
        flag = flag_of(item)
        if isinstance(value, tuple):
            if item.name != "backends" or config.backends_file is None:  # else the file is named
                for text in value:
                    words += [flag, text]
        elif item.metadata["type"] is bool:
            words.append(flag)
        elif item.name == "admin_token":
            words += [flag, "<not shown>"]
        else:
            words += [flag, format_default(value)]
    return " ".join(_export_shell_word(word) for word in words)


def _export_shell_word(word: str) -> str:
    """`word` quoted for a POSIX shell when it needs to be (shlex.quote's rule)."""
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _export_preamble(config: Config, target: str, file: str, run: str, check: str) -> list[str]:
    """The comment block every exported file starts with: who made it, from what, how to run it."""
    return [
        f"# {file} written by load_balancer {__version__} (--export {target}), from:",
        f"#   {_export_command(config, target)}",
        f"# Check: {check}",
        f"# Run:   {run}",
        "# Lines starting \"# load_balancer:\" name a setting this target cannot express, and why.",
        "# The upstreams are those of the moment of export: after a change (load_balancer re-reads",
        "# --backends-file on SIGHUP), export again and reload.",
        "",
    ]


def _export_time(seconds: float) -> str:
    """A duration as both peers write it: whole seconds as "30s", anything else in milliseconds
    ("250ms"; at least 1ms: neither reads fractions, and to some directives 0 means "never")."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _export_address(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets (both peers' listen/bind/server syntax)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _export_server_address(spec: BackendSpec, target: str) -> str:
    """A server's address: host:port, or a Unix socket (nginx ``unix:/path``, HAProxy ``/path``)."""
    if spec.unix_path is not None:
        path = spec.unix_path
        return _nginx_word("unix:" + path) if target == "nginx" else _haproxy_word(path)
    return _export_address(spec.host, spec.port)


def _export_indent(lines: list[str], by: str = "    ") -> list[str]:
    """`lines` one block level deeper (empty lines stay empty)."""
    return [by + line if line else "" for line in lines]


def _export_is_ip(host: str) -> bool:
    """Is `host` an IP address (rather than a name that is looked up)?"""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _export_host_header(specs: tuple) -> tuple[str, list[str]]:
    """The Host sent upstream for a request that has none (HTTP/1.0): load_balancer sends the
    chosen upstream's host[:port] as written; both peers build the request before they choose, so
    they can send one value. (value, comment lines)."""
    primaries = [spec for spec in specs if not spec.backup] or list(specs)
    netlocs = sorted({spec.netloc for spec in specs})
    if len(netlocs) == 1:
        return netlocs[0], []
    return primaries[0].netloc, [
        f"# load_balancer: a request without Host (HTTP/1.0) gets Host: {primaries[0].netloc} whichever",
        "# upstream it goes to; load_balancer sends the chosen upstream's own host:port."]


def _export_retry_conditions(config: Config) -> list[str]:
    """--retry-on as a list in HAProxy's order, without "none" (which only means "no other")."""
    return [word for word in ("conn-failure", "empty-response", "response-timeout")
            if word in config.retry_conditions]


# ---------------------------------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------------------------------
# nginx's default balancing in an upstream block is smooth weighted round robin, the very
# algorithm of smooth_weighted_cycle(): weights 3,1,1 give a b a c a. With more than one worker
# process the upstream's "zone" keeps that rotation (and the failure counts) in shared memory, so
# the workers share one rotation as load_balancer's do. nginx open source has no active health
# checks, no per-upstream Host or TLS name, and no admin API: see the comments it writes.

def export_nginx(config: Config) -> str:
    """The nginx.conf that reproduces `config` (``--export nginx``, through export_config()).
    Written for ``nginx -p DIR -c FILE -g 'daemon off;'``: no daemon directive, and the pid file,
    lock file, temp directories and access log are relative paths, under the prefix DIR."""
    specs = config.backend_specs
    lines = _export_preamble(config, "nginx", "nginx.conf", "nginx -p DIR -c FILE -g 'daemon off;'",
                             "nginx -t -p DIR -c FILE")
    lines += _nginx_main(config)
    lines += ["", "http {"]
    lines += _export_indent(_nginx_http(config))
    lines += [""] + _export_indent(_nginx_maps(config))
    if config.rate_limit:
        lines += [""] + _export_indent(_nginx_rate_zone(config))
    lines += [""] + _export_indent(_nginx_upstream(config, specs))
    lines += [""] + _export_indent(_nginx_proxy_server(config, specs))
    if config.redirect_http_port is not None:
        lines += [""] + _export_indent(_nginx_redirect_server(config))
    if config.admin_port is not None:
        lines += [""] + _export_indent(_nginx_admin_server(config))
    lines += ["}", ""]
    return "\n".join(lines)


def _nginx_listen(host: str, port: int) -> str:
    """A listen directive's address. load_balancer's socket on "::" takes IPv4 too (Linux's
    default); nginx's takes only IPv6 unless told."""
    host = host.strip("[]")
    return _export_address(host, port) + (" ipv6only=off" if host == "::" else "")


def _nginx_word(value: str) -> str:
    """A directive argument, quoted when nginx would otherwise split or end it there."""
    if re.fullmatch(r"[^\s;{}\"'\\#]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --log-level -> error_log level: nginx's "info" adds a line per client that closes a connection,
# which load_balancer logs only at debug; its "notice" is our info (start, stop, upstream events).
NGINX_LOG_LEVELS = {"debug": "info", "info": "notice", "warning": "warn", "error": "error"}


def _nginx_main(config: Config) -> list[str]:
    """The main context: processes, files under the prefix, the drain, connections per worker."""
    idle = config.pool_size * len(config.backend_specs)
    connections = 2 * config.max_connections + idle
    return [
        f"# --workers {config.workers}: processes sharing the port, as load_balancer's workers share it.",
        f"worker_processes {config.workers};",
        "# Files under the prefix (-p DIR), so that nothing needs root or a system path.",
        "pid nginx.pid;",
        "lock_file nginx.lock;",
        f"error_log stderr {NGINX_LOG_LEVELS[config.log_level]};",
        "# --drain-timeout: after SIGQUIT (nginx's graceful stop; SIGTERM and SIGINT stop at once,",
        "# where load_balancer drains on all three) requests in flight get this long.",
        f"worker_shutdown_timeout {_export_time(config.drain_timeout)};",
        "# Descriptors for worker_connections, and a few for files and listeners.",
        f"worker_rlimit_nofile {connections + 64};",
        "",
        "events {",
        f"    # --max-connections {config.max_connections} clients per worker. nginx counts upstream "
        "connections too:",
        f"    # twice that, plus {idle} idle keep-alive ones (keepalive below). At the limit nginx closes",
        "    # idle keep-alive client connections first, as load_balancer does.",
        "    # load_balancer: when all are busy it answers 503; nginx stops accepting (the kernel queues).",
        f"    worker_connections {connections};",
        "}",
    ]


def _nginx_http(config: Config) -> list[str]:
    """The http context: temp paths, access log, client-side timeouts and limits."""
    lines = [
        "# Temp files under the prefix (the compiled-in paths are system directories).",
        "client_body_temp_path client_body_temp;",
        "proxy_temp_path proxy_temp;",
        "fastcgi_temp_path fastcgi_temp;",
        "uwsgi_temp_path uwsgi_temp;",
        "scgi_temp_path scgi_temp;",
        "",
    ]
    lines += _nginx_access_log(config)
    size = max(config.max_field_size, config.max_request_line)
    count = max(2, math.ceil(config.max_header_size / size))
    lines += [
        "",
        "# The upstream's own Server and Date pass through, as load_balancer passes them.",
        "server_tokens off;",
        "# load_balancer forwards header fields with an underscore; nginx drops them by default.",
        "underscores_in_headers on;",
        "",
        "# --header-timeout: a new connection's first byte (and TLS handshake) and a whole request head.",
        f"client_header_timeout {_export_time(config.header_timeout)};",
        "# --idle-timeout: a keep-alive connection between requests, and a stalled request body or",
        "# response write.",
        f"keepalive_timeout {_export_time(config.idle_timeout)};",
        f"client_body_timeout {_export_time(config.idle_timeout)};",
        f"send_timeout {_export_time(config.idle_timeout)};",
        "# (load_balancer serves any number of requests on a connection; nginx closes it after",
        "# keepalive_requests, 1000, to free its memory: left as it is.)",
        "",
        "# --max-body-size (0 = unlimited in both): 413 above.",
        f"client_max_body_size {config.max_body_size};",
        f"# --max-request-line {config.max_request_line}, --max-field-size {config.max_field_size}, "
        f"--max-header-size {config.max_header_size}: the request line",
        f"# and each field line must fit in one {size}-byte buffer, the head in {count} of them.",
        "# load_balancer: nginx answers 414 or 400 (load_balancer 414 or 431) and counts whole",
        "# buffers, not bytes, so a head can pass that is a little over --max-header-size.",
        f"large_client_header_buffers {count} {size};",
        f"# load_balancer: --max-headers {config.max_headers} (the number of header fields) has no "
        "nginx directive.",
    ]
    return lines


def _nginx_access_log(config: Config) -> list[str]:
    """--access-log and --access-log-format as a log_format of the same fields."""
    if not config.access_log:
        return ["# --access-log is off.", "access_log off;"]
    formats = {
        # load_balancer: client "request line" status upstream duration.
        "short": "'$remote_addr \"$request\" $status $upstream_addr $request_time'",
        "common": "'$remote_addr - - [$time_local] \"$request\" $status $bytes_sent'",
        "combined": "'$remote_addr - - [$time_local] \"$request\" $status $bytes_sent '\n"
                    "        '\"$http_referer\" \"$http_user_agent\"'",
        "json": "escape=json '{\"time\":\"$time_iso8601\",\"client\":\"$remote_addr\","
                "\"method\":\"$request_method\",'\n"
                "        '\"target\":\"$request_uri\",\"version\":\"$server_protocol\",\"status\":$status,'\n"
                "        '\"upstream\":\"$upstream_addr\",\"upstream_address\":\"$upstream_addr\",'\n"
                "        '\"upstream_status\":\"$upstream_status\",\"duration_s\":$request_time,'\n"
                "        '\"bytes_sent\":$bytes_sent,\"bytes_received\":$request_length,'\n"
                "        '\"user_agent\":\"$http_user_agent\",\"referer\":\"$http_referer\"}'",
    }
    style = config.access_log_format
    if config.request_id_key:  # the request ID ends each line (json: request_id, after time)
        formats = {name: (text.replace('","client"', '","request_id":"$lb_request_id","client"', 1)
                          if name == "json" else text[:-1] + " $lb_request_id'")
                   for name, text in formats.items()}
    notes = {
        "short": ["# load_balancer: the upstream is its address (its URL in load_balancer's log), the",
                  "# duration in seconds with millisecond resolution (load_balancer: \"12.3ms\")."],
        "common": [],
        "combined": [],
        "json": ["# load_balancer: nginx writes \"\" where load_balancer writes null, the upstream's",
                 "# address where it writes its name, and \"duration_s\" (seconds) for \"duration_ms\";",
                 "# time is local with an offset, to the second."],
    }[style]
    if config.access_log == "-":
        where = ["# --access-log -: load_balancer writes these lines to standard output; here they go",
                 "# to access.log under the prefix (access_log /dev/stdout when nginx runs in a",
                 "# container's foreground)."]
        path = "access.log"
    else:
        where = ["# --access-log FILE: the same file; nginx reopens it on SIGUSR1 too (log rotation)."]
        path = _nginx_word(config.access_log)
    return [
        f"# --access-log-format {style}.",
        *where,
        *notes,
        f"log_format load_balancer {formats[style]};",
        f"access_log {path} load_balancer;",
    ]


def _nginx_maps(config: Config) -> list[str]:
    """Variables the proxy headers use: the Upgrade pair (WebSocket) and the Host fallback."""
    host, notes = _export_host_header(config.backend_specs)
    return [
        "# WebSocket and other upgrades, nginx's documented pattern for upstream keep-alive: without",
        "# Upgrade, Connection is \"\" (not sent), so the upstream connection stays reusable. h2c is",
        "# never tunnelled (load_balancer refuses it: an h2c upgrade through a proxy smuggles requests).",
        "map $http_upgrade $lb_upgrade {",
        "    default $http_upgrade;",
        "    \"~*h2c\" \"\";",
        "}",
        "map $lb_upgrade $connection_upgrade {",
        "    default upgrade;",
        "    \"\" \"\";",
        "}",
        "# Host goes upstream as the client sent it; without one, the upstream's host[:port].",
        *notes,
        "map $http_host $lb_host {",
        f"    \"\" {_nginx_word(host)};",
        "    default $http_host;",
        "}",
    ] + _nginx_request_id_map(config) + _nginx_trusted_maps(config) + _nginx_sticky_map(config)


def _nginx_trusted_maps(config: Config) -> list[str]:
    """--trusted-proxies: the realip module finds the client behind them (real_ip_recursive, as
    load_balancer walks the list), and maps keep what a trusted peer sent."""
    if not config.trusted_networks:
        return []
    networks = [str(network) for network in config.trusted_networks]
    lines = [
        f"# --trusted-proxies {config.trusted_proxies}: from these peers X-Forwarded-For, -Host, -Proto",
        "# and Forwarded are kept (X-Forwarded-For extended by the peer); the client ($remote_addr,",
        "# logged) is the right-most address in X-Forwarded-For that is not trusted.",
    ]
    if config.proxy_protocol_networks:
        peer = "$proxy_protocol_addr"
        lines += ["# load_balancer: with --proxy-protocol-from too, it walks X-Forwarded-For behind the",
                  "# PROXY address; nginx's realip module takes one source, here the PROXY header (server",
                  "# block), so $remote_addr is the PROXY address."]
    else:
        peer = "$realip_remote_addr"
        lines += [*[f"set_real_ip_from {network};" for network in networks],
                  "real_ip_header X-Forwarded-For;",
                  "real_ip_recursive on;",
                  "# $realip_remote_addr: the peer itself (the realip module has changed $remote_addr)."]
    lines += [
        f"geo {peer} $lb_trusted_peer {{",
        "    default 0;",
        *[f"    {network} 1;" for network in networks],
        "}",
    ]
    for name, variable, default in (("x_forwarded_for", "$lb_forwarded_for", None),
                                     ("x_forwarded_host", "$lb_forwarded_host", "$http_host"),
                                     ("x_forwarded_proto", "$lb_forwarded_proto", "$scheme")):
        kept = f"\"$lb_prior, {peer}\"" if default is None else "$lb_prior"
        lines += [f"map \"$lb_trusted_peer:$http_{name}\" {variable} {{",
                  f"    \"~^1:(?<lb_prior>.+)$\" {kept};",
                  f"    default {default or peer};",
                  "}"]
    return lines + ["map $lb_trusted_peer $lb_forwarded {", "    1 $http_forwarded;", "    default \"\";", "}"]


def _nginx_forwarded(config: Config) -> list[str]:
    """X-Forwarded-* and Forwarded toward the upstream (headers_for_upstream)."""
    if config.trusted_networks:
        return [
            "# X-Forwarded-*: set here, a trusted proxy's own kept (the maps above); Forwarded only",
            "# from a trusted proxy (an empty value is not sent).",
            "proxy_set_header X-Forwarded-For $lb_forwarded_for;",
            "proxy_set_header X-Forwarded-Host $lb_forwarded_host;",
            "proxy_set_header X-Forwarded-Proto $lb_forwarded_proto;",
            "proxy_set_header Forwarded $lb_forwarded;",
        ]
    return [
        "# X-Forwarded-For, -Host and -Proto: set here, a client's own replaced (not extended: no",
        "# --trusted-proxies), its Forwarded removed (an empty value is not sent: no Host, no",
        "# X-Forwarded-Host).",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Host $http_host;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header Forwarded \"\";",
    ]


def _nginx_request_id_map(config: Config) -> list[str]:
    """--request-id-header: the client's ID when it is valid, else nginx's own $request_id (32
    random hex digits, as load_balancer makes them)."""
    if not config.request_id_key:
        return ["# --request-id-header '': no request ID."]
    variable = "$http_" + config.request_id_key.decode().replace("-", "_")
    return [
        f"# --request-id-header {config.request_id_header}: the client's ID when it is 1-200 visible "
        "ASCII characters,",
        "# else $request_id (32 random hex digits, as load_balancer makes them).",
        "# load_balancer: a client's field that is repeated is replaced; nginx 1.22 reads the first.",
        f"map {variable} $lb_request_id {{",
        f"    \"~^[!-~]{{1,{MAX_REQUEST_ID}}}$\" {variable};",
        "    default $request_id;",
        "}",
    ]


def _nginx_sticky_map(config: Config) -> list[str]:
    """The variables the upstream block's hash reads: --hash-key's and --sticky-cookie's (see
    _nginx_balancing), where nginx has none built in."""
    lines = []
    if config.balance == "hash":
        lines += _nginx_key(config.hash_key, "$lb_hash_key")[1]
    if config.sticky_cookie:
        variable, maps = _nginx_key("cookie:" + config.sticky_cookie, "$lb_sticky_cookie")
        fallback = _nginx_sticky_fallback(config)
        lines += maps + [
            f"# --sticky-cookie {config.sticky_cookie}: its value where the request has one, else {fallback}.",
            f"map {variable} $lb_sticky_key {{",
            f"    \"\" {fallback};",
            f"    default {variable};",
            "}",
        ]
    return lines


# --hash-key -> the nginx variable it hashes.
NGINX_HASH_KEYS = {"client-ip": "$remote_addr", "uri": "$request_uri"}
NGINX_VARIABLE_NAME = re.compile(r"[A-Za-z0-9_]+")


def _nginx_key(key: str, variable: str) -> tuple[str | None, list[str]]:
    """The nginx variable that holds a --hash-key (``cookie:NAME`` for a sticky cookie too), and
    the map that makes it, named `variable`, where nginx has none: $remote_addr, $request_uri,
    $http_NAME, $cookie_NAME, or a map of $http_cookie for a cookie whose name is no variable
    name (nginx's take letters, digits and "_"). (None, []) for a header nginx cannot name."""
    kind, _, name = key.partition(":")
    if kind == "header":
        return ("$http_" + name.lower().replace("-", "_"), []) if re.fullmatch(r"[A-Za-z0-9-]+", name) \
            else (None, [])
    if kind != "cookie":
        return NGINX_HASH_KEYS[key], []
    if NGINX_VARIABLE_NAME.fullmatch(name):
        return "$cookie_" + name, []
    pattern = _nginx_word(r"~(?:^|;)\s*" + re.escape(name) + r"=(?<lb_cookie>[^;]*)")
    return variable, [f"# The cookie {name}: its name is no nginx variable name, so it is read from Cookie.",
                      f"map $http_cookie {variable} {{", f"    {pattern} $lb_cookie;",
                      "    default \"\";", "}"]


def _nginx_sticky_fallback(config: Config) -> str:
    """What a request without the sticky cookie is hashed by: the hash key, or $request_id (a
    random spread, nginx's nearest to round robin under a hash)."""
    if config.balance == "hash":
        return _nginx_key(config.hash_key, "$lb_hash_key")[0] or "$request_id"
    return "$request_id"


def _nginx_balancing(config: Config, specs: tuple) -> tuple[list[str], bool]:
    """The upstream block's balancing method (nginx wants it before keepalive): (lines, whether
    backup servers may stay: not under hash, which nginx refuses them with)."""
    lines, hashing = [], False
    if config.balance == "leastconn":
        lines += ["    # --balance leastconn: the fewest active connections for its weight, ties in weighted",
                  "    # round-robin order (load_balancer counts requests in flight and open tunnels).",
                  "    least_conn;"]
    elif config.balance == "hash":
        variable, _ = _nginx_key(config.hash_key, "$lb_hash_key")
        lines += [f"    # --balance hash --hash-key {config.hash_key}: consistent hashing, points by weight."]
        if variable is None:
            lines += [f"    # load_balancer: nginx cannot name the header {config.hash_key[7:]} in a variable "
                      "(letters, digits and",
                      "    # \"-\" only): round robin here."]
        else:
            hashing = True
            lines += ["    # load_balancer: a request without the key goes round robin; nginx hashes the empty",
                      "    # value, so every such request goes to one upstream."]
            if not config.sticky_cookie:
                lines.append(f"    hash {variable} consistent;")
    if config.sticky_cookie:
        hashing = True
        name = config.sticky_cookie
        lines += [
            f"    # --sticky-cookie {name}: load_balancer sets the cookie itself (an HMAC of the upstream's",
            "    # name). load_balancer: open source nginx cannot insert a cookie (nginx Plus: sticky",
            f"    # cookie {name}); here a request carrying {name} is pinned by hashing its value, so the",
            f"    # application must set {name} (or hash its own session cookie: --hash-key cookie:NAME).",
            f"    # Requests without it are hashed by {_nginx_sticky_fallback(config)} "
            "($lb_sticky_key, in the maps above).",
        ]
        if config.balance != "roundrobin":
            lines = [line for line in lines if line != "    least_conn;"]
            lines.append(f"    # load_balancer: one balancing method per upstream block: this hash replaces "
                         f"--balance {config.balance}'s.")
        lines.append("    hash $lb_sticky_key consistent;")
    if config.slow_start:
        lines += [f"    # load_balancer: --slow-start {format_default(config.slow_start)} is nginx Plus's "
                  f"\"server ... slow_start={_export_time(config.slow_start)}\";",
                  "    # open source nginx has no slow start."]
    if hashing and any(spec.backup for spec in specs) and not all(spec.backup for spec in specs):
        lines += ["    # load_balancer: nginx's hash takes no backup servers: the backups are left out",
                  "    # (commented below)."]
    return lines, not hashing


def _nginx_upstream(config: Config, specs: tuple) -> list[str]:
    """The upstream block: balancing method, servers with weights, backups and passive health;
    keep-alive pool."""
    policy = {"roundrobin": "Smooth weighted round robin (nginx's default)",
              "leastconn": "Least connections", "hash": "Consistent hashing"}[config.balance]
    balancing, backups_allowed = _nginx_balancing(config, specs)
    lines = [f"# {policy}, over the primaries; the backups take the",
             "# requests only while every primary is down or has failed."] if backups_allowed else [
             f"# {'Consistent hashing' if config.sticky_cookie else policy} (backups: see below)."]
    if all(spec.backup for spec in specs):
        lines += ["# Every upstream is a backup: load_balancer rotates over them as over primaries; nginx",
                  "# needs a primary, so here they are primaries."]
    if len(specs) > 1:
        seconds = max(1, math.ceil(config.fail_timeout))
        lines += [
            f"# --max-fails {config.max_fails} --fail-timeout {format_default(config.fail_timeout)}: "
            "passive health, the upstream out for that long.",
            f"# load_balancer: it counts {config.max_fails} failed requests in a row; nginx counts "
            f"{config.max_fails} failures within",
            f"# {seconds}s, successes between them or not.",
        ]
        if seconds != config.fail_timeout:
            lines.append(f"# load_balancer: fail_timeout is whole seconds in nginx: "
                         f"{format_default(config.fail_timeout)}s became {seconds}s.")
        passive = f" max_fails={config.max_fails} fail_timeout={seconds}s"
    else:
        lines.append("# One upstream: neither load_balancer nor nginx takes it out after failures.")
        passive = ""
    if config.health_interval:
        check = "HTTP GET " + config.health_path if config.health_path else "a TCP connect"
        lines += [
            f"# load_balancer: active health checks ({check} every "
            f"{_export_time(config.health_interval)}, {_export_time(config.health_timeout)} timeout,",
            f"# down after {config.fall} failures, up after {config.rise} passes) are nginx Plus's "
            "health_check;",
            "# open source nginx has none: an upstream is found down by the requests that fail on it.",
        ]
    lines += ["upstream load_balancer {",
              "    # Shared memory: one rotation and one failure count for all worker processes.",
              f"    zone load_balancer {64 + 4 * len(specs)}k;", *balancing]
    every_backup = all(spec.backup for spec in specs)
    for spec in specs:
        weight = f" weight={spec.weight}" if spec.weight != 1 else ""
        backup = " backup" if spec.backup and not every_backup else ""
        default_name = spec.netloc if spec.name == spec.netloc else f"{spec.netloc}:{spec.port}"
        name = "" if spec.name in (spec.netloc, default_name) else f"  # {spec.name}"
        cap = f" max_conns={spec.maxconn}" if spec.maxconn else ""
        line = f"server {_export_server_address(spec, 'nginx')}{weight}{cap}{passive}{backup};{name}"
        lines.append(("    # " if backup and not backups_allowed else "    ") + line)
    if any(spec.maxconn for spec in specs):
        lines += ["    # maxconn=N: max_conns=N. load_balancer queues a request that finds every server at its",
                  f"    # cap for --queue-timeout {format_default(config.queue_timeout)}s; open source nginx answers 502 "
                  "at once (its queue",
                  "    # directive is nginx Plus's). max_conns counts per worker process unless the zone is shared",
                  "    # (it is, above)."]
    for spec in specs:
        if spec.send_proxy:
            option = "send-proxy-v2" if spec.send_proxy == 2 else "send-proxy"
            lines += [f"    # load_balancer: {spec.name} gets a PROXY protocol v{spec.send_proxy} header on each "
                      f"connection ({option});",
                      "    # nginx's http proxy cannot send one (proxy_protocol on is the stream module's)."]
    if any(not _export_is_ip(spec.host) and not spec.unix_path for spec in specs):
        lines += ["    # load_balancer: nginx looks a host name up once, at start (and will not start if",
                  "    # it does not resolve), each address becoming a server of that weight, as in",
                  f"    # load_balancer, which looks it up again every --resolve-interval "
                  f"({format_default(config.resolve_interval)}s; nginx Plus: resolve)."]
    if config.pool_size:
        lines += [
            f"    # --pool-size {config.pool_size} idle connections per upstream and worker; nginx's "
            "keepalive counts per",
            f"    # group and worker: {config.pool_size} x {len(specs)} upstreams.",
            f"    keepalive {config.pool_size * len(specs)};",
        ]
    else:
        lines.append("    # --pool-size 0: no upstream keep-alive (no keepalive directive).")
    lines.append("}")
    return lines


def _nginx_proxy_server(config: Config, specs: tuple) -> list[str]:
    """The server block of the listener: TLS, proxy headers, upstream timeouts, retries, TLS to
    https:// upstreams, and the two locations (plain requests, upgrades)."""
    tls = config.tls_cert is not None
    what = ", with --tls-cert: HTTPS." if tls else "."
    lines = ["server {",
             f"    # --host {config.host} --port {config.port}{what}",
             f"    listen {_nginx_listen(config.host, config.port)}{' ssl' if tls else ''}"
             f"{' proxy_protocol' if config.proxy_protocol_networks else ''};"]
    if config.proxy_protocol_networks:
        lines += [
            f"    # --proxy-protocol-from {config.proxy_protocol_from}: connections begin with a PROXY "
            "header (v1 or v2),",
            "    # whose address is the client's ($remote_addr: logs, X-Forwarded-For).",
            "    # load_balancer: it requires the header only from those addresses and refuses it from",
            "    # others; nginx requires it on every connection to this listener.",
            *[f"    set_real_ip_from {network};" for network in config.proxy_protocol_networks],
            "    real_ip_header proxy_protocol;",
        ]
    if tls:
        lines += [
            "    # TLS 1.2 and 1.3 as load_balancer; the certificate is read again on reload (nginx -s",
            "    # reload, or SIGHUP), as load_balancer reads it again on SIGHUP.",
            f"    ssl_certificate {_nginx_word(config.tls_cert)};",
            f"    ssl_certificate_key {_nginx_word(config.tls_key)};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    schemes = {spec.scheme for spec in specs}
    primary = next((spec for spec in specs if not spec.backup), specs[0])
    scheme = primary.scheme
    lines += [
        "",
        "    # HTTP/1.1 upstream, so that connections are kept alive; Connection and Upgrade only for",
        "    # an upgrade (the maps above).",
        "    proxy_http_version 1.1;",
        "    proxy_set_header Connection $connection_upgrade;",
        "    proxy_set_header Upgrade $lb_upgrade;",
        "    proxy_set_header Host $lb_host;",
        *_export_indent(_nginx_forwarded(config)),
        "    proxy_pass_header Server;",
        "    proxy_pass_header Date;",
    ]
    if config.request_id_key:
        name = config.request_id_header
        lines += [
            "    # The request ID upstream and to the client (in place of one the upstream sent), also",
            "    # on nginx's own error answers.",
            f"    proxy_set_header {name} $lb_request_id;",
            f"    proxy_hide_header {name};",
            f"    add_header {name} $lb_request_id always;",
        ]
    lines += [
        "    # Bodies stream both ways as they arrive (event streams work), as in load_balancer.",
        "    # Remove these two to let nginx buffer: it then frees upstreams from slow clients.",
        "    proxy_buffering off;",
        "    proxy_request_buffering off;",
        "",
        "    # --connect-timeout, and --timeout: the wait for a response head and between reads of a",
        "    # body (and between writes of the request).",
        f"    proxy_connect_timeout {_export_time(config.connect_timeout)};",
        f"    proxy_read_timeout {_export_time(config.timeout)};",
        f"    proxy_send_timeout {_export_time(config.timeout)};",
    ]
    lines += _export_indent(_nginx_retries(config))
    if "https" in schemes:
        lines += [""] + _export_indent(_nginx_upstream_tls(config, specs))
    if len(schemes) > 1:
        other = "http" if scheme == "https" else "https"
        lines += [
            "    # load_balancer: the upstreams mix http:// and https://; nginx's proxy_pass has one",
            f"    # scheme for the group, here {scheme}:// (the first primary's), so requests to the "
            f"{other}:// ones fail.",
        ]
    lines += _export_indent(_nginx_protection(config))
    lines += [
        "",
        "    location / {",
        "        # Upgrades go to @upgrade, whose idle timeout is --tunnel-timeout.",
        "        error_page 418 = @upgrade;",
        "        if ($lb_upgrade) {",
        "            return 418;",
        "        }",
        f"        proxy_pass {scheme}://load_balancer;",
        "    }",
        "",
        f"    # --tunnel-timeout {format_default(config.tunnel_timeout)}: how long an upgraded connection "
        "(WebSocket) may idle;",
        "    # nginx applies it to the wait for the 101 as well (load_balancer: --timeout).",
        "    location @upgrade {",
        f"        proxy_read_timeout {_export_time(config.tunnel_timeout)};",
        f"        proxy_send_timeout {_export_time(config.tunnel_timeout)};",
        f"        send_timeout {_export_time(config.tunnel_timeout)};",
        f"        proxy_pass {scheme}://load_balancer;",
        "    }",
        "",
        "    # No upstream available: load_balancer answers 503 with Retry-After, nginx 502 (\"no live",
        "    # upstreams\" in its error log).",
        "}",
    ]
    return lines


# The rate-limit zone's size: nginx keeps about 16,000 IPv4 addresses a megabyte (8,000 IPv6).
NGINX_RATE_ZONE_MB = max(1, math.ceil(RATE_TABLE_SIZE / 16000))


def _nginx_rate_zone(config: Config) -> list[str]:
    """--rate-limit's shared zone (http context), keyed on the client address; an exempt address
    has an empty key, which limit_req does not count."""
    count, unit = config.rate_limit_spec.split(",")[0].replace(" ", "").split("/")
    lines = [f"# --rate-limit {config.rate_limit_spec}: one bucket per client address in a zone shared by "
             "every worker,",
             f"# {NGINX_RATE_ZONE_MB}m: about {RATE_TABLE_SIZE} addresses, as load_balancer's table, the "
             "least recently seen evicted."]
    key = "$binary_remote_addr"
    exempt = config.access_lists.rate_limit_exempt
    if exempt:
        lines += ["# --rate-limit-exempt: these addresses get an empty key, which limit_req does not count.",
                  "geo $lb_rate_exempt {",
                  "    default 0;",
                  *[f"    {network} 1;" for network in exempt],
                  "}",
                  "map $lb_rate_exempt $lb_rate_key {",
                  "    0 $binary_remote_addr;",
                  "    1 \"\";",
                  "}"]
        key = "$lb_rate_key"
    return lines + [f"limit_req_zone {key} zone=load_balancer_rate:{NGINX_RATE_ZONE_MB}m rate={count}r/{unit};",
                    "limit_req_status 429;"]


def _nginx_access_rules(flags: str, allow: tuple, deny: tuple) -> list[str]:
    """allow/deny directives: nginx takes the first that matches, so the denied ranges come
    first (a deny wins, as in load_balancer), then the allowed ones and "deny all"."""
    if not allow and not deny:
        return []
    return [f"# {flags}: 403 (load_balancer also closes the connection; nginx keeps it open).",
            *[f"deny {network};" for network in deny],
            *[f"allow {network};" for network in allow],
            *(["deny all;"] if allow else [])]


def _nginx_protection(config: Config) -> list[str]:
    """The proxy server's --allow, --deny and --rate-limit."""
    lists = config.access_lists
    lines = _nginx_access_rules("--allow, --deny", lists.allow, lists.deny)
    if config.rate_limit:
        _, burst = parse_rate_limit(config.rate_limit_spec)
        extra = f" burst={burst - 1} nodelay" if burst > 1 else ""
        lines += [
            f"# --rate-limit {config.rate_limit}: 429 above it, for every request of the address. nginx's "
            "burst counts",
            f"# the requests beyond the one the rate lets through, so burst={burst} here is nginx's "
            f"burst={burst - 1}; nodelay",
            "# answers them at once instead of spacing them out. load_balancer: nginx's 429 has no",
            "# Retry-After.",
            f"limit_req zone=load_balancer_rate{extra};",
        ]
    return [""] + lines if lines else []


def _nginx_retries(config: Config) -> list[str]:
    """--retry-on as proxy_next_upstream. nginx's "error" is a failed connect or an upstream that
    closed or reset before its response head; its "timeout" a connect or response-head timeout. It
    never re-sends a non-idempotent request that reached an upstream (without non_idempotent,
    which is never written here), and load_balancer re-sends only idempotent requests without a
    body: nearly the same rule."""
    conditions = set(_export_retry_conditions(config))
    if not conditions:
        # Failed connects and timeouts still count toward max_fails with "off" (checked with 1.22).
        return ["", "# --retry-on none: a failed request is not tried on another upstream.",
                "proxy_next_upstream off;"]
    words = []
    if conditions & {"conn-failure", "empty-response"}:
        words.append("error")
    if conditions & {"conn-failure", "response-timeout"}:
        words.append("timeout")
    lines = ["", f"# --retry-on {config.retry_on}: on to the next upstream, each tried at most",
             "# once (nginx never tries a server twice for one request; proxy_next_upstream_tries is",
             "# left at 0, no other limit)."]
    extra = []
    if "error" in words and "conn-failure" not in conditions:
        extra.append("a failed connect (in \"error\")")
    if "error" in words and "empty-response" not in conditions:
        extra.append("an upstream that closed without answering (in \"error\")")
    if "timeout" in words and "conn-failure" not in conditions:
        extra.append("a connect timeout (in \"timeout\")")
    if "timeout" in words and "response-timeout" not in conditions:
        extra.append("a response-head timeout (in \"timeout\")")
    if extra:
        lines += ["# load_balancer: nginx cannot tell these apart; for idempotent requests it also retries",
                  "# after " + ", and after ".join(extra) + "."]
    lines.append(f"proxy_next_upstream {' '.join(words)};")
    return lines


def _nginx_upstream_tls(config: Config, specs: tuple) -> list[str]:
    """TLS to https:// upstreams: verified against --backend-ca or the system's bundle, with the
    host name as SNI, TLS 1.2 or later (client_tls_context())."""
    names = sorted({spec.host for spec in specs if spec.scheme == "https"})
    first = next(spec.host for spec in specs if spec.scheme == "https")
    ca = config.backend_ca or EXPORT_SYSTEM_CA
    lines = [
        "# https:// upstreams: certificate and host name verified, SNI sent, TLS 1.2 or later.",
        f"# The CA: {'--backend-ca' if config.backend_ca else 'the system bundle (no --backend-ca)'}; "
        "chains as deep as OpenSSL's default allows.",
        "proxy_ssl_verify on;",
        "proxy_ssl_verify_depth 100;",
        f"proxy_ssl_trusted_certificate {_nginx_word(ca)};",
        "proxy_ssl_server_name on;",
        "proxy_ssl_protocols TLSv1.2 TLSv1.3;",
    ]
    if len(names) > 1:
        lines += ["# load_balancer: it checks each upstream's certificate against that upstream's name;",
                  f"# nginx checks (and sends as SNI) one name per location: {first} for all of them."]
    if _export_is_ip(first):
        lines += ["# load_balancer: an upstream addressed by IP: nginx (like Python) sends no SNI, but it",
                  "# matches the IP against the certificate's DNS names and CN (X509_check_host) where",
                  "# Python matches its IP addresses: verification fails unless the IP is also a DNS name."]
    lines.append(f"proxy_ssl_name {_nginx_word(first)};")
    return lines


def _nginx_redirect_server(config: Config) -> list[str]:
    """--redirect-http-port: a plain-HTTP server answering 308 to the same URL on https."""
    port = "" if config.port == 443 else f":{config.port}"
    return [
        f"# --redirect-http-port {config.redirect_http_port}: 308 to the same URL on https (keeps the "
        "method).",
        "server {",
        f"    listen {_nginx_listen(config.host, config.redirect_http_port)};",
        f"    return 308 https://$host{port}$request_uri;",
        "}",
    ]


def _nginx_admin_server(config: Config) -> list[str]:
    """--admin-port: nginx's stub_status, the only status open source nginx serves."""
    return [
        f"# --admin-host {config.admin_host} --admin-port {config.admin_port}: connection counters at "
        "/status (stub_status).",
        "# load_balancer: its dashboard (/), /status (JSON, per upstream), /metrics (Prometheus) and",
        "# POST /backends/<name>/drain|maint|ready have no open source nginx equivalent (nginx Plus",
        "# has its api module; nginx-prometheus-exporter turns stub_status into metrics). To take an",
        "# upstream out, mark its server line \"down\" and reload.",
        "server {",
        f"    listen {_nginx_listen(config.admin_host, config.admin_port)};",
        "    access_log off;",
        *_export_indent(_nginx_access_rules("--admin-allow", config.access_lists.admin_allow, ())),
        "    location = /status {",
        "        stub_status;",
        "    }",
        "    location / {",
        "        return 404 \"404 Not Found: try /status\\n\";",
        "    }",
        "}",
    ]


# ---------------------------------------------------------------------------------------------------
# HAProxy
# ---------------------------------------------------------------------------------------------------
# Written for HAProxy 2.4 or later (http-check send, .if blocks), checked against 2.6. "balance
# roundrobin" is weighted round robin over the servers that are up: the same counts in every cycle
# as smooth_weighted_cycle(), in another order (3,1,1: a a b a c, where load_balancer and nginx
# give a b a c a). The backups ("option allbackups": all of them, in rotation) take over when no
# primary is up. Nearly everything load_balancer does has a HAProxy directive; the rest is said in
# the file.

def export_haproxy(config: Config) -> str:
    """The haproxy.cfg that reproduces `config` (``--export haproxy``, through export_config()).
    Written for ``haproxy -db -f FILE`` (foreground): no daemon, chroot or user, logs on stdout,
    no stats socket."""
    specs = config.backend_specs
    names = _haproxy_server_names(specs)
    lines = _export_preamble(config, "haproxy", "haproxy.cfg", "haproxy -db -f FILE", "haproxy -c -f FILE")
    lines += _haproxy_global(config)
    lines += [""] + _haproxy_defaults(config, specs)
    lines += [""] + _haproxy_frontend(config)
    lines += [""] + _haproxy_backend(config, specs, names)
    if config.redirect_http_port is not None:
        lines += [""] + _haproxy_redirect(config)
    if config.admin_port is not None:
        lines += [""] + _haproxy_admin(config)
    lines.append("")
    return "\n".join(lines)


def _haproxy_bind(host: str, port: int) -> str:
    """A bind line's address; "::" takes IPv4 too, as load_balancer's socket does (v4v6)."""
    host = host.strip("[]")
    return _export_address(host, port) + (" v4v6" if host == "::" else "")


def _haproxy_word(value: str) -> str:
    """A config argument, quoted when needed: single quotes (no escapes, no ${ENV} expansion), or
    double quotes with backslashes when the value holds a single quote."""
    if re.fullmatch(r"[^\s\"'\\#$]+", value):
        return value
    if "'" not in value:
        return f"'{value}'"
    return '"' + re.sub(r'(["\\$#])', r"\\\1", value) + '"'


def _haproxy_server_names(specs: tuple) -> list[str]:
    """HAProxy server names: load_balancer's names with what HAProxy refuses (anything but
    A-Z a-z 0-9 . _ : -, such as an IPv6 address's brackets) as "_", made unique."""
    names: list[str] = []
    for spec in specs:
        name = re.sub(r"[^A-Za-z0-9._:-]", "_", spec.name)
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}_{n}", n + 1
        names.append(candidate)
    return names


# --log-level -> the syslog level of the stdout logger. Access log lines are sent at "info".
HAPROXY_LOG_LEVELS = {"debug": "debug", "info": "notice", "warning": "warning", "error": "err"}


def _haproxy_global(config: Config) -> list[str]:
    """The global section: threads, connections, the drain, buffers, logs."""
    level = "info" if config.access_log else HAPROXY_LOG_LEVELS[config.log_level]
    total = config.max_connections * config.workers
    head = config.max_head_size
    lines = [
        "global",
        "    # Log lines on stdout (load_balancer writes them to stderr); HAProxy's start-up warnings",
        "    # go to stderr.",
        f"    log stdout format raw local0 {level}",
        f"    # --workers {config.workers}: threads of one process, sharing one rotation and one health "
        "state as",
        "    # load_balancer's workers share theirs.",
        f"    nbthread {config.workers}",
        f"    # --max-connections {config.max_connections} per worker. At the limit HAProxy stops "
        "accepting (the",
        "    # kernel queues); load_balancer closes the longest-idle keep-alive connection, or answers 503.",
        f"    maxconn {total}",
        "    # --drain-timeout: after SIGUSR1 (HAProxy's soft stop; SIGTERM stops at once, where",
        "    # load_balancer drains on SIGTERM, SIGINT and SIGQUIT) requests in flight get this long.",
        f"    hard-stop-after {_export_time(config.drain_timeout)}",
        f"    # --max-headers {config.max_headers} fields (HAProxy counts the start line too, and applies "
        "the limit",
        "    # to responses as well: 502 above it).",
        f"    tune.http.maxhdr {config.max_headers + 1}",
    ]
    if config.tls_cert is not None and _haproxy_certificate(config)[1]:
        lines += ["    # --tls-key is the --tls-cert .crt's .key: HAProxy looks there with this.",
                  "    ssl-load-extra-del-ext"]
    if head + HAPROXY_MAXREWRITE > HAPROXY_DEFAULT_BUFSIZE:
        size = math.ceil((head + HAPROXY_MAXREWRITE) / 1024) * 1024
        lines += [
            f"    # --max-request-line {config.max_request_line} + --max-header-size "
            f"{config.max_header_size}: a request head must fit",
            f"    # in a buffer less tune.maxrewrite ({HAPROXY_MAXREWRITE}); the default buffer, "
            f"{HAPROXY_DEFAULT_BUFSIZE}, would refuse",
            "    # heads load_balancer accepts. Each connection holds two: lower the limits to keep it.",
            f"    tune.bufsize {size}",
        ]
    else:
        lines += [f"    # load_balancer: --max-request-line and --max-header-size are below HAProxy's "
                  f"{HAPROXY_DEFAULT_BUFSIZE}-byte",
                  "    # buffer, the only bound it has: it refuses only heads that do not fit in one (400)."]
    lines += [
        f"    # load_balancer: --max-request-line {config.max_request_line} and --max-field-size "
        f"{config.max_field_size} bound single lines;",
        "    # HAProxy bounds only the whole head (tune.bufsize).",
    ]
    return lines


def _haproxy_defaults(config: Config, specs: tuple) -> list[str]:
    """The defaults section: timeouts, keep-alive, X-Forwarded-For, retries."""
    lines = [
        "defaults",
        "    mode http",
        "    log global",
        "    # --connect-timeout; --timeout: the wait for a response head and between reads.",
        f"    timeout connect {_export_time(config.connect_timeout)}",
        f"    timeout server {_export_time(config.timeout)}",
        "    # --header-timeout: a whole request head, from a new connection's accept.",
        "    # load_balancer: it also bounds the TLS handshake; in HAProxy that is timeout client.",
        f"    timeout http-request {_export_time(config.header_timeout)}",
        "    # --idle-timeout: a keep-alive connection between requests, a stalled body or write.",
        f"    timeout http-keep-alive {_export_time(config.idle_timeout)}",
        f"    timeout client {_export_time(config.idle_timeout)}",
        "    # --tunnel-timeout: an upgraded connection (WebSocket) idle; HAProxy tunnels upgrades itself.",
        f"    timeout tunnel {_export_time(config.tunnel_timeout)}",
        "    # --queue-timeout: a request waits this long for a server below its maxconn, then 503.",
        f"    timeout queue {_export_time(config.queue_timeout)}",
        "    # Connections kept alive on both sides.",
        "    option http-keep-alive",
        "    # Bytes pass on as they arrive, as load_balancer passes them: without this HAProxy holds",
        "    # a piece of a body it expects more of (MSG_MORE) for up to 200 ms, so every Server-Sent",
        "    # Event would arrive that late. It costs bulk throughput (more, smaller sends): remove it",
        "    # if no response streams.",
        "    option http-no-delay",
    ]
    if config.pool_size:
        lines += ["    # --pool-size: idle upstream connections reused (pool-max-conn per server below).",
                  "    http-reuse safe"]
    else:
        lines += ["    # --pool-size 0: no upstream connection is reused.", "    http-reuse never"]
    conditions = _export_retry_conditions(config)
    if conditions:
        lines += [
            f"    # --retry-on {config.retry_on}: on to the next upstream, each tried at most once",
            "    # (redispatch on every retry; without it HAProxy retries the same server).",
            f"    retry-on {' '.join(conditions)}",
            f"    retries {len(specs) - 1}",
            "    option redispatch 1",
        ]
    else:
        lines += ["    # --retry-on none: a failed request is not tried on another upstream.",
                  "    retry-on none", "    retries 0"]
    return lines


def _haproxy_frontend(config: Config) -> list[str]:
    """The listener: bind (TLS), connection limit, request limits, X-Forwarded-*, access log."""
    tls = config.tls_cert is not None
    bind = _haproxy_bind(config.host, config.port)
    lines = ["frontend load_balancer"]
    if tls:
        crt, _, notes = _haproxy_certificate(config)
        lines += notes
        bind += f" ssl crt {_haproxy_word(crt)} ssl-min-ver TLSv1.2 alpn http/1.1"
    what = ", with --tls-cert: HTTPS." if tls else "."
    lines += [f"    # --host {config.host} --port {config.port}{what}",
              f"    bind {bind}",
              *_haproxy_accept_proxy(config),
              f"    maxconn {config.max_connections * config.workers}"]
    lines += _haproxy_access_log(config)
    lines += _haproxy_forwarded(config)
    lines += _haproxy_protection(config)
    lines += [
        "    # Upgrades (WebSocket) are tunnelled by HAProxy itself; h2c never (load_balancer refuses",
        "    # it: an h2c upgrade through a proxy smuggles requests), so its Upgrade field goes.",
        "    # load_balancer: HAProxy also checks a WebSocket handshake (Sec-WebSocket-Key, -Accept)",
        "    # and refuses one without them (400, 502), which load_balancer tunnels as it is.",
        "    http-request del-header Upgrade if { req.hdr(upgrade),lower -m sub h2c }",
    ]
    lines += _haproxy_request_id(config)
    host_header, notes = _export_host_header(config.backend_specs)
    lines += ["    # Host goes upstream as the client sent it; without one, the upstream's host[:port]."]
    lines += ["    " + note for note in notes]
    lines.append(f"    http-request set-header Host {_haproxy_word(host_header)} "
                 "if !{ req.hdr(host) -m found }")
    if config.max_body_size:
        lines += [
            f"    # --max-body-size {config.max_body_size}: 413 above, for a body with Content-Length.",
            "    # load_balancer: a chunked body is counted as it arrives and cut at the limit; HAProxy",
            "    # could only by buffering it whole (option http-buffer-request), so it is not limited.",
            "    http-request deny deny_status 413 if "
            f"{{ req.hdr_val(content-length) gt {config.max_body_size} }}",
        ]
    lines.append("    default_backend upstreams")
    return lines


def _haproxy_accept_proxy(config: Config) -> list[str]:
    """--proxy-protocol-from: the PROXY header (v1 or v2) expected from those sources only."""
    if not config.proxy_protocol_networks:
        return []
    networks = " ".join(str(network) for network in config.proxy_protocol_networks)
    return [
        f"    # --proxy-protocol-from {config.proxy_protocol_from}: a PROXY header (v1 or v2) from these "
        "sources,",
        "    # read before TLS; its address is the client's (src: logs, X-Forwarded-For).",
        f"    tcp-request connection expect-proxy layer4 if {{ src {networks} }}",
    ]


def _haproxy_forwarded(config: Config) -> list[str]:
    """X-Forwarded-* and Forwarded toward the upstream (headers_for_upstream): a client's own
    replaced; with --trusted-proxies, a trusted peer's kept and its X-Forwarded-For extended."""
    proto = "https" if config.tls_cert is not None else "http"
    if not config.trusted_networks:
        return [
            "    # X-Forwarded-For, -Host and -Proto set here, a client's own replaced or removed (no",
            "    # --trusted-proxies: nobody's list is extended); Forwarded removed.",
            "    http-request set-header X-Forwarded-For %[src]",
            f"    http-request set-header X-Forwarded-Proto {proto}",
            "    http-request del-header X-Forwarded-Host",
            "    http-request set-header X-Forwarded-Host %[req.hdr(host)] if { req.hdr(host) -m found }",
            "    http-request del-header Forwarded",
        ]
    networks = " ".join(str(network) for network in config.trusted_networks)
    return [
        f"    # --trusted-proxies {config.trusted_proxies}: from these peers X-Forwarded-For, -Host, "
        "-Proto and",
        "    # Forwarded are kept, X-Forwarded-For extended by the peer's address on one line (several",
        "    # lines: a line of its own after them, the same list by RFC 9110 section 5.3). From anyone",
        "    # else they are replaced or removed. (In this order: each rule sees what the one before left.)",
        f"    acl lb_trusted_peer src {networks}",
        "    http-request set-header X-Forwarded-For %[src] if !lb_trusted_peer",
        "    http-request add-header X-Forwarded-For %[src] if lb_trusted_peer { req.fhdr_cnt(x-forwarded-for) gt 1 }",
        "    http-request set-header X-Forwarded-For \"%[req.fhdr(x-forwarded-for)], %[src]\" "
        "if lb_trusted_peer { req.fhdr_cnt(x-forwarded-for) eq 1 }",
        "    http-request set-header X-Forwarded-For %[src] if { req.fhdr_cnt(x-forwarded-for) eq 0 }",
        "    http-request del-header X-Forwarded-Host if !lb_trusted_peer",
        "    http-request del-header X-Forwarded-Proto if !lb_trusted_peer",
        "    http-request del-header Forwarded if !lb_trusted_peer",
        "    http-request set-header X-Forwarded-Host %[req.hdr(host)] if { req.hdr(host) -m found } "
        "!{ req.hdr(x-forwarded-host) -m found }",
        f"    http-request set-header X-Forwarded-Proto {proto} if !{{ req.hdr(x-forwarded-proto) -m found }}",
        "    # The client address (logs) behind a trusted peer: the address before the peer's own.",
        "    # load_balancer: it walks the list from the right past every trusted address (nginx's",
        "    # real_ip_recursive); HAProxy 2.6 takes one hop.",
        "    http-request set-src req.hdr_ip(x-forwarded-for,-2) if lb_trusted_peer "
        "{ req.hdr_ip(x-forwarded-for,-2) -m found }",
    ]


def _haproxy_request_id(config: Config) -> list[str]:
    """--request-id-header: the client's ID when it is one valid field, else a UUID's 32 hex
    digits; upstream, on every response (HAProxy's own errors too), and in the log (txn var)."""
    if not config.request_id_key:
        return ["    # --request-id-header '': no request ID."]
    name, key = config.request_id_header, config.request_id_key.decode()
    return [
        f"    # --request-id-header {name}: the client's ID when it is one field of 1-200 visible ASCII",
        "    # characters, else 32 random hex digits (a UUID without its dashes); upstream and back.",
        f"    http-request set-var(txn.lb_request_id) req.fhdr({key}) if {{ req.fhdr_cnt({key}) eq 1 }} "
        f"{{ req.fhdr({key}) -m reg '^[!-~]{{1,{MAX_REQUEST_ID}}}$' }}",
        "    http-request set-var(txn.lb_request_id) uuid,regsub(-,,g) unless { var(txn.lb_request_id) -m found }",
        f"    http-request set-header {name} %[var(txn.lb_request_id)]",
        f"    http-after-response set-header {name} %[var(txn.lb_request_id)] if {{ var(txn.lb_request_id) -m found }}",
    ]


def _haproxy_acl(name: str, networks: tuple) -> list[str]:
    """`acl NAME src ...` over as many lines as it takes (HAProxy reads at most 64 words a line;
    lines of one name add up)."""
    return [f"    acl {name} src {' '.join(map(str, networks[start:start + 32]))}"
            for start in range(0, len(networks), 32)]


def _haproxy_protection(config: Config) -> list[str]:
    """The frontend's --allow and --deny (acl src + http-request deny) and --rate-limit (a
    stick-table of request rates by address + http-request deny deny_status 429)."""
    lists, lines = config.access_lists, []
    if lists.allow or lists.deny:
        lines.append("    # --allow, --deny: 403 (HAProxy's deny keeps the connection; load_balancer closes it).")
        lines += _haproxy_acl("lb_denied", lists.deny) + _haproxy_acl("lb_allowed", lists.allow)
        refused = " || ".join(filter(None, ("lb_denied" if lists.deny else "",
                                            "!lb_allowed" if lists.allow else "")))
        lines.append(f"    http-request deny deny_status 403 if {refused}")
    if config.rate_limit:
        interval_us, burst = parse_rate_limit(config.rate_limit_spec)
        window = burst * interval_us / 1e6
        lines += [
            f"    # --rate-limit {config.rate_limit}: load_balancer's token bucket lets {burst} request(s) "
            "through at once,",
            f"    # then one every {_export_time(interval_us / 1e6)}; HAProxy counts requests in a sliding "
            f"window: at most {burst} per",
            f"    # {_export_time(window)}, the same rate and burst. load_balancer: HAProxy counts the "
            "refused requests",
            "    # too, so a client that keeps hammering stays refused; load_balancer lets the next one "
            "through on time.",
            f"    stick-table type ipv6 size {RATE_TABLE_SIZE} expire {_export_time(max(window, 1.0) * 2)} "
            f"store http_req_rate({_export_time(window)})",
        ]
        if lists.rate_limit_exempt:
            lines += ["    # --rate-limit-exempt: not tracked, so never limited."]
            lines += _haproxy_acl("lb_rate_exempt", lists.rate_limit_exempt)
            lines.append("    http-request track-sc0 src unless lb_rate_exempt")
        else:
            lines.append("    http-request track-sc0 src")
        lines.append(f"    http-request deny deny_status 429 hdr Retry-After {math.ceil(interval_us / 1e6)} "
                     f"if {{ sc_http_req_rate(0) gt {burst} }}")
    return lines


def _haproxy_certificate(config: Config) -> tuple[str, bool, list[str]]:
    """The crt of the TLS bind line: (file, needs ssl-load-extra-del-ext, comment lines). HAProxy
    2.2 to 2.9 read a certificate's key from the same PEM file or from the file next to it, FILE.key
    (with ssl-load-extra-del-ext: a .crt's .key); naming any key file takes 3.0's crt-store
    ("load crt FILE key KEY"), avoided so that the file works on 2.4 and later."""
    cert, key = config.tls_cert, config.tls_key
    if key == cert:
        return cert, False, ["    # --tls-cert and --tls-key are one PEM file."]
    if key == cert + ".key":
        return cert, False, ["    # The key is FILE.key, where HAProxy looks for it."]
    if cert.endswith(".crt") and key == cert[:-4] + ".key":
        return cert, True, ["    # The key is the .crt's .key, found with ssl-load-extra-del-ext (global)."]
    certbot = re.fullmatch(r"/etc/letsencrypt/live/([^/]+)/[^/]+", cert)
    if certbot and os.path.dirname(key) == os.path.dirname(cert):
        # Not into certbot's live/ folder, which certbot owns: where the deploy hook writes it.
        combined = f"/etc/haproxy/certs/{certbot.group(1)}.pem"
        return combined, False, [
            "    # load_balancer: HAProxy reads the key from the certificate's PEM file; certbot writes",
            "    # two. examples/certbot-deploy-haproxy.sh, as a certbot deploy hook, writes them as",
            f"    # {combined} after each renewal and reloads HAProxy (see the README).",
        ]
    combined = cert + ".haproxy.pem"
    return combined, False, [
        "    # load_balancer: HAProxy reads the key from the certificate's PEM file or from FILE.key",
        "    # beside it (a crt-store, HAProxy 3.0+, can name any key file); make one PEM file, and",
        "    # again after each renewal (a certbot deploy hook: see the README):",
        f"    #   cat {_export_shell_word(cert)} {_export_shell_word(key)} "
        f"> {_export_shell_word(combined)}",
    ]


def _haproxy_access_log(config: Config) -> list[str]:
    """--access-log and --access-log-format as a log-format of the same fields."""
    if not config.access_log:
        return ["    # --access-log is off: no line per request (server state changes are still logged).",
                "    no log"]
    style = config.access_log_format
    formats = {
        "short": "'%ci \"%r\" %ST %b/%s %Tt'",
        "common": "'%ci - - [%trl] \"%r\" %ST %B'",
        "combined": "'%ci - - [%trl] \"%r\" %ST %B "
                    "\"%[capture.req.hdr(0)]\" \"%[capture.req.hdr(1)]\"'",
        "json": "'{\"time\":\"%[date,utime(%Y-%m-%dT%H:%M:%SZ)]\",\"client\":\"%ci\",\"method\":\"%HM\","
                "\"target\":\"%[capture.req.uri,json(utf8s)]\",\"version\":\"%HV\",\"status\":%ST,"
                "\"upstream\":\"%s\",\"upstream_address\":\"%si:%sp\",\"upstream_status\":%ST,"
                "\"duration_ms\":%Tt,\"bytes_sent\":%B,\"bytes_received\":%U,"
                "\"user_agent\":\"%[capture.req.hdr(1),json(utf8s)]\","
                "\"referer\":\"%[capture.req.hdr(0),json(utf8s)]\"}'",
    }
    if config.request_id_key:  # the request ID ends each line (json: request_id, after time)
        formats = {name: (text.replace('","client"', '","request_id":"%[var(txn.lb_request_id),json(utf8s)]","client"', 1)
                          if name == "json" else text[:-1] + " %[var(txn.lb_request_id)]'")
                   for name, text in formats.items()}
    notes = {
        "short": ["    # load_balancer: the upstream is backend/server (its URL in load_balancer's log), the",
                  "    # duration whole milliseconds without \"ms\"."],
        "common": [],
        "combined": [],
        "json": ["    # load_balancer: HAProxy writes \"-\" or <NOSRV> where load_balancer writes null, and",
                 "    # the time to the second."],
    }[style]
    lines = [f"    # --access-log, --access-log-format {style}, on stdout."] + notes
    if config.access_log != "-":
        lines += ["    # load_balancer: HAProxy writes its log to syslog or standard output, never to a file",
                  f"    # itself: have a syslog daemon write it to {config.access_log}."]
    if style in ("combined", "json"):
        lines += ["    capture request header Referer len 1024",
                  "    capture request header User-Agent len 1024"]
    return lines + [f"    log-format {formats[style]}"]


# --hash-key -> HAProxy's balance algorithm. "uri whole": with the query, as load_balancer hashes it.
HAPROXY_HASH_KEYS = {"client-ip": "source", "uri": "uri whole"}


def _haproxy_balancing(config: Config, names: list[str]) -> tuple[list[str], list[str]]:
    """The backend's balance, hash-type and cookie lines, and each server's cookie option."""
    lines = []
    if config.balance == "leastconn":
        lines += ["    # --balance leastconn: the fewest connections for its weight, ties in round robin.",
                  "    balance leastconn"]
    elif config.balance == "hash":
        kind, _, name = config.hash_key.partition(":")
        algorithm = {"header": f"hdr({name})", "cookie": f"hash req.cook({name})"}.get(
            kind, HAPROXY_HASH_KEYS.get(config.hash_key))
        lines += [f"    # --balance hash --hash-key {config.hash_key}: consistent hashing, points by weight; a",
                  "    # request without the key goes round robin, in both."]
        if kind == "cookie":
            lines.append("    # (balance hash <expression>: HAProxy 2.6 or later.)")
        lines += [f"    balance {algorithm}", "    hash-type consistent"]
    else:
        lines += ["    # Weighted round robin.", "    balance roundrobin"]
    lines += ["    # The backups, all of them in rotation, when no primary is up.", "    option allbackups"]
    cookies = [""] * len(names)
    if config.sticky_cookie:
        attributes = "nocache httponly" + (" secure" if config.tls_cert else "")
        lines += [
            f"    # --sticky-cookie {config.sticky_cookie}: a response to a client without a valid one sets it, "
            "and it is",
            "    # not passed on to the servers (indirect); a client whose server is down or in",
            "    # maintenance is balanced anew, one whose server drains stays. nocache: HAProxy also",
            "    # marks such a response Cache-Control: private.",
            "    # load_balancer: its values are an HMAC of the upstream's name under --sticky-key, which",
            "    # nobody can choose; here they are written below (by position), and a client may choose.",
            f"    cookie {_haproxy_word(config.sticky_cookie)} insert indirect {attributes} attr SameSite=Lax",
        ]
        cookies = [f" cookie s{index}" for index in range(1, len(names) + 1)]
    return lines, cookies


def _haproxy_backend(config: Config, specs: tuple, names: list[str]) -> list[str]:
    """The upstreams: balancing, backups, retry safety, health, keep-alive pool, TLS."""
    balancing, cookies = _haproxy_balancing(config, names)
    lines = ["backend upstreams", *balancing]
    if any(spec.backup for spec in specs) and not all(spec.backup for spec in specs):
        lines += ["    # load_balancer: a request that every primary failed goes on to a backup at once;",
                  "    # HAProxy turns to the backups only when the primaries are marked down (health",
                  "    # checks), and answers 503 until then."]
    if set(_export_retry_conditions(config)) & {"empty-response", "response-timeout"}:
        lines += [
            "    # A request that reached an upstream is re-sent only if idempotent and without a body",
            "    # (load_balancer's rule; HAProxy itself would re-send a POST).",
            "    http-request disable-l7-retry unless { method GET HEAD OPTIONS TRACE PUT DELETE } "
            "!{ req.hdr(transfer-encoding) -m found } !{ req.hdr_val(content-length) gt 0 }",
        ]
    options = []
    if config.health_interval:
        lines += _haproxy_checks(config, specs, names)
        options.append(f"check inter {_export_time(config.health_interval)} "
                       f"rise {config.rise} fall {config.fall}")
    else:
        lines.append("    # --health-interval 0: no active health checks.")
    if len(specs) > 1 and config.health_interval:
        lines += [
            f"    # --max-fails {config.max_fails}: passive health, that many failed connects in a row "
            "mark a server",
            "    # down (layer4: connects; layer7 would also count 5xx answers, which load_balancer passes",
            "    # on as answers).",
            "    # load_balancer: it also counts timeouts and upstreams that closed without answering,",
            f"    # and puts the upstream back after --fail-timeout {format_default(config.fail_timeout)}; "
            f"HAProxy when {config.rise} health checks",
            "    # have passed (there is no timed ejection).",
        ]
        options.append(f"observe layer4 error-limit {config.max_fails} on-error mark-down")
    elif len(specs) > 1:
        lines += [
            f"    # load_balancer: --max-fails {config.max_fails} --fail-timeout "
            f"{format_default(config.fail_timeout)} (passive health) needs",
            "    # active checks in HAProxy (observe ... on-error mark-down works with check): without",
            "    # them failed requests take no upstream out.",
        ]
    if config.pool_size:
        lines.append(f"    # --pool-size {config.pool_size}: idle connections kept per server.")
        options.append(f"pool-max-conn {config.pool_size}")
    if config.slow_start:
        lines += [f"    # --slow-start {format_default(config.slow_start)}: a server that comes back ramps up "
                  "over that time (HAProxy from",
                  "    # near 0, load_balancer from a tenth of its weight; HAProxy's hash-type map-based would",
                  "    # ignore it, consistent does not)."]
        if not config.health_interval:
            lines.append("    # load_balancer: HAProxy starts a ramp only after a check saw the server fail.")
        options.append(f"slowstart {_export_time(config.slow_start)}")
    if options:
        lines.append("    default-server " + " ".join(options))
    https = [spec for spec in specs if spec.scheme == "https"]
    ca = config.backend_ca or EXPORT_SYSTEM_CA
    if https:
        lines += [
            "    # https:// upstreams: certificate and host name verified, the host as SNI, TLS 1.2 or",
            f"    # later, ALPN http/1.1. CA: {'--backend-ca' if config.backend_ca else 'the system bundle'} "
            "(HAProxy 2.6 also reads ca-file @system-ca).",
        ]
        if any(_export_is_ip(spec.host) for spec in https):
            lines += ["    # load_balancer: an https:// upstream addressed by IP: HAProxy matches the IP",
                      "    # against the certificate's DNS names, where Python matches its IP addresses."]
    for spec, name, cookie in zip(specs, names, cookies):
        words = [f"    server {name} {_export_server_address(spec, 'haproxy')}{cookie}"]
        if spec.weight != 1:
            words.append(f"weight {spec.weight}")
        if spec.backup:
            words.append("backup")
        if spec.maxconn:
            words.append(f"maxconn {spec.maxconn}")
        if spec.send_proxy:  # on health checks too (HAProxy's default); such connections are private
            words.append("send-proxy-v2" if spec.send_proxy == 2 else "send-proxy")
        if spec.scheme == "https":
            words.append(f"ssl verify required ca-file {_haproxy_word(ca)} sni str({spec.host}) "
                         "ssl-min-ver TLSv1.2 alpn http/1.1")
            if config.health_interval:
                words.append(f"check-sni {spec.host}")
        lines.append(" ".join(words) + (f"  # {spec.name}" if name != spec.name else ""))
    if any(not _export_is_ip(spec.host) and not spec.unix_path for spec in specs):
        lines += ["    # load_balancer: a host name is looked up once, when HAProxy starts, its first address",
                  "    # used (a resolvers section and server-template would follow changes); load_balancer",
                  "    # makes each address an upstream and looks the name up again every --resolve-interval",
                  f"    # ({format_default(config.resolve_interval)}s)."]
    return lines


def _haproxy_checks(config: Config, specs: tuple, names: list[str]) -> list[str]:
    """Active health checks: a TCP connect (TLS handshake for https://) without --health-path, a
    GET of it with 2xx or 3xx expected with one (HealthChecker.probe())."""
    lines = [
        f"    # Active health checks every {_export_time(config.health_interval)}: down after "
        f"{config.fall} failures in a row, up after {config.rise}",
        f"    # passes. --health-timeout {format_default(config.health_timeout)}: the answer within "
        "timeout check (the connect",
        "    # within the shorter of timeout connect and inter).",
        f"    timeout check {_export_time(config.health_timeout)}",
    ]
    if config.health_path is None:
        return lines + ["    # Without --health-path: a TCP connect (and TLS handshake for https://)."]
    # The Host of a check is the upstream's host[:port]: one value for all of them, or the
    # server's name when every name is its host:port.
    netlocs = {spec.netloc for spec in specs}
    if len(netlocs) == 1:
        host = _haproxy_word(next(iter(netlocs)))
    elif all(name == spec.name and spec.name in (spec.netloc, f"{spec.netloc}:{spec.port}")
             for spec, name in zip(specs, names)):
        host = "%[srv_name]"
    else:
        host = _haproxy_word(specs[0].netloc)
        lines += [f"    # load_balancer: checks send Host: {specs[0].netloc} to every upstream, its own "
                  "host:port in",
                  "    # load_balancer: HAProxy has one check request per backend."]
    agent = _haproxy_word(f"load_balancer/{__version__} health-check")
    return lines + [
        "    # --health-path: GET it, 2xx or 3xx passes.",
        "    option httpchk",
        f"    http-check send meth GET uri {_haproxy_word(config.health_path)} ver HTTP/1.1 hdr Host {host} "
        f"hdr User-Agent {agent}",
        "    http-check expect status 200-399",
    ]


def _haproxy_redirect(config: Config) -> list[str]:
    """--redirect-http-port: a plain-HTTP frontend answering 308 to the same URL on https."""
    port = "" if config.port == 443 else f":{config.port}"
    return [
        f"# --redirect-http-port {config.redirect_http_port}: 308 to the same URL on https (keeps the "
        "method).",
        "frontend redirect",
        f"    bind {_haproxy_bind(config.host, config.redirect_http_port)}",
        "    no log",
        "    http-request redirect code 308 location "
        f"https://%[req.hdr(host),regsub(:[0-9]+$,)]{port}%[capture.req.uri]",
    ]


def _haproxy_admin(config: Config) -> list[str]:
    """--admin-port: HAProxy's stats page (with its admin form) and its Prometheus exporter."""
    lines = [
        f"# --admin-host {config.admin_host} --admin-port {config.admin_port}: the stats page at / "
        "(HTML; /;json and /;csv",
        "# for machines), Prometheus metrics at /metrics when HAProxy is built with its exporter",
        "# (haproxy -vv lists +PROMEX; Debian's, Ubuntu's and the official images are).",
        "# load_balancer: /status's JSON and POST /backends/<name>/drain|maint|ready take other",
        "# shapes here: the stats page's admin form (below), or the runtime API (set server",
        "# upstreams/NAME state drain|maint|ready) on a stats socket.",
        "frontend admin",
        f"    bind {_haproxy_bind(config.admin_host, config.admin_port)}",
        "    no log",
    ]
    if config.access_lists.admin_allow:
        lines += ["    # --admin-allow: only these addresses (403 for others)."]
        lines += _haproxy_acl("lb_admin_allowed", config.access_lists.admin_allow)
        lines += ["    http-request deny deny_status 403 if !lb_admin_allowed"]
    lines += [
        ".if feature(PROMEX)",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        ".endif",
        "    # Admin actions refused from another origin, as load_balancer refuses them.",
        "    http-request deny deny_status 403 if METH_POST "
        "{ req.hdr(sec-fetch-site) -m str cross-site same-site }",
        "    http-request set-var(txn.lb_host) req.hdr(host)",
        "    http-request set-var(txn.lb_origin) str(http://),concat(,txn.lb_host,)",
        "    http-request deny deny_status 403 if METH_POST { req.hdr(origin) -m found } "
        "!{ req.hdr(origin),strcmp(txn.lb_origin) eq 0 }",
        "    stats enable",
        "    stats uri /",
        "    stats refresh 5s",
    ]
    if config.admin_token:
        bearer = _haproxy_word("Bearer " + config.admin_token)
        lines += ["    # --admin-token: the admin form works only with Authorization: Bearer <token> (the",
                  "    # token is in this file: keep it private).",
                  f"    stats admin if {{ req.hdr(authorization) -m str {bearer} }}"]
    else:
        lines += ["    stats admin if TRUE"]
    return lines


# ===================================================================================================
# Command line
# ===================================================================================================

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage block: a wrong flag should be easy to read."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def program_name() -> str:
    """The name the program was run as, for its usage and error lines: ``load-balancer`` (the
    installed command), ``load_balancer.py``, ``python3 -m load_balancer``; ``load_balancer``
    where there is none (``python3 -c``, an embedding program)."""
    if __name__ == "__main__" and __spec__ is not None:  # python3 -m load_balancer
        return f"{os.path.basename(sys.executable) or 'python3'} -m {__spec__.name}"
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name != "-c" else "load_balancer"


def build_parser() -> ArgumentParser:
    """The command line, built from the Config fields: a flag per setting, in its group."""
    p = ArgumentParser(prog=program_name(), description="Round-robin HTTP/1.1 load balancer "
                       "(one file, standard library only).")
    groups: dict = {}
    for item in Config.settings():
        meta = item.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], p if meta["group"] == "general" else p.add_argument_group(meta["group"]))
        options = {"dest": item.name, "help": meta["help"]}
        if meta["type"] is bool:
            options["action"] = "store_true"
        else:
            if meta["const"] is not None:
                options.update(nargs="?", const=meta["const"])
            options.update(type=meta["type"] or str, metavar=meta["metavar"],
                           choices=meta["choices"], default=item.default)
            if meta["choices"]:
                options["type"] = str.lower
            if isinstance(item.default, tuple):  # repeatable: a tuple of the values given
                options.update(action="append", default=argparse.SUPPRESS, type=str)
            elif item.default is not None:
                options["help"] += f" (default: {format_default(item.default)})"
        if meta["reload"]:
            options["help"] += " (read again on SIGHUP)"
        group.add_argument(flag_of(item), **options)
    p.add_argument("--export", choices=EXPORT_TARGETS, type=str.lower,
                   help="print an nginx.conf or haproxy.cfg that reproduces this balancer, then exit")
    p.add_argument("--version", action="version", version=f"load_balancer {__version__}")
    return p


def format_default(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def options_table() -> str:
    """The README's table of options, made from Config as --help is (tests/test_docs.py keeps the
    README's copy exact): ``python3 -c 'import load_balancer; print(load_balancer.options_table())'``."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for item in Config.settings():
        meta = item.metadata
        metavar = meta["metavar"] and (f" [{meta['metavar']}]" if meta.get("const") else f" {meta['metavar']}")
        option = f"`{flag_of(item)}{metavar or ''}`"
        if item.name == "backends":
            default = "`SERVER_URLS`"
        elif meta["type"] is bool:
            default = "off"
        elif item.default is None:
            default = "none"
        else:
            default = f"`{format_default(item.default)}`"
        text = meta["help"]
        if meta["choices"]:
            text += f": {', '.join(meta['choices'])}"
        if meta["reload"]:
            text += " (read again on SIGHUP)"
        rows.append(f"| {option} | {default} | {text.replace('|', chr(92) + '|')} |")
    rows.append("| `--export nginx\\|haproxy` | | print an equivalent nginx.conf or haproxy.cfg and exit |")
    rows.append("| `--version` | | print the version and exit |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command line (``python3 load_balancer.py``, ``python3 -m load_balancer`` and the
    ``load-balancer`` command). Exit codes: 0 after a stop signal, 1 when it cannot start (a busy
    port), 2 for a wrong flag, URL or file."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker-process"]:
        return worker_process(argv[1])
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    export = options.pop("export")
    if "backends" in options and options["backends_file"] is not None:
        parser.error("give --backend or --backends-file, not both")
    options = {name: tuple(value) if isinstance(value, list) else value for name, value in options.items()}
    try:
        config = Config(**options)
        check_tls_files(config)
    except ValueError as error:
        parser.error(str(error))
    if export:
        sys.stdout.write(export_config(config, export))
        return 0
    try:
        configure_logging(config)
    except OSError as error:
        parser.error(f"cannot open --access-log {config.access_log}: {describe_os_error(error)}")
    if config.workers > 1 and not (hasattr(socket, "SO_REUSEPORT") and fcntl):
        log.warning("--workers needs SO_REUSEPORT and fcntl, which this system lacks: one worker")
        config = replace(config, workers=1)
    try:
        if config.workers == 1:
            return serve(config, ready=lambda balancer: announce(config, balancer.port, balancer.admin_port))
        return supervise(config, ready=lambda config, control: announce(
            config, config.port, control.admin.server_address[1] if control.admin else None))
    except ListenError as error:
        sys.stderr.write(f"{parser.prog}: error: {error.strerror}\n")
        return 1


def check_tls_files(config: Config) -> None:
    """Load the certificate, key and CA files once before starting, so that a wrong one is one
    line and exit 2 rather than a failure in every worker (ValueError)."""
    for flag, load in (("--tls-cert/--tls-key", lambda: config.tls_cert and server_tls_context(
            config.tls_cert, config.tls_key)), ("--backend-ca", lambda: config.backend_ca and
                                                client_tls_context(config.backend_ca))):
        try:
            load()
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"cannot load {flag}: {describe_os_error(error)}") from None


def announce(config: Config, port: int, admin_port: int | None) -> None:
    host = f"[{config.host}]" if ":" in config.host else config.host
    scheme = "https" if config.tls_cert else "http"
    log.info("load_balancer %s listening on %s://%s:%d with %d worker%s, balancing over %s",
             __version__, scheme, host, port, config.workers, "" if config.workers == 1 else "s",
             ", ".join(config.backends))
    if admin_port is not None:
        log.info("admin on http://%s:%d/status", config.admin_host, admin_port)


if __name__ == "__main__":
    sys.exit(main())
