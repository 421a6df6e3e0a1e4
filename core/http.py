"""Polite HTTP: per-host rate limits, retries with exponential backoff, default timeouts.

Retries are urllib3's ``Retry`` (it already honours ``Retry-After`` and backs off
exponentially); this module adds the per-host pacing urllib3 does not have.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .netguard import BoundedRetry, pool_classes

RETRY_STATUSES = (429, 500, 502, 503, 504)


class TokenBuckets:
    """Token buckets by key, handing out reservations: ``reserve`` takes a token now and
    says how long to wait before using it (tokens may go below zero, so waiters queue
    in order). With ``burst=1`` this spaces calls ``1/rate`` seconds apart.

    One instance serves a process; on a cluster one instance lives on the scheduler and
    every worker reserves there, so a limit holds for the whole cluster.
    """

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def reserve(self, key: str, rate: float, burst: float = 1.0) -> float:
        with self._lock:
            now = time.monotonic()
            tokens, when = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - when) * rate) - 1.0
            self._buckets[key] = (tokens, now)
        return 0.0 if tokens >= 0 else -tokens / rate


class HostRateLimiter:
    """Spaces requests to each host at least ``1/rate`` seconds apart, across threads (and,
    with a cluster's ``reserve``, across every worker of the cluster)."""

    def __init__(self, rate_per_host: float, reserve=None):
        self.rate = rate_per_host
        self.reserve = reserve or TokenBuckets().reserve
        self.rates: dict[str, float] = {}  # hosts that asked for less (robots.txt Crawl-delay)

    def slow_down(self, host: str, rate: float) -> None:
        """Never more than ``rate`` requests per second to ``host`` from here on."""
        self.rates[host] = min(rate, self.rates.get(host, self.rate), self.rate)

    def wait(self, host: str) -> None:
        delay = self.reserve(f"host:{host}", self.rates.get(host, self.rate), 1.0)
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
                 user_agent: str, pool_size: int = 16, reserve=None,
                 max_retry_after: float = 300.0, check_peer: bool = True):
        """``check_peer``: refuse connections whose address turns out not to be public
        (the downloader's pools; API sessions go to the recipe's own endpoints)."""
        self.max_retry_after = max_retry_after
        self.check_peer = check_peer
        self.limiter = HostRateLimiter(rate_per_host, reserve)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.user_agent = user_agent
        self.pool_size = pool_size
        self._proxies = {k: v for k, v in urllib.request.getproxies().items() if k != "no"}
        self.environment_proxies = bool(self._proxies)
        self._pools: dict[str, urllib3.PoolManager] | None = None
        self._pool_lock = threading.Lock()

    def pool(self, url: str) -> urllib3.PoolManager:
        """A urllib3 pool for ``url``: the downloader's lighter path (requests' per-request
        work is a third of a download's CPU), with the same retries, pacing and proxies."""
        with self._pool_lock:
            if self._pools is None:
                self._pools = {"direct": urllib3.PoolManager(
                    num_pools=64, maxsize=self.pool_size, headers={"User-Agent": self.user_agent},
                    retries=self.retry(retry_post=False),
                    timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))}
                self._pools["direct"].pool_classes_by_scheme = pool_classes(self.check_peer)
            proxies = self._proxies
        parts = urlsplit(url)
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
            with self._pool_lock:
                if proxy not in self._pools:
                    self._pools[proxy] = urllib3.ProxyManager(
                        proxy, num_pools=64, maxsize=self.pool_size,
                        headers={"User-Agent": self.user_agent},
                        retries=self.retry(retry_post=False),
                        timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))
                    self._pools[proxy].pool_classes_by_scheme = pool_classes(False)
                return self._pools[proxy]
        return self._pools["direct"]

    def retry(self, *, retry_post: bool) -> Retry:
        methods = set(Retry.DEFAULT_ALLOWED_METHODS) | ({"POST"} if retry_post else set())
        return BoundedRetry(total=self.retries, connect=self.retries, read=self.retries,
                            status=self.retries, backoff_factor=self.backoff, backoff_max=60,
                            status_forcelist=RETRY_STATUSES, allowed_methods=frozenset(methods),
                            respect_retry_after_header=True, raise_on_status=False,
                            max_retry_after=self.max_retry_after)

    def session(self, *, retry_post: bool = False) -> requests.Session:
        session = requests.Session()
        adapter = PoliteAdapter(self.limiter, self.timeout, self.retry(retry_post=retry_post),
                                self.pool_size)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = self.user_agent
        if not self.environment_proxies:
            # requests re-reads the whole environment for proxy settings on every request;
            # with none set there is nothing to find, and it costs ~0.4 ms a request.
            session.trust_env = False
        return session
