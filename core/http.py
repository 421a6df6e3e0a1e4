"""Polite HTTP: per-host rate limits, retries with exponential backoff, default timeouts.

Retries are urllib3's ``Retry`` (it already honours ``Retry-After`` and backs off
exponentially); this module adds the per-host pacing urllib3 does not have.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUSES = (429, 500, 502, 503, 504)


class HostRateLimiter:
    """Spaces requests to each host at least ``1/rate`` seconds apart, across threads."""

    def __init__(self, rate_per_host: float):
        self.interval = 1.0 / rate_per_host
        self._next_slot: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot.get(host, now))
            self._next_slot[host] = slot + self.interval
        delay = slot - now
        if delay > 0:
            time.sleep(delay)


class PoliteAdapter(HTTPAdapter):
    def __init__(self, limiter: HostRateLimiter, timeout: float, retry: Retry, pool_size: int):
        self.limiter = limiter
        self.timeout = timeout
        super().__init__(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        self.limiter.wait(urlsplit(request.url).netloc)
        return super().send(request, **kwargs)


class HttpClient:
    """Makes sessions that share one rate limiter, so every plugin is polite to every host."""

    def __init__(self, *, rate_per_host: float, timeout: float, retries: int, backoff: float,
                 user_agent: str, pool_size: int = 16):
        self.limiter = HostRateLimiter(rate_per_host)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.user_agent = user_agent
        self.pool_size = pool_size

    def retry(self, *, retry_post: bool) -> Retry:
        methods = set(Retry.DEFAULT_ALLOWED_METHODS) | ({"POST"} if retry_post else set())
        return Retry(total=self.retries, connect=self.retries, read=self.retries,
                     status=self.retries, backoff_factor=self.backoff, backoff_max=60,
                     status_forcelist=RETRY_STATUSES, allowed_methods=frozenset(methods),
                     respect_retry_after_header=True, raise_on_status=False)

    def session(self, *, retry_post: bool = False) -> requests.Session:
        session = requests.Session()
        adapter = PoliteAdapter(self.limiter, self.timeout, self.retry(retry_post=retry_post),
                                self.pool_size)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = self.user_agent
        return session
