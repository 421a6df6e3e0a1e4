"""Downloading one image to a temporary file, and checking that it is a sound image."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import itertools
import os
import socket
import sys
import threading
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from PIL import Image
from urllib3.util import parse_url

from ..errors import DiskFull, RecordError, disk_full
from ..output.storage import folder_fd
from ..record import FileInfo
from .analyses import run_analyses
from .http import HttpClient
from .netguard import (
    DEADLINES,
    DeadlinePassed,
    RefusedAddress,
    RetryAfterTooLong,
    address_problem,
)
from .optouts import MAX_FILE_BYTES, OptOuts, noindex, tdm_reserved
from .shaping import ImageSettings, Shaped, check_size, reencodes, shape_in_memory
from .shaping import shape as shape_image

CHUNK = 64 * 1024
PERMANENT_STATUSES = {400, 401, 403, 404, 410, 451}
MAX_REDIRECTS = 5
OPT_OUT_DIRECTIVES = ("noai", "noimageai")


def ai_opt_out(header: str) -> str | None:
    """The first AI opt-out directive in an X-Robots-Tag header, as img2dataset reads it.

    Directives may be scoped to a user agent (``otherbot: noai``); harvest honours
    unscoped ones and any scoped to it.
    """
    for part in header.split(","):
        directive = part.strip().lower()
        if ":" in directive:
            agent, _, directive = directive.partition(":")
            if agent.strip() not in ("harvest", "*"):
                continue
        if directive.strip() in OPT_OUT_DIRECTIVES:
            return directive.strip()
    return None


def refuse_private(url: str) -> None:
    """Refuses URLs whose host resolves to a private, loopback, link-local or otherwise
    non-public address: a result page must not make harvest fetch from the local network.

    The host is read with urllib3's parser, the one the connection uses, so that the
    check and the connection cannot disagree on it; the connection checks the address
    it reached again (see ``netguard``), which catches names that change their answer.
    """
    host = _host(url)
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise RecordError(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}",
                          permanent=False) from None
    for info in infos:
        problem = address_problem(info[4][0])
        if problem:
            raise RecordError(f"refused: {host} resolves to {problem} "
                              f"(run.allow_private_addresses allows it)")


def _host(url: str) -> str:
    authority = url.split("://", 1)[-1].split("/", 1)[0]
    if "\\" in authority:
        # urllib.parse and urllib3 read such a host differently: refuse it outright.
        raise RecordError("bad URL: backslash in the host part")
    try:
        host = parse_url(url).host
    except ValueError as exc:
        raise RecordError(f"bad URL: {exc}") from None
    if not host:
        raise RecordError("bad URL: no host")
    return host.strip("[]")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Bytes per pixel of Pillow's decoded storage: every multi-band image takes four.
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2}


class DecodeBudget:
    """Bounds the memory that decoding takes across all download threads at once.

    Sixteen threads each decoding a 10000 x 10000 RGBA PNG (400 MB each, under the pixel
    guard) would need 6.4 GB together; with a budget, a decode waits until the others
    leave room. One image larger than the whole budget still decodes, alone.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.condition = threading.Condition()

    @contextmanager
    def reserve(self, amount: int):
        amount = min(amount, self.limit)
        with self.condition:
            while self.used + amount > self.limit:
                self.condition.wait()
            self.used += amount
        try:
            yield
        finally:
            with self.condition:
                self.used -= amount
                self.condition.notify_all()


@functools.cache
def _prepare_process() -> None:
    """Once per process that checks images. The fetcher checks width x height against
    max_pixels from the header, before any decode; Pillow's global guard would fire
    first, at its own limit, with its own words."""
    Image.MAX_IMAGE_PIXELS = None
    if sys.platform.startswith("linux"):
        map_large_blocks()


def map_large_blocks() -> None:
    """Makes glibc give decoded images' memory back when they are freed.

    glibc raises its mmap threshold (up to 32 MB) after the first large block is freed;
    from then on Pillow's 16 MB image blocks come from per-thread heaps that keep them, so
    sixteen download threads end up holding sixteen decodes' worth of memory between
    decodes (measured: 1.3 GB with a 300 MB budget, 0.3 GB with this). A fixed 1 MB
    threshold maps each large block and unmaps it on free. Elsewhere: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def decode_bytes(width: int, height: int, mode: str, reduce: int = 1) -> int:
    return (width // reduce + 1) * (height // reduce + 1) * _BYTES_PER_PIXEL.get(mode, 4)


@dataclass
class Fetched(Shaped):
    """A checked image waiting in the temporary folder to be placed; a download process
    sends it back whole."""

    temp_path: Path = field(kw_only=True)
    # The enrichers' picture analyses, by name (see ``analyses``): computed here, in the
    # download worker, on the file as it will be stored.
    analyses: dict = field(default_factory=dict, kw_only=True)


def _waiting(temp_path: Path, shaped: Shaped | None, size: int, sha256: str, width: int,
             height: int, image_format: str) -> Fetched:
    """The checked image at ``temp_path``: as ``images:`` shaped it, or as downloaded."""
    shaped = shaped or Shaped(FileInfo("", size, sha256, width, height, image_format))
    return Fetched(**vars(shaped), temp_path=temp_path)


class Fetcher:
    """Thread-safe: every worker thread shares the HTTP client's urllib3 pools and rate limiter."""

    def __init__(self, http: HttpClient, temp_dir: Path, *, max_bytes: int, max_pixels: int,
                 verify: bool = True, allow_private: bool = False, respect_opt_outs: bool = True,
                 deadline: float = 120.0, allow_file_urls: bool = False,
                 decode_memory: int | None = None, images: ImageSettings | None = None,
                 respect_robots: bool = False, respect_tdmrep: bool = False,
                 respect_noindex: bool = False, share: int = 1, max_crawl_delay: float = 60.0,
                 analyses: tuple[str, ...] = ()):
        self.deadline = deadline
        self.analyses = tuple(analyses)
        self.max_crawl_delay = max_crawl_delay
        self.on_notice = None  # set by the engine: a line for the run's summary
        self.images = images if images is not None and images.active else None
        self.respect_noindex = respect_noindex
        self.respect_tdmrep = respect_tdmrep
        self.agent = (http.user_agent or "harvest").split("/")[0].strip().lower() or "harvest"
        self.opt_outs = None
        if respect_robots or respect_tdmrep:
            self.opt_outs = OptOuts(
                self._small_file, Path(temp_dir).parent / "opt-outs.sqlite", self.agent,
                robots=respect_robots, tdmrep=respect_tdmrep,
                on_crawl_delay=lambda host, delay: http.limiter.slow_down(
                    host, 1 / self._crawl_delay(host, delay) / share))
        self.budget = DecodeBudget(decode_memory) if decode_memory else None
        _prepare_process()
        self.allow_file_urls = allow_file_urls
        self.allow_private = allow_private
        self.respect_opt_outs = respect_opt_outs
        self.http = http
        self.temp_dir = temp_dir
        self.temp_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.temp_names = itertools.count()  # next() on it is atomic under the GIL
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.verify = verify

    @classmethod
    def for_run(cls, settings, temp_dir: Path, *, http: HttpClient | None = None,
                share: int = 1, threads: int | None = None, reserve=None,
                analyses: tuple[str, ...] = ()) -> Fetcher:
        """The downloader a run's settings (``recipe.RunSettings``) describe. ``share``:
        the number of processes downloading for the run; this one gets that fraction of
        the decode memory, and of the per-host rate unless ``reserve`` paces every
        process together. ``http``: a client already made."""
        rate_share = 1 if reserve is not None else share
        http = http or HttpClient(
            rate_per_host=settings.rate_per_host / rate_share, timeout=settings.timeout,
            retries=settings.retries, backoff=settings.backoff,
            user_agent=settings.user_agent, pool_size=threads or settings.concurrency,
            reserve=reserve, max_retry_after=settings.max_retry_after,
            check_peer=not settings.allow_private_addresses,
            api_deadline=settings.api_deadline, max_api_answer=settings.max_api_answer)
        return cls(http, temp_dir, max_bytes=settings.max_bytes,
                   max_pixels=settings.max_pixels, verify=settings.verify_images,
                   allow_private=settings.allow_private_addresses,
                   respect_opt_outs=settings.respect_opt_outs,
                   deadline=settings.download_deadline,
                   allow_file_urls=settings.allow_file_urls,
                   decode_memory=max(1, settings.decode_memory // share),
                   images=settings.images, respect_robots=settings.respect_robots,
                   respect_tdmrep=settings.respect_tdmrep,
                   respect_noindex=settings.respect_noindex, share=rate_share,
                   max_crawl_delay=settings.max_crawl_delay, analyses=analyses)

    def fetch(self, url: str, *, local_files: bool = False,
              expect_sha1: str | None = None) -> Fetched:
        """``local_files``: the record comes from a source that reads the local disk by
        design (a folder the recipe names); anything else needs ``run.allow_file_urls``."""
        fetched = self._fetch(url, local_files, expect_sha1)
        if self.analyses:
            fetched.analyses = run_analyses(self.analyses, fetched.temp_path)
        return fetched

    def _fetch(self, url: str, local_files: bool, expect_sha1: str | None) -> Fetched:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            if not (local_files or self.allow_file_urls):
                raise RecordError("refused: file: URL (run.allow_file_urls allows it)")
        elif scheme not in ("http", "https"):
            raise RecordError(f"refused: {scheme or 'no'} scheme (only http and https)")
        if self.images is not None and self.images.blur_faces:
            return self._fetch_in_memory(url, scheme, expect_sha1)
        temp_path, handle = self._new_temp()
        try:
            with os.fdopen(handle, "wb", buffering=0) as out:  # 64 KB writes: no buffer
                if scheme == "file":
                    size, digest = self._copy_local(url, out)
                else:
                    size, digest = self._guarded_download(url, out, expect_sha1)
            shaped = None
            if self.images is None:
                width, height, image_format = inspect_image(temp_path, self.max_pixels,
                                                            self.verify, self.budget)
            else:
                # The header first: when the image is to be re-encoded, that decode is the
                # check (a truncated file fails it), and a second one would be waste.
                width, height, image_format = inspect_image(temp_path, self.max_pixels, False)
                check_size(self.images, width, height)
                if reencodes(self.images, width, height, image_format):
                    shaped = shape_image(temp_path, self.images, width, height, image_format,
                                         size, digest, self._room, opener=self._open_temp)
                elif self.verify:
                    inspect_image(temp_path, self.max_pixels, True, self.budget)
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise
        return _waiting(temp_path, shaped, size, digest, width, height, image_format)

    def _new_temp(self) -> tuple[Path, int]:
        """A new temporary file for a download, and its open descriptor. The name comes
        from a counter, not mkstemp's random tries (a tenth of a download's CPU); O_EXCL
        still refuses to reuse anything already there."""
        name = os.path.join(self.temp_dir, f"{self.temp_prefix}{next(self.temp_names)}.part")
        return Path(name), self._open_temp(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    def _open_temp(self, path: str, flags: int) -> int:
        """Opens a file of the temporary folder for writing, reached folder by folder
        from the output folder without following a link (the folder swapped for a link
        mid-run must not take a download elsewhere); an ``open`` opener."""
        root = self.temp_dir.parent.parent
        try:
            folder = folder_fd(root, f"{self.temp_dir.parent.name}/{self.temp_dir.name}")
        except ValueError as exc:
            raise RecordError(str(exc), permanent=False) from None
        try:
            return os.open(os.path.basename(path), flags | getattr(os, "O_NOFOLLOW", 0), 0o644,
                           dir_fd=folder)
        finally:
            os.close(folder)

    def _fetch_in_memory(self, url: str, scheme: str, expect_sha1: str | None) -> Fetched:
        """For ``blur_faces``: the download is held in memory (``max_bytes`` bounds it),
        its faces blurred, and only the result written to a temporary file."""
        buffer = io.BytesIO()
        if scheme == "file":
            size, digest = self._copy_local(url, buffer)
        else:
            size, digest = self._guarded_download(url, buffer, expect_sha1)
        data = buffer.getvalue()
        del buffer
        width, height, image_format = inspect_image(data, self.max_pixels, False)
        check_size(self.images, width, height)
        stored, shaped = shape_in_memory(data, self.images, width, height, image_format,
                                         digest, self._room)
        temp_path, handle = self._new_temp()
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(stored)
        except OSError as exc:
            temp_path.unlink(missing_ok=True)
            if disk_full(exc):
                raise DiskFull(self.temp_dir.parent.parent) from None
            raise
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise
        return _waiting(temp_path, shaped, size, digest, width, height, image_format)

    def _room(self, amount: int):
        return self.budget.reserve(amount) if self.budget is not None else nullcontext()

    def _copy_local(self, url: str, out) -> tuple[int, str]:
        path = Path(unquote(urlsplit(url).path))
        try:
            with path.open("rb") as src:
                return self._stream(iter(lambda: src.read(CHUNK), b""), out)
        except FileNotFoundError:
            raise RecordError(f"file not found: {path}") from None
        except OSError as exc:
            raise RecordError(f"cannot read {path}: {exc.strerror}") from None

    def _guarded_download(self, url: str, out, expect_sha1: str | None = None) -> tuple[int, str]:
        DEADLINES.start(self.deadline, group=self)
        try:
            return self._download(url, out, expect_sha1)
        except RetryAfterTooLong as exc:
            raise RecordError(str(exc), permanent=False) from None
        except RefusedAddress as exc:
            raise RecordError(str(exc)) from None
        except DeadlinePassed:
            raise self._late() from None
        except RecordError:
            if DEADLINES.passed() is not None:
                # The watchdog shut the socket: whatever the read made of that, it is late.
                raise self._late() from None
            raise
        finally:
            DEADLINES.finish()

    def _crawl_delay(self, host: str, asked: float) -> float:
        """The seconds between requests to ``host``: its robots.txt Crawl-delay, but no
        more than ``run.max_crawl_delay`` (99999 s would park the run for a day)."""
        if asked <= self.max_crawl_delay:  # also false for NaN
            return asked
        if self.on_notice is not None:
            self.on_notice(f"robots.txt of {host} asks for Crawl-delay {asked:g} s; "
                           f"waiting run.max_crawl_delay ({self.max_crawl_delay:g} s) instead")
        return self.max_crawl_delay

    def _small_file(self, url: str) -> tuple[int, bytes]:
        """A host's robots.txt or tdmrep.json: (status, body), the body cut one byte past
        MAX_FILE_BYTES (so that a file too large to be read whole can be told apart)."""
        if not self.allow_private:
            refuse_private(url)
        self.http.limiter.wait(urlsplit(url).netloc)
        retries = urllib3.Retry(total=2, connect=1, read=1, redirect=5, status=0,
                                raise_on_redirect=False, raise_on_status=False)
        response = self.http.pool(url).request("GET", url, preload_content=False,
                                               retries=retries)
        body = b""
        for chunk in response.stream(CHUNK):
            body += chunk
            if len(body) > MAX_FILE_BYTES:
                response.close()  # the rest is not read: the connection cannot be reused
                break
        response.release_conn()
        declared = response.headers.get("Content-Length", "")
        cut = declared.isdigit() and len(body) < min(int(declared), MAX_FILE_BYTES + 1)
        if DEADLINES.passed() is not None or cut:
            # A file cut off (the watchdog closed a dripping socket) is not an empty one:
            # an empty robots.txt would allow everything.
            return None, b"cut off before its end"
        return response.status, body[:MAX_FILE_BYTES + 1]

    def opted_out(self, url: str) -> str | None:
        """Why the image's host now refuses it (robots.txt, TDMRep, X-Robots-Tag), asked
        afresh: ``harvest export --recheck-opt-outs``. None when it may still be used."""
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            return None
        DEADLINES.start(self.deadline, group=self)
        try:
            if not self.allow_private:
                refuse_private(url)
            if self.opt_outs is not None:
                self.opt_outs.check(url)
            self.http.limiter.wait(urlsplit(url).netloc)
            retries = urllib3.Retry(total=2, redirect=5, status=0, raise_on_status=False)
            # GET, headers only (the body is not read): HEAD is not served everywhere.
            response = self.http.pool(url).request("GET", url, retries=retries,
                                                   preload_content=False)
            headers = response.headers
            response.close()
            response.release_conn()
            return self._header_opt_out(headers)
        except RecordError as exc:
            return exc.reason if exc.permanent else None  # unreachable now: not an opt-out
        except (urllib3.exceptions.HTTPError, OSError):
            return None
        finally:
            DEADLINES.finish()

    def _header_opt_out(self, headers) -> str | None:
        """The opt-out an image response's headers declare, among those the run obeys."""
        robots_tag = headers.get("X-Robots-Tag", "")
        if self.respect_opt_outs and (directive := ai_opt_out(robots_tag)):
            return f"opted out of AI use: X-Robots-Tag {directive}"
        if self.respect_tdmrep and tdm_reserved(headers):
            return "TDM rights reserved: tdm-reservation header"
        if self.respect_noindex and (directive := noindex(robots_tag, self.agent)):
            return f"opted out of indexing: X-Robots-Tag {directive}"
        return None

    def abandon(self) -> None:
        """Ends every download of this fetcher now (the run is stopping)."""
        DEADLINES.expire_all(group=self)

    def _late(self) -> RecordError:
        return RecordError(f"took longer than run.download_deadline ({self.deadline:g} s)",
                           permanent=False)

    def _download(self, url: str, out, expect_sha1: str | None = None) -> tuple[int, str]:
        for _ in range(MAX_REDIRECTS + 1):
            # Redirects are followed here, not by the library, so that every hop is checked.
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise RecordError(f"refused: redirect to a {scheme or 'relative'} URL "
                                  f"(only http and https)")
            if not self.allow_private:
                refuse_private(url)
            if self.opt_outs is not None:
                self.opt_outs.check(url)
            host = urlsplit(url).netloc
            self.http.limiter.wait(host)
            try:
                response = self.http.pool(url).request("GET", url, preload_content=False,
                                                       redirect=False)
            except urllib3.exceptions.MaxRetryError as exc:
                raise RecordError(f"gave up after retries: {_root_cause(exc)}",
                                  permanent=False) from None
            except (urllib3.exceptions.TimeoutError, TimeoutError):
                raise RecordError("timed out", permanent=False) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise RecordError(f"connection failed: {_root_cause(exc)}", permanent=False) from None
            except ValueError as exc:
                raise RecordError(f"bad URL: {exc}") from None
            location = response.headers.get("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                response.drain_conn()
                response.release_conn()
                url = urljoin(url, location)
                continue
            break
        else:
            raise RecordError(f"more than {MAX_REDIRECTS} redirects")
        clean = False
        try:
            opted_out = self._header_opt_out(response.headers)
            if opted_out:
                raise RecordError(opted_out)
            if response.status != 200:
                permanent = response.status in PERMANENT_STATUSES
                response.drain_conn()  # error pages are small; the connection stays usable
                clean = True
                raise RecordError(f"HTTP {response.status}", permanent=permanent)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type and not (content_type.startswith("image/")
                                     or content_type == "application/octet-stream"):
                raise RecordError(f"not an image: Content-Type {content_type}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise RecordError(f"too large: {int(declared)} bytes > max_bytes {self.max_bytes}")
            try:
                result = self._stream(response.stream(CHUNK), out, expect_sha1)
                clean = True
                return result
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError,
                    OSError) as exc:
                raise RecordError(f"connection broken mid-download: {_root_cause(exc)}",
                                  permanent=False) from None
        finally:
            if not clean:
                # A body left unread (refused, too large, broken) must not reach the next
                # request on this connection: close it rather than return it to the pool.
                response.close()
            response.release_conn()

    def _stream(self, chunks, out, expect_sha1: str | None = None) -> tuple[int, str]:
        digest = hashlib.sha256()
        sha1 = hashlib.sha1(usedforsecurity=False) if expect_sha1 else None
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.max_bytes:
                raise RecordError(f"too large: over max_bytes {self.max_bytes}")
            digest.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                if disk_full(exc):
                    raise DiskFull(self.temp_dir.parent.parent) from None
                raise
        if size == 0:
            raise RecordError("empty response")
        if sha1 is not None and sha1.hexdigest() != expect_sha1.lower():
            raise RecordError("not the file the source described: its SHA-1 differs",
                              permanent=False)
        return size, digest.hexdigest()


def inspect_image(path: Path | bytes, max_pixels: int, full_decode: bool = True,
                  budget: DecodeBudget | None = None) -> tuple[int, int, str]:
    """Width, height and format of a sound image, or RecordError saying what is wrong.
    ``path``: a file, or the image's bytes.

    The pixel count is checked from the header before anything is decoded (the
    decompression-bomb guard); then ``verify`` checks the structure and a reduced-size
    decode (``draft``) reads the whole compressed stream, which catches truncated JPEGs
    that ``verify`` alone lets through. ``budget`` bounds the memory of the decodes
    running at once.
    """
    room = budget.reserve if budget is not None else (lambda amount: nullcontext())
    if isinstance(path, bytes):
        data = path
        path = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                image_format = image.format or ""
                if width * height > max_pixels:
                    raise RecordError(f"decompression-bomb guard: {width}x{height} pixels "
                                      f"> max_pixels {max_pixels}")
                if image_format == "JPEG" and full_decode:
                    # JPEG's verify() checks nothing the decode below does not; one open.
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    with room(decode_bytes(width, height, image.mode, 8)):
                        image.load()
                    return width, height, image_format
                mode = image.mode
                image.verify()
            if full_decode:
                if isinstance(path, io.BytesIO):
                    path = io.BytesIO(data)
                with Image.open(path) as image, room(decode_bytes(width, height, mode)):
                    image.load()
    except RecordError:
        raise
    except Image.DecompressionBombError as exc:
        raise RecordError(f"decompression-bomb guard: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise RecordError(f"decompression-bomb guard: {exc}") from None
    except Image.UnidentifiedImageError:
        raise RecordError("not an image: Pillow cannot identify it") from None
    except OSError as exc:
        if exc.errno is None:  # Pillow's own (a truncated file): the image is at fault
            raise RecordError(f"corrupt image: {exc}") from None
        # The file system's: the download is sound, the folder was tampered with.
        raise RecordError(f"cannot read the download back: {exc.strerror}",
                          permanent=False) from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise RecordError(f"corrupt image: {exc}") from None
    return width, height, image_format


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    reason = getattr(exc, "reason", None)
    return str(reason or exc).splitlines()[0][:200]
