"""``openverse``: openly licensed images from the Openverse API (``/v1/images/``), every one
with its license, version, creator and landing page.

Modelled on Openverse's public API documentation (docs.openverse.org): anonymous use is
throttled (about one request a second, page_size at most 20); an application registered
for OAuth2 client credentials gets a bearer token from ``/v1/auth_tokens/token/`` and may
ask for up to 500 results a page. Searches go at most 20 pages deep, whatever the mode:
a term's ``count`` beyond that is not reachable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from harvest.core import (
    Bool,
    Choice,
    Float,
    Int,
    ListOf,
    Option,
    OptionError,
    PluginConfigError,
    Query,
    Record,
    Secret,
    Source,
    Str,
    hookimpl,
)

MAX_PAGES = 20
ANONYMOUS_PAGE_SIZE = 20
# Openverse's license codes -> the SPDX-style ids harvest records carry.
LICENSES = {"by": "CC-BY", "by-sa": "CC-BY-SA", "by-nc": "CC-BY-NC", "by-nd": "CC-BY-ND",
            "by-nc-sa": "CC-BY-NC-SA", "by-nc-nd": "CC-BY-NC-ND", "cc0": "CC0", "pdm": "PDM",
            "sampling+": "CC-Sampling-Plus", "nc-sampling+": "CC-NC-Sampling-Plus"}


def license_id(code: str | None, version: str | None) -> str | None:
    if not code:
        return None
    base = LICENSES.get(code.lower(), code.upper())
    if base in ("CC0", "PDM"):
        return f"{base}-1.0"
    return f"{base}-{version}" if version else base


class OpenverseSource(Source):
    """Openly licensed images from Openverse, with license, creator and landing page."""

    options = (
        Option("endpoint", Str(), "https://api.openverse.org", help="API base URL"),
        Option("client_id", Secret(), None,
               help="OAuth2 client id reference (registered applications; default anonymous)"),
        Option("client_secret", Secret(), None, help="OAuth2 client secret reference"),
        Option("license", ListOf(Choice(*LICENSES)), None,
               help="only these licenses, e.g. [by, by-sa, cc0]"),
        Option("license_type", ListOf(Choice("all", "all-cc", "commercial", "modification")),
               None, help="licenses allowing commercial use and/or modification"),
        Option("source", ListOf(Str()), None, help="only these providers, e.g. [flickr, wikimedia]"),
        Option("extension", ListOf(Str()), None, help="file types, e.g. [jpg, png]"),
        Option("aspect_ratio", ListOf(Choice("tall", "wide", "square")), None, help="image shapes to keep"),
        Option("size", ListOf(Choice("small", "medium", "large")), None, help="image sizes to keep"),
        Option("mature", Bool(), False, help="include results marked mature"),
        Option("count", Int(1), None, help="images per term and language"),
        Option("page_size", Int(1, 500), ANONYMOUS_PAGE_SIZE,
               help="results per page (at most 20 without client credentials)"),
        Option("requests_per_second", Float(0.01, 100), 1.0,
               help="pace of API requests (Openverse throttles anonymous use to about 1/s)"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        if (options.get("client_id") is None) != (options.get("client_secret") is None):
            raise OptionError("client_secret" if options.get("client_id") else "client_id",
                              "client_id and client_secret go together")
        if options.get("client_id") is None and options.get("page_size", 20) > ANONYMOUS_PAGE_SIZE:
            raise OptionError("page_size", f"at most {ANONYMOUS_PAGE_SIZE} without client "
                                           "credentials (Openverse answers 401)")

    @property
    def query_limit(self) -> int | None:
        return self.config["count"]

    def open(self) -> None:
        self.endpoint = self.config["endpoint"].rstrip("/")
        self.session = self.context.session()
        self.token: str | None = None
        self.token_expires = 0.0

    def _authorization(self) -> dict[str, str]:
        if self.config["client_id"] is None:
            return {}
        if self.token is None or time.time() > self.token_expires - 60:
            self.context.take(f"openverse:{self.endpoint}", self.config["requests_per_second"])
            response = self.session.post(f"{self.endpoint}/v1/auth_tokens/token/", data={
                "grant_type": "client_credentials",
                "client_id": self.config["client_id"].reveal(),
                "client_secret": self.config["client_secret"].reveal()})
            if response.status_code in (400, 401, 403):
                raise PluginConfigError(f"{self.context.name}: Openverse refused the client "
                                        f"credentials (HTTP {response.status_code})")
            response.raise_for_status()
            answer = response.json()
            self.token = answer["access_token"]
            self.token_expires = time.time() + float(answer.get("expires_in") or 3600)
        return {"Authorization": f"Bearer {self.token}"}

    def _params(self, query: Query, page: int) -> dict:
        params = {"q": query.text, "page": page, "page_size": self.config["page_size"],
                  "mature": str(self.config["mature"]).lower()}
        for name in ("license", "license_type", "source", "extension", "aspect_ratio", "size"):
            if self.config[name]:
                params[name] = ",".join(self.config[name])
        return params

    def records(self, query: Query | None) -> Iterator[Record]:
        for page in range(1, MAX_PAGES + 1):
            self.context.take(f"openverse:{self.endpoint}", self.config["requests_per_second"])
            response = self.session.get(f"{self.endpoint}/v1/images/",
                                        params=self._params(query, page),
                                        headers=self._authorization())
            if response.status_code == 401:
                raise PluginConfigError(f"{self.context.name}: Openverse refused the request "
                                        f"(HTTP 401): page_size over 20 needs client credentials")
            response.raise_for_status()
            answer = response.json()
            if not isinstance(answer, dict):
                raise RuntimeError("the API's answer is not a JSON object")
            results = answer.get("results")
            yield from self.each_item(results, lambda result: self._record(result, query), query)
            page_count = answer.get("page_count")
            if not isinstance(page_count, int) or page >= page_count or not results:
                return

    def _record(self, result: dict, query: Query) -> Record | None:
        """Raises (AttributeError, TypeError...) on a result that cannot be read."""
        if not result.get("id") or not result.get("url"):
            return None
        if not isinstance(result["url"], str):
            raise TypeError(f"url is a {type(result['url']).__name__}")
        tags = [t.get("name") for t in result.get("tags") or [] if isinstance(t, dict)]
        fields = {
            "title": result.get("title"),
            "license": license_id(result.get("license"), result.get("license_version")),
            "license_url": result.get("license_url"),
            "author": result.get("creator"),
            "author_url": result.get("creator_url"),
            "page_url": result.get("foreign_landing_url"),
            "provider": result.get("provider"),
            "provider_source": result.get("source"),
            "tags": [t for t in tags if t],
            "source_width": result.get("width"),
            "source_height": result.get("height"),
            "mature": result.get("mature"),
        }
        fields = {k: v for k, v in fields.items() if v not in (None, "", [])}
        return Record(source="openverse", source_id=str(result["id"]), url=result["url"],
                      query=query, fields=fields, personal={"author", "author_url"})


@hookimpl
def harvest_sources():
    return {"openverse": OpenverseSource}
