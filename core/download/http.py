"""Polite HTTP: per-host rate limits, retries with exponential backoff, default timeouts.

Retries are urllib3's ``Retry`` (it already honours ``Retry-After`` and backs off
exponentially); this module adds the per-host pacing urllib3 does not have, and the
bounds on every API call a plugin's session makes: a deadline for the whole answer (a
read timeout restarts on each byte, so a server dripping one byte a second never trips
it), a cap on the answer's size (read in chunks, never whole into memory first), and for
a source, a cap on the calls and on the time one search may spend waiting on them.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .netguard import DEADLINES, BoundedRetry, NameNotResolved, UnresolvedNames, pool_classes

RETRY_STATUSES = (429, 500, 502, 503, 504)
ANSWER_CHUNK = 64 * 1024


class ApiLimitReached(requests.exceptions.RequestException):
    """An API call or a search went past one of the run's bounds (the reason says which)."""


class HostNotResolved(requests.exceptions.ConnectionError):
    """An API host whose name did not resolve (``NameNotResolved``), as requests raises."""

    reason_is_message = True


class SearchBudget:
    """One search's share of an API: at most ``max_calls`` calls, and at most ``seconds``
    spent waiting on their answers (not on the downloads the search feeds, which may
    hold it back for hours). The engine starts it at each search of its source."""

    def __init__(self, max_calls: int, seconds: float):
        self.max_calls = max_calls
        self.seconds = seconds
        self.calls = 0
        self.waited = 0.0
        self.active = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self.calls, self.waited, self.active = 0, 0.0, True

    def stop(self) -> None:
        with self._lock:
            self.active = False

    def charge(self) -> None:
        """Counts a call about to go out; raises when the search has had its share."""
        with self._lock:
            if not self.active:
                return
            if self.calls >= self.max_calls:
                raise ApiLimitReached(f"search cut short after {self.calls} API calls "
                                      f"(run.max_api_calls)")
            if self.waited >= self.seconds:
                raise ApiLimitReached(f"search cut short after {self.waited:.0f} s waiting "
                                      f"on the API (run.search_deadline {self.seconds:g} s)")
            self.calls += 1

    def waited_for(self, seconds: float) -> None:
        with self._lock:
            self.waited += seconds


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
    def __init__(self, limiter: HostRateLimiter, timeout: float, retry: Retry, pool_size: int,
                 *, deadline: float = 120.0, max_answer: int = 32_000_000,
                 budget: SearchBudget | None = None):
        self.limiter = limiter
        self.timeout = timeout
        self.deadline = deadline
        self.max_answer = max_answer
        self.budget = budget
        super().__init__(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        # Connections the deadline watchdog can shut (API endpoints are the recipe's own:
        # no check of the peer's address).
        self.poolmanager.pool_classes_by_scheme = pool_classes(False)

    def send(self, request, **kwargs):
        """The answer whole (unless ``stream``), within ``deadline`` seconds from the first
        byte sent to the last received, retries included, and at most ``max_answer`` bytes."""
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if self.budget is not None:
            self.budget.charge()
        self.limiter.wait(urlsplit(request.url).netloc)
        started = time.monotonic()
        own_deadline = DEADLINES.remaining() is None  # else a download's deadline governs
        if own_deadline:
            DEADLINES.start(self.deadline)
        try:
            response = super().send(request, **{**kwargs, "stream": True})
            if not kwargs.get("stream"):
                self._read_answer(response)
            return response
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError):
            if own_deadline and DEADLINES.passed() is not None:
                raise ApiLimitReached(f"API answer took longer than run.api_deadline "
                                      f"({self.deadline:g} s)") from None
            cause = sys.exc_info()[1]
            if cause is not None and cause.args and isinstance(cause.args[0], NameNotResolved):
                raise HostNotResolved(str(cause.args[0]), request=request) from None
            raise
        finally:
            if own_deadline:
                DEADLINES.finish()
            if self.budget is not None:
                self.budget.waited_for(time.monotonic() - started)

    def _read_answer(self, response) -> None:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_answer:
            response.close()
            raise self._too_large()
        body = bytearray()
        for chunk in response.iter_content(ANSWER_CHUNK):  # decoded: a gzip bomb counts
            body += chunk
            if len(body) > self.max_answer:
                response.close()
                raise self._too_large()
        response._content = bytes(body)  # what requests' own read would have set

    def _too_large(self) -> ApiLimitReached:
        return ApiLimitReached(f"API answer larger than run.max_api_answer "
                               f"({self.max_answer:,} bytes)")


class HttpClient:
    """Makes sessions that share one rate limiter, so every plugin is polite to every host."""

    def __init__(self, *, rate_per_host: float, timeout: float, retries: int, backoff: float,
                 user_agent: str, pool_size: int = 16, reserve=None,
                 max_retry_after: float = 300.0, check_peer: bool = True,
                 api_deadline: float = 120.0, max_api_answer: int = 32_000_000):
        """``check_peer``: refuse connections whose address turns out not to be public
        (the downloader's pools; API sessions go to the recipe's own endpoints).
        ``api_deadline``, ``max_api_answer``: the bounds of each call of a session."""
        self.api_deadline = api_deadline
        self.max_api_answer = max_api_answer
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
        self.unresolved = UnresolvedNames()

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
                            max_retry_after=self.max_retry_after, unresolved=self.unresolved)

    def session(self, *, retry_post: bool = False,
                budget: SearchBudget | None = None) -> requests.Session:
        """``budget``: the calls and waiting time the current search may still spend."""
        session = requests.Session()
        adapter = PoliteAdapter(self.limiter, self.timeout, self.retry(retry_post=retry_post),
                                self.pool_size, deadline=self.api_deadline,
                                max_answer=self.max_api_answer, budget=budget)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = self.user_agent
        if not self.environment_proxies:
            # requests re-reads the whole environment for proxy settings on every request;
            # with none set there is nothing to find, and it costs ~0.4 ms a request.
            session.trust_env = False
        return session
