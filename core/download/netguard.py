"""Guards on every download: only public addresses, a total deadline, bounded retry waits.

Three attacks shape this module. A URL that two parsers read differently
(``http://127.0.0.1\\@example.com/``) or a name that resolves to a public address when
checked and to a private one when connected (DNS rebinding) would let a URL list reach
the local network; so the address is checked on the socket itself, after it connects
and before a byte is sent. A server that drips one byte a second never trips a read
timeout; so each download has a deadline, enforced by a watchdog thread that shuts the
socket down. A server that answers ``Retry-After: 99999`` would park a thread for a day;
so a retry wait longer than the cap fails the record (transiently) instead.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import socket
import threading
import time

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local use): the last 32 bits are IPv4.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 6145 IPv4-translated


class RefusedAddress(Exception):
    """A connection to a non-public address, refused before any request went out."""


class RetryAfterTooLong(Exception):
    def __init__(self, seconds: float, limit: float):
        super().__init__(f"server asked to retry after {seconds:.0f} s, more than "
                         f"run.max_retry_after ({limit:g} s)")


class DeadlinePassed(Exception):
    pass


def address_problem(address: str) -> str | None:
    """Why ``address`` (an IP literal) is not a public one, or None when it is.

    IPv6 forms that carry an IPv4 address (mapped, compatible, translated, NAT64, 6to4,
    Teredo) are judged by the IPv4 address they lead to: Python calls ``::127.0.0.1``
    and ``64:ff9b::7f00:1`` global, but a dual-stack host or a NAT64 gateway reaches
    127.0.0.1 through them.
    """
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (int(ip) >> 32 == 0 or ip in _SIIT or ip in _NAT64[0]
                                 or ip in _NAT64[1]):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip in _NAT64[1]:
            return f"non-public address {ip}"
        if embedded is not None and not embedded.is_global:
            return f"non-public address {ip} (IPv4 {embedded})"
    if not ip.is_global or ip.is_multicast:
        return f"non-public address {ip}"
    return None


def _check_peer(sock: socket.socket, host: str) -> None:
    try:
        peer = sock.getpeername()[0]
    except OSError:
        return  # not connected: the request fails on its own
    problem = address_problem(peer)
    if problem:
        sock.close()
        raise RefusedAddress(f"refused: {host} resolves to {problem} "
                             f"(run.allow_private_addresses allows it)")


class Deadlines:
    """Per-thread download deadlines, enforced by one watchdog thread.

    A download thread calls ``start(seconds)``; every connection it waits on is
    ``watch``ed; when the time is up the watchdog shuts those sockets down, which wakes
    the blocked read, and ``passed()`` tells the thread why its read failed.
    ``expire_all`` does the same at once for a group of threads (a stop request).
    """

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, dict]] = []
        self._order = itertools.count()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._entries: dict[int, dict] = {}

    def start(self, seconds: float, group: object = None) -> None:
        entry = {"deadline": time.monotonic() + seconds, "sockets": [], "passed": False,
                 "seconds": seconds, "group": group}
        key = next(self._order)
        entry["key"] = key
        self._local.entry = entry
        with self._lock:
            self._entries[key] = entry
            if len(self._heap) > 2 * len(self._entries) + 1024:
                # Finished downloads leave their entries behind until their deadline;
                # at a thousand downloads a second that would be a lot of them.
                self._heap = [item for item in self._heap if item[1] in self._entries]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (entry["deadline"], key, entry))
            earliest = self._heap[0][1] == key
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="deadlines", daemon=True)
                self._thread.start()
        if earliest:
            self._wake.set()

    def finish(self) -> None:
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        if entry is not None:
            with self._lock:
                self._entries.pop(entry["key"], None)
                entry["sockets"] = []

    def watch(self, sock: socket.socket | None) -> None:
        entry = getattr(self._local, "entry", None)
        if entry is None or sock is None:
            return
        with self._lock:
            if entry["passed"]:
                _shut(sock)
            else:
                entry["sockets"].append(sock)

    def remaining(self) -> float | None:
        entry = getattr(self._local, "entry", None)
        if entry is None:
            return None
        return entry["deadline"] - time.monotonic()

    def passed(self) -> float | None:
        """The deadline in seconds when this thread's download ran out of time."""
        entry = getattr(self._local, "entry", None)
        return entry["seconds"] if entry is not None and entry["passed"] else None

    def expire_all(self, group: object = None) -> None:
        """Expires now every deadline of ``group`` (all when None)."""
        with self._lock:
            for entry in self._entries.values():
                if group is None or entry["group"] is group:
                    self._expire(entry)

    def _expire(self, entry: dict) -> None:
        entry["passed"] = True
        for sock in entry["sockets"]:
            _shut(sock)
        entry["sockets"] = []

    def _watch(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, key, entry = heapq.heappop(self._heap)
                    if key in self._entries:
                        self._expire(entry)
                wait = self._heap[0][0] - now if self._heap else 1.0
            self._wake.wait(min(max(wait, 0.01), 1.0))
            self._wake.clear()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


DEADLINES = Deadlines()


class _Watched:
    """Mixed into urllib3's connections: the peer address check and the deadline watch."""

    check_peer = True

    def _new_conn(self):
        sock = super()._new_conn()
        if self.check_peer and not self.proxy:
            _check_peer(sock, self.host)
        return sock

    def getresponse(self):
        DEADLINES.watch(self.sock)
        return super().getresponse()


class _WatchedHTTP(_Watched, HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, HTTPSConnection):
    pass


class _OpenHTTP(_WatchedHTTP):
    check_peer = False


class _OpenHTTPS(_WatchedHTTPS):
    check_peer = False


def pool_classes(check_peer: bool) -> dict[str, type]:
    """``PoolManager.pool_classes_by_scheme`` whose connections are guarded."""
    http_cls, https_cls = (_WatchedHTTP, _WatchedHTTPS) if check_peer else (_OpenHTTP, _OpenHTTPS)
    http_pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,),
                     {"ConnectionCls": http_cls})
    https_pool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,),
                      {"ConnectionCls": https_cls})
    return {"http": http_pool, "https": https_pool}


class BoundedRetry(Retry):
    """urllib3's Retry with two bounds: a Retry-After longer than ``max_retry_after``
    gives up at once, and no wait runs past the download's deadline."""

    def __init__(self, *args, max_retry_after: float = 300.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_retry_after = max_retry_after
        # urllib3 clamps Retry-After to this (6 h by default) before we see it.
        self.retry_after_max = 10**9

    def new(self, **kw) -> BoundedRetry:
        retry = super().new(**kw)
        retry.max_retry_after = self.max_retry_after
        return retry

    def sleep_for_retry(self, response) -> bool:
        retry_after = self.get_retry_after(response)
        if not retry_after:
            return False
        if retry_after > self.max_retry_after:
            raise RetryAfterTooLong(retry_after, self.max_retry_after)
        _bounded_sleep(retry_after)
        return True

    def _sleep_backoff(self) -> None:
        backoff = self.get_backoff_time()
        if backoff > 0:
            _bounded_sleep(backoff)


def _bounded_sleep(seconds: float) -> None:
    remaining = DEADLINES.remaining()
    if remaining is not None and seconds > remaining:
        raise DeadlinePassed()
    time.sleep(seconds)

